"""Partial traces and block statistics over named axes: known toy kernels and unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

import ntkscope as nk
from ntkscope.core import jackknife as jk
from ntkscope.metrics.state_axes import from_blocks, to_blocks
from ntkscope.metrics.structure import (
    MAX_PAIR_BLOCKS,
    block_effective_rank,
    block_frobenius,
    block_traces,
    structure,
)

DT = torch.float64


def _within(est, exact: torch.Tensor, z: float = 4.5) -> bool:
    return bool(((est.values - exact).abs() <= z * est.stderr + 1e-9 * exact.abs().max()).all())


def _block_diag_toy() -> tuple[nk.FactoredKernel, torch.Tensor]:
    """State (time=3, hidden=4); K_tt = c_t² · I₄ exactly, K_st = 0 for s ≠ t (disjoint params)."""
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    J = torch.zeros(12, 15, dtype=DT)
    g = torch.Generator().manual_seed(0)
    for t in range(3):
        Q, _ = torch.linalg.qr(torch.randn(5, 4, generator=g, dtype=DT))  # orthonormal columns
        J[4 * t : 4 * t + 4, 5 * t : 5 * t + 5] = c[t] * Q.T  # rows orthonormal × c_t
    return nk.NTK.from_jacobian(J), c


def test_block_diagonal_toy_known_values():
    K, c = _block_diag_toy()
    s = structure(K, "time", method="exact", axes=("time", "hidden"), shape=(3, 4))
    torch.testing.assert_close(s.trace.values, 4 * c**2)  # tr(c² I₄)
    torch.testing.assert_close(s.frobenius.values, torch.diag(4 * c**4))  # ‖c² I₄‖², zero off-diagonal
    torch.testing.assert_close(s.effective_rank.values, torch.full((3,), 4.0, dtype=DT))
    torch.testing.assert_close(s.cross_trace.values, torch.diag(4 * c**2))
    assert s.total_trace.value == pytest.approx(float(4 * c.square().sum()))
    assert s.total_effective_rank.value == pytest.approx(float((4 * c**2).sum() ** 2 / (4 * c**4).sum()))
    # keep the hidden axis instead: each hidden unit sees Σ_t c_t², blocks coupled across hidden units 0
    h = structure(K, "hidden", method="exact", axes=("time", "hidden"), shape=(3, 4))
    torch.testing.assert_close(h.trace.values, torch.full((4,), float(c.square().sum()), dtype=DT))
    torch.testing.assert_close(h.frobenius.values, torch.diag(torch.full((4,), float(c.pow(4).sum()), dtype=DT)))
    # the estimators: within their error bars
    for method in ("jvp", "vjp"):
        e = structure(K, "time", method=method, num_probes=200, seed=3, axes=("time", "hidden"), shape=(3, 4))
        # (VJP with Rademacher probes is exact here: K_tt is diagonal, so its stderr is 0 too)
        assert _within(e.trace, s.trace.values)
        # the off-diagonal block norms are zero in expectation only (per probe pair they are not)
        assert _within(e.frobenius, s.frobenius.values)


def test_cross_trace_of_coupled_toy():
    """K_st = a_s a_t · I₄ (rank-4 coupling across time): tr K_st = 4 a_s a_t, ‖K_st‖² = 4 a_s² a_t²."""
    a = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    J = torch.cat([a[t] * torch.eye(4, dtype=DT) for t in range(3)], 0)  # (12, 4)
    K = nk.NTK.from_jacobian(J)
    s = structure(K, "time", method="exact", axes=("time", "hidden"), shape=(3, 4))
    torch.testing.assert_close(s.cross_trace.values, 4 * torch.outer(a, a))
    torch.testing.assert_close(s.frobenius.values, 4 * torch.outer(a, a) ** 2)
    assert s.total_frobenius_sq.value == pytest.approx(float(4 * (a**2).sum() ** 2))
    assert s.total_effective_rank.value == pytest.approx(4.0)


def _toy(D0: int = 3, D1: int = 4, P: int = 7, seed: int = 0) -> tuple[nk.FactoredKernel, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(D0 * D1, P, generator=g, dtype=DT)
    J[:D1] *= 3  # uneven blocks
    return nk.NTK.from_jacobian(J), J


@pytest.mark.parametrize("method,probes", [("jvp", "rademacher"), ("jvp", "gaussian"), ("vjp", "rademacher"), ("vjp", "sphere")])
def test_estimators_unbiased_over_seeds(method, probes):
    K, _ = _toy()
    kw = dict(axes=("time", "hidden"), shape=(3, 4))
    ref = structure(K, "time", method="exact", **kw)
    n = 300
    runs = [structure(K, "time", method=method, num_probes=4, seed=s, probes=probes, **kw) for s in range(n)]
    for q in ("trace", "frobenius", "cross_trace"):
        vals = torch.stack([getattr(r, q).values for r in runs])
        mean, se = vals.mean(0), vals.std(0) / math.sqrt(n)
        z = ((mean - getattr(ref, q).values) / se).abs().max()
        assert z < 4.0, (q, float(z))
    for q in ("total_trace", "total_frobenius_sq"):
        v = torch.tensor([getattr(r, q).value for r in runs])
        assert abs(float(v.mean()) - getattr(ref, q).value) < 4.0 * float(v.std()) / math.sqrt(n), q
    # the jackknife error bars match the spread over seeds (on average, to within a factor ~1.6)
    tr = torch.stack([r.trace.values for r in runs])
    se2 = torch.stack([r.trace.stderr for r in runs]).square().mean(0)
    ratio = se2 / tr.var(0)
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.6, ratio


def test_totals_match_core_metrics_on_the_same_probes():
    """The per-block traces sum to the trace estimate; totals equal ntkscope's one-sided JVP metrics
    (P = 64 > 50 probes: those sample too, rather than turn exact)."""
    K, J = _toy(seed=1, P=64)
    s = structure(K, "time", num_probes=50, seed=5, axes=("time", "hidden"), shape=(3, 4))
    assert float(s.trace.values.sum()) == pytest.approx(s.total_trace.value, rel=1e-12)
    assert float(s.frobenius.values.sum()) == pytest.approx(s.total_frobenius_sq.value, rel=1e-12)
    t = nk.trace(K, method="jvp", num_probes=50, seed=5)
    f = nk.frobenius_norm(K, method="jvp", num_probes=50, seed=5, squared=True)
    r = nk.effective_rank(K, method="jvp", num_probes=50, seed=5)
    assert s.total_trace.value == pytest.approx(t.value, rel=1e-10)
    assert s.total_trace.stderr == pytest.approx(t.stderr, rel=1e-8)
    assert s.total_frobenius_sq.value == pytest.approx(f.value, rel=1e-10)
    assert s.total_effective_rank.value == pytest.approx(r.value, rel=1e-10)
    assert s.trace.jvp_passes == 50 and s.trace.vjp_passes == 0 and s.trace.num_probes == 50


def test_generic_axes_multi_keep_and_helpers():
    K, J = _toy(3, 4, 6, seed=2)
    J3 = J.reshape(3, 2, 2, 6)  # axes (time, batch, hidden)
    kw = dict(axes=("time", "batch", "hidden"), shape=(3, 2, 2))
    s = structure(K, ("batch", "time"), method="exact", **kw)
    assert s.trace.values.shape == (2, 3) and s.frobenius.values.shape == (2, 3, 2, 3)
    ref = J3.square().sum((2, 3)).T  # tr over hidden and params, per (batch, time)
    torch.testing.assert_close(s.trace.values, ref)
    assert s.frobenius.axes == ("batch", "time", "batch'", "time'")
    bt = block_traces(K, "batch", method="exact", **kw)
    torch.testing.assert_close(bt.values, J3.square().sum((0, 2, 3)))
    bf = block_frobenius(K, "batch", method="exact", pairs=False, **kw)
    Kd = J @ J.T
    Kb = Kd.reshape(3, 2, 2, 3, 2, 2)
    torch.testing.assert_close(bf.values, torch.stack([Kb[:, b, :, :, b, :].square().sum() for b in range(2)]))
    br = block_effective_rank(K, "batch", method="exact", **kw)
    torch.testing.assert_close(br.values, bt.values**2 / bf.values)
    ct = block_traces(K, "time", method="exact", cross=True, **kw)
    torch.testing.assert_close(ct.values, torch.einsum("sbhp,tbhp->st", J3, J3))
    # blocking round trip
    rows = torch.randn(5, 12, dtype=DT)
    torch.testing.assert_close(from_blocks(to_blocks(rows, (3, 2, 2), [2, 0]), (3, 2, 2), [2, 0]), rows)
    e = s.trace.estimate(1, 2)
    assert e.exact and e.value == pytest.approx(float(ref[1, 2]))


def test_structure_errors():
    K, _ = _toy()
    kw = dict(axes=("time", "hidden"), shape=(3, 4))
    with pytest.raises(ValueError, match="unknown axes"):
        structure(K, "layer", **kw)
    with pytest.raises(ValueError, match="no names"):
        structure(K, "time")
    with pytest.raises(ValueError, match="num_probes"):
        structure(K, "time", num_probes=2, **kw)
    with pytest.raises(ValueError, match="method"):
        structure(K, "time", method="hutchpp", **kw)
    with pytest.raises(ValueError, match="entries"):
        structure(K, "time", axes=("time", "hidden"), shape=(3, 5))
    with pytest.raises(ValueError, match="independent"):
        structure(K, "time", probes="orthogonal", **kw)
    with pytest.raises(TypeError, match="factored"):
        structure(torch.eye(3), "time")  # type: ignore[arg-type]
    big = nk.NTK.from_jacobian(torch.randn(2 * (MAX_PAIR_BLOCKS + 1), 3, dtype=DT))
    with pytest.raises(ValueError, match="pairs=False"):
        structure(big, "time", axes=("time", "hidden"), shape=(MAX_PAIR_BLOCKS + 1, 2))
    s = structure(
        big, "time", axes=("time", "hidden"), shape=(MAX_PAIR_BLOCKS + 1, 2), pairs=False, cross=False, num_probes=4, seed=0
    )
    assert s.frobenius.values.shape == (MAX_PAIR_BLOCKS + 1,) and s.cross_trace is None


def test_block_jackknife_helpers_against_brute_force() -> None:
    """The batched jackknife the block statistics use: leave-one-out means, pair means, errors."""
    g = torch.Generator().manual_seed(7)
    m = 6
    H = torch.randn(m, m, 2, 3, dtype=DT, generator=g)  # a pair statistic per entry of a (2, 3) grid
    off = ~torch.eye(m, dtype=torch.bool)
    rowsum = (H * off[:, :, None, None]).sum(1)
    colsum = (H * off[:, :, None, None]).sum(0)
    full, loo = jk.pair_mean_loo_from_sums(rowsum, colsum)

    def pair_mean(idx: list[int]) -> torch.Tensor:
        return torch.stack([H[i, j] for i in idx for j in idx if i != j]).mean(0)

    torch.testing.assert_close(full, pair_mean(list(range(m))))
    torch.testing.assert_close(loo, torch.stack([pair_mean([j for j in range(m) if j != k]) for k in range(m)]))
    x = torch.randn(m, 4, dtype=DT, generator=g)
    mean, x_loo = jk.mean_loo(x)
    se, corrected = jk.stderr_and_corrected(mean, x_loo)
    torch.testing.assert_close(se, x.std(0) / math.sqrt(m))  # a plain mean: std/√m
    torch.testing.assert_close(corrected, x.mean(0))  # and no bias to remove
    inf_se, same = jk.stderr_and_corrected(mean[:1], x_loo[:1, :1])
    assert math.isinf(float(inf_se)) and torch.equal(same, mean[:1])  # one probe: no spread to measure


def test_block_entries_carry_the_jackknife_degrees_of_freedom():
    """One block's Estimate, and the totals, keep m − 1 degrees of freedom: their ci() uses
    Student's t as nk.trace's does (the normal quantile covered 0.85–0.92 at 8 probes)."""
    K, _ = _toy(seed=2, P=64)
    s = structure(K, "time", num_probes=8, seed=0, axes=("time", "hidden"), shape=(3, 4))
    e = s.trace.estimate(1)
    assert e.info["dof"] == 7 and e.info["index"] == [1] and e.quantity == "trace"
    assert s.trace.ci(1) == e.ci() and s.total_trace.info["dof"] == 7
    t = nk.trace(K, method="jvp", num_probes=8, seed=0)
    lo, hi = s.total_trace.ci()
    assert (lo, hi) == pytest.approx(t.ci(), rel=1e-9)
    normal = (e.value * math.exp(-1.96 * e.stderr / e.value), e.value * math.exp(1.96 * e.stderr / e.value))
    assert e.ci()[0] < normal[0] and e.ci()[1] > normal[1]  # t(7) is wider than the normal quantile
