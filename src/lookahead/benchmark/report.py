"""Reports: results.json (every record + the summary), results.md (tables) and PNG plots."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .stats import BASELINE, PLAIN, Record, is_limit


def _f(x, fmt: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def equality_cell(g: dict) -> str:
    """'6/6' or '4/6 (2 near-ties)'; '–' where nothing was compared (the baseline, sampling)."""
    if not g.get("compared"):
        return "–"
    cell = f"{g['same_as_baseline']}/{g['compared']}"
    if g["divergences"] and g.get("near_tie_checked"):
        cell += f" ({g['near_ties']}/{g['divergences']} near-ties)"
    return cell


def _machine_line(meta: dict) -> str:
    """CPU, its kernel-relevant flags and the numeric setup (older results.json lack the details)."""
    load = meta.get("load_average") or []
    busy = f" (1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)" \
        if len(load) == 2 and None not in load else ""
    facts = [f"{meta['machine']}{busy}"]
    if meta.get("cpu_flags") is not None:
        facts.append("flags " + (" ".join(meta["cpu_flags"]) or "none of avx/amx/fma/sse4"))
    if meta.get("isa_caps"):
        caps = " ".join(f"{k}={v}" for k, v in meta["isa_caps"].items())
        facts.append(f"**instruction sets capped: {caps}** (ATen {meta.get('aten_cpu_capability', '?')})")
    if "threads" in meta:
        facts.append(f"{meta['threads']} torch threads")
    facts.append(f"torch {meta['torch']}, transformers {meta['transformers']}")
    if meta.get("device"):
        facts.append(f"{meta['device']}, {meta['dtype']} ({meta.get('dtype_reason', '?')}), "
                     f"kernels {meta.get('kernels', '?')}, oneDNN bf16 {meta.get('mkldnn_bf16', '?')}")
    return "; ".join(facts)


def _has(methods: Sequence[str], summary: dict, key: str) -> bool:
    """Whether any method has figure `key` (it only exists when plain / an oracle ran)."""
    return any(summary["overall"].get(m, {}).get(key) is not None for m in methods)


def _column_table(methods: Sequence[str], categories: Sequence[str], summary: dict, key: str, cell) -> list[str]:
    """One row per method, one column per category and one for all (geomean of categories)."""
    by_cat, overall = summary["by_category"], summary["overall"]
    lines = ["| method | " + " | ".join(categories) + " | all (geomean of categories) |",
             "|---|" + "---:|" * (len(categories) + 1)]
    for m in methods:
        cells = [cell(by_cat[m].get(c, {}).get(key)) for c in categories]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | **{cell(overall[m].get(key))}** |")
    return lines + [""]


def _times(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def markdown(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    methods, categories = meta["methods"], meta["categories"]
    by_cat = summary["by_category"]
    lines = [f"# Benchmark: {meta['model']} ({meta['dtype']}, {meta['mode']})", ""]
    lines += [f"`{meta['command']}`", ""]
    lines += [f"{_machine_line(meta)}; {meta['prompts']} prompts ({meta['limit']} per category, test split), "
              f"max {meta['max_new_tokens']} new tokens; {meta['definitions']['cold']} "
              f"{meta['definitions']['warm']}", ""]
    drafted = [m for m in methods if m != BASELINE]
    lines += ["## Speedup over transformers greedy `generate()` (geometric mean of per-prompt ratios)", ""]
    lines += _column_table(drafted, categories, summary, "speedup_geomean", _times)
    vs_plain = [m for m in methods if m not in (BASELINE, PLAIN)]
    if _has(vs_plain, summary, "speedup_vs_plain_geomean"):
        lines += ["## Speedup over our own loop without drafting (`plain`)", ""]
        lines += _column_table(vs_plain, categories, summary, "speedup_vs_plain_geomean", _times)
    oracle = (summary.get("best_oracle") or {}).get("all")
    if _has(drafted, summary, "oracle_fraction"):
        lines += [f"## Share of the oracle's speedup (best oracle per column; overall: `{oracle}`)", ""]
        lines += _column_table(drafted, categories, summary, "oracle_fraction", _pct)
    lines += ["## Per method and category", ""]
    plain_col, oracle_col = _has(methods, summary, "speedup_vs_plain_geomean"), oracle is not None
    lines += ["| category | method | tok/s median [p25–p75] | speedup geomean [min–max] "
              + ("| vs plain " if plain_col else "") + ("| % of oracle " if oracle_col else "")
              + "| accepted tok/step | draft nodes/step | draft share | model-forward share "
              "| same tokens as baseline |",
              "|---|---|---:|---:|" + "---:|" * (plain_col + oracle_col) + "---:|---:|---:|---:|---|"]
    for c in categories:
        for m in methods:
            g = by_cat[m].get(c)
            if not g:
                continue
            tps = f"{_f(g['tokens_per_s_median'], '.1f')} [{_f(g['tokens_per_s_p25'], '.1f')}–" \
                  f"{_f(g['tokens_per_s_p75'], '.1f')}]"
            sp = "1.00x" if m == BASELINE else \
                f"{_f(g['speedup_geomean'])}x [{_f(g['speedup_min'])}–{_f(g['speedup_max'])}]"
            extra = (f"| {_times(g.get('speedup_vs_plain_geomean'))} " if plain_col else "") + \
                (f"| {_pct(g.get('oracle_fraction'))} " if oracle_col else "")
            lines.append(f"| {c} | {m} | {tps} | {sp} {extra}| {_f(g['mean_accepted'])} "
                         f"| {_f(g.get('mean_tree_nodes'), '.1f')} | {_pct(g['draft_share'])} "
                         f"| {_pct(g['forward_share'])} | {equality_cell(g)} |")
    lines += ["", "Columns: tok/s = new tokens / wall time of the whole call (prefill included), per prompt; "
              "speedup = per-prompt tok/s ratio against the baseline run of the same prompt; "
              + ("vs plain = the same against our own loop without drafting (`plain`); " if plain_col else "")
              + ("% of oracle = speedup over the best oracle's (always-right chains through our loop, "
                 "`oracle-LN`) in the same column; " if oracle_col else "")
              + "accepted tok/step = "
              "tokens emitted per token-emitting forward of the target (bonus token included; 1.00 = plain "
              "decoding); draft nodes/step = draft tokens verified per lookahead step (root excluded); "
              "draft share = drafting time over step time (lookahead: building the draft tree; assisted: "
              "draft-model forwards over wall time); model-forward share = time inside the target model's "
              "forward calls over wall time (the rest is drafting, masks, cache compaction, sampling, Python); "
              "same tokens = identical token ids to the baseline; a divergence is a near-tie when, in a plain "
              "forward at the first differing position, both tokens' logits are within "
              f"{meta['near_tie']} of the top logit.", ""]
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, default=float) + "\n")


def plot_speedups(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, by_cat, overall = results["meta"], results["summary"]["by_category"], results["summary"]["overall"]
    methods = [m for m in meta["methods"] if m != BASELINE]
    groups = list(meta["categories"]) + ["all"]
    fig, ax = plt.subplots(figsize=(2.0 + (0.9 + 0.25 * len(methods)) * len(groups), 4.8))
    width = 0.84 / max(len(methods), 1)
    top = 1.0
    for j, m in enumerate(methods):
        vals = [(by_cat[m].get(c, {}).get("speedup_geomean") if c != "all" else overall[m].get("speedup_geomean"))
                or 0.0 for c in groups]
        top = max(top, *vals)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        # The oracles are limits, not rivals: hatched, so the eye reads them as ceilings.
        style = {"hatch": "//", "alpha": 0.45} if is_limit(m) else {}
        bars = ax.bar(xs, vals, width, label=m, **style)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01 * top, f"{v:.2f}", ha="center", va="bottom",
                    fontsize=6.5, rotation=90 if len(methods) > 4 else 0)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, top * 1.18)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("speedup over model.generate() (geomean)")
    ax.set_title(f"{meta['model']} · {meta['dtype']} · {meta['mode']} · {meta['max_new_tokens']} new tokens")
    ax.legend(fontsize=8, ncols=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.08),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accepted(path: Path, results: dict, records: Sequence[Record]) -> bool:
    """Histogram of tokens emitted per step, per lookahead method and category. False if none."""
    meta = results["meta"]
    methods = [m for m in meta["methods"] if any(r.method == m and r.accepted for r in records)]
    if not methods:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(meta["categories"])
    top = max(max(r.accepted) for r in records if r.accepted)
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cats, strict=True):
        for m in methods:
            acc = [a for r in records if r.method == m and r.category == c for a in r.accepted]
            if acc:
                ax.hist(acc, bins=range(1, top + 2), density=True, histtype="step", linewidth=1.5,
                        label=f"{m} (mean {sum(acc) / len(acc):.2f})", align="left")
        ax.set_title(c)
        ax.set_xlabel("tokens per step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_all(out: Path, results: dict, records: Sequence[Record], plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    write_json(written[0], results)
    written[1].write_text(markdown(results))
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("lookahead bench: matplotlib is not installed (pip install -e '.[bench]'); no plots written")
            return written
        plot_speedups(out / "speedup.png", results)
        written.append(out / "speedup.png")
        if plot_accepted(out / "accepted_hist.png", results, records):
            written.append(out / "accepted_hist.png")
    return written
