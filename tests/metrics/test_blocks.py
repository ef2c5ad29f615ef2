"""ntkscope.parameter_blocks: exact against block Jacobians from jacrev, sums equal to the totals,
the VJP side equal to the whole-kernel one-sided estimators on the same probes, unbiased over seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import model_zoo as models
import ntkscope as nk
from ntkscope import tasks
from ntkscope.metrics.param_groups import resolve_groups


def _blocks_of(case: models.Case, groups: object) -> dict[str, list[str]]:
    return resolve_groups(list(case.params), groups)  # type: ignore[arg-type]


def _reference(J: torch.Tensor, case: models.Case, blocks: dict[str, list[str]]) -> list[torch.Tensor]:
    """Dense block kernels K_g = J_g J_gᵀ from a jacrev Jacobian (columns in parameter order)."""
    cols, at = {}, 0
    for n, p in case.params.items():
        cols[n] = (at, at + p.numel())
        at += p.numel()
    out = []
    for names in blocks.values():
        Jg = torch.cat([J[:, cols[n][0] : cols[n][1]] for n in names], 1).double()
        out.append(Jg @ Jg.T)
    return out


def _perturbed(case: models.Case, scale: float = 0.3, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in case.params.items()}


CASES = [
    ("mlp", None),
    ("mlp", "tensor"),
    ("gru", "tensor"),
    ("gru", {"weights": ["weight_*"], "hidden_bias": "bias_hh_l0"}),
    ("gru-loop", "tensor"),
]


@pytest.mark.parametrize("name,groups", CASES)
def test_exact_matches_jacrev_blocks(name: str, groups: object) -> None:
    case = models.FACTORIES[name](torch.float64)
    K = case.ntk()
    theta0 = _perturbed(case)
    if case.fn is not None:
        K0 = nk.NTK.from_function(case.fn, theta0, case.inputs, output=case.output)
    else:
        K0 = nk.NTK(case.model, case.inputs, output=case.output, params=theta0)
    res = nk.parameter_blocks(K, groups, other=K0, method="exact")  # type: ignore[arg-type]
    blocks = _blocks_of(case, groups)
    assert res.names == list(blocks) and res.params == blocks
    Ks = _reference(models.reference_jacobian(case), case, blocks)
    K0s = _reference(models.reference_jacobian(case, theta0), case, blocks)
    G = len(Ks)
    tr = torch.tensor([float(k.trace()) for k in Ks], dtype=torch.float64)
    fro = torch.tensor([[float((a * b).sum()) for b in Ks] for a in Ks], dtype=torch.float64)
    cross = torch.tensor([float((Ks[g] * K0s[g]).sum()) for g in range(G)], dtype=torch.float64)
    fro0 = torch.tensor([float(k.square().sum()) for k in K0s], dtype=torch.float64)
    torch.testing.assert_close(res.trace.values, tr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.frobenius.values, fro, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.effective_rank.values, tr**2 / fro.diagonal(), rtol=1e-10, atol=0)
    assert res.alignment is not None and res.other_trace is not None and res.total_alignment is not None
    torch.testing.assert_close(res.alignment.values, cross / (fro.diagonal() * fro0).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(res.other_trace.values, torch.tensor([float(k.trace()) for k in K0s], dtype=torch.float64))
    Kf, K0f = sum(Ks), sum(K0s)
    assert isinstance(Kf, torch.Tensor) and isinstance(K0f, torch.Tensor)
    assert math.isclose(res.total_trace.value, float(Kf.trace()), rel_tol=1e-10)
    assert math.isclose(res.total_frobenius_sq.value, float(Kf.square().sum()), rel_tol=1e-10)
    want = float((Kf * K0f).sum()) / math.sqrt(float(Kf.square().sum()) * float(K0f.square().sum()))
    assert math.isclose(res.total_alignment.value, want, rel_tol=1e-10)
    assert res.trace.stderr is None and res.total_trace.stderr is None and res.method == "exact"


@pytest.mark.parametrize("name,groups", [("mlp", None), ("gru", "tensor"), ("gru-loop", {"w": "weight_*"})])
def test_vjp_side_is_the_whole_kernel_estimator_split(name: str, groups: object) -> None:
    """Same seed, same probes: the block sums are the one-sided trace / Frobenius estimates of K
    (12 probes, below every zoo model's D, where those would turn exact)."""
    case = models.FACTORIES[name](torch.float64)
    K = case.ntk(ghost=False) if case.fn is None else case.ntk()  # the MLP's trace would sample per-example blocks
    res = nk.parameter_blocks(K, groups, num_probes=12, seed=3)  # type: ignore[arg-type]
    tr = nk.trace(K, method="vjp", num_probes=12, seed=3)
    fro = nk.frobenius_norm(K, method="vjp", num_probes=12, seed=3, squared=True)
    reff = nk.effective_rank(K, method="vjp", num_probes=12, seed=3)
    assert math.isclose(float(res.trace.values.sum()), res.total_trace.value, rel_tol=1e-12)
    assert math.isclose(float(res.frobenius.values.sum()), res.total_frobenius_sq.value, rel_tol=1e-12)
    assert math.isclose(res.total_trace.value, tr.value, rel_tol=1e-10)
    assert math.isclose(res.total_frobenius_sq.value, fro.value, rel_tol=1e-10)
    assert tr.stderr is not None and fro.stderr is not None and reff.stderr is not None
    assert math.isclose(res.total_trace.stderr or 0, tr.stderr, rel_tol=1e-8)
    assert math.isclose(res.total_frobenius_sq.stderr or 0, fro.stderr, rel_tol=1e-8)
    assert math.isclose(res.total_effective_rank.value, reff.value, rel_tol=1e-10)
    assert math.isclose(res.total_effective_rank.stderr or 0, reff.stderr, rel_tol=1e-8)
    # one VJP per probe serves every block
    assert (res.vjp_passes, res.jvp_passes, res.side) == (12, 0, "vjp")
    assert res.trace.stderr is not None and bool((res.trace.stderr > 0).all())
    assert torch.allclose(res.frobenius.values, res.frobenius.values.T)


def test_jvp_side_sums_and_costs() -> None:
    case = models.mlp()
    K = case.ntk()
    res = nk.parameter_blocks(K, "tensor", method="jvp", num_probes=12, seed=1)
    assert res.side == "jvp" and res.vjp_passes == 0 and res.jvp_passes == 4 * 12  # G block JVPs per probe
    assert res.info["jvp_blocks"] == ["subset NTK"]
    assert math.isclose(float(res.trace.values.sum()), res.total_trace.value, rel_tol=1e-12)
    assert math.isclose(float(res.frobenius.values.sum()), res.total_frobenius_sq.value, rel_tol=1e-12)
    # a from_function kernel has no model to restrict: the full JVP with the other rows zero
    loop = models.gru_loop()
    r2 = nk.parameter_blocks(loop.ntk(), {"ih": ["weight_ih", "bias_ih"]}, method="jvp", num_probes=6, seed=0)
    assert r2.names == ["ih", "(rest)"] and r2.info["jvp_blocks"][0].startswith("masked JVP")
    assert r2.jvp_passes == 2 * 6


def _exact(case: models.Case, groups: object, theta0: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    blocks = _blocks_of(case, groups)
    Ks = _reference(models.reference_jacobian(case), case, blocks)
    tr = torch.tensor([float(k.trace()) for k in Ks], dtype=torch.float64)
    fro = torch.tensor([[float((a * b).sum()) for b in Ks] for a in Ks], dtype=torch.float64)
    if theta0 is None:
        return tr, fro
    K0s = _reference(models.reference_jacobian(case, theta0), case, blocks)
    cross = torch.tensor([float((a * b).sum()) for a, b in zip(Ks, K0s)], dtype=torch.float64)
    return tr, fro, cross


@pytest.mark.parametrize("method", ["vjp", "jvp"])
def test_unbiased_over_seeds(method: str) -> None:
    """Block traces and block inner products (with K0's cross terms) are unbiased: the mean over
    200 seeds lies within 4.5 standard errors of the exact values, entry by entry."""
    case = models.mlp()
    theta0 = _perturbed(case)
    K = case.ntk()
    K0 = nk.NTK(case.model, case.inputs, params=theta0)
    tr, fro, cross = _exact(case, "tensor", theta0)
    groups = "tensor" if method == "vjp" else None  # the JVP side rebuilds its block NTKs per call
    if groups is None:
        tr, fro, cross = _exact(case, None, theta0)
    runs = [nk.parameter_blocks(K, groups, other=K0, method=method, num_probes=8, seed=s) for s in range(200)]
    trs = torch.stack([r.trace.values for r in runs])
    fros = torch.stack([r.frobenius.values for r in runs])
    crosses = torch.stack([r.cross.values.diagonal() for r in runs if r.cross is not None])
    n = len(runs)
    for est, want in ((trs, tr), (fros, fro), (crosses, cross)):
        # within 4.5 standard errors (a block whose estimate has no spread must be exact)
        err = (est.mean(0) - want).abs()
        assert bool((err <= 4.5 * est.std(0) / n**0.5 + 1e-9 * want.abs()).all()), (err, est.std(0))
    # the per-seed stderr estimates the spread across seeds (jackknife of the trace: std/√m)
    se = torch.stack([r.trace.stderr for r in runs if r.trace.stderr is not None]).mean(0)
    spread = trs.std(0)
    moving = spread > 1e-9 * tr
    ratio = se[moving] / spread[moving]
    assert bool(((ratio > 0.75) & (ratio < 1.25)).all()), ratio
    # the alignment is the ratio of these (unbiased) parts, from the same probes
    r0 = runs[0]
    assert r0.alignment is not None and r0.other_frobenius is not None and r0.cross is not None
    want_al = r0.cross.values.diagonal() / (r0.frobenius.values.diagonal() * r0.other_frobenius.values.diagonal()).sqrt()
    torch.testing.assert_close(r0.alignment.values, want_al)


def test_alignment_with_itself_and_sums_with_other() -> None:
    case = models.gru()
    K = case.ntk()
    res = nk.parameter_blocks(K, "tensor", other=K, num_probes=16, seed=2)
    assert res.alignment is not None and res.total_alignment is not None
    torch.testing.assert_close(res.alignment.values, torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert math.isclose(res.total_alignment.value, 1.0, rel_tol=1e-12)
    assert res.vjp_passes == 16  # other is K itself: one set of passes


def test_jvp_side_with_snapshot_kernels_matches_exact_in_expectation() -> None:
    """K0 at a parameter snapshot on the JVP side: the block operators are built on a private copy
    loaded with the snapshot (the user's model keeps its own values, grads and mode)."""
    case = models.gru()
    theta0 = _perturbed(case, 0.2, 9)
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    case.model.train()
    K = case.ntk()
    K0 = nk.NTK(case.model, case.inputs, output=case.output, params=theta0)
    res = nk.parameter_blocks(K0, "tensor", method="jvp", num_probes=400, seed=4)
    ex0 = nk.parameter_blocks(K0, "tensor", method="exact")
    assert res.trace.stderr is not None
    z = (res.trace.values - ex0.trace.values) / res.trace.stderr
    assert float(z.abs().max()) < 4.5
    for n, p in case.model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert case.model.training
    assert K.num_params == K0.num_params


def test_adaptive_rtol_meets_tolerance() -> None:
    case = models.mlp()
    K = case.ntk()
    res = nk.parameter_blocks(K, num_probes=8, seed=0, rtol=0.1)
    assert res.converged is True
    assert res.trace.stderr is not None and res.total_trace.stderr is not None
    assert float(res.trace.stderr.max()) <= 0.1 * res.total_trace.value
    assert res.total_trace.stderr <= 0.1 * res.total_trace.value
    # every product of earlier rounds reused (≤: the memo computes a repeated ±1 column once)
    assert res.num_probes > 8 and res.vjp_passes <= res.num_probes
    assert res.vjp_passes == res.info["adaptive"]["rounds"][-1]["passes"]


def test_groups_by_module_and_errors() -> None:
    torch.manual_seed(0)
    net = tasks.RecurrentRegressor("gru", 3, 5, 2).double()
    X = torch.randn(2, 4, 3, dtype=torch.float64)
    K = nk.NTK(net, X)
    res = nk.parameter_blocks(K, method="exact")
    assert res.names == ["rnn", "readout"]
    assert res.numels == [sum(p.numel() for p in net.rnn.parameters()), 12]
    assert res.shares().sum().item() == pytest.approx(1.0)
    assert "rnn" in res.table() and res.to_dict()["names"] == ["rnn", "readout"]
    with pytest.raises(ValueError, match="matches no parameter"):
        nk.parameter_blocks(K, {"x": "encoder.*"})
    with pytest.raises(ValueError, match="in two blocks"):
        nk.parameter_blocks(K, {"a": "rnn.*", "b": "rnn.weight_hh_l0"})
    with pytest.raises(ValueError, match="groups="):
        nk.parameter_blocks(K, "layers")
    with pytest.raises(TypeError, match="ntkscope.NTK"):
        nk.parameter_blocks(nk.NTK.from_jacobian(torch.randn(4, 6)))
    other = nk.NTK(net, X, params=["rnn.weight_hh_l0"])
    with pytest.raises(ValueError, match="same parameters"):
        nk.parameter_blocks(K, other=other)
    with pytest.raises(ValueError, match="different inputs"):
        nk.parameter_blocks(K, other=nk.NTK(net, X + 1))
    with pytest.raises(ValueError, match="num_probes"):
        nk.parameter_blocks(K, num_probes=2)
    with pytest.raises(ValueError, match="unknown method"):
        nk.parameter_blocks(K, method="hutchpp")


def test_auto_reports_its_side() -> None:
    net = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 30)).double()
    X = torch.randn(20, 30, dtype=torch.float64)
    K = nk.NTK(net, X)
    res = nk.parameter_blocks(K, method="auto", num_probes=16, seed=0)
    assert res.method in ("vjp", "jvp") and res.side == res.method
    assert "one VJP per probe serves all" in res.info["reason"]
    small = nk.parameter_blocks(models.mlp().ntk(), method="auto", num_probes=40, seed=0)
    assert small.method == "exact" and "exact" in small.info["reason"]


def test_blocks_that_do_not_reach_the_state() -> None:
    """Parameters above the state (or unused) have a zero block: its trace and products are 0,
    its ratios NaN, and the other blocks are unaffected."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    groups = {"first": "0.*", "second": "2.*"}
    hidden = nk.NTK(net[:2], X)  # a hidden state: the layer above it does not reach it
    full = nk.NTK(nn.Sequential(net[0], net[1], _Drop(net[2])), X)
    res = nk.parameter_blocks(full, groups, num_probes=8, seed=0)
    assert res.info["zero_blocks"] == ["second"]
    assert float(res.trace.values[1]) == 0 and float(res.frobenius.values[1].abs().sum()) == 0
    assert math.isnan(float(res.effective_rank.values[1])) and math.isfinite(float(res.effective_rank.values[0]))
    ref = nk.parameter_blocks(hidden, {"first": "0.*"}, num_probes=8, seed=0)
    assert math.isclose(res.total_trace.value, ref.total_trace.value, rel_tol=1e-10)


class _Drop(nn.Module):
    """Holds a layer's parameters but returns its input unchanged."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * self.layer.weight.sum() * 0.0
