"""Aggregation of per-prompt benchmark records: medians, spreads, geometric-mean speedups.

Every figure is computed from per-prompt records, so a noisy machine only widens the spread:
speedups are per-prompt ratios against the baseline run of the *same* prompt (taken moments
apart, interleaved), summarised by their geometric mean.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

BASELINE = "baseline"  # transformers model.generate(): every speedup is over it
PLAIN = "plain"        # our own loop without drafting
ORACLE = "oracle"      # `oracle` / `oracle-LN`: our loop with always-right chains
COPY_ORACLE = "copy-oracle"  # `copy-oracle[-LN]`: the same, drafting only what the context holds


def _of_kind(method: str, kind: str) -> bool:
    """`method` is `kind` or one of its variants (`kind-...`)."""
    return method == kind or method.startswith(kind + "-")


def is_oracle(method: str) -> bool:
    return _of_kind(method, ORACLE)


def is_limit(method: str) -> bool:
    """An oracle of either kind: a bound shown beside the methods, not a rival."""
    return is_oracle(method) or _of_kind(method, COPY_ORACLE)


@dataclass
class Record:
    """One (prompt, method) run."""
    prompt_id: str
    category: str
    method: str
    prompt_tokens: int
    token_ids: list[int]
    wall_s: float                       # the whole call, prefill included
    prefill_s: float | None = None      # first forward (HF) / prefill (lookahead)
    forward_s: float = 0.0              # time inside the target model's forward calls
    forward_calls: int = 0              # target forwards, prefill included
    draft_s: float | None = None        # lookahead: trie drafting; assisted: draft model forwards
    step_s: float | None = None         # lookahead: draft + verify/commit time (engine's definition)
    accepted: list[int] = field(default_factory=list)  # tokens emitted per step (lookahead only)
    same_as_baseline: bool | None = None
    diverged_at: int | None = None      # first differing position vs the baseline
    tie_gap: float | None = None        # plain forward there: the two tokens' distance from the top logit
    near_tie: bool | None = None
    walls: list[float] = field(default_factory=list)  # every repeat's wall time (wall_s: the fastest)
    draft_tokens: int | None = None     # lookahead: draft nodes verified, summed over steps
    sources: dict | None = None         # lookahead: nodes proposed / accepted per draft source

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_steps(self) -> int:
        """Forwards that emitted tokens: lookahead's verify steps, or every target forward of
        transformers (its first forward covers the prompt and already emits a token)."""
        return len(self.accepted) if self.accepted else self.forward_calls

    @property
    def mean_accepted(self) -> float | None:
        """Tokens emitted per token-emitting forward, bonus token included (1.0 = plain decoding)."""
        steps = self.decode_steps
        return self.new_tokens / steps if steps else None

    @property
    def draft_share(self) -> float | None:
        if self.draft_s is None:
            return None
        denom = self.step_s if self.step_s else self.wall_s
        return self.draft_s / denom if denom else None

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(new_tokens=self.new_tokens, tokens_per_s=self.tokens_per_s, mean_accepted=self.mean_accepted,
                   draft_share=self.draft_share)
        return out

    @classmethod
    def from_json(cls, data: dict) -> Record:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def geomean(values: Iterable[float]) -> float | None:
    xs = [float(v) for v in values]
    if not xs:
        return None
    if any(x <= 0 for x in xs):
        raise ValueError("geometric mean needs positive values")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return quantile(values, 0.5)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, None when equal (a prefix of the other differs at its end)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def speedups(records: Iterable[Record], baseline: str = BASELINE) -> dict[tuple[str, str], float]:
    """Per (method, prompt_id): tokens/s over the baseline's tokens/s on the same prompt."""
    records = list(records)
    base = {r.prompt_id: r.tokens_per_s for r in records if r.method == baseline}
    out = {}
    for r in records:
        b = base.get(r.prompt_id)
        if b and r.tokens_per_s > 0:
            out[(r.method, r.prompt_id)] = r.tokens_per_s / b
    return out


def _sum_or_none(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) if xs else None


def _ratios_of(records: list[Record], ratios: dict[tuple[str, str], float]) -> list[float]:
    return [ratios[(r.method, r.prompt_id)] for r in records if (r.method, r.prompt_id) in ratios]


def summarize_group(records: list[Record], ratios: dict[tuple[str, str], float],
                    plain_ratios: dict[tuple[str, str], float] | None = None) -> dict:
    """Figures of one (method, category) group; `plain_ratios`: per-prompt speedups over `plain`."""
    tps = [r.tokens_per_s for r in records]
    sp = _ratios_of(records, ratios)
    new = sum(r.new_tokens for r in records)
    wall = sum(r.wall_s for r in records)
    fwd = sum(r.forward_s for r in records)
    steps = sum(r.decode_steps for r in records)
    draft = _sum_or_none([r.draft_s for r in records])
    step_time = _sum_or_none([r.step_s if r.step_s is not None else (r.wall_s if r.draft_s is not None else None)
                              for r in records])
    compared = [r for r in records if r.same_as_baseline is not None]
    diverged = [r for r in compared if not r.same_as_baseline]
    gaps = [r.tie_gap for r in diverged if r.tie_gap is not None]
    return {
        "n": len(records),
        "new_tokens": new,
        "tokens_per_s_median": median(tps),
        "tokens_per_s_p25": quantile(tps, 0.25),
        "tokens_per_s_p75": quantile(tps, 0.75),
        "tokens_per_s_min": min(tps) if tps else None,
        "tokens_per_s_max": max(tps) if tps else None,
        "speedup_geomean": geomean(sp),
        "speedup_min": min(sp) if sp else None,
        "speedup_max": max(sp) if sp else None,
        "speedup_vs_plain_geomean": geomean(_ratios_of(records, plain_ratios)) if plain_ratios else None,
        "mean_accepted": new / steps if steps else None,
        "draft_share": draft / step_time if draft is not None and step_time else None,
        "forward_share": fwd / wall if wall else None,  # time inside the target model's forwards
        "mean_tree_nodes": (sum(r.draft_tokens for r in records if r.draft_tokens is not None)
                            / max(sum(len(r.accepted) for r in records if r.draft_tokens is not None), 1)
                            if any(r.draft_tokens is not None for r in records) else None),
        "same_as_baseline": len(compared) - len(diverged) if compared else None,
        "compared": len(compared),
        "divergences": len(diverged),
        "near_ties": sum(1 for r in diverged if r.near_tie),
        "near_tie_checked": sum(1 for r in diverged if r.near_tie is not None),
        "max_divergence_gap": max(gaps) if gaps else None,
    }


def summarize(records: list[Record], methods: Sequence[str], categories: Sequence[str],
              baseline: str = BASELINE) -> dict:
    """{"by_category": {method: {category: figures}}, "overall": {method: figures}, "best_oracle": ..}.

    overall.speedup_geomean is the geometric mean of the category geomeans (each category
    weighs the same, as in Spec-Bench); overall.speedup_geomean_prompts pools all prompts;
    speedup_vs_plain_geomean likewise, over our own no-draft loop (when `plain` ran). When an
    oracle ran, oracle_fraction is the speedup over the best oracle's in the same column.
    """
    ratios = speedups(records, baseline)
    plain_ratios = speedups(records, PLAIN) if PLAIN in methods else None
    by_cat: dict[str, dict[str, dict]] = {}
    overall: dict[str, dict] = {}
    for m in methods:
        mine = [r for r in records if r.method == m]
        by_cat[m] = {c: summarize_group([r for r in mine if r.category == c], ratios, plain_ratios)
                     for c in categories if any(r.category == c for r in mine)}
        pooled = summarize_group(mine, ratios, plain_ratios) if mine else {}
        for key in ("speedup_geomean", "speedup_vs_plain_geomean"):
            pooled[key + "_prompts"] = pooled.get(key)
            pooled[key] = geomean(g[key] for g in by_cat[m].values() if g[key] is not None)
        overall[m] = pooled
    best = _oracle_fractions(by_cat, overall, [m for m in methods if is_oracle(m)], categories)
    return {"by_category": by_cat, "overall": overall, "best_oracle": best}


def _oracle_fractions(by_cat: dict[str, dict[str, dict]], overall: dict[str, dict], oracles: list[str],
                      categories: Sequence[str]) -> dict[str, str]:
    """Set oracle_fraction (speedup / the best oracle's, per column) in place; {column: best oracle}.

    Both speedups are over the same baseline runs, so the ratio of their geometric means is the
    geometric mean of the per-prompt ratios method / oracle."""
    columns = {c: {m: by_cat[m].get(c, {}) for m in by_cat} for c in categories}
    columns["all"] = overall
    best = {}
    for column, groups in columns.items():
        ran = [(groups[o]["speedup_geomean"], o) for o in oracles if groups[o].get("speedup_geomean")]
        top, best[column] = max(ran) if ran else (None, None)
        for g in groups.values():
            if g:
                sp = g.get("speedup_geomean")
                g["oracle_fraction"] = sp / top if top and sp is not None else None
    return best
