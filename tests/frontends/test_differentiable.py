"""Differentiable NTK statistics: gradients against dense Jacobians and finite differences, no leaks."""

from __future__ import annotations

import copy
import gc
import itertools
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntkscope import differentiable as dn


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


X = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def dense_J(model: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The D × P Jacobian from jacrev, itself differentiable (double backward)."""
    names = list(params)

    def f(*ts):
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernel has no double backward
            return functional_call(model, dict(zip(names, ts)), (x,)).reshape(-1)

    parts = jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1)


def grads(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    g = torch.autograd.grad(loss, list(params.values()), retain_graph=True, materialize_grads=True)
    return torch.cat([t.reshape(-1) for t in g])


@pytest.mark.parametrize("side", ["vjp", "jvp"])
def test_estimate_gradients_equal_dense_gradients(side):
    model = small_mlp()
    params = dict(model.named_parameters())
    D, P, m = 6, sum(p.numel() for p in params.values()), 7
    W = dn.draw_probes(D if side == "vjp" else P, m, seed=1, dtype=torch.float64)
    W2 = dn.draw_probes(D if side == "vjp" else P, m, seed=1, dtype=torch.float64, stream=3)
    A = dn.ntk_vectors(model, X, W, side=side)
    B = dn.ntk_vectors(model, X, W2, side=side)
    J = dense_J(model, X, params)
    Ad, Bd = ((J.T @ W).T, (J.T @ W2).T) if side == "vjp" else ((J @ W).T, (J @ W2).T)
    for fn in (dn.trace_estimate, dn.frobenius_sq_estimate, lambda a, b=None: dn.frobenius_sq_estimate(a, b)):
        la, ld = fn(A), fn(Ad)
        torch.testing.assert_close(la, ld, rtol=1e-10, atol=0)
        torch.testing.assert_close(grads(la, params), grads(ld, params), rtol=1e-9, atol=1e-12)
    la, ld = dn.frobenius_sq_estimate(A, B), dn.frobenius_sq_estimate(Ad, Bd)
    torch.testing.assert_close(grads(la, params), grads(ld, params), rtol=1e-9, atol=1e-12)


def test_alignment_gradients_student_teacher_equal_dense():
    student, teacher = small_mlp(0), small_mlp(1)
    ps, pt = dict(student.named_parameters()), dict(teacher.named_parameters())
    W = dn.draw_probes(6, 9, seed=2, dtype=torch.float64)
    A = dn.ntk_vectors(student, X, W)
    with torch.no_grad():
        Bt = dn.ntk_vectors(teacher, X, W)
    Js = dense_J(student, X, ps)
    Jt = dense_J(teacher, X, pt).detach()
    Ad, Bd = (Js.T @ W).T, (Jt.T @ W).T
    for fn in (dn.inner_estimate, dn.alignment_estimate):
        la, ld = fn(A, Bt), fn(Ad, Bd)
        torch.testing.assert_close(la, ld, rtol=1e-10, atol=0)
        torch.testing.assert_close(grads(la, ps), grads(ld, ps), rtol=1e-9, atol=1e-12)
    # the teacher's Gram may be given instead of its rows
    torch.testing.assert_close(dn.alignment_estimate(A, gram2=Bt @ Bt.T), dn.alignment_estimate(A, Bt))


def test_enumerated_probes_give_exact_statistic_and_its_gradient():
    """Over all 2^D Rademacher vectors E[wwᵀ] = I exactly: the estimate is the exact statistic,
    so its gradient is the exact gradient (unbiasedness, checked without noise), which itself
    matches central finite differences."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 2, dtype=torch.float64)
    params = dict(model.named_parameters())
    W = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64).T  # (4, 16)
    A = dn.ntk_vectors(model, x, W)
    J = dense_J(model, x, params)
    K = J @ J.T
    torch.testing.assert_close(dn.trace_estimate(A), K.trace())
    torch.testing.assert_close(dn.frobenius_sq_estimate(A, A), K.square().sum())  # all pairs = independent pairs
    g_tr = grads(dn.trace_estimate(A), params)
    g_fr = grads(dn.frobenius_sq_estimate(A, A), params)
    torch.testing.assert_close(g_tr, grads(K.trace(), params))

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def exact(theta: torch.Tensor) -> torch.Tensor:
        vals = dict(zip(params, (t.reshape(s) for t, s in zip(torch.split(theta, [s.numel() for s in shapes]), shapes))))
        Jt = dense_J(model, x, vals)
        Kt = Jt @ Jt.T
        return torch.stack([Kt.trace(), Kt.square().sum()])

    h = 1e-6
    fd = torch.stack(
        [(exact(flat + h * e) - exact(flat - h * e)) / (2 * h) for e in torch.eye(flat.numel(), dtype=torch.float64)], 1
    )
    torch.testing.assert_close(g_tr, fd[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_fr, fd[1], rtol=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(exact, (flat.clone().requires_grad_(),))


def test_func_grad_route_equals_backward_route():
    model = small_mlp()
    W = dn.draw_probes(6, 5, seed=4, dtype=torch.float64)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(lambda th: dn.frobenius_sq_estimate(dn.ntk_vectors(model, X, W, params=th)))(theta)
    model.zero_grad()
    dn.frobenius_sq_estimate(dn.ntk_vectors(model, X, W)).backward()
    for n, p in model.named_parameters():
        # the last bias does not enter J, so backward leaves its .grad unset
        torch.testing.assert_close(g[n], p.grad if p.grad is not None else torch.zeros_like(p))


def _directional_check(model: nn.Module, x: torch.Tensor, side: str, statistic: Any, m: int = 6) -> None:
    """∇θ of a statistic of ntk_vectors against central differences of its value along random
    directions (the value needs first derivatives only, which torch.func gets right everywhere)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    P = sum(p.numel() for p in params.values())
    D = copy.deepcopy(model)(x).numel()  # a copy: a train-mode BatchNorm's forward moves its running stats
    W = dn.draw_probes(D if side == "vjp" else P, m, seed=0, dtype=torch.float64)

    def value(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return statistic(dn.ntk_vectors(model, x, W, side=side, params=ps))

    g = torch.autograd.grad(value(params), list(params.values()), materialize_grads=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        d = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
        h = 1e-6
        with torch.no_grad():
            up = value({n: p + h * d[n] for n, p in params.items()})
            down = value({n: p - h * d[n] for n, p in params.items()})
        fd = float((up - down) / (2 * h))
        analytic = sum(float((gi * d[n]).sum()) for gi, n in zip(g, params))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8), (side, analytic, fd)


def test_transformer_trace_gradient_equals_finite_differences():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
    _directional_check(enc.double().eval(), torch.randn(1, 3, 4, dtype=torch.float64), "vjp", dn.trace_estimate)


def _normed(kind: str) -> nn.Module:
    norm = {
        "layer": nn.LayerNorm(6),
        "batch-train": nn.BatchNorm1d(6),
        "batch-eval": nn.BatchNorm1d(6),
        "rms": nn.RMSNorm(6),
        "instance": nn.Sequential(nn.Unflatten(1, (3, 2)), nn.InstanceNorm1d(3, affine=True), nn.Flatten()),
    }[kind]
    model = nn.Sequential(nn.Linear(3, 6), norm, nn.Tanh(), nn.Linear(6, 2)).double()
    if kind == "batch-eval":
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
        model.eval()
    return model


@pytest.mark.parametrize("side", ["vjp", "jvp"])
@pytest.mark.parametrize("kind", ["layer", "batch-train", "batch-eval", "rms", "instance"])
def test_gradients_through_normalisation_layers_equal_finite_differences(kind: str, side: str) -> None:
    """PyTorch's fused layer/batch/instance norms have wrong second derivatives under torch.func
    (the VJP side's vmap, and reverse over forward mode): a LayerNorm's trace gradient was off by
    up to 0.48 (a QA repro); the statistics run on elementary norms instead."""
    torch.manual_seed(0)
    model = _normed(kind)
    x = torch.randn(4, 3, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _directional_check(model, x, side, dn.trace_estimate)
    _directional_check(model, x, side, dn.frobenius_sq_estimate)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # running stats untouched


def test_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="eval"):
        dn.ntk_vectors(model, torch.randn(2, 3), torch.randn(6, 2))


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_training_with_regulariser_leaks_no_graph_or_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    counts, rss = [], []

    def rss_kib() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))

    for step in range(60):
        W = dn.draw_probes(64, 8, seed=step)
        A = dn.ntk_vectors(model, x, W)
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * dn.frobenius_sq_estimate(A) / dn.trace_estimate(A).detach()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (10, 30, 59):
            counts.append(_live_tensors())
            rss.append(rss_kib())
    assert counts[0] == counts[1] == counts[2], counts  # no tensors (graphs) survive a step
    assert rss[2] - rss[1] < 20 * 1024, rss  # KiB: no growth beyond allocator noise
