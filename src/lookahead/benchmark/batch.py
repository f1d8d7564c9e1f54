"""Offline batch generation measured: `engine.generate_batch` against the alternatives, same prompts, one run.

    python -m lookahead.benchmark.batch --model smollm2-135m --dtype float32 --limit 2 --max-new-tokens 96

Methods, each over the whole prompt set, in rotating order per round (machine drift hits all alike):
- `loop`: a Python loop of `engine.generate` (one request at a time, drafting on): what users did before;
- `batch`: `engine.generate_batch` (continuous batching, drafting on);
- `batch-plain`: `engine.generate_batch(draft=False)` (continuous batching, no drafts);
- `hf-padded`: `model.generate` on left-padded batches of `--max-batch` prompts (transformers' own batching).
Writes results.json and results.md; prints the table. Equality: greedy tokens against `model.generate` one
prompt at a time (padding changes a padded batch's numerics, so hf-padded may part at near-ties).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch


def _hf_padded(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int, eos) -> list[list[int]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos or None, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))  # padding follows a row's eos
            out.append(row[:end])
    return out


def main(argv: list[str] | None = None) -> int:
    import lookahead
    from lookahead.benchmark.cli import _machine, run_facts
    from lookahead.benchmark.datasets import CATEGORIES, load_prompts
    from lookahead.benchmark.report import _machine_line

    p = argparse.ArgumentParser(prog="python -m lookahead.benchmark.batch", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--limit", type=int, default=2, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/batch-api")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = lookahead.load(args.model, dtype=args.dtype)
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    prompts = [engine.encode(q.messages if chat else q.text) for c in CATEGORIES
               for q in load_prompts(c, "test", limit=args.limit)]
    n, eos = args.max_new_tokens, sorted(engine.eos_ids)
    reference = [_hf_padded(engine.model, engine.tokenizer, [q], n, 1, eos)[0] for q in prompts]

    def fresh():  # each run starts from an empty drafting state, so no method profits from another's
        return lookahead.Engine(engine.model, engine.tokenizer, engine.draft_config, cost=engine.cost)

    methods = {
        "loop": lambda: [o.token_ids for o in (fresh().generate(q, max_new_tokens=n) for q in prompts)],
        "batch": lambda: [o.token_ids for o in fresh().generate_batch(prompts, max_new_tokens=n,
                                                                       max_batch=args.max_batch, progress=False)],
        "batch-plain": lambda: [o.token_ids for o in fresh().generate_batch(
            prompts, max_new_tokens=n, max_batch=args.max_batch, draft=False, progress=False)],
        "hf-padded": lambda: _hf_padded(engine.model, engine.tokenizer, prompts, n, args.max_batch, eos),
    }
    names = list(methods)
    seconds: dict[str, list[float]] = {m: [] for m in names}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            t0 = time.perf_counter()
            outputs[m] = methods[m]()
            seconds[m].append(time.perf_counter() - t0)
            print(f"round {r + 1} {m}: {seconds[m][-1]:.1f}s", file=sys.stderr)
    rows = []
    for m in names:
        best = min(seconds[m])
        tokens = sum(len(t) for t in outputs[m])
        same = sum(a == b for a, b in zip(outputs[m], reference, strict=True))
        rows.append({"method": m, "seconds": seconds[m], "best_s": best, "tokens": tokens,
                     "tokens_per_s": tokens / best, "same_as_reference": same})
    loop = next(r for r in rows if r["method"] == "loop")["best_s"]
    facts = run_facts(engine.model, f"{args.dtype}: {engine.dtype_reason}")
    meta = {"model": args.model, "dtype": facts["torch_dtype"], "prompts": len(prompts), "max_new_tokens": n,
            "max_batch": args.max_batch, "rounds": args.rounds, "machine": _machine(), **facts,
            "command": "python -m lookahead.benchmark.batch " + " ".join(argv or sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    # Never slower, in a batch: drafting over draft=False, best round and summed rounds (one round is noisy).
    drafted, plain = seconds["batch"], seconds["batch-plain"]
    meta["drafting_over_plain"] = {"best": min(plain) / min(drafted), "summed": sum(plain) / sum(drafted)}
    lines = [f"{len(prompts)} prompts ({args.limit} per category), {n} new tokens, {args.model}, max batch "
             f"{args.max_batch}; best of {args.rounds} interleaved rounds", "", _machine_line(meta), "",
             "| method | wall s | tok/s | vs loop of generate() | same tokens as model.generate() one by one |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['best_s']:.1f} | {r['tokens_per_s']:.1f} | {loop / r['best_s']:.2f}x | "
                     f"{r['same_as_reference']}/{len(prompts)} |")
    ratio = meta["drafting_over_plain"]
    lines += ["", f"`batch` (drafting) over `batch-plain` (`draft=False`): {ratio['best']:.3f}x best round, "
              f"{ratio['summed']:.3f}x summed over the rounds"]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "results.md").write_text("# Offline batch generation\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
