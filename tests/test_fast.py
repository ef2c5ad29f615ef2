"""The fast block paths (ntkscope.fast) equal the generic torch.func path, in float64 to 1e-10."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscope as nk
from ntkscope import fast


def _pair(model: nn.Module, inputs, output=None):  # type: ignore[no-untyped-def]
    return nk.NTK(model, inputs, output=output, fast=True), nk.NTK(model, inputs, output=output, fast=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _check(Kf: nk.NTK, Kg: nk.NTK, m: int = 37) -> None:
    g = torch.Generator().manual_seed(1)
    U = torch.randn(Kf.num_params, m, generator=g, dtype=torch.float64)
    V = torch.randn(Kf.dim, m, generator=g, dtype=torch.float64)
    assert _rel(Kf.jvp(U), Kg.jvp(U)) < 1e-10
    assert _rel(Kf.vjp(V), Kg.vjp(V)) < 1e-10
    assert _rel(Kf.matmat(V), Kg.matmat(V)) < 1e-10
    assert Kf.paths["jvp"] == Kf.paths["vjp"] == Kf._fast.name
    assert Kg.paths["jvp"] is not None and not Kg.paths["jvp"].startswith("fast")


def _mlp(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(*mods).double()


@pytest.mark.parametrize(
    "model",
    [
        _mlp(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU()),
        _mlp(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3)),
        _mlp(nn.Identity(), nn.Linear(5, 3)),
    ],
)
def test_mlp_equals_generic(model: nn.Sequential) -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64)
    _check(*_pair(model, x))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_gru_equals_generic(batch_first: bool, bias: bool, with_h0: bool) -> None:
    torch.manual_seed(0)
    gru = nn.GRU(3, 5, bias=bias, batch_first=batch_first).double()
    x = torch.randn(4, 7, 3, dtype=torch.float64)  # (B, T) or (T, B)
    h0 = torch.randn(1, 7 if not batch_first else 4, 5, dtype=torch.float64)
    _check(*_pair(gru, (x, h0) if with_h0 else x, output=0))


def test_estimates_equal_and_model_untouched() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(4, 6).double()
    before = {n: p.detach().clone() for n, p in gru.named_parameters()}
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    Kf, Kg = _pair(gru, x, output=0)
    for method in ("vjp", "jvp", "hutchpp"):
        a, b = nk.trace(Kf, method=method, num_probes=24, seed=3), nk.trace(Kg, method=method, num_probes=24, seed=3)
        assert abs(a.value - b.value) <= 1e-10 * abs(b.value)
        assert (a.jvp_passes, a.vjp_passes) == (b.jvp_passes, b.vjp_passes)
    assert all(torch.equal(p, before[n]) for n, p in gru.named_parameters())
    assert all(p.grad is None for p in gru.parameters())


def test_live_parameters_and_inputs() -> None:
    """Training in place (or editing the inputs) invalidates the fast path's cached forward."""
    torch.manual_seed(0)
    model = _mlp(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3, dtype=torch.float64)
    Kf, Kg = _pair(model, x)
    _check(Kf, Kg)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
        x.add_(0.25)
    _check(Kf, Kg)


@pytest.mark.parametrize(
    "model, inputs, output",
    [
        (nn.LSTM(3, 4), torch.randn(5, 2, 3), 0),
        (nn.GRU(3, 4, num_layers=2), torch.randn(5, 2, 3), 0),
        (nn.GRU(3, 4, bidirectional=True), torch.randn(5, 2, 3), 0),
        (nn.GRU(3, 4), torch.randn(5, 2, 3), lambda out: out[0][-1]),
        (nn.Sequential(nn.Linear(3, 4), nn.GELU()), torch.randn(5, 3), None),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh()), torch.randn(2, 5, 3), None),
    ],
)
def test_unsupported_falls_back(model: nn.Module, inputs: torch.Tensor, output) -> None:  # type: ignore[no-untyped-def]
    K = nk.NTK(model, inputs, output=output)
    assert K._fast is None
    K.vjp(torch.ones(K.dim, 2))
    assert not str(K.paths["vjp"]).startswith("fast")
    with pytest.raises(ValueError, match="fast=True"):
        nk.NTK(model, inputs, output=output, fast=True)


def test_parameter_subset_not_fast() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    K = nk.NTK(model, torch.randn(5, 3), params=["2.weight"])
    assert K._fast is None


def test_float32_check_passes() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(10, 16)
    K = nk.NTK(gru, torch.randn(20, 5, 10), output=0)
    K.jvp(torch.ones(K.num_params, 3))
    K.vjp(torch.ones(K.dim, 3))
    assert K.paths == {"jvp": "fast-gru", "vjp": "fast-gru"}


def test_build_rejects_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(2, 3)
    names = [n for n, _ in model.named_parameters()]
    assert fast.build(model, (x,), {}, None, names, [p.detach() for p in model.parameters()]) is None


@pytest.mark.parametrize("m", [1, 3])
def test_probe_block_not_modified(m: int) -> None:
    torch.manual_seed(0)
    gru = nn.GRU(3, 4)
    K = nk.NTK(gru, torch.randn(5, 2, 3), output=0)
    V = torch.randn(K.dim, m)
    U = torch.randn(K.num_params, m)
    V0, U0 = V.clone(), U.clone()
    K.vjp(V)
    K.jvp(U)
    assert torch.equal(V, V0) and torch.equal(U, U0)


@pytest.mark.parametrize("side", ["jvp", "vjp"])
def test_sqnorms_equal_generic(side: str) -> None:
    torch.manual_seed(0)
    for model, x, out in [
        (_mlp(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)), torch.randn(9, 5, dtype=torch.float64), None),
        (nn.GRU(3, 5).double(), torch.randn(6, 4, 3, dtype=torch.float64), 0),
    ]:
        Kf, Kg = _pair(model, x, output=out)
        n = Kf.num_params if side == "jvp" else Kf.dim
        X = torch.randn(n, 70, dtype=torch.float64)
        a, b = Kf.sqnorms(side, X), Kg.sqnorms(side, X)
        assert _rel(a, b) < 1e-10
        assert getattr(Kf, f"{side}_count") == getattr(Kg, f"{side}_count") == 70
