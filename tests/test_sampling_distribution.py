"""Drafting does not change the sampled distribution; a biased accept rule is caught by the same test.

Setup: a tiny random llama whose lm_head is scaled so that next-token distributions are peaked
(top token ~0.5), a repetitive prompt, and a trie warmed on the model's own samples, so that
nearly every 3-token continuation is drafted and accepted in one step.

Statistic: Pearson's chi-square test of homogeneity on the joint outcome (x1, x2, x3) of the
first three sampled tokens, N samples per arm, outcomes seen fewer than 10 times over both arms
pooled into one cell (so every other cell has expected counts >= 5). We reject "same distribution" at
alpha = 1e-3. All seeds are fixed, so the test is deterministic; the arms use disjoint seeds,
so they are independent samples.

Power, measured on 5 disjoint seed blocks at N = 800 (this one and 4 more): the exact rule gave
p = 0.92, 0.5, 0.6, 0.96, 0.56 (no false rejection); the biased rule below p < 1e-108 every time.
A subtler, real-world bias -- REST's rule, one independent draw per root-to-leaf branch, the
longest accepted branch kept -- was rejected in 4 of 5 blocks (p = 2.7e-5, 1e-6, 4.4e-5, 4.8e-6,
and 2.1e-3), i.e. ~80% power at this N; it is not asserted here, as a drafting change could move
it either way.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import IdTokenizer, tiny_model
from lookahead import DraftConfig, Engine
from lookahead.decoding.accept import accept_walk
from lookahead.decoding.sampling import Sampler
from lookahead.drafting.state import SOURCES

N = 800
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
    # A fixed 24-node budget: the trees (and so the power against branch-wise biases) do not
    # depend on how fast this machine runs the cost calibration.
    engine = Engine(model, IdTokenizer(), DraftConfig(sizing="fixed", sources=SOURCES))
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
    def choose(path, node_logits):
        node = 0  # the node whose logits these are: follow the drafted tokens from the root
        for token in path[len(context):]:
            node = next(c for c in tree.children[node] if tree.tokens[c] == token)
        probs = torch.softmax(self.process(path, node_logits), dim=-1)
        likely = [c for c in tree.children[node] if probs[tree.tokens[c]] > 0.1]
        if likely:
            return tree.tokens[max(likely, key=lambda c: probs[tree.tokens[c]])]
        return int(torch.multinomial(probs, 1, generator=self.generator))
    return accept_walk(tree, logits, context, choose)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model forwards are all overhead: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain(one_thread):
    engine = peaked_engine()
    outcomes, mean_accepted = draw(engine, range(0, N), draft=False)
    assert mean_accepted == 1.0
    return outcomes


def test_drafting_keeps_the_sampled_distribution(plain):
    drafted, mean_accepted = draw(peaked_engine(), range(N, 2 * N), draft=True)
    assert mean_accepted > 2.2, "drafts were hardly accepted: the test would not exercise tree sampling"
    stat, df, p = chi2_homogeneity(plain, drafted)
    print(f"exact rule: chi2 = {stat:.1f}, df = {df}, p = {p:.3g}")
    assert df >= 10 and p > ALPHA


def test_the_same_test_catches_a_biased_accept_rule(plain, monkeypatch):
    monkeypatch.setattr(Sampler, "accept", favour_drafts)
    biased, _ = draw(peaked_engine(), range(2 * N, 3 * N), draft=True)
    stat, df, p = chi2_homogeneity(plain, biased)
    print(f"favour_drafts: chi2 = {stat:.1f}, df = {df}, p = {p:.3g}")
    assert p < ALPHA
