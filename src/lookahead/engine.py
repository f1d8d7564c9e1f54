"""Engine: a model, its tokenizer and what drafting has learned; generate(), generate_batch(), stream().

All three drive the one decode core (`decoding.step.Decoder`); so does the server.
"""
from __future__ import annotations

import copy
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .chat import encode_messages
from .decoding.accept import accept_greedy
from .decoding.attention import NAME as GROUPED
from .decoding.attention import use_grouped
from .decoding.cost import CostModel, drafting_rate, flat_span, load_cost, measure_cost
from .decoding.invariant import is_invariant, make_invariant
from .decoding.kernels import EAGER, PACKED, can_pack, linear_kernels, pack_linears, stacked_linears, unpack_linears
from .decoding.sampling import SamplingParams
from .decoding.sizing import SizingPolicy
from .decoding.step import MAX_CACHE_TOKENS, Decoder, run
from .decoding.support import check_supported
from .drafting.fusion import Budget
from .drafting.recycle import RecycleTable
from .drafting.state import SOURCES, DraftState
from .drafting.trie import TokenTrie
from .models import cast, default_device, load_model
from .request import GenerationOutput, Request

Prompt = str | Sequence[dict] | Sequence[int]
NODES = 12  # the default node cap where verify cost grows with the tree (CPUs)


@dataclass(frozen=True)
class DraftConfig:
    """Draft tree budget and trie settings. Defaults tuned on the CPU benchmark; the node cap widens on a GPU."""
    # Caps, not sizes: the measured sizing verifies only the part of the tree that pays, so deep
    # caps cost nothing where chains are short and let copy-heavy text (code) accept 8+ tokens a step.
    max_nodes: int | None = None  # draft nodes verified per step at most (root excluded); None: NODES, or up
    #                               to 4x that where the measured verify cost is flat (`Engine.max_nodes`)
    max_depth: int = 12       # longest branch
    # A row that has copied its context for a whole branch (an edit, a quote) drafts twice as deep (and as many
    # more nodes), twice again after copying a whole branch at that depth, up to this: its copy chain is still
    # right where the caps cut it (README "Deeper while copying").
    copy_depth: int = 24      # <= max_depth: no deeper while copying; 48: 48 deep from 36 copied tokens
    max_match: int = 4        # longest context suffix matched in the trie
    capacity: int = 200_000   # node cap of the shared (cross-request) trie
    # Fused into one tree: prompt, history (the tries), recycle, ngram. With measured sizing: 1.43x vs
    # 1.40x for the best single source on the Qwen-1.5B ablation, 1.45x vs 1.35x on SmolLM2 (README
    # "Benchmark").
    sources: tuple[str, ...] = SOURCES
    sizing: str = "measured"  # "measured": per step, the size that pays for itself on the measured
    #                           verify-cost curve (up to max_nodes), guarded by realised speed;
    #                           "fixed": always the whole tree (max_nodes)
    recycle_k: int = 8        # next-token guesses kept per token by the recycle table

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_depth", "copy_depth", "max_match", "capacity", "recycle_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"DraftConfig.{name} must be >= 1")
        if self.sizing not in ("measured", "fixed"):
            raise ValueError("DraftConfig.sizing must be 'measured' or 'fixed'")

    def new_trie(self) -> TokenTrie:
        return TokenTrie(max_match=self.max_match, window=self.max_match + self.max_depth, capacity=self.capacity)


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, draft_config: DraftConfig | None = None,
                 state: DraftState | None = None, cost: CostModel | None = None,
                 sizing: SizingPolicy | None = None, deterministic: bool = False) -> None:
        if deterministic and not is_invariant(model):
            make_invariant(model)  # a position's logits no longer depend on what shares its forward
        elif not is_invariant(model):
            use_grouped(model)  # verify forwards without per-head copies of the KV cache (same numbers)
        check_supported(model)  # refuse unsupported models now, not at the first request
        self.model, self.tokenizer = model, tokenizer
        self.deterministic = is_invariant(model)
        self.draft_config = cfg = draft_config or DraftConfig()
        self.vocab_size = _vocab_size(model)
        self.model_id = _model_id(model)
        self.state = state or self.new_state()
        if cfg.sizing == "measured" and cost is None:
            # Tiny unnamed models are measured afresh (milliseconds); named ones once per machine.
            cost = load_cost(model, _cost_key(model)) if self.model_id else measure_cost(model, context=64)
        self.cost = cost if cfg.sizing == "measured" else None
        # Unless given, the node cap widens where the measured curve says wider trees are next to free (a GPU:
        # on an H200, SmolLM2 decoded 1.32x faster with 48 nodes than with 12, README "On a GPU").
        self.row_nodes = cfg.max_nodes or NODES  # a row's cap in a batch of many (Decoder)
        self.max_nodes = cfg.max_nodes or NODES * (flat_span(self.cost, NODES + 1) if self.cost else 1)
        # One policy for every request of this engine (pass one to share it between engines on one
        # model): what it learns about the machine, e.g. that drafting loses here, is kept.
        self.sizing = sizing or SizingPolicy(self.cost, guard=cfg.sizing == "measured")
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.dtype_reason = "given"  # load(dtype="auto") says why it chose

    # -- what drafting learns -------------------------------------------------------------
    def new_state(self) -> DraftState:
        cfg = self.draft_config
        recycle = RecycleTable(self.vocab_size, cfg.recycle_k) if "recycle" in cfg.sources else None
        return DraftState(cfg.new_trie(), recycle, tuple(cfg.sources))

    def save_state(self, path: str | os.PathLike) -> None:
        """Shared trie, recycle table, calibration and trust curves in one file (`load_state` reads it)."""
        self.state.save(path, model=self.model_id)

    def load_state(self, path: str | os.PathLike) -> None:
        """Replace what drafting has learned by a saved state; a file that does not fit raises StateFileError."""
        cfg = self.draft_config
        self.state = DraftState.load(path, sources=tuple(cfg.sources), capacity=cfg.capacity,
                                     vocab_size=self.vocab_size, recycle_k=cfg.recycle_k, model=self.model_id)

    # -- prompts and requests ------------------------------------------------------------
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
            # Contents are text: a special-token string inside a message cannot close its turn.
            return encode_messages(self.tokenizer, prompt)
        raise ValueError("prompt must be a string, a list of token ids, or a list of {'role', 'content'} messages")

    def request(self, prompt: Prompt, max_new_tokens: int = 256, stop: Sequence[str] | str | None = None,
                draft: bool = True, sampling: SamplingParams | None = None, max_draft: int | None = None,
                **params) -> Request:
        """A checked request (tokenized prompt, limits, stop strings, accept rule) for the decode core."""
        sampling = SamplingParams.of(sampling, **params)
        ids = self.encode(prompt)
        # Built now, so that a bad setting fails at the call, not at the first token.
        accept = accept_greedy if sampling.plain_greedy else \
            sampling.sampler(self.model, len(ids), self.eos_ids).accept
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return Request(ids, self.tokenizer, max_new_tokens=max_new_tokens, stops=stops, eos_ids=self.eos_ids,
                       max_positions=self.max_positions, accept=accept, draft=draft, max_draft=max_draft)

    def decoder(self, prefill_chunk: int | None = None, max_cache_tokens: int | None = MAX_CACHE_TOKENS) -> Decoder:
        """A decode core over this engine's model, drafting state, sizing policy and cost curve.

        `prefill_chunk`: most prompt tokens prefilled per step for rows joining a running batch (None:
        whole); `max_cache_tokens`: bound of the batch's padded KV cache (None: unbounded)."""
        cfg = self.draft_config
        return Decoder(self.model, self.state, self.sizing, Budget(self.max_nodes, cfg.max_depth), self.cost,
                       prefill_chunk, max_cache_tokens, copy_depth=cfg.copy_depth, row_nodes=self.row_nodes)

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
        request = self.request(prompt, max_new_tokens, stop, draft, sampling, **params)
        run(self.decoder(), [request], max_batch=1)
        return _finished(request)

    def generate_batch(self, prompts: Sequence[Prompt | Request], max_new_tokens: int = 256,
                       stop: Sequence[str] | str | None = None, draft: bool = True,
                       sampling: SamplingParams | None = None, max_batch: int = 16, progress: bool = True,
                       max_cache_tokens: int | None = MAX_CACHE_TOKENS, **params) -> list[GenerationOutput]:
        """Generate for every prompt with continuous batching; outputs in input order, each with its stats.

        Up to `max_batch` requests share each forward; as one finishes the next prompt joins. Every
        prompt is checked before anything runs, so a bad one fails the call at once. Greedy outputs are
        those of `generate` one prompt at a time (fp32: token-identical to model.generate()). An item
        may also be a `Request` from `engine.request(...)`, for settings that differ per prompt.
        `max_cache_tokens` bounds the batch's KV cache (rows x longest row, padded): long prompts wait
        for room rather than multiply every row's cache."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("generate_batch takes a list of prompts (use generate for one)")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        requests = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, Request):
                requests.append(prompt)
                continue
            try:
                requests.append(self.request(prompt, max_new_tokens, stop, draft, sampling, **params))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        bar = tqdm(total=len(requests), unit="req", desc="generating", disable=not progress)
        tokens = 0

        def finished(request: Request) -> None:
            nonlocal tokens
            tokens += len(request.ids)
            bar.update(1)
            bar.set_postfix(tokens=tokens, refresh=False)

        try:
            run(self.decoder(max_cache_tokens=max_cache_tokens), requests, max_batch, on_finish=finished)
        finally:
            bar.close()
        return [_finished(r) for r in requests]

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, stop: Sequence[str] | str | None = None,
               draft: bool = True, sampling: SamplingParams | None = None, **params) -> TextStream:
        """Text pieces as tokens are accepted; `.output` holds the full result once iterated.

        Takes the same sampling parameters as `generate`."""
        return TextStream(self.decoder(), self.request(prompt, max_new_tokens, stop, draft, sampling, **params))


class TextStream:
    """Iterate for text pieces (held back while they may start a stop string); then read `.output`."""

    def __init__(self, decoder: Decoder, request: Request) -> None:
        self._decoder, self.request = decoder, request
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        request, sent = self.request, 0
        self._decoder.add(request)
        while not request.done:
            self._decoder.step()
            text = request.text(final=request.done)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        self.output = _finished(request)


def _finished(request: Request) -> GenerationOutput:
    if request.error is not None:
        raise request.error
    return request.output()


def load(source: str | None = None, dtype: str | torch.dtype = "auto", device: str | None = None,
         draft_config: DraftConfig | None = None, deterministic: bool = False, kernels: str = "auto") -> Engine:
    """An Engine for a named model (default: the embedded SmolLM2-135M-Instruct), a .gguf file or an HF dir.

    `dtype="auto"` picks the dtype and linear kernels that decode fastest with drafting on this machine
    (printed once, with the reason); an explicit dtype always wins. float32 with eager kernels is the exact
    reference (token-identical to `model.generate`); bfloat16 or packed kernels may part from it at
    near-ties of the top two logits. `kernels`: "auto" (bf16: eager or oneDNN-packed linears, whichever
    measures faster; fp32 stays eager, the exact mode, unless dtype is auto too), "eager" or "packed".

    `deterministic=True` installs batch- and tree-invariant kernels (decoding/invariant.py): the same
    greedy request gives the same text bit for bit in any dtype, whatever the draft tree or the batch
    (and equals `draft=False` decoding on the same engine); forwards cost more (README)."""
    if kernels not in ("auto", EAGER, PACKED):
        raise ValueError("kernels must be 'auto', 'eager' or 'packed'")
    if deterministic and kernels == PACKED:
        raise ValueError("deterministic mode runs its own invariant linear kernels: kernels must be 'auto' or 'eager'")
    if deterministic:
        kernels = EAGER  # packed weights would be measured and kept, then never run
    device = device or default_device()
    cost, reason = None, "given"
    if dtype != "auto":
        model, tokenizer = load_model(source, dtype=dtype, device=device)
        half = next(model.parameters()).dtype == torch.bfloat16
        if kernels == PACKED or (kernels == "auto" and half and can_pack(model)):
            options = [(model, PACKED)] if kernels == PACKED else [(model, EAGER), (model, PACKED)]
            model, reason, cost = _fastest(options)
    else:  # fp32 read on the host; the choice moves it to the device
        model, tokenizer = load_model(source, dtype=torch.float32, device="cpu")
        model, reason, cost = _auto_choice(model, device, None if kernels == "auto" else kernels)
    if cost is not None or dtype == "auto":
        print(f"[lookahead] {'dtype auto' if dtype == 'auto' else 'kernels'}: {reason}", file=sys.stderr)
    # The curve the choice read is not read again (deterministic kernels have their own).
    engine = Engine(model, tokenizer, draft_config, cost=None if deterministic else cost, deterministic=deterministic)
    engine.dtype_reason = reason
    if engine.max_nodes > engine.row_nodes:
        wide = engine.max_nodes + 1
        print(f"[lookahead] draft trees up to {engine.max_nodes} nodes: a {wide}-token verify forward costs "
              f"{engine.cost(wide) / engine.cost(NODES + 1):.2f}x a {NODES + 1}-token one here", file=sys.stderr)
    # Everything loaded so far (model, tokenizer, libraries: ~430k objects for SmolLM2) lives as long as the
    # process: frozen, Python's full collections, which the drafters' trie nodes trigger, skip it (measured:
    # 0.24 s a pass before, 0.02 s after, Zen 3). vLLM freezes its heap after start-up for the same reason.
    gc.freeze()
    return engine


def _auto_choice(model: torch.nn.Module, device: str,
                 only: str | None = None) -> tuple[torch.nn.Module, str, CostModel | None]:
    """`model` (fp32, on the host) on `device`, as is or cast to bf16, with eager or packed linears: whichever
    decodes fastest with drafting there (exact fp32 eager unless another is >10 % faster); the reason and the
    chosen curve. CUDA is measured too: on an H200, SmolLM2-135M's forwards are launch-bound and fp32 was as
    fast as bf16 (README "On a GPU"), while a large model's bf16 weights take half the memory traffic."""
    cuda = device.startswith("cuda")
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if cuda and bf16:
        # Both copies must fit beside each other to be measured; where they do not, bf16 is the one that fits.
        need, free = 6 * sum(p.numel() for p in model.parameters()), torch.cuda.mem_get_info(device)[0]
        if need > 0.8 * free:
            return cast(model, torch.bfloat16).to(device), (
                f"bfloat16 (not measured: fp32 weights and a bf16 copy take {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB of GPU memory is free)"), None
    model = model.to(device)
    candidates = [(model, k) for k in (EAGER, PACKED) if only in (None, k) and (k == EAGER or can_pack(model))]
    if bf16:
        half = cast(copy.deepcopy(model), torch.bfloat16)  # the fp32 weights stay exact
        candidates += [(half, k) for k in (EAGER, PACKED) if only in (None, k) and (k == EAGER or can_pack(half))]
        del half
    if not candidates:
        raise ValueError("packed kernels need oneDNN on the CPU with native kernels for the model's dtype")
    chosen, reason, cost = _fastest(candidates)
    if not bf16:
        reason += "; this GPU has no native bf16" if cuda else (
            "; this CPU has no native bf16: a k-token bf16 forward costs about k one-token ones, so drafting "
            "cannot pay in bf16")
    del candidates, model
    if cuda:
        torch.cuda.empty_cache()  # the candidate not chosen
    return chosen, reason, cost


def _fastest(candidates: list[tuple[torch.nn.Module, str]]) -> tuple[torch.nn.Module, str, CostModel]:
    """The (model, kernels) whose measured cost curve gives the most tokens/s with drafting; the first
    candidate (the exact one) stays unless another is more than 10 % faster, and a later one replaces
    an earlier only when 5 % faster. Curves are measured once per machine and checked against live
    forwards at each start."""
    measured = []
    for model, kind in candidates:
        (pack_linears if kind == PACKED else unpack_linears)(model)
        cost = load_cost(model, _cost_key(model))
        measured.append((drafting_rate(cost), model, kind, cost))
    best = measured[0]
    for entry in measured[1:]:  # each must clearly beat the one kept: near-equal candidates do not flip per start
        if entry[0] > (1.1 if best is measured[0] else 1.05) * best[0]:
            best = entry
    rate, model, kind, cost = best
    (pack_linears if kind == PACKED else unpack_linears)(model)
    name = lambda m, k: f"{str(next(m.parameters()).dtype).removeprefix('torch.')} {k}"  # noqa: E731
    figures = ", ".join(f"{name(m, k)} ~{r:.0f}" for r, m, k, _ in measured)
    exact = " (the exact mode)" if kind == EAGER and next(model.parameters()).dtype == torch.float32 else ""
    return model, f"{name(model, kind)} kernels{exact}: measured tok/s with drafting {figures}", cost


def _cost_key(model: torch.nn.Module) -> str:
    """What a cached cost curve belongs to (with dtype, device and machine added by `cost_path`)."""
    linears = "-invariant" if is_invariant(model) else "-packed" if linear_kernels(model) == PACKED else ""
    linears += "-stacked" if stacked_linears(model) else ""  # siblings in one matmul: a cheaper forward
    grouped = "-grouped" if model.config._attn_implementation == GROUPED else ""  # verify forwards cost less
    return f"{_model_id(model)}-{sum(p.numel() for p in model.parameters())}{linears}{grouped}"


def _model_id(model: torch.nn.Module) -> str:
    """The model's name (its directory's), which a saved drafting state records: the same on every machine."""
    return Path(str(getattr(model.config, "_name_or_path", "") or "")).name


def _vocab_size(model: torch.nn.Module) -> int:
    """Rows the recycle table needs: the width of the model's logits."""
    head = model.get_output_embeddings()
    return head.out_features if head is not None else model.config.get_text_config().vocab_size
