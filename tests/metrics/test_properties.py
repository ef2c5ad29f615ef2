"""Property-based guards of the public API (hypothesis), on random small models, dtypes and arguments.

Every call either returns an estimate within 5 standard errors of the exact value (or the exact
value itself), or raises one of the documented errors (``ValueError``/``TypeError`` naming the
problem).  Nothing hangs: each example runs under a hypothesis deadline, and every call is
bounded by construction (budgets far beyond the exact cost are refused; tolerance runs have a
pass budget and turn exact when that is cheaper).  ``derandomize=True``: the same examples on
every run, so the guard is not flaky.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ntkscope as nk
from ntkscope.metrics.adaptive import ConvergenceWarning

SETTINGS = settings(
    max_examples=25, deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)

METRICS = ["trace", "frobenius_norm", "effective_rank", "target_alignment"]
METHODS = ["auto", "exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp", "vjp_proj", "jvp_proj"]


@st.composite
def models(draw: st.DrawFn) -> tuple[torch.nn.Module, torch.Tensor]:
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n_in = draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 6))
    n_out = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 5))
    act = draw(st.sampled_from([torch.nn.Tanh, torch.nn.ReLU, torch.nn.Identity]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), act(), torch.nn.Linear(hidden, n_out)).to(dtype)
    return model, torch.randn(batch, n_in, generator=g).to(dtype)


DOCUMENTED = (ValueError, TypeError)


def _call(metric: str, K: nk.NTK, y: torch.Tensor, **kw: object) -> nk.Estimate:
    fn = getattr(nk, metric)
    return fn(K, y, **kw) if metric == "target_alignment" else fn(K, **kw)


@SETTINGS
@given(
    mk=models(),
    metric=st.sampled_from(METRICS),
    method=st.sampled_from(METHODS),
    num_probes=st.one_of(st.none(), st.integers(-2, 80)),
    seed=st.integers(0, 1000),
    chunk=st.one_of(st.none(), st.integers(-1, 9)),
    probes=st.sampled_from([None, "rademacher", "gaussian", "sphere", "orthogonal"]),
)
def test_fixed_budget_calls_are_right_or_refuse(
    mk: tuple[torch.nn.Module, torch.Tensor], metric: str, method: str, num_probes: int | None, seed: int, chunk: int | None,
    probes: str | None,
) -> None:  # fmt: skip
    model, x = mk
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        K = nk.NTK(model, x)
    except DOCUMENTED:
        return
    y = torch.randn(K.dim, dtype=K.dtype)
    try:
        e = _call(metric, K, y, method=method, num_probes=num_probes, seed=seed, chunk_size=chunk, probes=probes)
    except DOCUMENTED as err:
        assert str(err), "errors must name the problem"
        return
    finally:
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # never changes the model
    try:
        exact = _call(metric, K, y, method="exact").value
    except DOCUMENTED:  # e.g. a kernel that vanishes: then the estimate could not be defined either
        return
    assert math.isfinite(e.value) and e.passes >= 0
    tol = 1e-4 * max(abs(exact), 1.0) if K.dtype == torch.float32 else 1e-8 * max(abs(exact), 1.0)
    if e.exact or e.stderr is None:
        assert abs(e.value - exact) <= tol, (e, exact)
    else:
        assert e.stderr >= 0
        if math.isfinite(e.stderr) and e.num_probes >= 8 and metric == "trace":
            # unbiased: within 5 standard errors (the ratios' small-budget bias is checked elsewhere)
            assert abs(e.value - exact) <= 5 * e.stderr + tol, (e, exact)


@SETTINGS
@given(
    mk=models(),
    metric=st.sampled_from(METRICS[:3]),
    method=st.sampled_from(["auto", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp"]),
    rtol=st.one_of(st.none(), st.sampled_from([0.0, 1e-6, 1e-3, 0.05, -1.0])),
    max_passes=st.one_of(st.none(), st.integers(0, 400)),
    seed=st.integers(0, 1000),
)
def test_tolerance_calls_end_within_their_budget(
    mk: tuple[torch.nn.Module, torch.Tensor], metric: str, method: str, rtol: float | None, max_passes: int | None, seed: int
) -> None:
    model, x = mk
    try:
        K = nk.NTK(model, x)
    except DOCUMENTED:
        return
    y = torch.randn(K.dim, dtype=K.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            e = _call(metric, K, y, method=method, seed=seed, rtol=rtol, max_passes=max_passes)
        except DOCUMENTED as err:
            assert str(err)
            return
    exact_cost = min(K.dim, K.num_params)
    if max_passes is not None:
        # never more than the budget, plus (once) the exact value when it was the cheaper way on
        assert e.passes <= max_passes + 2 * exact_cost + 32, (e.passes, max_passes)
    assert math.isfinite(e.value)


@pytest.mark.parametrize("bad", [{"num_probes": 10**9}, {"rtol": 0.0}, {"chunk_size": 0}])
def test_unbounded_requests_are_refused_up_front(bad: dict) -> None:
    K = nk.NTK.from_jacobian(torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError):
        nk.trace(K, method="vjp", seed=0, **bad)
