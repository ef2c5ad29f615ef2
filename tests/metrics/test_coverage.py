"""Calibration of the error bars: 95 % intervals cover the exact value in 90–99 % of seeds.

Kernels are ``NTK.from_jacobian`` factors ``J = U diag(√λ) Vᵀ`` with a known spectrum
``λ_i = 1/i`` (D = 150, P = 200), so every exact value is known; each metric is estimated under
200 seeds at a budget where the normal approximation holds (m = 120 probes, below D, where the
one-sided methods would compute the exact value instead; Hutch++ on one kernel 28, below the
exact cost it would switch to), for the one-sided methods and Hutch++; every method, at budgets
from 2 probes to min(D, P), further below.  The binomial
standard deviation of a measured coverage over 200 runs is 1.5 %, so the 90–99 % band is
about ±3σ around 95 %: a calibrated estimator passes, a stderr off by 30 % fails.
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.tasks import jacobian_with_spectrum

SEEDS = 200
M = 120


def _factor(D: int, P: int, alpha: float, seed: int) -> torch.Tensor:
    """A Jacobian whose NTK has eigenvalues i^-alpha, i = 1..D."""
    return jacobian_with_spectrum(D, P, torch.arange(1, D + 1, dtype=torch.float64) ** -alpha, seed=seed)


@pytest.fixture(scope="module")
def setting() -> dict:
    J1 = _factor(150, 200, 1.0, 0)
    g = torch.Generator().manual_seed(5)
    J2 = J1 + 0.7 * torch.randn(150, 200, dtype=torch.float64, generator=g) / 200**0.5
    y = torch.randn(150, dtype=torch.float64, generator=g)
    K1, K2 = J1 @ J1.T, J2 @ J2.T
    truth = {
        "frobenius_norm": float(K1.norm()),
        "effective_rank": float(K1.trace() ** 2 / K1.square().sum()),
        "alignment": float((K1 * K2).sum() / (K1.norm() * K2.norm())),
        "target_alignment": float(y @ K1 @ y / (K1.norm() * (y @ y))),
    }
    A, B = nk.NTK.from_jacobian(J1), nk.NTK.from_jacobian(J2)
    fns = {
        "frobenius_norm": lambda **k: nk.frobenius_norm(A, **k),
        "effective_rank": lambda **k: nk.effective_rank(A, **k),
        "alignment": lambda **k: nk.alignment(A, B, **k),
        "target_alignment": lambda **k: nk.target_alignment(A, y, **k),
    }
    return {"truth": truth, "fns": fns}


def coverage(fn, truth: float, method: str, m: int, seeds: int = SEEDS) -> float:  # type: ignore[no-untyped-def]
    hits = 0
    for s in range(seeds):
        lo, hi = fn(method=method, num_probes=m, seed=s).ci(0.95)
        hits += lo <= truth <= hi
    return hits / seeds


@pytest.mark.parametrize("quantity", ["frobenius_norm", "effective_rank", "alignment", "target_alignment"])
@pytest.mark.parametrize("method", ["vjp", "jvp", "hutchpp"])
def test_ci_coverage(setting: dict, quantity: str, method: str) -> None:
    # Hutch++ on one kernel: 120 probes (240 passes) would cover the exact cost (150), which is
    # what runs then; 28 probes (56 passes) stay below it
    m = 28 if method == "hutchpp" and quantity != "alignment" else M
    cov = coverage(setting["fns"][quantity], setting["truth"][quantity], method, m)
    assert 0.90 <= cov <= 0.99, f"{quantity}/{method}: 95% interval covered {cov:.3f}"


def test_effective_rank_bias_shrinks_and_jackknife_corrects(setting: dict) -> None:
    """r_eff = t²/f is biased (delta method: O(1/m)); the bias shrinks with m."""
    truth = setting["truth"]["effective_rank"]
    fn = setting["fns"]["effective_rank"]

    def bias(m: int) -> tuple[float, float, float]:
        vals, bcs = [], []
        for s in range(SEEDS):
            e = fn(method="vjp", num_probes=m, seed=s)
            vals.append(e.value)
            bcs.append(e.info["bias_corrected"])
        v = torch.tensor(vals)
        return float(v.mean()) - truth, float(v.std()) / SEEDS**0.5, float(torch.tensor(bcs).mean()) - truth

    b_small, se_small, bc_small = bias(8)
    b_big, se_big, _ = bias(128)
    assert b_small > 4 * se_small  # a real, positive bias at 8 probes ...
    assert abs(b_big) < abs(b_small) / 4  # ... that shrinks at 128 (O(1/m): ~16× in expectation)
    assert abs(bc_small) < abs(b_small) / 2  # the jackknife correction removes most of it


# -- every method, every budget (issue 13) ---------------------------------------------------------
#
# A small kernel (D = 24, P = 40, λ_i = 1/i) so that budgets run from 2 probes up to min(D, P),
# including next to D, where XTrace's own error bar used to cover 0.2.  600 fixed seeds per cell:
# the binomial sd of a measured coverage is 0.9 % at 95 % and 1.1 % at 92 %, so a cell whose true
# coverage is in the band is not pushed out of it by the draw (at 150 seeds, true 0.92–0.93 cells
# of Hutchinson and Hutch++ measured 0.88).  Estimates whose budget covers the exact cost come
# back exact, and then must equal the exact value.
COV_SEEDS = 600
D_COV, P_COV = 24, 40
TRACE_BUDGETS = {
    "hutchinson": (2, 8, 11, 23),
    "hutchpp": (2, 8, 11, 23),
    "xtrace": (2, 6, 11, 23),
    "vjp": (2, 8, 16, 23),
    "jvp": (2, 8, 16, 23),
    "vjp_proj": (2, 8, 16, 23),
    "jvp_proj": (2, 8, 16, 23),
}
RATIO_BUDGETS = {"vjp": (4, 10, 23), "jvp": (4, 10, 23), "hutchpp": (4, 10, 23), "hutchinson": (4, 10, 23), "xtrace": (3, 5, 23)}
#: The one measured deviation from the 0.90–0.99 band, kept visible rather than budgeted away:
#: XNysTrace at 11 of 24 dimensions (22 of the 24 passes exact costs) covers 0.997 — conservative,
#: never overconfident.  Its variance falls like m^-2.5 there, and the grouped jackknife
#: overestimates it 4× (Efron–Stein: the interactions between test vectors are inflated);
#: extrapolating from delete-1 and delete-2 groups, half-sample splits, and the Efron–Stein
#: second-order correction were each tried and under-covered (0.77–0.89) instead.  A value
#: outside this wider band fails.
KNOWN = {
    ("trace", "xtrace", 11): (0.90, 1.0),
}


@pytest.fixture(scope="module")
def small() -> nk.FactoredKernel:
    return nk.NTK.from_jacobian(_factor(D_COV, P_COV, 1.0, 0))


def _coverage_cells(fn, truth: float, method: str, budgets: tuple[int, ...]) -> dict[int, float | str]:  # type: ignore[no-untyped-def]
    out: dict[int, float | str] = {}
    for m in budgets:
        hits, n = 0, 0
        for s in range(COV_SEEDS):
            e = fn(method=method, num_probes=m, seed=s)
            if e.exact:
                assert e.value == pytest.approx(truth, rel=1e-9), (method, m)
                continue
            assert e.stderr is not None and math.isfinite(e.stderr), (method, m, e)
            lo, hi = e.ci(0.95)
            hits += lo <= truth <= hi
            n += 1
        out[m] = hits / n if n else "exact"
    return out


def _outside(cells: dict[int, float | str], quantity: str, method: str) -> dict[int, float | str]:
    bad = {}
    for m, c in cells.items():
        lo, hi = KNOWN.get((quantity, method, m), (0.90, 0.99))
        if c != "exact" and not lo <= c <= hi:  # type: ignore[operator]
            bad[m] = c
    return bad


@pytest.mark.parametrize("method", list(TRACE_BUDGETS))
def test_trace_interval_coverage_across_budgets(small: nk.FactoredKernel, method: str) -> None:
    truth = ex.exact_trace(small)
    cells = _coverage_cells(lambda **k: nk.trace(small, **k), truth, method, TRACE_BUDGETS[method])
    assert not _outside(cells, "trace", method), f"trace/{method}: 95% coverage {cells}"


@pytest.mark.parametrize("quantity", ["frobenius_norm", "effective_rank"])
@pytest.mark.parametrize("method", list(RATIO_BUDGETS))
def test_norm_and_rank_interval_coverage_across_budgets(small: nk.FactoredKernel, quantity: str, method: str) -> None:
    fn = getattr(nk, quantity)
    truth = fn(small, method="exact").value
    cells = _coverage_cells(lambda **k: fn(small, **k), truth, method, RATIO_BUDGETS[method])
    assert not _outside(cells, quantity, method), f"{quantity}/{method}: 95% coverage {cells}"


@pytest.mark.parametrize("m", [6, 24])
def test_target_alignment_jvp_interval_on_a_model(m: int) -> None:
    """The JVP side estimates yᵀKy from squares ``(yᵀJu)²`` (right-skewed): on the linear scale
    its interval covered 0.855–0.90 at 6–24 probes; on the log scale, as for the other positive
    quantities, it is calibrated (300 fixed seeds: binomial sd 1.3 %)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4)).double()
    X, y = torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    K = nk.NTK(net, X)
    truth = nk.target_alignment(K, y, method="exact").value
    cov = coverage(lambda **k: nk.target_alignment(K, y, **k), truth, "jvp", m, seeds=300)
    assert 0.90 <= cov <= 0.99, f"target_alignment/jvp at {m} probes: 95% interval covered {cov:.3f}"


# -- alignments near 1 (a kernel against a nearby one: training from its own initial kernel) ---------


def _gru_and_nearby() -> tuple[nk.NTK, nk.NTK]:
    """A GRU with a readout, and the same model with every parameter moved by 0.05·N(0, 1): the
    block alignments are 0.992 and 0.998 (D = 60)."""
    torch.manual_seed(0)

    class GRUReadout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = torch.nn.GRU(3, 8, batch_first=True), torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0][:, -1])

    net = GRUReadout()
    X = torch.randn(30, 5, 3).double()
    net.double()
    moved = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in net.named_parameters()}  # the QA's draw
    return nk.NTK(net, X), nk.NTK(net, X, params=moved)


def test_block_alignment_near_one_is_calibrated_on_the_jvp_side() -> None:
    """Per-block JVP alignments of 0.99 come with a stderr that shrinks as the estimate nears 1:
    at 96 probes the linear interval covered 0.87 and 0.92 of 200 seeds, and did not improve with
    probes (QA: 0.87 at 32 too); on Fisher's atanh scale 0.97 and 0.995 — the 0.99 band's edge,
    binomial sd 0.5 %, hence the upper limit 1.  (At 32 probes a quarter of the JVP estimates
    exceed 1, where no atanh interval exists, and block 0 still covers 0.86: docs/methods.md.)"""
    K, K0 = _gru_and_nearby()
    truth = nk.parameter_blocks(K, other=K0, method="exact").alignment
    assert truth is not None
    hits = torch.zeros(len(truth.values))
    for s in range(SEEDS):
        r = nk.parameter_blocks(K, other=K0, method="jvp", num_probes=96, seed=s)
        assert r.alignment is not None
        for i, want in enumerate(truth.values.tolist()):
            lo, hi = r.alignment.ci(i)
            hits[i] += lo <= want <= hi
    cov = (hits / SEEDS).tolist()
    assert all(0.93 <= c <= 1.0 for c in cov), f"per-block JVP alignment coverage {cov}"


def test_jvp_alignment_of_nearby_kernels_shares_its_probes() -> None:
    """With P₁ = P₂ both kernels see the same JVP probes, so the cross term moves with the norms:
    at 32 probes the alignment 0.998 is estimated to ±0.003 (independent probes: ±0.05, as often
    above 1 as below).  At 96 probes its interval covers 0.985 of 200 seeds (at 32, where 45 % of
    the estimates exceed 1, 0.90)."""
    K, K0 = _gru_and_nearby()
    truth = nk.alignment(K, K0, method="exact").value
    err = torch.tensor([nk.alignment(K, K0, method="jvp", num_probes=32, seed=s).value - truth for s in range(50)])
    assert float(err.abs().max()) < 0.02 and float(err.square().mean().sqrt()) < 0.008
    est = [nk.alignment(K, K0, method="jvp", num_probes=96, seed=s) for s in range(100)]
    cov = sum(lo <= truth <= hi for lo, hi in (e.ci() for e in est)) / len(est)
    assert 0.90 <= cov <= 1.0, cov  # 100 seeds: binomial sd 2.2 % at 0.95
