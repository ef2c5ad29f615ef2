"""Top eigenvalues, stochastic Lanczos quadrature and the entropy effective rank vs exact spectra."""

from __future__ import annotations

import math

import pytest
import torch

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.metrics import spectrum as sp
from ntkscope.tasks import jacobian_with_spectrum

LAM = 0.8 ** torch.arange(60, dtype=torch.float64)  # geometric decay


@pytest.fixture(scope="module")
def K() -> nk.FactoredKernel:
    return nk.NTK.from_jacobian(jacobian_with_spectrum(60, 80, LAM))


@pytest.fixture(scope="module")
def mlp() -> nk.NTK:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    return nk.NTK(model, torch.randn(20, 5, dtype=torch.float64))  # D = 60, P = 147


@pytest.fixture(scope="module")
def mlp_eigs(mlp: nk.NTK) -> torch.Tensor:
    return ex.eigenvalues(mlp)


@pytest.mark.parametrize(("method", "tol"), [("nystrom", 1e-3), ("rsvd", 1e-3), ("lanczos", 1e-9), ("gram", 1e-12)])
def test_top_eigenvalues_match_exact(K: nk.FactoredKernel, method: str, tol: float) -> None:
    r = sp.top_eigenvalues(K, 5, method=method, seed=0, oversample=10, power_iters=2)
    assert torch.allclose(r.values, LAM[:5], rtol=tol, atol=0)
    ell = 15
    expected = {"nystrom": 2 * ell * 3, "rsvd": 2 * ell * 3, "lanczos": 2 * r.info.get("steps", 0), "gram": 60}[method]
    residuals = 0 if method == "gram" else 2 * 5  # the Ritz residuals behind r.errors: one K-product per value
    assert r.passes == expected + residuals
    assert r.errors is not None and torch.all((r.values - LAM[:5]).abs() <= r.errors + 1e-12)


def test_nystrom_and_rsvd_agree_without_power_iterations(K: nk.FactoredKernel) -> None:
    a = sp.top_eigenvalues(K, 8, method="nystrom", seed=1, power_iters=0)
    b = sp.top_eigenvalues(K, 8, method="rsvd", seed=1, power_iters=0)
    # both are the Rayleigh–Ritz values of K on range(KΩ) for the same Ω
    assert torch.allclose(a.values, b.values, rtol=1e-8)
    assert (a.values <= LAM[:8] * (1 + 1e-9)).all()  # Ritz values never exceed the truth


def test_top_eigenvalues_of_a_model(mlp: nk.NTK, mlp_eigs: torch.Tensor) -> None:
    exact = mlp_eigs[:4]
    r = sp.top_eigenvalues(mlp, 4, method="lanczos", seed=0, steps=40)
    assert torch.allclose(r.values, exact, rtol=1e-8)
    r = sp.top_eigenvalues(mlp, 4, method="rsvd", seed=0, power_iters=3)
    assert torch.allclose(r.values, exact, rtol=1e-3)
    vecs = sp.top_eigenvalues(mlp, 2, method="nystrom", seed=0, power_iters=3, return_vectors=True).vectors
    assert vecs is not None and vecs.shape == (60, 2)


def test_bad_arguments(K: nk.FactoredKernel) -> None:
    with pytest.raises(ValueError):
        sp.top_eigenvalues(K, 0)
    with pytest.raises(ValueError, match="needs the factor"):
        sp.top_eigenvalues(torch.eye(5), 2, method="rsvd")
    with pytest.raises(ValueError, match="unknown method"):
        sp.top_eigenvalues(K, 2, method="qr")


def test_slq_traces_within_error_bars(mlp: nk.NTK, mlp_eigs: torch.Tensor) -> None:
    lam = mlp_eigs.clamp(min=0)
    sd = sp.spectral_density(mlp, num_probes=30, steps=25, seed=0)
    for f, truth in [(lambda x: x, lam.sum()), (lambda x: x**2, lam.square().sum())]:
        val, se = sd.trace(f)
        assert abs(val - float(truth)) <= 4 * se
    assert sd.passes == 2 * sum(t.numel() for t in sd.nodes)
    sigma = float(lam[0]) / 50
    t = torch.linspace(-6 * sigma, float(lam[0]) + 6 * sigma, 4000)
    mass = float(sd.density(t, sigma=sigma).sum() * (t[1] - t[0]))
    assert mass == pytest.approx(1.0, abs=0.02)


def test_entropy_rank_exact_formula() -> None:
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    p = lam[:4] / lam.sum()
    assert sp.entropy_rank_of(lam) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert sp.entropy_rank_of(torch.ones(7)) == pytest.approx(7.0)
    assert sp.participation_ratio_of(lam) == pytest.approx(64 / 22)
    with pytest.raises(ValueError):
        sp.entropy_rank_of(torch.zeros(3))
    zero = nk.NTK.from_jacobian(torch.zeros(5, 4, dtype=torch.float64))
    for method in ("exact", "slq"):  # slq returned nan ± inf
        with pytest.raises(ValueError, match="zero"):
            sp.entropy_effective_rank(zero, method=method, num_probes=4, seed=0)


def test_entropy_effective_rank_slq_vs_exact(mlp: nk.NTK, mlp_eigs: torch.Tensor) -> None:
    exact = sp.entropy_effective_rank(mlp, method="exact")
    assert exact.value == pytest.approx(sp.entropy_rank_of(mlp_eigs))
    assert exact.info["participation_ratio"] == pytest.approx(nk.effective_rank(mlp, method="exact").value)
    e = sp.entropy_effective_rank(mlp, num_probes=40, steps=30, seed=0)
    assert e.stderr is not None and abs(e.value - exact.value) <= 4 * e.stderr
    assert abs(e.info["participation_ratio"] - exact.info["participation_ratio"]) <= 4 * e.info["participation_ratio_stderr"]
    assert 1.0 <= e.value <= 60 and e.passes == 2 * 40 * 30


def test_slq_is_exact_for_low_rank() -> None:
    lam = torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64)
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(40, 30, lam))
    e = sp.entropy_effective_rank(K, num_probes=5, steps=20, seed=0)
    # Lanczos meets the 3-dimensional invariant subspace: ≤ 4 steps, quadrature exact
    assert e.passes <= 2 * 5 * 4
    # every probe has a different weight on each eigenvector, so the ratio still has probe noise
    assert abs(e.value - sp.entropy_rank_of(lam)) <= 4 * e.stderr


def test_slq_runs_every_probe_in_one_block_per_step() -> None:
    """SLQ pushes its probes through K together (one block per Lanczos step, not one vector per
    probe and step), with the same recurrences as one Lanczos run per probe."""
    from ntkscope.core.linalg import lanczos, lanczos_many

    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 60, dtype=torch.float64, generator=g)
    A = A @ A.T
    L = torch.randn(60, 3, dtype=torch.float64, generator=g)
    V = torch.randn(60, 5, dtype=torch.float64, generator=g)
    for M in (A, L @ L.T):  # full rank, and rank 3 (every run stops at its invariant subspace)
        for col, (alpha, beta) in enumerate(lanczos_many(lambda X, M=M: M @ X, V, 20)):
            a, b, _ = lanczos(lambda x, M=M: M @ x, V[:, col], 20)
            assert torch.allclose(alpha, a, atol=1e-9) and torch.allclose(beta, b, atol=1e-9)
    calls = []
    op = nk.DenseOperator(A)
    inner = op.matmat
    op.matmat = lambda X: (calls.append(X.shape[-1]), inner(X))[1]  # type: ignore[method-assign]
    nk.spectral_density(op, num_probes=6, steps=10, seed=0)
    assert len(calls) == 10 and calls[0] == 6


def test_lanczos_past_an_early_stop_and_rsvd_past_p_report_what_they_know() -> None:
    """k above the Lanczos steps that ran crashed (vectors fewer than values); rsvd returned P < k
    values while nystrom and gram pad with K's zero eigenvalues (QA repros)."""
    J = jacobian_with_spectrum(12, 30, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))  # rank 3
    K = nk.NTK.from_jacobian(J)
    e = sp.top_eigenvalues(K, k=6, method="lanczos", seed=0)
    assert e.values.shape == (6,) and e.values[:3] == pytest.approx([3.0, 2.0, 1.0], rel=1e-9)
    assert e.info["steps"] < 6 and all(math.isinf(float(x)) for x in e.errors[e.info["steps"] :])  # unknown, not 0 ± 0
    thin = nk.NTK.from_jacobian(jacobian_with_spectrum(10, 4, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)))
    r = sp.top_eigenvalues(thin, k=7, method="rsvd", seed=0)
    assert r.values.shape == (7,) and r.values[:4] == pytest.approx([4.0, 3.0, 2.0, 1.0], rel=1e-9) and (r.values[4:] == 0).all()

