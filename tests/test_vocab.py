"""The block-maxima argmax and top-k give exactly torch's answers over vocabulary-wide rows."""
import pytest
import torch

from lookahead import vocab


def _rows(vocab_size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(6, vocab_size, generator=g) * 3).to(dtype)
    # ties of the maximum across and within blocks, a row of one value, infinities, NaN
    rows[0, 5] = rows[0, 7 * vocab.BLOCK + 3] = rows[0, -1] = rows[0].max() + 1
    rows[1] = 0.5
    rows[2, 100:] = float("-inf")
    rows[3, 3 * vocab.BLOCK + 1] = float("inf")
    rows[4, 9 * vocab.BLOCK + 2] = rows[4, 20 * vocab.BLOCK] = float("nan")
    return rows


@pytest.mark.parametrize("vocab_size", [49152, 32001, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_torchs_first_index_of_the_maximum(vocab_size, dtype):
    rows = _rows(vocab_size, dtype, seed=vocab_size)
    assert vocab._use_blocks(rows)
    assert torch.equal(vocab.argmax(rows), rows.float().argmax(-1))
    assert vocab.argmax(rows)[0] == 5 and vocab.argmax(rows)[1] == 0


@pytest.mark.parametrize("vocab_size", [49152, 32001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gives_torchs_values_and_indices_that_hold_them(vocab_size, dtype):
    rows = _rows(vocab_size, dtype, seed=1)[[0, 2, 3, 5]]
    rows[1, :100] = torch.arange(100, dtype=dtype)  # a row with only 100 finite values
    values, indices = vocab.topk(rows, 8)
    expected = rows.topk(8, dim=-1).values.float()
    assert torch.equal(values, expected)
    assert torch.equal(rows.float().gather(1, indices), expected)
    assert all(len(set(r)) == 8 for r in indices.tolist())


def test_topk_past_the_finite_values_gives_indices_that_hold_them():
    rows = torch.full((2, 40 * vocab.BLOCK + 5), float("-inf"))
    rows[:, 2] = 1.0
    values, indices = vocab.topk(rows, 8)
    assert values[:, 0].tolist() == [1.0, 1.0] and indices[:, 0].tolist() == [2, 2]
    assert torch.isinf(values[:, 1:]).all() and torch.equal(rows.gather(1, indices), values)


def test_small_vocabularies_and_other_shapes_use_torchs_kernels():
    rows = torch.randn(3, 500)
    assert not vocab._use_blocks(rows)
    assert torch.equal(vocab.argmax(rows), rows.argmax(-1))
    assert torch.equal(vocab.topk(rows, 4)[0], rows.topk(4).values)
