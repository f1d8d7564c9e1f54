"""Sampling parameters and the per-node token choice of the exact tree walk.

`SamplingParams` holds the request's settings under transformers' GenerationConfig names and
meanings, validated up front. `Sampler` turns them into transformers' own LogitsProcessorList
(built by the model's `_get_logits_processor`, exactly as `model.generate()` builds it) plus a
dedicated torch.Generator, and chooses one token for one tree node from the token path that
leads to that node (see `verify.accept_walk`).

The only processor written here is OpenAI's presence/frequency penalty, which transformers
does not ship.
"""
from __future__ import annotations

import difflib
import math
import numbers
import warnings
from dataclasses import dataclass, fields, replace

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..tree import DraftTree
from .accept import accept_walk

_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


@dataclass(frozen=True)
class SamplingParams:
    """How each token is chosen. Defaults are transformers' global generation defaults.

    Greedy (``do_sample=False``, or ``temperature=0``) takes the argmax after the processors;
    sampling draws from the softmax of the processed logits. ``top_k=50`` applies when
    sampling, as in ``model.generate``; pass ``top_k=0`` to disable it (OpenAI-style).
    ``presence_penalty``/``frequency_penalty`` follow OpenAI: over generated tokens only,
    ``logit -= presence * (count > 0) + frequency * count``.
    """
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    min_new_tokens: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def of(cls, base: SamplingParams | None = None, **given) -> SamplingParams:
        """`base` (default: the defaults) with the given keyword values; None means 'not given'."""
        known = {f.name for f in fields(cls)}
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown generation parameter '{name}'{hint}; known: {', '.join(sorted(known))}")
        if base is not None and not isinstance(base, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, not {type(base).__name__}")
        return replace(base or cls(), **{k: v for k, v in given.items() if v is not None})

    @classmethod
    def from_generation_config(cls, config: GenerationConfig, **given) -> SamplingParams:
        """The settings of a GenerationConfig (e.g. a model's `generation_config`), then `given`."""
        names = {f.name for f in fields(cls)} - {"presence_penalty", "frequency_penalty", "seed"}
        values = {n: getattr(config, n, None) for n in names}
        return cls.of(**values, **given)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor at all: the vectorised `accept_greedy` applies."""
        return self.greedy and not (self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                                    or self.no_repeat_ngram_size or self.bad_words_ids or self.min_new_tokens)

    def generation_config(self, eos_ids: list[int]) -> GenerationConfig:
        """The GenerationConfig that model.generate() would build for these settings."""
        config = GenerationConfig(**GenerationConfig._get_default_generation_params())
        config.update(do_sample=not self.greedy, repetition_penalty=self.repetition_penalty,
                      no_repeat_ngram_size=self.no_repeat_ngram_size, min_new_tokens=self.min_new_tokens,
                      bad_words_ids=[list(w) for w in self.bad_words_ids] if self.bad_words_ids else None,
                      eos_token_id=list(eos_ids) or None)
        if not self.greedy:  # warpers do not move the argmax: greedy runs without them
            config.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        return config

    def sampler(self, model: torch.nn.Module, prompt_len: int, eos_ids: list[int] | set[int]) -> Sampler:
        return Sampler(self, model, prompt_len, sorted(eos_ids))


def _check(p: SamplingParams) -> None:
    """ValueError naming the parameter for any value transformers would reject or misread."""
    def number(name: str, lo: float, hi: float, lo_open: bool = False, integer: bool = False) -> None:
        v = getattr(p, name)
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v):
            raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {v!r}")
        if v < lo or v > hi or (lo_open and v == lo):
            lo_s = f"{'>' if lo_open else '>='} {lo}"
            raise ValueError(f"{name} must be {lo_s}" + (f" and <= {hi}" if hi != math.inf else "") + f", got {v!r}")
        object.__setattr__(p, name, int(v) if integer else float(v))  # transformers wants e.g. a float penalty

    if not isinstance(p.do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {p.do_sample!r}")
    number("temperature", 0.0, math.inf)
    number("top_k", 0, math.inf, integer=True)
    number("top_p", 0.0, 1.0, lo_open=True)
    if p.min_p is not None:
        number("min_p", 0.0, 1.0)
    number("repetition_penalty", 0.0, math.inf, lo_open=True)
    number("presence_penalty", -2.0, 2.0)
    number("frequency_penalty", -2.0, 2.0)
    number("no_repeat_ngram_size", 0, math.inf, integer=True)
    number("min_new_tokens", 0, math.inf, integer=True)
    if p.seed is not None:
        number("seed", 0, 2**63 - 1, integer=True)
    if p.bad_words_ids is not None:
        words = p.bad_words_ids
        ok = isinstance(words, (list, tuple)) and len(words) > 0 and all(
            isinstance(w, (list, tuple)) and len(w) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in w) for w in words)
        if not ok:
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {words!r}")
        object.__setattr__(p, "bad_words_ids", tuple(tuple(int(t) for t in w) for w in words))
    if not p.do_sample:
        changed = [n for n in _SAMPLING_ONLY if getattr(p, n) not in (getattr(SamplingParams, n), 0)]
        if changed:
            warnings.warn(f"do_sample is False, so {', '.join(changed)} {'is' if len(changed) == 1 else 'are'} "
                          "ignored (greedy decoding); pass do_sample=True to sample", UserWarning, stacklevel=4)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties over generated tokens: logit -= presence * (count > 0) + frequency * count."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence, self.frequency, self.prompt_len = float(presence), float(frequency), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class Sampler:
    """One request's token choice: transformers' processor chain, then argmax or one draw.

    `choose(ids, logits)` sees the whole token path (prompt + accepted + draft path) of the
    node whose `logits` it gets, so penalties and length-dependent processors see exactly the
    input_ids model.generate() would pass at that position.
    """

    def __init__(self, params: SamplingParams, model: torch.nn.Module, prompt_len: int, eos_ids: list[int]) -> None:
        self.params = params
        self.prompt_len = prompt_len
        self.device = next(model.parameters()).device
        vocab = model.config.get_text_config().vocab_size
        if params.bad_words_ids and max(max(w) for w in params.bad_words_ids) >= vocab:
            raise ValueError(f"bad_words_ids holds token ids outside the vocabulary (size {vocab})")
        config = params.generation_config(eos_ids)  # a fresh config: _prepare_special_tokens may change it
        # model.generate() turns eos ids into tensors first (bad words and min_new_tokens need them).
        model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=self.device)
        extra = LogitsProcessorList()
        if params.presence_penalty or params.frequency_penalty:
            extra.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, prompt_len))
        self.processors: LogitsProcessorList = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt_len, logits_processor=extra, device=self.device)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def process(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The processed scores [vocab] (float32) for one node whose token path is `ids`."""
        scores = logits.to(dtype=torch.float32, copy=True)[None]
        if self.processors:
            scores = self.processors(torch.tensor([ids], device=scores.device), scores)
        return scores[0]

    def choose(self, ids: list[int], logits: torch.Tensor) -> int:
        scores = self.process(ids, logits)
        if self.generator is None:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))

    def accept(self, tree: DraftTree, logits: torch.Tensor, context: list[int]) -> tuple[list[int], list[int]]:
        return accept_walk(tree, logits, context, self.choose)
