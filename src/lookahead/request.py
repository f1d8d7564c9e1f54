"""A generation request: what to continue, when to stop, how to choose tokens, and what happened.

`Request` is the one object the decode core, `Engine.generate`/`stream` and the server share.
`Engine.request(...)` builds it (tokenizing and checking the prompt, building the accept rule);
the core appends each step's tokens with `append()`, which applies the stop rules (EOS, stop
strings, token limit, context window) and cuts an accepted chunk exactly where plain decoding
would have stopped.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .decoding.accept import AcceptRule, accept_greedy


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0                 # verify forwards after prefill
    draft_tokens: int = 0          # draft nodes verified, summed over steps
    prefill_s: float = 0.0
    draft_s: float = 0.0
    forward_s: float = 0.0         # this request's forwards (shared with the batch it ran in)
    total_s: float = 0.0
    accepted: list[int] = field(default_factory=list)  # tokens emitted per step
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (nodes proposed, accepted)

    @property
    def mean_accepted(self) -> float:
        """Tokens per forward, bonus token included (1.0 = plain decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    @property
    def draft_share(self) -> float:
        step = self.draft_s + self.forward_s
        return self.draft_s / step if step else 0.0

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.total_s:.2f}s ({self.tokens_per_s:.1f} tok/s), "
                f"{self.steps} steps, {self.mean_accepted:.2f} accepted tokens/step, "
                f"draft time {100 * self.draft_share:.1f}% of step time")


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str  # "stop" (eos or stop string) or "length"


class Request:
    """One sequence to generate. `append(tokens)` applies the stop rules; `done` says when it is over."""

    def __init__(self, prompt: Sequence[int], tokenizer, *, max_new_tokens: int = 256,
                 stops: Sequence[str] = (), eos_ids: Sequence[int] = (), max_positions: int | None = None,
                 accept: AcceptRule = accept_greedy, draft: bool = True, max_draft: int | None = None) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_positions and len(prompt) >= max_positions:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model's context window is {max_positions}")
        if max_draft is not None and max_draft < 0:
            raise ValueError("max_draft must be >= 0")
        self.prompt = list(prompt)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stops = [s for s in stops if s]
        self.eos_ids = set(eos_ids)
        self.max_positions = max_positions
        self.accept = accept
        self.draft = draft and max_draft != 0
        self.max_draft = max_draft       # draft nodes per step at most (None: the engine's caps)
        self.ids: list[int] = []
        self.finish_reason = "length"
        self.error: Exception | None = None  # set when this request failed alone (its accept rule, its prefill)
        self.stop_at: int | None = None      # character offset of a matched stop string
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))
        self._text = ""                      # decoded text of self.ids, refreshed once per append

    # -- limits -----------------------------------------------------------------------------
    @property
    def context(self) -> list[int]:
        return self.prompt + self.ids

    @property
    def final_length(self) -> int:
        """The most positions this request can occupy in a KV cache (prompt and every new token)."""
        length = len(self.prompt) + self.max_new_tokens
        return min(length, self.max_positions) if self.max_positions else length

    @property
    def room(self) -> int:
        """Draft depth the next step may use: an accepted path of depth d emits d + 1 tokens, and
        neither the token limit nor the model's last position may be passed."""
        room = self.max_new_tokens - len(self.ids) - 1
        if self.max_positions is not None:
            room = min(room, self.max_positions - len(self.prompt) - len(self.ids) - 1)
        return room

    @property
    def done(self) -> bool:
        return (self.error is not None or self.finish_reason == "stop" or len(self.ids) >= self.max_new_tokens
                or (self.max_positions is not None and len(self.prompt) + len(self.ids) >= self.max_positions))

    # -- tokens in --------------------------------------------------------------------------
    def append(self, tokens: list[int]) -> int:
        """Append one step's tokens up to the first stop; returns how many were kept."""
        kept = 0
        for token in tokens:
            if len(self.ids) >= self.max_new_tokens:
                break
            self.ids.append(token)
            kept += 1
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
        if self.stops and kept:
            kept = self._cut_at_stop_string(kept)
        return kept

    def _cut_at_stop_string(self, kept: int) -> int:
        """Find a stop string completed by this step's `kept` tokens; drop the tokens after it.

        One decode per step, and a search only over the new text (plus the longest stop's overlap
        with the old), so long outputs do not pay for every earlier token again."""
        before = self._text
        text = self._decode(self.ids)
        start = max(0, len(before) - max(len(s) for s in self.stops) + 1)
        # (start, end) of each stop string found; the earliest start wins, the shortest stop on a tie.
        found = [(at, at + len(s)) for s in self.stops if (at := text.find(s, start)) >= 0]
        if not found:
            self._text = text
            return kept
        at, end = min(found)
        # The first token whose text reaches the end of the stop string (one decode per candidate).
        first = len(self.ids) - kept
        for i in range(first + 1, len(self.ids) + 1):
            if len(self._decode(self.ids[:i])) >= end:
                break
        dropped = len(self.ids) - i
        del self.ids[i:]
        self.stop_at = at
        self.finish_reason = "stop"
        self._text = self._decode(self.ids)
        return kept - dropped

    # -- text out ---------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, final: bool = True) -> str:
        text = self._decode(self.ids) if not self.stops else self._text
        if self.stop_at is not None:
            return text[: self.stop_at]
        if final:
            return text
        # Mid-stream: hold back an incomplete character and anything that may start a stop string.
        text = text.rstrip("\ufffd")
        return text[: len(text) - _held_back(text, self.stops)]

    def output(self) -> GenerationOutput:
        return GenerationOutput(self.text(), list(self.ids), self.stats, self.finish_reason)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    hold = 0
    for s in stops:
        # Only positions where the stop's first character occurs can start a partial match.
        lo = max(0, len(text) - len(s) + 1)
        at = text.find(s[0], lo)
        while at >= 0:
            if s.startswith(text[at:]):
                hold = max(hold, len(text) - at)
                break  # the earliest start is the longest hold for this stop
            at = text.find(s[0], at + 1)
    return hold
