"""Statistical checks of the estimators against exact values.

* Unbiased estimators: the mean over 200 seeds lies within 4 standard errors (of that mean) of
  the exact value.  These runs use the zoo models' exact Jacobians as dense factors (the
  estimator math is operator-agnostic and dense products are cheap); that an estimate through
  AD equals the estimate through the dense Jacobian for the same seed is checked separately for
  every zoo model and method, and two 200-seed runs go through AD end to end.
* Ratio estimators: error shrinks with ``num_probes``; the jackknife bias correction helps.
* XTrace/XNysTrace against a naive leave-one-out implementation; Hutch++ exact for low rank;
  probe moments.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

import model_zoo as Z
import ntkscope as nk
from ntkscope import estimators as est
from ntkscope.core import jackknife as jk
from ntkscope.core.probes import BLOCK, Probe, ProbeStream, Stream
from ntkscope.estimators import exact as ex

SEEDS = 200
TRACE_METHODS = ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp", "vjp_proj", "jvp_proj"]
FRO_METHODS = ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp"]
MODELS = ["mlp", "gru", "cnn-bn-train"]  # D < P, D < P, D ≪ P
DTYPES = [torch.float64, torch.float32]


@cache
def _jac(name: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """The zoo model's exact Jacobian (through the NTK's own exact path, checked in estimators/test_exact.py)."""
    case = Z.FACTORIES[name](dtype)
    if scale != 1.0:
        params = {n: p.detach() * scale for n, p in case.params.items()}
        K = nk.NTK(case.model, case.inputs, output=case.output, params=params)
    else:
        K = case.ntk()
    return ex.jacobian(K)


def _assert_unbiased(values: list[float], exact: float, what: str) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    mean, se = float(x.mean()), float(x.std() / math.sqrt(len(values)))
    # 4 standard errors, plus rounding slack for estimators that are exact (zero variance)
    assert abs(mean - exact) <= 4 * se + 1e-5 * abs(exact), f"{what}: mean {mean} vs exact {exact} (SE {se})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_unbiased_trace(name: str, dtype: torch.dtype) -> None:
    J = _jac(name, dtype)
    K = nk.NTK.from_jacobian(J)
    exact = float(J.double().square().sum())
    for method in TRACE_METHODS:
        m = Z.sampled_budget(K, method, 10)
        vals = [nk.trace(K, method=method, num_probes=m, seed=s).value for s in range(SEEDS)]
        _assert_unbiased(vals, exact, f"trace/{method}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_unbiased_frobenius_sq(name: str, dtype: torch.dtype) -> None:
    J = _jac(name, dtype).double()
    K = nk.NTK.from_jacobian(_jac(name, dtype))
    exact = float((J @ J.T).square().sum())
    for method in FRO_METHODS:
        m = Z.sampled_budget(K, method, 10, "frobenius_norm")
        vals = [nk.frobenius_norm(K, method=method, num_probes=m, seed=s, squared=True).value for s in range(SEEDS)]
        _assert_unbiased(vals, exact, f"frobenius_sq/{method}")


@pytest.mark.parametrize("probes", ["gaussian", "sphere", "orthogonal"])
def test_unbiased_trace_other_probe_kinds(probes: str) -> None:
    J = _jac("gru", torch.float64)
    K = nk.NTK.from_jacobian(J)
    exact = float(J.square().sum())
    for method in ["hutchinson", "hutchpp", "vjp", "jvp"]:
        vals = [nk.trace(K, method=method, num_probes=10, seed=s, probes=probes).value for s in range(SEEDS)]
        _assert_unbiased(vals, exact, f"trace/{method}/{probes}")


def test_unbiased_alignment_and_target_numerators() -> None:
    """tr(K1 K2) (K1, K2: one model at two parameter points) and yᵀKy from the JVP side."""
    J1, J2 = _jac("gru", torch.float64), _jac("gru", torch.float64, 1.3)
    A, B = nk.NTK.from_jacobian(J1), nk.NTK.from_jacobian(J2)
    exact = float(((J1 @ J1.T) * (J2 @ J2.T)).sum())
    y = torch.randn(J1.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact_y = float((J1.T @ y).square().sum())
    res: dict[str, list[float]] = {"hutchinson": [], "hutchpp": [], "vjp": [], "jvp": [], "jvp-shared": [], "target-jvp": []}
    m = 10
    for s in range(SEEDS):
        st = ProbeStream(A.dim, Probe.RADEMACHER, s, 0, torch.float64)
        res["hutchinson"].append(float(est.hutchinson_grams([A, B], st, m)[:, 1, 2].mean()))
        r = est.hutchpp_grams([A, B], st, m)
        res["hutchpp"].append(float(r.exact[1, 2] + r.residual[:, 1, 2].mean()))
        W1, W2 = est.onesided(A, "vjp", st.columns, m, keep=True), est.onesided(B, "vjp", st.columns, m, keep=True)
        res["vjp"].append(float(jk.pair_mean_loo((W1 @ W1.T) * (W2 @ W2.T))[0]))
        su = ProbeStream(A.num_params, Probe.RADEMACHER, s, 0, torch.float64)
        U1 = est.onesided(A, "jvp", su.columns, m, keep=True)
        U2 = est.onesided(B, "jvp", su.child(Stream.SECOND).columns, m, keep=True)
        res["jvp"].append(float(jk.pair_mean_loo((U1 @ U2.T) ** 2, independent_diag=True)[0]))
        # the same u for both kernels (P₁ = P₂, what alignment does): pairs i ≠ j only
        U2s = est.onesided(B, "jvp", su.columns, m, keep=True)
        res["jvp-shared"].append(float(jk.pair_mean_loo((U1 @ U2s.T) ** 2)[0]))
        res["target-jvp"].append(float((U1 @ y).square().mean()))
    for k, v in res.items():
        _assert_unbiased(v, exact_y if k.startswith("target") else exact, f"numerator/{k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(Z.FACTORIES))
def test_estimate_through_ad_equals_dense_jacobian(name: str, dtype: torch.dtype) -> None:
    """Same seed → the same estimate through AD as through the model's dense Jacobian (without
    per-example blocks, which a bare Jacobian does not have: their samples differ by design)."""
    case = Z.FACTORIES[name](dtype)
    K = case.ntk(ghost=False) if case.fn is None else case.ntk()
    K.jvp(torch.zeros(K.num_params, dtype=K.dtype)), K.vjp(torch.zeros(K.dim, dtype=K.dtype))  # a fast path's self-check
    Kd = nk.NTK.from_jacobian(ex.jacobian(K))
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for method in TRACE_METHODS:
        m = Z.sampled_budget(K, method, 8)
        a, b = nk.trace(K, method=method, num_probes=m, seed=7), nk.trace(Kd, method=method, num_probes=m, seed=7)
        assert abs(a.value - b.value) <= tol * abs(b.value), method
        assert not a.exact and not b.exact, method
        assert abs(a.stderr - b.stderr) <= 10 * tol * abs(b.value) + 1e-12, method  # type: ignore[operator]
        assert (a.jvp_passes, a.vjp_passes) == (b.jvp_passes, b.vjp_passes)
    for method in FRO_METHODS:
        m = Z.sampled_budget(K, method, 8, "frobenius_norm")
        a = nk.frobenius_norm(K, method=method, num_probes=m, seed=7, squared=True)
        b = nk.frobenius_norm(Kd, method=method, num_probes=m, seed=7, squared=True)
        assert abs(a.value - b.value) <= 10 * tol * abs(b.value), method


@pytest.mark.parametrize(
    "factory, dtype, method",
    [("rnn", torch.float32, "vjp"), ("gru-loop", torch.float64, "jvp"), ("lstm", torch.float32, "hutchinson")],
)
def test_unbiased_through_ad(factory: str, dtype: torch.dtype, method: str) -> None:
    K = Z.FACTORIES[factory](dtype).ntk()
    exact = ex.exact_trace(K)
    vals = [nk.trace(K, method=method, num_probes=6, seed=s).value for s in range(SEEDS)]
    _assert_unbiased(vals, exact, f"{factory}/{method}")


# -- ratios ----------------------------------------------------------------------------------


def _synthetic(D: int, P: int, decay: float, seed: int) -> torch.Tensor:
    """A D × P factor with singular values k^(-decay) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = min(D, P)
    U, _ = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(P, r, generator=g, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** (-decay)
    return (U * s) @ V.T


@cache
def _ratio_setup() -> tuple[nk.FactoredKernel, nk.FactoredKernel, torch.Tensor, dict[str, float]]:
    J1 = _synthetic(120, 80, 0.5, 0)
    J2 = J1 + 0.5 * _synthetic(120, 80, 0.5, 1)
    K1, K2 = J1 @ J1.T, J2 @ J2.T
    y = torch.randn(120, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 5 * J1[:, 0]
    f1, f2 = K1.square().sum().sqrt(), K2.square().sum().sqrt()
    exact = {
        "effective_rank": float(torch.trace(K1) ** 2 / f1**2),
        "frobenius_norm": float(f1),
        "alignment": float((K1 * K2).sum() / (f1 * f2)),
        "target_alignment": float(y @ K1 @ y / (f1 * (y @ y))),
    }
    return nk.NTK.from_jacobian(J1), nk.NTK.from_jacobian(J2), y, exact


def _ratio(quantity: str, method: str, m: int, seed: int) -> nk.Estimate:
    A, B, y, _ = _ratio_setup()
    if quantity == "effective_rank":
        return nk.effective_rank(A, method=method, num_probes=m, seed=seed)
    if quantity == "frobenius_norm":
        return nk.frobenius_norm(A, method=method, num_probes=m, seed=seed)
    if quantity == "alignment":
        return nk.alignment(A, B, method=method, num_probes=m, seed=seed)
    return nk.target_alignment(A, y, method=method, num_probes=m, seed=seed)


@pytest.mark.parametrize("quantity", ["effective_rank", "frobenius_norm", "alignment", "target_alignment"])
def test_ratio_error_shrinks_with_probes(quantity: str) -> None:
    exact = _ratio_setup()[3][quantity]
    for method in FRO_METHODS:
        err = {}
        for m in (8, 64):
            vals = torch.tensor([_ratio(quantity, method, m, s).value for s in range(30)])
            err[m] = float((vals - exact).abs().mean())
        # Monte Carlo error falls like 1/√m (a factor 2.8 here); Hutch++/XTrace faster
        assert err[64] < 0.6 * err[8], f"{quantity}/{method}: {err}"


@pytest.mark.parametrize(
    "quantity, method, m",
    [("effective_rank", "vjp", 24), ("frobenius_norm", "vjp", 6), ("alignment", "vjp", 6), ("target_alignment", "vjp", 6)],
)
def test_ratio_bias_correction_helps(quantity: str, method: str, m: int) -> None:
    """At small budgets the plug-in ratio is visibly biased; the jackknife correction removes most of it."""
    exact = _ratio_setup()[3][quantity]
    es = [_ratio(quantity, method, m, s) for s in range(400)]
    v = torch.tensor([e.value for e in es])
    bc = torch.tensor([e.info["bias_corrected"] for e in es])
    bias, se = float(v.mean()) - exact, float(v.std()) / 20
    assert abs(bias) > 3 * se  # the bias is real at this budget (so the test can fail)
    assert abs(float(bc.mean()) - exact) < 0.5 * abs(bias)


def test_stderr_matches_spread() -> None:
    """The reported standard error matches the spread of the estimates over seeds (within 25 %)."""
    J = _jac("gru", torch.float64)
    K = nk.NTK.from_jacobian(J)
    for method in ["hutchinson", "vjp", "jvp"]:
        es = [nk.trace(K, method=method, num_probes=Z.sampled_budget(K, method, 40), seed=s) for s in range(SEEDS)]
        spread = float(torch.tensor([e.value for e in es]).std())
        rms_se = math.sqrt(sum(e.stderr**2 for e in es) / len(es))  # type: ignore[operator]
        assert 0.75 < rms_se / spread < 1.25, (method, rms_se, spread)


# -- XTrace / XNysTrace ----------------------------------------------------------------------


def _naive_xtrace(A: torch.Tensor, Om: torch.Tensor, improved: bool) -> torch.Tensor:
    """Epperly, Tropp, Webber (2024), Alg. 1.2 by definition: Hutch++ with the other test vectors
    as sketch and ω_i as the single residual probe, normalised (improved) for sphere probes."""
    n, k = Om.shape
    out = []
    for i in range(k):
        Q, _ = torch.linalg.qr(A @ torch.cat([Om[:, :i], Om[:, i + 1 :]], 1))
        r = Om[:, i] - Q @ (Q.T @ Om[:, i])
        if improved:
            r = r * math.sqrt(n - k + 1) / r.norm()
        out.append(torch.trace(Q.T @ A @ Q) + r @ A @ r)
    return torch.stack(out)


def _naive_xnystrace(A: torch.Tensor, Om: torch.Tensor, improved: bool, nu: float) -> torch.Tensor:
    """XNysTrace by definition: the Nyström approximation from the other test vectors, plus
    Hutchinson with ω_i on the remainder, for the shifted A + νI (minus νn)."""
    n, m = Om.shape
    An = A + nu * torch.eye(n, dtype=A.dtype)
    out = []
    for i in range(m):
        O = torch.cat([Om[:, :i], Om[:, i + 1 :]], 1)
        Y = An @ O
        Ahat = Y @ torch.linalg.solve(O.T @ Y, Y.T)
        w = Om[:, i]
        if improved:
            Qo, _ = torch.linalg.qr(O)
            r = w - Qo @ (Qo.T @ w)
            w = r * math.sqrt(n - m + 1) / r.norm()
        out.append(torch.trace(Ahat) + w @ (An - Ahat) @ w - nu * n)
    return torch.stack(out)


@pytest.mark.parametrize("kind", [Probe.GAUSSIAN, Probe.SPHERE, Probe.RADEMACHER])
def test_xtrace_matches_naive_leave_one_out(kind: Probe) -> None:
    n = 20
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)  # non-symmetric
    B = torch.randn(n, 6, generator=g, dtype=torch.float64)
    Psd = B @ B.T + 0.1 * torch.diag(torch.rand(n, generator=g, dtype=torch.float64))
    for seed in range(3):
        s = ProbeStream(n, kind, seed, 0, torch.float64)
        fast = est.xtrace_samples(lambda X: A @ X, s, 12, torch.float64, 4)
        ref = _naive_xtrace(A, s.columns(0, 6), kind is Probe.SPHERE)
        assert torch.allclose(fast, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
        fast = est.xnystrace_samples(lambda X: Psd @ X, s, 10, torch.float64, 4)
        Om = s.columns(0, 10)
        nu = torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(Psd @ Om)) / math.sqrt(n)
        ref = _naive_xnystrace(Psd, Om, kind is Probe.SPHERE, nu)
        assert torch.allclose(fast, ref, rtol=1e-9)


def test_xtrace_error_estimate_is_sane() -> None:
    """XTrace's own error estimate is within a factor 2 of the actual spread over seeds, and
    XNysTrace stays finite and exact when the probes outnumber the rank."""
    n = 60
    J = _synthetic(n, 40, 1.0, 3)
    A = J @ J.T
    for psd in (True, False):
        fn = est.xnystrace_samples if psd else est.xtrace_samples
        means, ses = [], []
        for seed in range(SEEDS):
            x = fn(lambda X: A @ X, ProbeStream(n, Probe.SPHERE, seed, 0, torch.float64), 12, torch.float64, 64)
            means.append(float(x.mean()))
            ses.append(float(x.std() / math.sqrt(len(x))))
        spread = float(torch.tensor(means).std())
        rms = math.sqrt(sum(s * s for s in ses) / len(ses))
        assert 0.5 < rms / spread < 2.0, (psd, rms, spread)
    low = _synthetic(n, 5, 0.5, 4)  # rank 5 < 20 probes
    A = low @ low.T
    x = est.xnystrace_samples(lambda X: A @ X, ProbeStream(n, Probe.SPHERE, 0, 0, torch.float64), 20, torch.float64, 64)
    assert torch.isfinite(x).all() and abs(float(x.mean()) - float(torch.trace(A))) < 1e-8 * float(torch.trace(A))


def test_xtrace_refuses_dependent_probes() -> None:
    K = nk.NTK.from_jacobian(_jac("gru", torch.float64))
    with pytest.raises(ValueError, match="independent"):
        nk.trace(K, method="xtrace", num_probes=10, seed=0, probes="orthogonal")


# -- Hutch++ ---------------------------------------------------------------------------------


@pytest.mark.parametrize("generic", [False, True])
def test_hutchpp_exact_for_low_rank(generic: bool) -> None:
    J = _synthetic(40, 3, 0.3, 5)  # rank 3
    Kd = J @ J.T
    K = nk.DenseOperator(Kd) if generic else nk.NTK.from_jacobian(J)
    tr, fro2 = float(torch.trace(Kd)), float(Kd.square().sum())
    if not generic:
        # the factored kernel runs on G = JᵀJ (3×3): 3 one-sided passes give it exactly, fewer
        # than any Hutch++ budget of 2 or more probes (2 passes each), so that is what runs
        for m in (2, 12):
            e = nk.trace(K, method="hutchpp", num_probes=m, seed=0)
            assert e.exact and e.passes == 3 and "covers the exact cost of 3" in e.info["variants"][0]
            assert abs(e.value - tr) < 1e-10 * tr
        return
    for seed in range(5):
        e = nk.trace(K, method="hutchpp", num_probes=12, seed=seed)  # 4 sketch columns ≥ rank 3
        assert abs(e.value - tr) < 1e-10 * tr and e.info["sketch_size"] == 4 and not e.exact
        f = nk.frobenius_norm(K, method="hutchpp", num_probes=12, seed=seed, squared=True)
        assert abs(f.value - fro2) < 1e-10 * fro2
    e = nk.trace(K, method="hutchpp", num_probes=6, seed=0)  # 2 sketch columns < rank: not exact
    assert abs(e.value - tr) > 1e-6 * tr


def test_hutchpp_split_uses_the_whole_budget() -> None:
    for m in range(1, 40):
        for k in (1, 2):
            q, r = est.hutchpp_split(m, k)
            assert q % k == 0 and r >= 1
            assert q // k + q + r == m  # sketch share + exact products + residual probes


# -- probes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Probe))
def test_probe_moments(kind: Probe) -> None:
    d, n = 6, 4096
    V = ProbeStream(d, kind, 0, 0, torch.float64).columns(0, n)
    M = (V @ V.T) / n
    # per-entry standard error of the mean of v_a v_b: at most ~√(3/n) for these distributions
    assert (M - torch.eye(d, dtype=torch.float64)).abs().max() < 4 * math.sqrt(3 / n)
    assert V.mean(1).abs().max() < 4 * math.sqrt(1 / n)
    if kind is Probe.RADEMACHER:
        assert torch.equal(V.abs(), torch.ones_like(V))
    if kind in (Probe.SPHERE, Probe.ORTHOGONAL):
        assert torch.allclose(V.norm(dim=0), torch.full((n,), math.sqrt(d), dtype=torch.float64))
    if kind is Probe.ORTHOGONAL:
        B = ProbeStream(50, kind, 0, 0, torch.float64).columns(0, BLOCK)
        assert torch.allclose(B.T @ B, 50 * torch.eye(BLOCK, dtype=torch.float64), atol=1e-10)


def test_probe_streams_are_chunk_invariant() -> None:
    for kind in Probe:
        s = ProbeStream(7, kind, 123, 2, torch.float64)
        full = s.columns(0, 100)
        parts = torch.cat([s.columns(a, min(100, a + 13)) for a in range(0, 100, 13)], 1)
        assert torch.equal(full, parts)
        assert not torch.equal(full, s.child(3).columns(0, 100))
        assert torch.equal(ProbeStream(7, kind, 123, 2, torch.float32).columns(0, 100), full.float())
