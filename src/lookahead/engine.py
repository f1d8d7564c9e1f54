"""Engine: a model, its tokenizer and a shared TokenTrie; generate() and stream()."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .decoding.loop import TreeVerifier, decode
from .decoding.sampling import SamplingParams
from .decoding.verify import accept_greedy
from .drafting.budget import cached_cost, measure_cost
from .drafting.drafter import SOURCES, DraftState
from .drafting.fusion import Budget
from .drafting.recycle import RecycleTable
from .drafting.trie import TokenTrie
from .models import load_model

Prompt = str | Sequence[dict] | Sequence[int]


@dataclass(frozen=True)
class DraftConfig:
    """Draft tree budget and trie settings. Defaults tuned on the CPU benchmark (bf16)."""
    # Caps, not sizes: the measured sizing verifies only the part of the tree that pays, so deep
    # caps cost nothing where chains are short and let copy-heavy text (code) accept 8+ tokens a step.
    max_nodes: int = 12       # draft nodes verified per step at most (root excluded)
    max_depth: int = 12       # longest branch
    max_match: int = 4        # longest context suffix matched in the trie
    capacity: int = 200_000   # node cap of the shared (cross-request) trie
    prompt_weight: float = 0.5  # trie-only drafting: trust in the request scope vs the shared one (0.5 = equal)
    # Fused into one tree: prompt, history (the tries), recycle, ngram. With measured sizing: 1.43x vs
    # 1.40x for the best single source on the Qwen-1.5B ablation, 1.45x vs 1.35x on SmolLM2 (README
    # "Benchmark").
    sources: tuple[str, ...] = SOURCES
    sizing: str = "measured"  # "measured": per step, the size that pays for itself on the measured
    #                           verify-cost curve (up to max_nodes); "fixed": always max_nodes
    recycle_k: int = 8        # next-token guesses kept per token by the recycle table

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_depth", "max_match", "capacity", "recycle_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"DraftConfig.{name} must be >= 1")
        if self.sizing not in ("measured", "fixed"):
            raise ValueError("DraftConfig.sizing must be 'measured' or 'fixed'")

    def new_trie(self) -> TokenTrie:
        return TokenTrie(max_match=self.max_match, window=self.max_match + self.max_depth,
                         capacity=self.capacity, prompt_weight=self.prompt_weight)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0                 # verify forwards after prefill
    draft_tokens: int = 0          # draft nodes verified, summed over steps
    prefill_s: float = 0.0
    draft_s: float = 0.0
    forward_s: float = 0.0
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


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, draft_config: DraftConfig | None = None,
                 trie: TokenTrie | None = None) -> None:
        TreeVerifier(model)  # refuse unsupported models now, not at the first request
        self.model, self.tokenizer = model, tokenizer
        self.draft_config = draft_config or DraftConfig()
        self.trie = trie or self.draft_config.new_trie()
        self.drafting = self._draft_state()
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    def _draft_state(self) -> DraftState:
        cfg, model = self.draft_config, self.model
        recycle = None
        if "recycle" in cfg.sources:
            saved = self.trie.extra
            if "recycle_tokens" in saved and saved["recycle_tokens"].shape[0] == _vocab_size(model):
                recycle = RecycleTable.from_arrays(saved)
            else:
                recycle = RecycleTable(_vocab_size(model), cfg.recycle_k)
        cost = None
        if cfg.sizing == "measured":
            name = getattr(model.config, "_name_or_path", "")
            # Tiny unnamed models are measured afresh (milliseconds); named ones once per machine.
            size = sum(p.numel() for p in model.parameters())
            cost = cached_cost(model, f"{name}-{size}") if name else measure_cost(model)
        return DraftState(self.trie, recycle, tuple(cfg.sources), cost)

    def save_draft_state(self, path) -> None:
        """Shared trie and recycle table in one safetensors file (load it with TokenTrie.load)."""
        recycle = self.drafting.recycle
        self.trie.save(path, extra=recycle.to_arrays() if recycle is not None else None)

    # -- prompts ------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)):
            raise ValueError("prompt must be a string, a list of token ids, or a list of {'role', 'content'} messages")
        if not prompt:
            raise ValueError("the prompt is empty")
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model's tokenizer has no chat template; pass a plain string prompt")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        raise ValueError("prompt must be a string, a list of token ids, or a list of {'role', 'content'} messages")

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompt: Prompt, max_new_tokens: int = 256, stop: Sequence[str] | str | None = None,
                 draft: bool = True, sampling: SamplingParams | None = None, **params) -> GenerationOutput:
        """Generate up to `max_new_tokens`; greedy by default, token-identical to model.generate() (fp32).

        Sampling and processors take transformers' GenerationConfig names and meanings: `do_sample`,
        `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`, `no_repeat_ngram_size`,
        `bad_words_ids`, `min_new_tokens`, plus OpenAI's `presence_penalty`/`frequency_penalty` and a
        per-request `seed` (see SamplingParams). They override the fields of `sampling` if both are given.
        Drafting never changes the output distribution.
        """
        run = _Run(self, prompt, max_new_tokens, stop, draft, SamplingParams.of(sampling, **params))
        for _ in run:
            pass
        return run.output()

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, stop: Sequence[str] | str | None = None,
               draft: bool = True, sampling: SamplingParams | None = None, **params) -> TextStream:
        """Text pieces as tokens are accepted; `.output` holds the full result once iterated.

        Takes the same sampling parameters as `generate`."""
        return TextStream(_Run(self, prompt, max_new_tokens, stop, draft, SamplingParams.of(sampling, **params)))


class TextStream:
    """Iterate for text pieces (held back while they may start a stop string); then read `.output`."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        run, sent = self._run, 0
        for _ in run:
            text = run.text(final=False)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        text = run.text(final=True)
        if len(text) > sent:
            yield text[sent:]
        self.output = run.output()


class _Run:
    """One request: iterating it runs decode steps; stops at eos, a stop string or the token limit."""

    def __init__(self, engine: Engine, prompt: Prompt, max_new_tokens: int, stop, draft: bool,
                 sampling: SamplingParams) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.engine = engine
        self.prompt = engine.encode(prompt)
        if not self.prompt:
            raise ValueError("the prompt is empty")
        if engine.max_positions and len(self.prompt) >= engine.max_positions:
            raise ValueError(f"prompt has {len(self.prompt)} tokens; the model's context window is "
                             f"{engine.max_positions}")
        self.stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.max_new_tokens = max_new_tokens
        self.draft = draft
        # Built now, so that a bad setting fails at the call, not at the first token.
        self.accept = accept_greedy if sampling.plain_greedy else \
            sampling.sampler(engine.model, len(self.prompt), engine.eos_ids).accept
        self.ids: list[int] = []
        self.finish_reason = "length"
        self.stop_at: int | None = None  # character offset of a matched stop string
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))

    def __iter__(self) -> Iterator[list[int]]:
        engine, stats = self.engine, self.stats
        start = time.perf_counter()
        session = engine.drafting.drafter(self.prompt) if self.draft else None
        cfg = engine.draft_config
        steps = decode(TreeVerifier(engine.model), self.prompt, session, Budget(cfg.max_nodes, cfg.max_depth),
                       self.max_new_tokens, engine.max_positions, self.accept)
        first = True
        for step in steps:
            if first:  # the first step's forward also covers the prefill
                stats.prefill_s = time.perf_counter() - start - step.forward_s - step.draft_s
                first = False
            stats.steps += 1
            stats.draft_tokens += step.draft_size
            stats.draft_s += step.draft_s
            stats.forward_s += step.forward_s
            kept = self._append(step.tokens)
            stats.accepted.append(kept)
            stats.new_tokens = len(self.ids)
            stats.total_s = time.perf_counter() - start
            if session is not None:
                stats.sources = {name: (s.proposed, s.accepted) for name, s in session.stats.items()}
            yield step.tokens[:kept]
            if self.finish_reason == "stop" or len(self.ids) >= self.max_new_tokens:
                break

    def _append(self, tokens: list[int]) -> int:
        """Append tokens one by one up to the first stop; returns how many were kept."""
        for i, token in enumerate(tokens):
            if len(self.ids) >= self.max_new_tokens:
                return i
            self.ids.append(token)
            if token in self.engine.eos_ids or self._hit_stop_string():
                self.finish_reason = "stop"
                return i + 1
        return len(tokens)

    def _hit_stop_string(self) -> bool:
        if not self.stops:
            return False
        text = self._decode(self.ids)
        before = len(self._decode(self.ids[:-1]))
        for s in self.stops:
            at = text.find(s, max(0, before - len(s) + 1))
            if at >= 0:  # the stop string is completed by this token
                self.stop_at = at if self.stop_at is None else min(self.stop_at, at)
        return self.stop_at is not None

    def _decode(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, final: bool = True) -> str:
        text = self._decode(self.ids)
        if self.stop_at is not None:
            return text[: self.stop_at]
        if final:
            return text
        # Mid-stream: hold back an incomplete character and anything that may start a stop string.
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.stops for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]

    def output(self) -> GenerationOutput:
        return GenerationOutput(self.text(), list(self.ids), self.stats, self.finish_reason)


def load(source: str | None = None, dtype: str | torch.dtype = "bfloat16", device: str | None = None,
         draft_config: DraftConfig | None = None) -> Engine:
    """An Engine for a named model (default: the embedded SmolLM2-135M-Instruct), a .gguf file or an HF dir."""
    model, tokenizer = load_model(source, dtype=dtype, device=device)
    return Engine(model, tokenizer, draft_config)


def _vocab_size(model: torch.nn.Module) -> int:
    """Rows the recycle table needs: the width of the model's logits."""
    head = model.get_output_embeddings()
    return head.out_features if head is not None else model.config.get_text_config().vocab_size
