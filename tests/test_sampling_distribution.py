"""Drafting does not change the sampled distribution; a biased accept rule is caught by the same test.

Setup: a tiny random llama whose lm_head is scaled so that next-token distributions are peaked
(top token ~0.5), a repetitive prompt, and a trie warmed on the model's own samples, so that
nearly every 3-token continuation is drafted and accepted in one step.

Statistic: Pearson's chi-square test of homogeneity on the joint outcome (x1, x2, x3) of the
first three sampled tokens, N samples per arm, outcomes seen fewer than 10 times over both arms
pooled into one cell (so every expected count is >= 5). We reject "same distribution" at
alpha = 1e-3. All seeds are fixed, so the test is deterministic; the arms use disjoint seeds,
so they are independent samples.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import IdTokenizer, tiny_model
from lookahead import Engine
from lookahead.decoding.sampling import Sampler

N = 1000
ALPHA = 1e-3
PROMPT = [5, 9, 12, 7, 30] * 4
# Penalised sampling: the repetition penalty sees each node's own path, so it is part of what is tested.
PARAMS = dict(do_sample=True, top_p=0.95, repetition_penalty=1.2)


def chi2_homogeneity(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of Pearson's 2 x K test that a and b share one distribution."""
    pooled_a, pooled_b = Counter(), Counter()
    for key in set(a) | set(b):
        cell = key if a[key] + b[key] >= min_count else "other"
        pooled_a[cell] += a[key]
        pooled_b[cell] += b[key]
    cells = sorted(set(pooled_a) | set(pooled_b), key=str)
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for cell in cells:
        total = pooled_a[cell] + pooled_b[cell]
        for observed, n in ((pooled_a[cell], na), (pooled_b[cell], nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    df = len(cells) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))  # chi2 survival function
    return stat, df, p


def peaked_engine() -> Engine:
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(60)  # random logits ~N(0, 0.03) -> a top token near p = 0.5
    engine = Engine(model, IdTokenizer())
    for i in range(50):  # warm the shared trie on the model's own samples
        engine.generate(PROMPT, max_new_tokens=6, seed=10**6 + i, **PARAMS)
    return engine


def draw(engine: Engine, seeds: range, draft: bool) -> tuple[Counter, float]:
    """Joint 3-token outcomes for each seed, and the mean accepted tokens per step."""
    outcomes, tokens, steps = Counter(), 0, 0
    for seed in seeds:
        out = engine.generate(PROMPT, max_new_tokens=3, draft=draft, seed=seed, **PARAMS)
        outcomes[tuple(out.token_ids)] += 1
        tokens, steps = tokens + out.stats.new_tokens, steps + out.stats.steps
    return outcomes, tokens / steps


# -- deliberately wrong accept rules (negative controls) ----------------------------------
def favour_drafts(self: Sampler, tree, logits, context):
    """Biased: take a draft child outright whenever its probability exceeds 0.1; else sample."""
    path, nodes, emitted, node = list(context), [0], [], 0
    while True:
        probs = torch.softmax(self.process(path, logits[node]), dim=-1)
        likely = [c for c in tree.children[node] if probs[tree.tokens[c]] > 0.1]
        if likely:
            token = tree.tokens[max(likely, key=lambda c: probs[tree.tokens[c]])]
        else:
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        emitted.append(token)
        child = next((c for c in tree.children[node] if tree.tokens[c] == token), None)
        if child is None:
            return nodes, emitted
        nodes.append(child)
        path.append(token)
        node = child


def longest_of_independent_branches(self: Sampler, tree, logits, context):
    """REST-style (biased): sample every root-to-leaf branch independently, keep the longest accepted one."""
    best = None
    for leaf in (i for i in range(len(tree)) if not tree.children[i]):
        branch, path, nodes, emitted = tree.path_to(leaf), list(context), [0], []
        for i, node in enumerate(branch):
            token = self.choose(path, logits[node])
            emitted.append(token)
            if i + 1 == len(branch) or tree.tokens[branch[i + 1]] != token:
                break
            nodes.append(branch[i + 1])
            path.append(token)
        if best is None or len(nodes) > len(best[0]):
            best = (nodes, emitted)
    return best


@pytest.fixture(scope="module")
def plain():
    engine = peaked_engine()
    outcomes, mean_accepted = draw(engine, range(0, N), draft=False)
    assert mean_accepted == 1.0
    return outcomes


def test_drafting_keeps_the_sampled_distribution(plain):
    drafted, mean_accepted = draw(peaked_engine(), range(N, 2 * N), draft=True)
    assert mean_accepted > 2.5, "drafts were hardly accepted: the test would not exercise tree sampling"
    stat, df, p = chi2_homogeneity(plain, drafted)
    print(f"exact rule: chi2 = {stat:.1f}, df = {df}, p = {p:.3g}")
    assert df >= 10 and p > ALPHA


@pytest.mark.parametrize("biased_rule", [favour_drafts, longest_of_independent_branches])
def test_the_same_test_catches_a_biased_accept_rule(plain, biased_rule, monkeypatch):
    monkeypatch.setattr(Sampler, "accept", biased_rule)
    biased, mean_accepted = draw(peaked_engine(), range(2 * N, 3 * N), draft=True)
    stat, df, p = chi2_homogeneity(plain, biased)
    print(f"{biased_rule.__name__}: chi2 = {stat:.1f}, df = {df}, p = {p:.3g}")
    assert p < ALPHA
