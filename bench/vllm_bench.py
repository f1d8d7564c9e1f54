"""Speculative decoding inside vLLM: no speculation, vLLM's n-gram (default, tuned), suffix decoding, ours.

Run in the vLLM environment (`bash install.sh vllm`; suffix decoding also needs `arctic-inference`):

    .venv-vllm/bin/python bench/vllm_bench.py --limit 2 --max-new-tokens 128

The prompts are `lookahead bench`'s (test split, same categories). Every method has its own engine,
all alive at once; each prompt (concurrency 1) and each batch (concurrency 8) runs on every method in
turn, the order rotating, so machine drift hits all methods alike. Greedy, so each method's tokens are
compared with no speculation's. Each engine runs in a process of its own. Acceptance comes from vLLM's
own counters: a request-step emits one token of the model's own plus the accepted drafts, so
tokens/step = generated / (generated - accepted).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

PROPOSER = "lookahead.integrations.vllm.LookaheadProposer"
METHODS: dict[str, dict | None] = {
    "none": None,
    # vLLM's defaults: prompt_lookup_min = max = 5 when neither is given.
    "ngram": {"method": "ngram", "num_speculative_tokens": 5},
    "ngram-tuned": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix"},
    # Drafts up to 12 deep, as the engine's default depth: the chain length itself is chosen per step.
    "lookahead": {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 12},
}
CATEGORIES = ("code", "chat", "summary", "qa")


def cpu_description() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = set(open("/proc/cpuinfo").read().split())
    return {"model": model, "cores": os.cpu_count(),
            "flags": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2"),
            "platform": platform.platform()}


def exported_model(name: str) -> Path:
    """The named model as a safetensors directory (exported once, cached)."""
    from lookahead.export import export
    from lookahead.weights import cache_root

    out = cache_root() / "export" / f"{name}-float32"
    if not (out / "model.safetensors").is_file():
        export(name, out, "float32")
    return out


def counters(llm) -> dict[str, float]:
    out = {"generation_tokens": 0.0, "spec_decode_num_accepted_tokens": 0.0}
    for metric in llm.get_metrics():
        key = metric.name.removeprefix("vllm:")
        if key in out:
            out[key] = float(metric.value)
    return out


def run(llm, prompts: list, max_new_tokens: int) -> dict:
    from vllm import SamplingParams

    before = counters(llm)
    start = time.perf_counter()
    outputs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    seconds = time.perf_counter() - start
    after = counters(llm)
    generated = after["generation_tokens"] - before["generation_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    return {"seconds": seconds, "tokens": generated, "tokens_per_s": generated / seconds,
            "tokens_per_step": generated / max(generated - accepted, 1),
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}


def geomean(values: list[float]) -> float | None:
    import math
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(records: list[dict], methods: list[str]) -> dict:
    """Per method: concurrency-1 speedup per category (geomean of per-prompt ratios to `none`), and
    concurrency-8 throughput ratio (geomean over batches); tokens/step; same tokens as `none`."""
    base = {r["prompt"]: r for r in records if r["method"] == "none" and r["concurrency"] == 1}
    base8 = {r["prompt"]: r for r in records if r["method"] == "none" and r["concurrency"] == 8}
    out = {}
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        row = {"concurrency_1": {}, "same_tokens": [0, 0]}
        for c in CATEGORIES:
            rs = [r for r in mine if r["concurrency"] == 1 and r["category"] == c]
            if not rs:
                continue
            ratios = [r["tokens_per_s"] / base[r["prompt"]]["tokens_per_s"] for r in rs]
            row["concurrency_1"][c] = {"speedup": geomean(ratios),
                                       "tokens_per_s": sorted(r["tokens_per_s"] for r in rs)[len(rs) // 2],
                                       "tokens_per_step": sum(r["tokens"] for r in rs) /
                                       sum(r["tokens"] / r["tokens_per_step"] for r in rs)}
        ones = [r for r in mine if r["concurrency"] == 1]
        row["concurrency_1_all"] = geomean([r["tokens_per_s"] / base[r["prompt"]]["tokens_per_s"]
                                            for r in ones])
        eights = [r for r in mine if r["concurrency"] == 8]
        ratios8 = [r["tokens_per_s"] / base8[r["prompt"]]["tokens_per_s"] for r in eights]
        row["concurrency_8"] = {"speedup": geomean(ratios8),
                                "tokens_per_s": sorted(r["tokens_per_s"] for r in eights)[len(eights) // 2]
                                if eights else None,
                                "tokens_per_step": sum(r["tokens"] for r in eights) /
                                sum(r["tokens"] / r["tokens_per_step"] for r in eights) if eights else None}
        for r in mine:
            reference = base[r["prompt"]] if r["concurrency"] == 1 else base8[r["prompt"]]
            for a, b in zip(r["token_ids"], reference["token_ids"], strict=True):
                row["same_tokens"][0] += a == b
                row["same_tokens"][1] += 1
        out[m] = row
    return out


def markdown(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    cpu = meta["cpu"]
    lines = [f"# Inside vLLM {meta['vllm']}: {meta['model']} ({meta['dtype']}, greedy)", "",
             f"`{meta['command']}`", "",
             f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {', '.join(cpu['flags'])}. "
             f"1-min load average {meta['load_average'][0]:.1f} at the start, "
             f"{meta['load_average'][1]:.1f} at the end. "
             f"concurrency 1: {meta['prompts']} prompts ({meta['limit']} per category, test split), "
             f"{meta['max_new_tokens']} new tokens, "
             f"concurrency 8: {meta['batches']} batches of 8 other prompts (2 per category); each prompt runs once "
             f"per method; vLLM in eager mode (`enforce_eager`), {meta['threads']}.", "",
             "Speedup over vLLM without speculation (concurrency 1: geometric mean of per-prompt tokens/s ratios; "
             "concurrency 8: each batch of 8 submitted at once, geometric mean over batches):", "",
             "| method | " + " | ".join(CATEGORIES)
             + " | all (c=1) | c=8 | tokens/step (c=1 per category) | same tokens |",
             "|---|" + "---:|" * (len(CATEGORIES) + 3) + "---|"]
    for m, row in summary.items():
        c1 = row["concurrency_1"]
        cells = [f"{c1[c]['speedup']:.2f}x" if c in c1 else "–" for c in CATEGORIES]
        steps = " / ".join(f"{c1[c]['tokens_per_step']:.2f}" if c in c1 else "–" for c in CATEGORIES)
        c8 = row["concurrency_8"]["speedup"]
        same = f"{row['same_tokens'][0]}/{row['same_tokens'][1]}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | **{row['concurrency_1_all']:.2f}x** | "
                     f"{c8:.2f}x | {steps} | {same} |")
    lines += ["", "Tokens/s (median, concurrency 1 per category; concurrency 8 aggregate):", "",
              "| method | " + " | ".join(CATEGORIES) + " | c=8 |", "|---|" + "---:|" * (len(CATEGORIES) + 1)]
    for m, row in summary.items():
        c1 = row["concurrency_1"]
        cells = [f"{c1[c]['tokens_per_s']:.1f}" if c in c1 else "–" for c in CATEGORIES]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {row['concurrency_8']['tokens_per_s']:.1f} |")
    if meta.get("failed"):
        lines += ["", "Methods that could not run: " + "; ".join(f"{k}: {v}" for k, v in meta["failed"].items())]
    if meta.get("proposer_metrics"):
        lines += ["", "Our proposer's counters at the end (per source: nodes proposed / accepted):", "",
                  "```", meta["proposer_metrics"].strip(), "```"]
    return "\n".join(lines) + "\n"


def plot(path: Path, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    methods = [m for m in summary if m != "none"]
    groups = [*CATEGORIES, "c=8"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        row = summary[m]
        values = [row["concurrency_1"].get(c, {}).get("speedup") or 0 for c in CATEGORIES]
        values.append(row["concurrency_8"]["speedup"] or 0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                  [f"{c}\n(c=1)" for c in CATEGORIES] + ["all\n(c=8)"])
    ax.set_ylabel("speedup over no speculation")
    ax.set_title(f"vLLM {results['meta']['vllm']} on CPU, {results['meta']['model']} {results['meta']['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def serve_method(conn, model: str, spec: dict | None) -> None:
    """One method's engine in a process of its own: vLLM's metric registry is per process, and a second
    LLM in one process would take it over from the first."""
    from vllm import LLM

    try:
        llm = LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=512 << 20,
                  max_model_len=4096, seed=0, disable_log_stats=False, speculative_config=spec)
        run(llm, [[{"role": "user", "content": "Say hello."}]], 8)  # warm-up, not timed
        conn.send(("ready", None))
    except Exception as e:  # e.g. suffix decoding without arctic-inference: recorded, the rest runs
        conn.send(("failed", f"{type(e).__name__}: {e}"[:300]))
        return
    while (job := conn.recv()) is not None:
        conn.send(run(llm, *job))
    llm.llm_engine.engine_core.shutdown()
    conn.send("bye")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3, help="prompts per category at concurrency 1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2, help="batches of 8 (2 per category) at concurrency 8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import multiprocessing

    import vllm

    from lookahead.benchmark.datasets import load_prompts

    model = exported_model(args.model)
    # Every prompt is run once per method, and the batches use prompts of their own: the shared trie and
    # suffix decoding's tree remember earlier answers, so a repeated prompt would measure a replay.
    per_category = {c: load_prompts(c, "test", args.limit + 2 * args.batches) for c in CATEGORIES}
    prompts = [(c, p) for c in CATEGORIES for p in per_category[c][:args.limit]]
    batches = [[p for c in CATEGORIES for p in per_category[c][args.limit + 2 * b:args.limit + 2 * b + 2]]
               for b in range(args.batches)]
    out = Path(args.out or f"bench/results/vllm-{args.model}-float32")
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "proposer_metrics.prom"
    os.environ.update({"LOOKAHEAD_VLLM_METRICS": str(metrics_file.resolve()), "LOOKAHEAD_VLLM_METRICS_EVERY": "16"})
    load = [os.getloadavg()[0]]

    ctx = multiprocessing.get_context("spawn")
    engines, failed = {}, {}
    for name in args.methods.split(","):  # one at a time: engine start-up is CPU-heavy
        parent, child = ctx.Pipe()
        process = ctx.Process(target=serve_method, args=(child, str(model), METHODS[name]))
        process.start()
        status, detail = parent.recv()
        if status == "ready":
            engines[name] = (process, parent)
        else:
            failed[name] = detail
            process.join()
            print(f"[bench] {name} failed: {detail}", flush=True)
    methods = list(engines)
    records = []
    jobs = [("one", i) for i in range(len(prompts))] + [("batch", b) for b in range(len(batches))]
    for turn, (kind, i) in enumerate(jobs):
        order = methods[turn % len(methods):] + methods[:turn % len(methods)]
        for m in order:
            _, conn = engines[m]
            if kind == "one":
                category, p = prompts[i]
                conn.send(([p.messages], args.max_new_tokens))
                r = conn.recv()
                r.update(method=m, concurrency=1, category=category, prompt=p.id)
            else:
                conn.send(([p.messages for p in batches[i]], args.max_new_tokens))
                r = conn.recv()
                r.update(method=m, concurrency=8, category="all", prompt=f"batch{i}")
            records.append(r)
            print(f"[bench] {m:12s} c={r['concurrency']} {r['category']:8s} {r['prompt']:>12s} "
                  f"{r['tokens_per_s']:6.1f} tok/s {r['tokens_per_step']:.2f} tok/step", flush=True)
    load.append(os.getloadavg()[0])
    (out / "records.json").write_text(json.dumps(records))  # raw, in case the report below fails
    for process, conn in engines.values():
        conn.send(None)
        conn.recv()
        process.join(timeout=60)
    results = {"meta": {"model": args.model, "dtype": "float32", "vllm": vllm.__version__, "cpu": cpu_description(),
                        "command": "python bench/vllm_bench.py " + " ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
                        "prompts": len(prompts), "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                        "batches": args.batches, "methods": methods, "failed": failed, "load_average": load,
                        "threads": "vLLM's CPU worker default (1 torch thread on this 2-core machine)",
                        "specs": {m: METHODS[m] for m in methods},
                        "proposer_metrics": metrics_file.read_text() if metrics_file.is_file() else None},
               "summary": summarize(records, methods), "records": records}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(out / "speedup.png", results)
    print(markdown(results))


if __name__ == "__main__":
    main()
