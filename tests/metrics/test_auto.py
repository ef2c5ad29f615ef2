"""``method="auto"``: a pilot picks the method and the side, inside the pass budget."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.tasks import jacobian_with_spectrum


def test_auto_picks_hutchpp_for_low_rank_and_reuses_pilot() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(200, 300, torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)))
    e = nk.trace(K, method="auto", num_probes=60, seed=0)
    assert e.method == "hutchpp"
    assert "spans" in e.info["reason"]
    assert e.info["pilot_passes"] == 12  # ℓ = 60 // 10 columns, a VJP and a JVP each
    assert e.passes == 60  # auto reads num_probes as an AD-pass budget, pilot included: 24 K-matvecs after 12 pilot passes
    assert e.value == pytest.approx(ex.exact_trace(K), rel=1e-9)


def test_auto_stays_one_sided_for_a_flat_spectrum() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(200, 300, torch.ones(200, dtype=torch.float64)))
    e = nk.trace(K, method="auto", num_probes=60, seed=0)
    assert e.method == "vjp"  # D < P
    assert "flat" in e.info["reason"] and e.info["pilot_passes"] == 12
    assert e.passes == 60  # the budget, pilot included (its 6 VJPs are the one-sided method's first 6 probes)
    assert e.num_probes == 54


def test_auto_pilots_on_the_jvp_side_when_p_is_smaller() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(300, 120, torch.linspace(0.5, 1.5, 120, dtype=torch.float64)))
    e = nk.trace(K, method="auto", num_probes=80, seed=0)
    assert e.method == "jvp" and e.info["pilot"]["side"] == "jvp"
    assert e.jvp_passes == 72 and e.vjp_passes == 8  # pilot JVPs reused, its 8 VJPs inside the 80-pass budget


def test_auto_with_tolerance() -> None:
    big = nk.NTK.from_jacobian(jacobian_with_spectrum(200, 300, torch.arange(1, 201, dtype=torch.float64) ** -0.3))
    e = nk.trace(big, method="auto", seed=0, rtol=0.01)
    assert e.converged and "reason" in e.info
    assert abs(e.value - ex.exact_trace(big)) <= 4 * e.stderr + 1e-9


def test_choose_method_is_the_choice_auto_makes() -> None:
    low = nk.NTK.from_jacobian(jacobian_with_spectrum(200, 300, torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)))
    method, reason = nk.choose_method([low], "trace", 60, seed=0)
    assert method is nk.Method.HUTCHPP and "spans" in reason
    assert nk.trace(low, method="auto", num_probes=60, seed=0).method == method.value
    small = nk.NTK.from_jacobian(jacobian_with_spectrum(20, 30, torch.ones(20, dtype=torch.float64)))
    assert nk.choose_method([small], "trace", 60)[0] is nk.Method.EXACT  # min(D, P) = 20 passes fit the budget


def test_auto_never_times_passes_and_a_seed_fixes_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's choice and probe count depend on the seed, the budget and the model only: not on
    measured time (which moved its choice between processes) nor on whether the kernel was used
    before (a reused kernel lost 10 timing passes again: budgets 4–12 all gave 2 probes, ±inf)."""
    monkeypatch.setattr(nk.NTK, "pass_seconds", lambda *a, **k: pytest.fail("auto must not time passes"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4)).double()
    X = torch.randn(30, 6, dtype=torch.float64)  # D = 120 < P = 224: the VJP side
    used = nk.NTK(net, X)
    nk.trace(used, method="vjp", num_probes=3, seed=0)
    for budget in (6, 12, 24):
        fresh = nk.effective_rank(nk.NTK(net, X), num_probes=budget, seed=1)
        again = nk.effective_rank(used, num_probes=budget, seed=1)
        assert (fresh.method, fresh.num_probes, fresh.value) == (again.method, again.num_probes, again.value)
        assert fresh.method == "vjp" and fresh.num_probes == budget - 2  # one check pass per AD mode
        assert fresh.passes <= budget and fresh.stderr is not None and math.isfinite(fresh.stderr)



def test_auto_reads_a_low_precision_pilot_at_float32_round_off() -> None:
    """In float16/bfloat16 the pilot's "spans K's range" threshold (10³·eps) exceeded 1, so auto
    chose Hutch++ for every kernel, calling it exact up to round-off (a QA repro)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    x = torch.randn(40, 10)
    for dtype in (torch.float16, torch.bfloat16):
        # ghost=False: no per-example blocks, whose exact trace (8 VJPs) auto would take without a pilot
        low = nk.trace(nk.NTK(copy.deepcopy(model).to(dtype), x.to(dtype), ghost=False), num_probes=64, seed=0)
        assert low.method == "vjp", (dtype, low.info["reason"])
