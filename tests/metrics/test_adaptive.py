"""Tolerance-driven stopping (rtol/atol/max_passes), with product reuse."""

from __future__ import annotations

import warnings

import pytest
import torch

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.metrics.adaptive import ConvergenceWarning
from ntkscope.tasks import jacobian_with_spectrum


@pytest.fixture(scope="module")
def K() -> nk.FactoredKernel:
    # big enough (exact: 400 passes) that tolerance loops run several rounds before exact is cheaper
    return nk.NTK.from_jacobian(jacobian_with_spectrum(400, 600, torch.arange(1, 401, dtype=torch.float64) ** -0.5))


@pytest.mark.parametrize("method", ["vjp", "jvp", "hutchinson", "hutchpp", "xtrace"])
def test_trace_meets_rtol(K: nk.FactoredKernel, method: str) -> None:
    exact = ex.exact_trace(K)
    e = nk.trace(K, method=method, seed=0, rtol=0.02)
    assert e.converged is True
    if e.exact:  # xtrace: the next round would have cost more than the exact value
        assert method == "xtrace" and e.value == pytest.approx(exact, rel=1e-9)
        return
    assert e.stderr is not None and e.stderr <= 0.02 * abs(e.value)
    assert abs(e.value - exact) <= 4 * e.stderr + 1e-9 * exact
    assert e.info["adaptive"]["rounds"][-1]["num_probes"] == e.num_probes


@pytest.mark.parametrize("method", ["vjp", "jvp"])
def test_extends_probe_stream_instead_of_restarting(K: nk.FactoredKernel, method: str) -> None:
    """Later rounds reuse earlier probes: one pass per probe in all, and the same value as a
    fixed-budget run at the final probe count."""
    e = nk.trace(K, method=method, seed=3, rtol=0.01)
    assert len(e.info["adaptive"]["rounds"]) > 1
    assert e.passes == e.num_probes
    fixed = nk.trace(K, method=method, seed=3, num_probes=e.num_probes)
    assert e.value == pytest.approx(fixed.value, rel=1e-12)


def test_two_sided_hutchinson_reuses_matvecs(K: nk.FactoredKernel) -> None:
    # rtol below the ~1.8 % relative error of the first round's 32 probes: more rounds are needed
    e = nk.frobenius_norm(K, method="hutchinson", seed=1, rtol=0.008)
    assert e.converged and len(e.info["adaptive"]["rounds"]) > 1
    assert e.passes == 2 * e.num_probes  # one VJP + one JVP per probe, none recomputed


@pytest.mark.parametrize("metric", ["frobenius_norm", "effective_rank", "alignment", "target_alignment"])
def test_ratio_metrics_accept_tolerances(K: nk.FactoredKernel, metric: str) -> None:
    y = torch.linspace(-1, 1, 400, dtype=torch.float64)
    K2 = nk.NTK.from_jacobian(jacobian_with_spectrum(400, 600, torch.arange(1, 401, dtype=torch.float64) ** -0.3, seed=1))
    call = {
        "frobenius_norm": lambda **k: nk.frobenius_norm(K, **k),
        "effective_rank": lambda **k: nk.effective_rank(K, **k),
        "alignment": lambda **k: nk.alignment(K, K2, **k),
        "target_alignment": lambda **k: nk.target_alignment(K, y, **k),
    }[metric]
    exact = call(method="exact").value
    e = call(method="vjp", seed=0, rtol=0.05)
    assert e.converged is True and e.stderr <= 0.05 * abs(e.value)
    assert abs(e.value - exact) <= 4 * e.stderr


def test_atol(K: nk.FactoredKernel) -> None:
    e = nk.trace(K, method="vjp", seed=0, atol=0.5)
    assert e.converged and e.stderr is not None and e.stderr <= 0.5


def test_budget_ends_first_warns(K: nk.FactoredKernel) -> None:
    with pytest.warns(ConvergenceWarning, match="max_passes=150"):
        e = nk.effective_rank(K, method="vjp", seed=0, rtol=1e-4, max_passes=150)
    assert e.converged is False
    assert e.passes <= 150
    assert e.stderr is not None and e.stderr > 1e-4 * e.value


def test_max_passes_alone_spends_the_budget(K: nk.FactoredKernel) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = nk.trace(K, method="jvp", seed=0, max_passes=300)
    assert e.converged is None
    assert 150 < e.passes <= 300


def test_xtrace_turns_exact_at_its_dimension_limit() -> None:
    """A tolerance XTrace cannot meet below the dimension ends in the exact value (it costs less)."""
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(40, 60, torch.arange(1, 41, dtype=torch.float64) ** -0.5))
    e = nk.trace(K, method="xtrace", seed=0, num_probes=4, rtol=1e-12)
    assert e.exact and e.converged is True and e.value == pytest.approx(ex.exact_trace(K), rel=1e-12)


def test_exact_and_fixed_budget_flags(K: nk.FactoredKernel) -> None:
    assert nk.trace(K, method="exact", rtol=0.01).converged is True
    assert nk.trace(K, method="vjp", num_probes=10, seed=0).converged is None


@pytest.mark.parametrize("kw", [{"rtol": -1.0}, {"atol": float("nan")}, {"rtol": 0.0, "atol": 0.0}, {"max_passes": 0}])
def test_bad_tolerances(K: nk.FactoredKernel, kw: dict) -> None:
    with pytest.raises(ValueError):
        nk.trace(K, method="vjp", seed=0, **kw)


@pytest.mark.parametrize("method", ["vjp", "jvp", "hutchinson", "hutchpp", "xtrace", "auto"])
def test_every_quantity_stays_within_max_passes(method: str) -> None:
    """An unreachable tolerance spends at most ``max_passes``: XTrace's ‖K‖² and ⟨K₁, K₂⟩ cost 4
    passes per probe on each part (they spent 100–240 for 50–80), the exact yᵀKy one more."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4)).double()
    X = torch.randn(30, 6, dtype=torch.float64)
    K = nk.NTK(net, X)
    K2 = nk.NTK(net, X, params={n: p.detach() + 0.05 for n, p in net.named_parameters()})
    y = torch.randn(30, 4, dtype=torch.float64)
    calls = {
        "trace": lambda **k: nk.trace(K, **k),
        "frobenius_norm": lambda **k: nk.frobenius_norm(K, **k),
        "effective_rank": lambda **k: nk.effective_rank(K, **k),
        "alignment": lambda **k: nk.alignment(K, K2, **k),
        "target_alignment": lambda **k: nk.target_alignment(K, y, **k),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nk.ConvergenceWarning)
        for name, call in calls.items():
            for budget in (50, 80):
                e = call(method=method, rtol=1e-6, max_passes=budget, seed=0)
                assert e.passes <= budget, (name, budget, e.passes)
    if method == "xtrace":
        with pytest.raises(ValueError, match="cannot pay for the fewest probes"):
            nk.alignment(K, K2, method="xtrace", rtol=1e-6, max_passes=20, seed=0)


def test_max_passes_below_the_exact_cost_is_kept_by_auto_and_refused_by_exact() -> None:
    """auto's default budget (32 passes) covered the exact value (30) and spent it past
    max_passes=10 (a new user's repro); an explicit exact method names the conflict."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    K = nk.NTK(net, torch.randn(10, 5, dtype=torch.float64), ghost=False)  # no per-example blocks: exact costs D = 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nk.ConvergenceWarning)
        for call in (nk.trace, nk.effective_rank):
            for kw in ({"max_passes": 10}, {"rtol": 0.5, "max_passes": 10}):
                e = call(K, seed=0, **kw)
                assert not e.exact and e.passes <= 10, (call.__name__, kw, e.method, e.passes)
    assert nk.trace(K, seed=0, max_passes=40).exact  # a cap above the exact cost still takes it
    with pytest.raises(ValueError, match="method='exact' costs 30 passes, more than max_passes=10"):
        nk.trace(K, method="exact", max_passes=10)


def test_convergence_warning_points_at_the_callers_line() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(40, 60, torch.arange(1, 41, dtype=torch.float64) ** -0.5))
    with pytest.warns(ConvergenceWarning) as record:
        nk.trace(K, method="vjp", seed=0, rtol=1e-8, max_passes=8)
    assert record[0].filename == __file__


def test_parameter_blocks_stay_within_max_passes() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4)).double()
    K = nk.NTK(net, torch.randn(30, 6, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nk.ConvergenceWarning)
        for method in ("vjp", "jvp"):  # the JVP side: one JVP per block and probe (it spent 64 for 50)
            assert nk.parameter_blocks(K, method=method, rtol=1e-6, max_passes=50, seed=0).passes <= 50
