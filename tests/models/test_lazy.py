"""ntkscope.models.lazy.AlphaScaled: the centred, α-scaled model of Chizat, Oyallon & Bach (2019)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.models.lazy import AlphaScaled


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_centred_and_scaled() -> None:
    inner = _net()
    net = AlphaScaled(inner, 7.0)
    assert torch.equal(net(X), torch.zeros(6, 3, dtype=torch.float64))  # f_α(θ₀) = 0
    f0 = inner(X).detach()
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(0.1)
    torch.testing.assert_close(net(X), 7.0 * (inner(X) - f0))
    torch.testing.assert_close(net.reference(X), f0)
    # θ₀ lives in buffers (and the state dict), the trainable parameters are the model's own
    assert [id(p) for p in net.parameters()] == [id(p) for p in inner.parameters()]
    assert len(net.state_dict()) == 2 * len(list(inner.parameters()))
    assert net.loss_scale == pytest.approx(1 / 49)
    assert float(net.scale_loss(torch.tensor(49.0))) == pytest.approx(1.0)


def test_ntk_of_the_scaled_model_is_alpha_squared_k() -> None:
    inner = _net()
    net = AlphaScaled(inner, 3.0)
    K = nk.NTK(inner, X)
    Ka = nk.NTK(net, X)
    assert Ka.num_params == K.num_params  # θ₀ buffers are not parameters of the kernel
    torch.testing.assert_close(ex.kernel(Ka), 9.0 * ex.kernel(K))
    K0 = nk.NTK(inner, X, params=net.initial_parameters())
    torch.testing.assert_close(ex.kernel(K0), ex.kernel(K))


def test_the_initial_kernel_is_over_the_same_parameters_when_some_are_frozen() -> None:
    inner = _net()
    first = next(inner.parameters())
    first.requires_grad_(False)  # the docs' recipe differentiated it anyway (a QA repro)
    net = AlphaScaled(inner, 3.0)
    K, K0 = nk.NTK(inner, X), nk.NTK(inner, X, params=net.initial_parameters())
    assert K0.param_names == K.param_names and K0.num_params == K.num_params
    torch.testing.assert_close(ex.kernel(K0), ex.kernel(K))  # nothing has moved yet
    assert len(net.initial_parameters(trainable=False)) == len(list(inner.parameters()))
    torch.testing.assert_close(net.reference(X), inner(X))


@pytest.mark.parametrize("alpha", [30.0, 300.0])
def test_one_sgd_step_follows_the_kernel_for_large_alpha(alpha: float) -> None:
    """With loss L(f_α)/α², an SGD step moves f_α by −η K ∇L + O(η²/α), whatever α."""
    inner = _net()
    K = ex.kernel(nk.NTK(inner, X))
    net = AlphaScaled(inner, alpha)
    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eta = 0.05
    opt = torch.optim.SGD(net.trainable_parameters(), lr=eta)
    loss = net.scale_loss(0.5 * (net(X) - y).square().sum())
    loss.backward()
    opt.step()
    predicted = -eta * K @ (0.0 - y).reshape(-1)  # ∇L at f_α = 0 is (f_α − y)
    moved = net(X).detach().reshape(-1)
    rel = float((moved - predicted).norm() / predicted.norm())
    assert rel < 3.0 / alpha  # the second-order term shrinks like 1/α


def test_bad_arguments() -> None:
    inner = _net()
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="alpha"):
            AlphaScaled(inner, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        AlphaScaled(inner, 1.0, theta0={"0.weight": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match="shape"):
        AlphaScaled(inner, 1.0, theta0={n: torch.zeros(1) for n, _ in inner.named_parameters()})
    before = {n: p.detach().clone() for n, p in inner.named_parameters()}
    AlphaScaled(inner, 2.0)
    assert all(torch.equal(p, before[n]) for n, p in inner.named_parameters())


def test_the_reference_pass_moves_no_running_stats() -> None:
    """In train mode only the model's own forward updates BatchNorm's running stats: the
    reference pass f(θ₀, x) normalises with the same batch statistics and leaves them alone."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    plain = AlphaScaled(inner, 2.0)
    twin = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    twin.load_state_dict(inner.state_dict())
    out = plain(X)
    twin(X)  # the model's own forward, once
    assert torch.equal(out, torch.zeros(6, 3, dtype=torch.float64))  # batch statistics on both passes
    for a, b in zip(inner[1].buffers(), twin[1].buffers()):
        assert torch.equal(a, b)  # running stats moved once, as by one forward of the model
