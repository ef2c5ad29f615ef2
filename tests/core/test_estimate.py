"""The Estimate result type: intervals, cost fields, serialisation."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import t

from ntkscope.core.estimate import Estimate


def _est(**kw) -> Estimate:  # type: ignore[no-untyped-def]
    base = dict(value=10.0, stderr=1.0, jvp_passes=3, vjp_passes=4, num_probes=4, method="vjp", seconds=0.1)
    base.update(kw)
    return Estimate(**base)  # type: ignore[arg-type]


def test_interval_uses_student_t_with_the_jackknife_dof() -> None:
    e = _est(quantity="alignment", info={"dof": 3})
    lo, hi = e.ci(0.95)
    q = t.ppf(0.975, 3)
    assert (lo, hi) == pytest.approx((10 - q, 10 + q))
    lo, hi = _est(quantity="alignment").ci(0.95)  # no dof: the normal quantile
    assert (lo, hi) == pytest.approx((10 - 1.959964, 10 + 1.959964), rel=1e-6)


def test_positive_quantities_get_a_log_scale_interval() -> None:
    lo, hi = _est(quantity="trace", stderr=5.0).ci(0.95)
    assert lo > 0 and hi / 10 == pytest.approx(10 / lo)  # symmetric in log, never below zero


def test_a_very_wide_interval_reaches_infinity_and_bad_levels_are_refused() -> None:
    # one degree of freedom at 99.999 %: q·stderr/value ≈ 3e4, whose exp overflowed (QA repro)
    lo, hi = _est(quantity="trace", stderr=5.0, info={"dof": 1}).ci(0.99999)
    assert lo == 0.0 and hi == math.inf
    for level in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="level"):
            _est().ci(level)


def test_exact_values_and_cost_fields() -> None:
    e = _est(stderr=None, exact=True)
    assert e.ci() == (10.0, 10.0) and e.rel_stderr is None
    assert _est().passes == 7 and _est().rel_stderr == pytest.approx(0.1)
    assert _est(value=0.0).rel_stderr == math.inf
    assert float(_est()) == 10.0
    assert "± 1" in str(_est()) and "3 JVP + 4 VJP passes" in str(_est())


def test_to_dict_is_json_and_drops_non_json_info() -> None:
    d = _est(info={"dof": 3, "tensor": object()}).to_dict()
    assert d["info"] == {"dof": 3}
    assert json.loads(json.dumps(d))["value"] == 10.0
