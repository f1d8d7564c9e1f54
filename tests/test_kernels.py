"""Packed linears: sibling projections stacked into one matmul give each sibling's own columns."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from lookahead.decoding import kernels
from lookahead.decoding.kernels import can_pack, pack_linears, stacked_linears, unpack_linears

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]  # qwen2: q/k/v carry biases; gemma3/qwen3: norms after q and k


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():
        return model(ids).logits


def _counting(monkeypatch) -> list[int]:
    """Counts packed matmul calls (the stacked and the single ones both go through `_packed`)."""
    calls = [0]
    inner = kernels._packed

    def counted(*args):
        calls[0] += 1
        return inner(*args)
    monkeypatch.setattr(kernels, "_packed", counted)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_siblings_give_the_logits_of_one_matmul_each_in_fewer_calls(arch, monkeypatch):
    model = tiny_model(arch)
    if not can_pack(model):
        pytest.skip("no oneDNN here")
    calls = _counting(monkeypatch)
    layers = model.config.num_hidden_layers
    eager = _logits(model)
    with monkeypatch.context() as m:
        m.setattr(kernels, "SIBLINGS", ())
        pack_linears(model)
        assert stacked_linears(model) == 0
        one_each, calls_each = _logits(model), calls[0]
    calls[0] = 0
    assert pack_linears(model) == 7 * layers + 1  # every linear still counted as packed
    assert stacked_linears(model) == 5 * layers
    stacked = _logits(model)
    assert (calls_each, calls[0]) == (7 * layers + 1, 4 * layers + 1)  # q/k/v and gate/up: one call each
    torch.testing.assert_close(stacked, one_each, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, eager, rtol=1e-4, atol=1e-4)
    unpack_linears(model)
    assert stacked_linears(model) == 0
    torch.testing.assert_close(_logits(model), eager, rtol=0, atol=0)


def test_a_sibling_given_another_input_computes_its_own_columns():
    model = tiny_model("qwen2")
    if not can_pack(model):
        pytest.skip("no oneDNN here")
    attention = model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    x, y = torch.randn(5, 32), torch.randn(5, 32)
    expected = [torch.nn.functional.linear(a, m.weight, m.bias) for a, m in ((x, q), (y, k), (x, v))]
    pack_linears(model)
    with torch.inference_mode():
        got = [q(x), k(y), v(x)]  # k reads another tensor: neither it nor v may take columns computed for x
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stacked_siblings_hold_no_activations_after_a_forward():
    model = tiny_model("llama")
    if not can_pack(model):
        pytest.skip("no oneDNN here")
    pack_linears(model)
    _logits(model)
    groups = {id(m.forward.func): m.forward.func for m in model.modules()
              if isinstance(m, torch.nn.Linear) and isinstance(getattr(m.forward, "func", None), kernels._Stacked)}
    assert len(groups) == 2 * model.config.num_hidden_layers
    assert all(group.cached is None for group in groups.values())


def test_siblings_called_in_any_order_share_one_matmul(monkeypatch):
    """An MLP that reads up before gate (or attention v before q) still runs one stacked matmul per input."""
    model = tiny_model("llama")
    if not can_pack(model):
        pytest.skip("no oneDNN here")
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 32)
    expected = [torch.nn.functional.linear(x, m.weight) for m in (mlp.up_proj, mlp.gate_proj)]
    pack_linears(model)
    calls = _counting(monkeypatch)
    with torch.inference_mode():
        got = [mlp.up_proj(x), mlp.gate_proj(x)]
    assert calls[0] == 1
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert mlp.gate_proj.forward.func.cached is None  # both served: nothing held
