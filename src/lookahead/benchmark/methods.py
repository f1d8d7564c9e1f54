"""The methods compared, each run on one prompt (token ids) and timed the same way.

- baseline: transformers `model.generate()` (greedy, or sampling with the same settings)
- pld / pld-nN: transformers prompt lookup, `prompt_lookup_num_tokens=10`, `max_matching_ngram_size=N`
- assisted: transformers assisted generation with a small draft model of the same tokenizer
- lookahead: this engine with a *cold* trie; lookahead-warm: the trie warmed from the train split
- lookahead[-warm]-nA-dB-mC-cD: the same with DraftConfig(max_nodes=A, max_depth=B, max_match=C, copy_depth=D),
  for tuning (each part optional after `-nA-dB`; `-cD` alone sets only the depth while copying)
- ablations: a `-sSRC+SRC` suffix keeps only those draft sources (e.g. `lookahead-sprompt+history`),
  `-fixed` verifies the whole budget every step instead of the measured size (`lookahead-n24-d12-fixed`)
- plain: this engine's own loop without drafting (what drafting is measured against, loop costs equal)
- oracle-LN: this engine's loop with always-right chains of N tokens (oracle.py); `oracle`: N = 16
- copy-oracle[-LN]: the same, drafting only what could be copied from the context: the bound of copying drafters

Every call is timed from outside (wall clock, prefill included). Forward hooks on the target
(and draft) model count and time their forward calls, which tells where the time goes
without touching any method's code.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..drafting.state import SOURCES
from ..engine import DraftConfig, Engine
from .oracle import DEFAULT_LENGTH, OracleState, oracle_config
from .stats import BASELINE, COPY_ORACLE, PLAIN, Record

PLD_TOKENS = 10
DEFAULT_PLD_NGRAM = 3
_LOOKAHEAD = re.compile(r"^lookahead(?P<warm>-warm)?(?:-n(?P<n>\d+)-d(?P<d>\d+)(?:-m(?P<m>\d+))?)?(?:-c(?P<c>\d+))?"
                        r"(?:-s(?P<src>[a-z]+(?:\+[a-z]+)*))?(?P<fixed>-fixed)?$")
_PLD = re.compile(r"^pld(?:-n(?P<n>\d+))?$")
_ORACLE = re.compile(r"^(?P<copy>copy-)?oracle(?:-L(?P<length>\d+))?$")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str                       # baseline | pld | assisted | lookahead | plain | oracle | copy-oracle
    warm: bool = False
    ngram: int | None = None        # pld
    draft_config: DraftConfig | None = None  # lookahead; None = the engine's. oracle: its chain length


def parse_method(name: str, base: DraftConfig | None = None) -> MethodSpec:
    """A method name as given on the command line -> MethodSpec (ValueError if unknown)."""
    name = name.strip()
    if name == BASELINE:
        return MethodSpec(name, "baseline")
    if name in ("assisted", PLAIN):
        return MethodSpec(name, name)
    if m := _ORACLE.match(name):
        length = int(m["length"]) if m["length"] else DEFAULT_LENGTH
        if length < 1:
            raise ValueError(f"method {name!r}: the chain length must be >= 1")
        return MethodSpec(name, COPY_ORACLE if m["copy"] else "oracle", draft_config=oracle_config(length))
    if m := _PLD.match(name):
        return MethodSpec(name, "pld", ngram=int(m["n"]) if m["n"] else DEFAULT_PLD_NGRAM)
    if m := _LOOKAHEAD.match(name):
        cfg = None
        if m["n"] or m["c"] or m["src"] or m["fixed"]:
            cfg = base = base or DraftConfig()
        if m["n"]:
            cfg = replace(cfg, max_nodes=int(m["n"]), max_depth=int(m["d"]),
                          max_match=int(m["m"]) if m["m"] else base.max_match)
        if m["src"]:
            sources = tuple(m["src"].split("+"))
            if unknown := set(sources) - set(SOURCES):
                raise ValueError(f"method {name!r}: unknown draft sources {sorted(unknown)}; choose from {SOURCES}")
            cfg = replace(cfg, sources=sources)
        if m["c"]:
            cfg = replace(cfg, copy_depth=int(m["c"]))
        if m["fixed"]:
            cfg = replace(cfg, sizing="fixed")
        return MethodSpec(name, "lookahead", warm=bool(m["warm"]), draft_config=cfg)
    raise ValueError(f"unknown method {name!r}: use baseline, pld, pld-nN, assisted, plain, [copy-]oracle[-LN], "
                     "lookahead, lookahead-warm, or "
                     "lookahead[-warm][-nNODES-dDEPTH[-mMATCH]][-cDEPTH][-sSRC+SRC][-fixed]")


class ForwardMeter:
    """Counts and times a module's forward calls (hooks; removed on exit)."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.module = module
        self.calls = 0
        self.seconds = 0.0
        self.first_s: float | None = None
        self._t0 = 0.0
        self._handles: list = []

    def __enter__(self) -> ForwardMeter:
        if self.module is not None:
            self._handles = [self.module.register_forward_pre_hook(self._pre),
                             self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        dt = time.perf_counter() - self._t0
        self.calls += 1
        self.seconds += dt
        if self.first_s is None:
            self.first_s = dt


@dataclass
class Context:
    """What the methods share for one run: one engine (its model serves every method), the draft
    model for `assisted`, the tries, and the generation settings."""
    engine: Engine
    max_new_tokens: int
    sampling: dict | None = None           # {"do_sample": True, "temperature": .., "top_p": .., "top_k": ..}
    seed: int = 0
    assistant: torch.nn.Module | None = None
    # (prompt tail, answer) pairs from the train split; a warm trie learns each as a session
    # would have: the prompt's last max_match tokens (the lead-in), then the answer
    warm_corpus: list[tuple[list[int], list[int]]] = field(default_factory=list)
    trie_scope: str = "prompt"             # "prompt": every prompt starts from the same trie; "run": tries learn on
    oracles: dict[str, OracleState] = field(default_factory=dict)  # per [copy-]oracle-LN: answers its loop emits
    plain_answers: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # draft=False, by prompt
    _engines: dict = field(default_factory=dict)
    _sizings: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    def eos_ids(self) -> list[int]:
        return sorted(self.engine.eos_ids)

    # -- lookahead state ----------------------------------------------------------------------
    def engine_for(self, spec: MethodSpec) -> Engine:
        """An engine on the shared model with a fresh cross-request state: an empty trie (cold) or
        one that learned the warm corpus (warm); everything else the engine keeps across requests
        (e.g. a recycle table) starts empty too. With trie_scope "run" one engine per method
        serves the whole run and keeps learning."""
        if self.trie_scope == "run" and spec.name in self._engines:
            return self._engines[spec.name]
        cfg = spec.draft_config or self.engine.draft_config
        trie = cfg.new_trie()
        if spec.warm:
            for tail, answer in self.warm_corpus:
                trie.insert(list(tail[-cfg.max_match:]) + list(answer))
        # Cold means a fresh drafting state; what the engine learned about the machine (cost curve, the
        # sizing policy's never-slower guard) is kept per method, as a long-running engine keeps it.
        engine = Engine(self.engine.model, self.engine.tokenizer, cfg, cost=self.engine.cost,
                        sizing=self._sizings.get(spec.name))
        self._sizings[spec.name] = engine.sizing
        engine.state.trie = trie
        if self.trie_scope == "run":
            self._engines[spec.name] = engine
        return engine


def _generation_config(ctx: Context, **extra):
    from transformers import GenerationConfig

    eos = ctx.eos_ids()
    kwargs = dict(max_new_tokens=ctx.max_new_tokens, eos_token_id=eos or None,
                  pad_token_id=eos[0] if eos else 0, do_sample=False)
    if ctx.sampling:
        kwargs.update(ctx.sampling)
    else:  # explicit greedy: no sampling knob may leak in from the model's own generation_config
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(extra)
    return GenerationConfig(**kwargs)


def _run_hf(ctx: Context, spec: MethodSpec, ids: list[int], assistant: torch.nn.Module | None = None,
            **extra) -> Record:
    model = ctx.model
    x = torch.tensor([ids], device=model.device)
    config = _generation_config(ctx, **extra)
    kwargs = {"assistant_model": assistant} if assistant is not None else {}
    if ctx.sampling:
        torch.manual_seed(ctx.seed)
    with ForwardMeter(model) as target, ForwardMeter(assistant) as draft:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config, **kwargs)
            wall = time.perf_counter() - t0
    tokens = out[0, len(ids):].tolist()  # one sequence: never padded
    return Record(prompt_id="", category="", method=spec.name, prompt_tokens=len(ids), token_ids=tokens,
                  wall_s=wall, prefill_s=target.first_s if spec.kind == "baseline" else None,
                  forward_s=target.seconds, forward_calls=target.calls,
                  draft_s=draft.seconds if spec.kind == "assisted" else None)


def run_baseline(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    return _run_hf(ctx, spec, ids)


def run_pld(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    return _run_hf(ctx, spec, ids, prompt_lookup_num_tokens=PLD_TOKENS, max_matching_ngram_size=spec.ngram)


def run_assisted(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    if ctx.assistant is None:
        raise ValueError("method 'assisted' needs a draft model (--assistant)")
    return _run_hf(ctx, spec, ids, assistant=ctx.assistant)


def _run_engine(ctx: Context, spec: MethodSpec, engine: Engine, ids: list[int], draft: bool = True) -> Record:
    """One timed `engine.generate` call (our decode core), as a Record."""
    kwargs = dict(ctx.sampling or {})
    if ctx.sampling:
        kwargs["seed"] = ctx.seed
    with ForwardMeter(engine.model) as target:
        t0 = time.perf_counter()
        out = engine.generate(list(ids), max_new_tokens=ctx.max_new_tokens, draft=draft, **kwargs)
        wall = time.perf_counter() - t0
    s = out.stats
    return Record(prompt_id="", category="", method=spec.name, prompt_tokens=len(ids), token_ids=list(out.token_ids),
                  wall_s=wall, prefill_s=s.prefill_s, forward_s=target.seconds, forward_calls=target.calls,
                  draft_s=s.draft_s, step_s=s.draft_s + s.forward_s, accepted=list(s.accepted),
                  draft_tokens=s.draft_tokens,
                  sources={k: list(v) for k, v in (getattr(s, "sources", None) or {}).items()} or None)


def run_lookahead(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    return _run_engine(ctx, spec, ctx.engine_for(spec), ids)


def run_plain(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    # draft=False never reads the drafting state, so the shared engine serves as it is.
    return _run_engine(ctx, spec, ctx.engine, ids, draft=False)


def run_oracle(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    if ctx.sampling:  # a sampled answer is not known in advance: drafting changes which draws are made
        raise ValueError(f"method {spec.name!r} is greedy only (drop --sampling or the oracle)")
    # Its own engine (the oracle as drafting state, the spec's chain length) on the shared model.
    state = ctx.oracles.setdefault(spec.name, OracleState(copy=spec.kind == COPY_ORACLE))
    engine = Engine(ctx.model, ctx.engine.tokenizer, spec.draft_config, state=state)
    key = tuple(ids)
    if key not in ctx.plain_answers:
        ctx.plain_answers[key] = OracleState.plain(engine, ids, ctx.max_new_tokens)
    state.prepare(engine, ids, ctx.max_new_tokens, ctx.plain_answers[key])  # untimed: the oracle's knowledge
    return _run_engine(ctx, spec, engine, ids)


RUNNERS: dict[str, Callable[[Context, MethodSpec, list[int]], Record]] = {
    "baseline": run_baseline, "pld": run_pld, "assisted": run_assisted, "lookahead": run_lookahead,
    "plain": run_plain, "oracle": run_oracle, COPY_ORACLE: run_oracle}


def run_method(ctx: Context, spec: MethodSpec, ids: list[int]) -> Record:
    return RUNNERS[spec.kind](ctx, spec, ids)
