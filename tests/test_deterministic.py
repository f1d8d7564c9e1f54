"""Deterministic mode: a position's logits are the same bits whatever shares its forward (tree, batch, chunk)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, tiny_model
from lookahead import DraftTree
from lookahead.decoding.invariant import make_invariant
from lookahead.decoding.verify import Verifier
from lookahead.models import cast

PROMPT = [5, 17, 3, 40, 41, 42, 9, 9, 12, 60, 61, 7, 33, 2, 70]
OTHER = [8, 1, 50, 51, 52, 53, 20, 21, 22, 90, 4]


def plain_logits(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy one token per forward: the reference each verified position must equal bit for bit."""
    verifier = Verifier(model)
    verifier.add(0, prompt[:-1])
    tokens, logits = [prompt[-1]], []
    for _ in range(n):
        out = verifier.verify([DraftTree.root_only(tokens[-1])])[0][0]
        verifier.commit([[0]])
        logits.append(out)
        tokens.append(int(out.argmax()))
    return tokens, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_position_gets_the_same_logits_in_a_tree_a_batch_and_a_chunked_prefill(arch, dtype):
    model = cast(copy.deepcopy(tiny_model(arch, seed=3)), dtype)
    make_invariant(model)
    tokens, reference = plain_logits(model, PROMPT, 6)
    # The true path as one branch of a tree with wrong siblings at every depth, in a batch behind another
    # row with a longer prompt (so this row's cache is padded), prefilled in chunks of 4.
    wrong = [(t + 1) % VOCAB for t in tokens]
    parents, tree_tokens, path = [-1], [tokens[0]], [0]
    for depth in range(1, 6):
        parents += [path[-1], path[-1]]
        tree_tokens += [wrong[depth], tokens[depth]]
        path.append(len(tree_tokens) - 1)
    tree = DraftTree(tree_tokens, parents)
    verifier = Verifier(model)
    verifier.add("other", OTHER * 2)
    row, ids = None, PROMPT[:-1]
    for i in range(0, len(ids), 4):
        row = verifier.prefill(row, ids[i: i + 4])
    verifier.join("row", row, len(ids))
    logits = verifier.verify([DraftTree.chain(OTHER[-1], [1, 2, 3]), tree])[1]
    for depth, node in enumerate(path):
        assert torch.equal(logits[node], reference[depth]), f"{arch} {dtype}: depth {depth} differs"


def test_deterministic_engine_and_its_cost_curve_are_keyed_apart():
    from conftest import IdTokenizer
    from lookahead import Engine
    from lookahead.engine import _cost_key
    model = tiny_model("llama")
    plain_key = _cost_key(model)
    engine = Engine(model, IdTokenizer(), deterministic=True)
    assert engine.deterministic and _cost_key(model) == plain_key + "-invariant"
    assert Engine(model, IdTokenizer()).deterministic  # the model carries its kernels


def test_reports_name_the_invariant_kernels():
    """Benchmarks and the server's /health say what the linears run: not "eager" once deterministic."""
    from lookahead.decoding.kernels import running_kernels
    model = tiny_model("llama")
    assert running_kernels(model) == "eager"
    make_invariant(model)
    assert running_kernels(model) == "invariant"


STORY = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
NOISE = ["Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox.",
         "def add(a, b):\n    return a + b\n\nRewrite add to subtract.",
         "List the planets of the solar system.",
         "Tell me a short story about a lighthouse keeper who loves cats."]


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_same_greedy_request_same_text_whatever_was_drafted_and_batched(dtype):
    """20 repeated greedy requests, under a drafting state that keeps learning and in batches of 1-4 rows
    with other requests, give one text: that of plain decoding on the same engine."""
    import lookahead
    from conftest import FIXED
    if dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # k-row bf16 matmuls cost k one-row ones there, so 8-row tiles would make this test ~10x slower; dtype
        # auto picks fp32 on such CPUs, and the tiny-model test covers bf16 invariance on every CPU.
        pytest.skip("no native bf16 on this CPU")
    # Whole trees every step: the point is that what is verified alongside a position does not matter.
    engine = lookahead.load(dtype=dtype, device="cpu", deterministic=True, draft_config=FIXED)
    n = 24
    plain = engine.generate(STORY, max_new_tokens=n, draft=False).token_ids
    texts, drafted = set(), 0
    for i in range(7):                                   # alone, after the trie learned other answers
        engine.generate(NOISE[i % len(NOISE)], max_new_tokens=n)
        out = engine.generate(STORY, max_new_tokens=n)
        texts.add(tuple(out.token_ids))
        drafted += sum(out.stats.accepted) - out.stats.steps  # drafted tokens accepted
    for batch in (2, 3, 4):                              # sharing forwards with other rows
        prompts = [STORY, NOISE[batch - 2], STORY, NOISE[batch - 1], STORY, NOISE[0], STORY, STORY, STORY, NOISE[3]]
        outs = engine.generate_batch(prompts[: 2 * batch + 2], max_new_tokens=n, max_batch=batch, progress=False)
        texts |= {tuple(o.token_ids) for p, o in zip(prompts, outs, strict=False) if p is STORY}
    assert drafted > 0                                   # repeats accepted drafted tokens: trees were verified
    assert texts == {tuple(plain)}, f"{len(texts)} different texts"
    # Seeded sampling: one draw per emitted token, from logits that no longer depend on the forward's company.
    sample = dict(max_new_tokens=n, do_sample=True, temperature=0.9, seed=7)
    alone = engine.generate(STORY, **sample).token_ids
    undrafted = engine.generate(STORY, draft=False, **sample).token_ids
    batch = [engine.request(STORY, **sample), engine.request(NOISE[1], max_new_tokens=n)]
    assert alone == undrafted == engine.generate_batch(batch, progress=False)[0].token_ids


def test_deterministic_mode_refuses_packed_kernels_by_name():
    import lookahead
    with pytest.raises(ValueError, match="deterministic mode runs its own invariant linear kernels"):
        lookahead.load(deterministic=True, kernels="packed")
