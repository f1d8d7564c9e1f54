"""`lookahead bench`: the peers and lookahead in one interleaved run, or the verify-cost curve."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

DEFAULT_METHODS = "baseline,pld,assisted,lookahead,lookahead-warm"
DEFAULT_DTYPE = "auto"
# Classic speculative decoding needs a draft model with the target's tokenizer.
ASSISTANTS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark lookahead against transformers greedy, prompt lookup and assisted generation",
        description="Runs every method on each prompt in turn (interleaved), then writes results.json, "
                    "results.md and PNG plots to --out. With --cost-curve: the verify cost t(k)/t(1) instead.")
    p.add_argument("--model", default="smollm2-135m", help="named model, .gguf file or HF directory")
    p.add_argument("--dtype", default=None, help="auto (the default: what the engine picks here), bfloat16 or "
                   "float32 (the exact reference)")
    p.add_argument("--kernels", default="auto", choices=["auto", "eager", "packed"],
                   help="linear kernels (default auto: with --dtype auto, whichever decodes fastest here; "
                        "the choice can flip between runs where the two measure within noise)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tasks", default="code,chat,summary,qa", help="comma-separated categories")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated: baseline, pld (n-gram 3), pld-nN, assisted, lookahead (cold trie), "
                        "lookahead-warm, lookahead[-warm][-nNODES-dDEPTH[-mMATCH]][-sSRC+SRC][-fixed] "
                        "(a DraftConfig variant: size, sources, fixed sizing), plain (our loop, no drafting), "
                        "oracle-LN (our loop, always-right chains of N tokens; greedy only; oracle = oracle-L16), "
                        "copy-oracle[-LN] (the same, drafting only what could be copied from the context); "
                        f"default {DEFAULT_METHODS} (assisted only where a draft model is known)")
    p.add_argument("--limit", type=int, default=6, help="test prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-chars", type=int, default=6000, help="skip longer prompts (prefill cost)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<model>-<dtype>-<mode>)")
    p.add_argument("--assistant", default=None, help="draft model for 'assisted' (default: the target's known "
                   "same-tokenizer draft, e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)")
    p.add_argument("--sampling", action="store_true", help="sample (temperature/top-p/top-k, seeded) instead of "
                   "greedy, in every method")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50, help="as transformers' default; 0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-source", choices=("self", "reference"), default="self",
                   help="what warms the trie of lookahead-warm: the model's own greedy answers to train prompts "
                        "(generated once, cached on disk; as the Lookahead paper does) or the datasets' "
                        "reference answers (code and qa only)")
    p.add_argument("--warm-limit", type=int, default=8, help="train prompts per category for the warm-up")
    p.add_argument("--trie-scope", choices=("prompt", "run"), default="prompt",
                   help="prompt: each prompt starts from the same trie (cold: empty; warm: the warm-up only), "
                        "so results do not depend on prompt order; run: each method's trie keeps learning "
                        "across the run's prompts, as a server's would")
    p.add_argument("--max-nodes", type=int, default=None, help="DraftConfig.max_nodes for lookahead")
    p.add_argument("--max-depth", type=int, default=None, help="DraftConfig.max_depth for lookahead")
    p.add_argument("--copy-depth", type=int, default=None, help="DraftConfig.copy_depth for lookahead")
    p.add_argument("--max-match", type=int, default=None, help="DraftConfig.max_match for lookahead")
    p.add_argument("--repeats", type=int, default=1, help="runs per prompt and method (interleaved); the fastest "
                   "counts: on a shared machine interference only ever adds time")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--near-tie", type=float, default=None,
                   help="a divergence is a near-tie when both tokens' logits in a plain forward are within this of "
                        "the top logit (default 0.25 for bf16/fp16, 1e-3 for fp32)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="only re-render DIR/results.md and the plots from DIR/results.json (no model is loaded)")
    p.add_argument("--cost-curve", action="store_true", help="measure the verify cost t(k)/t(1) instead")
    p.add_argument("--context", type=int, default=512, help="cost curve: cached context length")
    p.add_argument("--ks", default=None, help="cost curve: comma-separated k values (default 1..128)")
    p.add_argument("--reps", type=int, default=7, help="cost curve: timed repetitions per k")
    p.set_defaults(func=run_cli)
    return p


def _cpu_model() -> str:
    from ..decoding.cost import cpu_info

    return cpu_info()[0] or platform.processor() or platform.machine()


def _machine() -> str:
    return f"{_cpu_model()}, {os.cpu_count()} cores"


def _resolve_dtype(args: argparse.Namespace) -> None:
    """Fill in the default --dtype and say why the run uses the dtype it does (results.json records it)."""
    if args.dtype is None:
        args.dtype = DEFAULT_DTYPE
        args.dtype_reason = "default (auto: the engine's choice on this machine)"
    else:
        args.dtype_reason = f"--dtype {args.dtype} given on the command line"


def _mkldnn_bf16() -> bool | None:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent or failing on some builds
        return None


def run_facts(model, dtype_reason: str) -> dict:
    """What decides kernel speed, for results.json: CPU and its flags, threads, versions, oneDNN bf16
    support, device, dtype and why that dtype."""
    import torch

    from ..decoding.cost import ISA_CAPS, cpu_info
    from ..decoding.kernels import running_kernels

    param = next(model.parameters())
    return {"cpu_model": _cpu_model(), "cpu_flags": cpu_info()[1], "cores": os.cpu_count(),
            "threads": torch_threads(), **_versions(), "mkldnn_bf16": _mkldnn_bf16(),
            # Instruction-set caps set for MKL / oneDNN / ATen (e.g. an AVX2-only CPU emulated), and ATen's pick.
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)},
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(param.device), "torch_dtype": str(param.dtype).removeprefix("torch."),
            "dtype_reason": dtype_reason,
            # Linear layers: eager F.linear, oneDNN-packed weights, or the deterministic mode's invariant tiles.
            "kernels": running_kernels(model),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def _default_out(args, mode: str) -> Path:
    from .harness import slug

    name = args.model if "/" not in args.model and os.sep not in args.model else slug(args.model)
    return Path("bench") / "results" / f"{name}-{args.dtype}-{mode}"


def _command(args, methods: list[str]) -> str:
    parts = ["lookahead bench", f"--model {args.model}", f"--dtype {getattr(args, 'dtype_asked', args.dtype)}"]
    if args.cost_curve:
        parts += ["--cost-curve", f"--context {args.context}", f"--reps {args.reps}"]
        if args.ks:
            parts.append(f"--ks {args.ks}")
        return " ".join(parts)
    parts += [f"--tasks {args.tasks}", f"--methods {','.join(methods)}", f"--limit {args.limit}",
              f"--max-new-tokens {args.max_new_tokens}"]
    if args.kernels != "auto":
        parts.append(f"--kernels {args.kernels}")
    if args.repeats != 1:
        parts.append(f"--repeats {args.repeats}")
    if args.threads != 2:
        parts.append(f"--threads {args.threads}")
    if args.max_prompt_chars != 6000:
        parts.append(f"--max-prompt-chars {args.max_prompt_chars}")
    if any("warm" in m for m in methods):
        parts += [f"--warm-source {args.warm_source}", f"--warm-limit {args.warm_limit}"]
    if args.trie_scope != "prompt":
        parts.append(f"--trie-scope {args.trie_scope}")
    for flag in ("max_nodes", "max_depth", "copy_depth", "max_match", "assistant"):
        if getattr(args, flag) is not None:
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    if args.sampling:
        parts += ["--sampling", f"--temperature {args.temperature}", f"--top-p {args.top_p}",
                  f"--top-k {args.top_k}", f"--seed {args.seed}"]
    return " ".join(parts)


def run_cli(args: argparse.Namespace) -> int:
    # No OMP_WAIT_POLICY is forced: PASSIVE (threads sleep between ops) doubled a SmolLM2 forward on a quiet
    # 2-core machine (145 vs 54 ms); benchmarks measure what users get. results.json records the variable.
    import torch

    torch.set_num_threads(args.threads)
    _resolve_dtype(args)
    if args.report:
        return _rerender(Path(args.report), plots=not args.no_plots)
    if args.cost_curve:
        return _cost_curve(args)
    return _bench(args)


def _rerender(folder: Path, plots: bool = True) -> int:
    from .report import write_all
    from .stats import Record, summarize

    results = json.loads((folder / "results.json").read_text())
    records = [Record.from_json(r) for r in results["records"]]
    results["summary"] = summarize(records, results["meta"]["methods"], results["meta"]["categories"])
    written = write_all(folder, results, records, plots=plots)
    print("written: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _load_engine(args):
    import lookahead

    sizes = {k: v for k, v in (("max_nodes", args.max_nodes), ("max_depth", args.max_depth),
                               ("copy_depth", args.copy_depth), ("max_match", args.max_match)) if v is not None}
    engine = lookahead.load(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
                            draft_config=lookahead.DraftConfig(**sizes))
    # Results are named and recorded by the dtype that ran (auto resolves here); other models load in it.
    args.dtype_asked = args.dtype
    args.dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    return engine


def _cost_curve(args) -> int:
    from tqdm import tqdm

    from . import cost

    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else cost.DEFAULT_KS
    if 1 not in ks:
        ks = (1, *ks)
    engine = _load_engine(args)
    ids = cost.context_ids(engine.tokenizer, args.context + max(ks))
    with tqdm(total=2 + args.reps, desc="cost curve (rounds over all k)", file=sys.stderr) as bar:
        curve = cost.cost_curve(engine.model, ids, context=args.context, ks=ks, reps=args.reps,
                                progress=bar.update)
    out = Path(args.out) if args.out else _default_out(args, "cost")
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.model} · {args.dtype} · {torch_threads()} threads · {_machine()}"
    curve["meta"] = {"model": args.model, "dtype": args.dtype, "machine": _machine(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "command": _command(args, []),
                     **run_facts(engine.model, f"{args.dtype_reason}; {engine.dtype_reason}"),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out / "cost_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    md = cost.markdown(curve, title)
    (out / "cost_curve.md").write_text(md)
    if not args.no_plots:
        cost.plot(out / "cost_curve.png", curve, title)
    print(md)
    print(f"written to {out}/", file=sys.stderr)
    return 0


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _items(engine, categories, split: str, limit: int, max_chars: int):
    from .datasets import load_prompts
    from .harness import Item

    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    out = {}
    for c in categories:
        prompts = load_prompts(c, split, limit=limit, max_prompt_chars=max_chars)
        out[c] = [(p, Item(p.id, c, engine.encode(p.messages if chat else p.text))) for p in prompts]
    return out


def _bench(args) -> int:
    from tqdm import tqdm

    from .datasets import CATEGORIES
    from .harness import (
        NEAR_TIE,
        mark_equality,
        run_interleaved,
        self_answers,
        warm_cache_path,
        warm_pairs,
        warm_up_methods,
    )
    from .methods import Context, parse_method
    from .report import markdown, write_all
    from .stats import BASELINE, summarize

    categories = [c.strip() for c in args.tasks.split(",") if c.strip()]
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown task {c!r}; choose from {', '.join(CATEGORIES)}")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    assistant_name = args.assistant or ASSISTANTS.get(args.model)
    if "assisted" in names and assistant_name is None:
        if args.methods != DEFAULT_METHODS:
            raise ValueError(f"method 'assisted' needs --assistant: no known draft model for {args.model!r}")
        names.remove("assisted")  # the default list: skip what this model cannot run
    if BASELINE not in names:
        names.insert(0, BASELINE)  # every speedup is against it
    if len(set(names)) != len(names):
        raise ValueError("a method is listed twice")
    if args.repeats < 1 or (args.repeats > 1 and args.trie_scope == "run"):
        raise ValueError("--repeats must be >= 1, and 1 with --trie-scope run (a repeat would teach the trie "
                         "the very answer it then drafts)")

    engine = _load_engine(args)
    specs = [parse_method(n, engine.draft_config) for n in names]
    sampling = None
    if args.sampling:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    assistant = None
    if "assisted" in names:
        from ..models import load_model

        assistant, draft_tok = load_model(assistant_name, dtype=args.dtype, device=args.device)
        if len(draft_tok) != len(engine.tokenizer):
            print(f"lookahead bench: warning: draft tokenizer ({len(draft_tok)}) and target tokenizer "
                  f"({len(engine.tokenizer)}) differ in size", file=sys.stderr)
    dtype = next(engine.model.parameters()).dtype
    threshold = None if sampling else (args.near_tie if args.near_tie is not None else NEAR_TIE.get(dtype, 0.25))

    tests = _items(engine, categories, "test", args.limit, args.max_prompt_chars)
    # Category by category, so a partial run still covers whole categories; interleaved within.
    items = [it for c in categories for _, it in tests[c]]
    if not items:
        raise ValueError("no prompts selected")
    by_id = {it.id: it for it in items}

    ctx = Context(engine, args.max_new_tokens, sampling=sampling, seed=args.seed, assistant=assistant,
                  trie_scope=args.trie_scope)
    if any(s.warm for s in specs):
        train = _items(engine, categories, "train", args.warm_limit, args.max_prompt_chars)
        train_items = [it for c in categories for _, it in train[c]]
        if args.warm_source == "self":
            cache = warm_cache_path(args.model, args.dtype, args.max_new_tokens)
            meta = {"model": args.model, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                    "what": "greedy answers of the model (lookahead, greedy-exact) to train prompts"}
            with tqdm(total=len(train_items), desc="warm-up: model answers to train prompts", file=sys.stderr) as bar:
                answers = self_answers(engine, train_items, args.max_new_tokens, cache, meta,
                                       progress=lambda it: (bar.set_postfix_str(it.id), bar.update()))
        else:
            answers = {}
            for c in categories:
                for p, it in train[c]:
                    if p.reference:
                        ref = engine.tokenizer(p.reference, add_special_tokens=False).input_ids
                        answers[it.id] = {"prompt_tail": it.ids[-16:], "answer": ref}
        ctx.warm_corpus = warm_pairs(answers, train_items)
        print(f"warm-up corpus: {len(ctx.warm_corpus)} answers, "
              f"{sum(len(a) for _, a in ctx.warm_corpus)} tokens ({args.warm_source})", file=sys.stderr)

    load_before = _loadavg()
    short = min(items, key=lambda it: len(it.ids))
    warm_up_methods(ctx, specs, short.ids)
    out = Path(args.out) if args.out else _default_out(args, "sampling" if sampling else "greedy")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "records.partial.jsonl"  # the run so far, record by record; removed when done
    with tqdm(total=len(items) * len(specs) * args.repeats, desc="bench", file=sys.stderr) as bar, \
            partial.open("w") as saved:
        records = run_interleaved(ctx, items, specs, args.repeats,
                                  lambda what: (bar.set_postfix_str(what), bar.update()),
                                  lambda r: (saved.write(json.dumps(r.to_json()) + "\n"), saved.flush()))
    with tqdm(total=1, desc="checking divergences (plain forwards)", file=sys.stderr) as bar:
        mark_equality(records, by_id, engine.model, threshold)
        bar.update()

    summary = summarize(records, names, categories)
    cfg = engine.draft_config
    results = {
        "meta": {
            "command": _command(args, names), "model": args.model, "dtype": args.dtype,
            "mode": "sampling" if sampling else "greedy", "sampling": sampling, "seed": args.seed,
            "categories": categories, "methods": names, "limit": args.limit, "prompts": len(items),
            "repeats": args.repeats,
            "max_new_tokens": args.max_new_tokens, "max_prompt_chars": args.max_prompt_chars,
            "assistant": assistant_name if assistant is not None else None,
            "draft_config": {"max_nodes": engine.max_nodes, "max_depth": cfg.max_depth, "copy_depth": cfg.copy_depth,
                             "max_match": cfg.max_match, "capacity": cfg.capacity},
            "pld": {"prompt_lookup_num_tokens": 10}, "near_tie": threshold,
            "warm_source": args.warm_source, "warm_limit": args.warm_limit, "trie_scope": args.trie_scope,
            "warm_corpus_answers": len(ctx.warm_corpus),
            "warm_corpus_tokens": sum(len(a) for _, a in ctx.warm_corpus),
            "machine": _machine(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": [load_before, _loadavg()],  # 1-minute load at the start and end of the timed part
            **run_facts(engine.model, f"{args.dtype_reason}; {engine.dtype_reason}"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "definitions": {
                "cold": ("lookahead = cold: every prompt starts from a fresh engine state (empty shared trie, "
                         "empty recycle table), so it drafts from the prompt and its own output only."
                         if args.trie_scope == "prompt" else
                         "lookahead = cold: the run starts from a fresh engine state (empty shared trie and "
                         "recycle table) that learns from every prompt run before (prompts run in order)."),
                "warm": (f"lookahead-warm: the shared trie first learns the model's own greedy answers to "
                         f"{args.warm_limit} train prompts per category (cached on disk)" if args.warm_source == "self"
                         else f"lookahead-warm: the shared trie first learns the dataset reference answers of "
                              f"{args.warm_limit} train prompts per category")
                        + (" (the rest of the state starts empty), restored before every prompt."
                           if args.trie_scope == "prompt" else ", then keeps learning across the run."),
            },
        },
        "summary": summary,
        "prompts": [{"id": it.id, "category": it.category, "prompt_tokens": len(it.ids)} for it in items],
        "records": [r.to_json() for r in records],
    }
    written = write_all(out, results, records, plots=not args.no_plots)
    partial.unlink(missing_ok=True)
    print(markdown(results))
    print("written: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
