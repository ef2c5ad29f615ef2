"""Accuracy on demand: grow a probe budget until the error estimate meets a tolerance.

Every metric in :mod:`ntkscope.metrics` accepts ``rtol=``, ``atol=`` and ``max_passes=``.  The
loop (:func:`drive`) runs the estimator at ``m`` probes, reads its standard error ``se`` (sample
variance or jackknife over probes; XTrace: a grouped jackknife over test vectors), stops when

    se ≤ max(atol, rtol · |value|),

and otherwise grows ``m`` geometrically — by the factor ``(se / tol)²`` that a 1/√m error law
predicts (times 1.2), clamped to [1.5, 4] — until the pass budget ``max_passes`` would be
exceeded.  It then returns the last estimate with ``converged=False`` and emits
:class:`ConvergenceWarning`.

**Extending, not restarting.**  Probe column j depends only on (seed, stream, j)
(:mod:`ntkscope.core.probes`), so the first m probes of a bigger run are the same vectors.  During
the loop the operators are wrapped in :class:`CachedFactor` / :class:`CachedKernel`, which
memoise ``Jᵀw``, ``Ju`` and ``Kv`` per probe column (keyed by the column's bytes): a product is
computed once and every later round reuses it, so only the new probes cost AD passes.  The
per-probe statistics (Gram matrices, U-statistics, jackknife) are recomputed from the stored
products each round, which costs linear algebra, not passes.  What is reused, per method:

* one-sided (``vjp``/``jvp``, trace and the Gram U-statistics) and ``hutchinson``: every pass;
* ``hutchpp``: re-sketched geometrically — the sketch products ``KS`` are reused, but Q changes
  with the sketch, so ``KQ`` and the deflated residual products are recomputed each round
  (geometric growth bounds this overhead by a constant factor; all of it is counted);
* ``xtrace``: doubling (growth capped at 2, as for Hutch++) on its own error estimate; the test-vector products ``KΩ`` are reused,
  ``KQ`` is recomputed.

The reported pass counts are the AD passes actually spent in all rounds.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.callers import user_stacklevel
from ..operators.base import FactoredKernel, KernelOperator

__all__ = ["ConvergenceWarning", "CachedFactor", "CachedKernel", "cached", "drive", "AdaptiveResult"]

#: First block when a tolerance is given and ``num_probes`` is not.
FIRST_BLOCK = 32
#: The pass budget of a tolerance run when ``max_passes`` is not given.
DEFAULT_MAX_PASSES = 100_000
GROWTH_MIN, GROWTH_MAX, SAFETY = 1.5, 4.0, 1.2


class ConvergenceWarning(UserWarning):
    """The pass budget (``max_passes``) or the probe limit ended before the tolerance was met."""


# -- memoised operators ---------------------------------------------------------------------


def _keys(X: torch.Tensor) -> list[bytes]:
    """One digest per column of ``X`` (its dtype and bytes)."""
    # a fresh row-major copy: .contiguous() may keep odd strides on size-1 dimensions, which view() rejects
    rows = torch.empty((X.shape[1], X.shape[0]), dtype=X.dtype).copy_(X.detach().T)
    raw = rows.view(torch.uint8).numpy()
    tag = str(X.dtype).encode()
    return [hashlib.blake2b(r.tobytes() + tag, digest_size=16).digest() for r in raw]


class _Memo:
    def __init__(self) -> None:
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = 0

    def apply(self, X: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        keys = _keys(X)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            # duplicates inside one block are computed once
            uniq: dict[bytes, int] = {}
            for i in missing:
                uniq.setdefault(keys[i], i)
            idx = list(uniq.values())
            out = fn(X if len(idx) == X.shape[1] else X[:, idx])  # same block, same rounding
            for j, i in enumerate(idx):
                self.store[keys[i]] = out[:, j].clone()
        self.hits += len(keys) - len(missing)
        return torch.stack([self.store[k] for k in keys], 1)


class CachedFactor(FactoredKernel):
    """A :class:`FactoredKernel` that computes each probe column's ``Jᵀw`` / ``Ju`` once.

    Products go through to ``base`` (whose pass counters therefore count only new passes).
    """

    base: FactoredKernel

    def __init__(self, base: FactoredKernel) -> None:
        super().__init__(base.dim, base.dtype, base.device)
        self.base = base
        self.num_params = base.num_params
        self.chunk_size = base.chunk_size
        self.state_shape = getattr(base, "state_shape", (base.dim,))
        self._memo = {"jvp": _Memo(), "vjp": _Memo(), "blocks": _Memo()}

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        return self._memo["jvp"].apply(U, self.base.jvp)

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        return self._memo["vjp"].apply(V, self.base.vjp)

    def modes(self) -> dict[str, bool]:
        return self.base.modes()

    def trace_blocks(self) -> int | None:
        return self.base.trace_blocks()

    def block_sqnorms(self, X: torch.Tensor) -> torch.Tensor:
        """Per-example trace samples, memoised like the products (a tolerance round redraws its
        earlier probes)."""
        return self._memo["blocks"].apply(X, lambda Y: self.base.block_sqnorms(Y)[None, :])[0]

    def block_basis(self, start: int, stop: int) -> torch.Tensor:
        return self.base.block_basis(start, stop)

    def same_inputs(self, other: FactoredKernel) -> bool | None:
        return self.base.same_inputs(other.base)  # type: ignore[arg-type]


class CachedKernel(KernelOperator):
    """A :class:`KernelOperator` that computes each probe column's ``Kv`` once."""

    def __init__(self, base: KernelOperator) -> None:
        super().__init__(base.dim, base.dtype, base.device)
        self.base = base
        self.chunk_size = base.chunk_size
        self._memo = _Memo()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._memo.apply(V, self.base.matmat)


def cached(op: KernelOperator) -> KernelOperator:
    """Wrap ``op`` in the memoising proxy of its kind (idempotent)."""
    if isinstance(op, (CachedFactor, CachedKernel)):
        return op
    return CachedFactor(op) if isinstance(op, FactoredKernel) else CachedKernel(op)


# -- the stopping loop ----------------------------------------------------------------------


@dataclass
class AdaptiveResult:
    value: float
    stderr: float
    payload: Any
    num_probes: int
    converged: bool | None
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""


def check_tolerances(rtol: float | None, atol: float | None, max_passes: int | None) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v)):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if rtol is not None and atol is not None and rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: no finite budget can meet that tolerance")
    if not (rtol or atol) and (rtol is not None or atol is not None) and max_passes is None:
        raise ValueError(
            "a zero tolerance can never be met by a random estimate: give a positive rtol/atol, a max_passes= budget, "
            "or use method='exact'"
        )
    if max_passes is not None and (isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1):
        raise ValueError(f"max_passes must be a positive int, got {max_passes!r}")


def drive(
    run: Callable[[int], tuple[float, float, Any]],
    passes: Callable[[], int],
    m0: int,
    *,
    rtol: float | None,
    atol: float | None,
    max_passes: int | None,
    max_probes: int | None = None,
    max_growth: float = GROWTH_MAX,
    what: str = "estimate",
    exact: Callable[[], tuple[float, float, Any]] | None = None,
    exact_passes: int | None = None,
    probe_cost: float | None = None,
    incremental: bool = True,
) -> AdaptiveResult:
    """Run ``run(m) -> (value, stderr, payload)`` at growing m until the tolerance is met.

    ``passes()`` reads the AD passes spent so far (all rounds).  With no tolerance but a
    ``max_passes``, the whole budget is spent (``converged=None``).  ``max_probes`` caps m where
    the estimator has a dimension limit (XTrace needs fewer probes than the dimension);
    ``max_growth`` caps the growth factor per round (2 — doubling — for Hutch++ and XTrace, whose
    error can fall faster than 1/√m, so the 1/√m prediction would overshoot).  With ``exact``
    (a function returning the exact value) and its cost ``exact_passes``, a round whose new
    passes would cost at least as much as the exact value runs ``exact`` instead, the first
    round included.
    ``incremental=False`` (Hutch++, XTrace: a larger sketch needs its products afresh): a round
    of m probes may cost ``probe_cost · m`` passes, whatever earlier rounds computed.
    """
    want_tol = rtol is not None or atol is not None
    m = m0 if max_probes is None else min(m0, max_probes)
    history: list[dict[str, float]] = []
    if exact is not None and exact_passes is not None and want_tol and probe_cost and m * probe_cost >= exact_passes:
        value, se, payload = exact()  # the first round alone would cost as much (a trace over per-example blocks)
        history.append({"num_probes": 0, "value": value, "stderr": 0.0, "passes": passes(), "tol": 0.0})
        return AdaptiveResult(value, se, payload, 0, True, history, "the exact value cost less than the first round")
    prev_m, prev_passes = 0, 0
    while True:
        value, se, payload = run(m)
        used = passes()
        tol = max(atol or 0.0, (rtol or 0.0) * abs(value)) if want_tol else 0.0
        history.append({"num_probes": m, "value": value, "stderr": se, "passes": used, "tol": tol})
        if want_tol and se <= tol:
            return AdaptiveResult(value, se, payload, m, True, history, "tolerance met")
        # marginal cost of one more probe, measured on the last round (cached products are free)
        cost = max((used - prev_passes) / max(m - prev_m, 1), 1e-9)
        if want_tol and math.isfinite(se) and tol > 0:
            grow = min(max(SAFETY * (se / tol) ** 2, GROWTH_MIN), max_growth)
        else:
            grow = 2.0 if want_tol or max_passes is None else GROWTH_MAX
        m_next = math.ceil(m * grow)
        reason = ""
        if max_probes is not None and m_next > max_probes:
            m_next = max_probes
            reason = f"the probe limit {max_probes} of this method (its dimension or the memory for stored products) was reached; use method='exact'"
        if max_passes is not None:
            affordable = m + int((max_passes - used) / cost)
            if affordable < m_next:
                m_next = affordable
                reason = f"the pass budget max_passes={max_passes} ran out ({used} passes spent)"
        if max_passes is not None and probe_cost:
            # nominal cost: products a cache answered for free (e.g. deflated zero probes) still
            # cannot make the probe count outgrow the pass budget
            m_next = min(m_next, max(m, int(max_passes / probe_cost)))
            if not incremental and used + probe_cost * m_next > max_passes:
                m_next = max(m, int((max_passes - used) / probe_cost))
                reason = f"the pass budget max_passes={max_passes} ran out ({used} passes spent)"
        nominal = max(cost, probe_cost or 0.0)
        if exact is not None and exact_passes is not None and want_tol and (m_next - m) * nominal >= exact_passes:
            value, se, payload = exact()
            history.append({"num_probes": 0, "value": value, "stderr": 0.0, "passes": passes(), "tol": tol})
            return AdaptiveResult(value, se, payload, m, True, history, "the exact value cost less than the next round")
        if m_next <= m:
            converged = False if want_tol else None
            reason = reason or "no further growth possible"
            if want_tol:
                warnings.warn(
                    f"{what}: stderr {se:.3g} > tolerance {tol:.3g} at {m} probes: {reason}",
                    ConvergenceWarning,
                    stacklevel=user_stacklevel(),
                )
            return AdaptiveResult(value, se, payload, m, converged, history, reason)
        prev_m, prev_passes = m, used
        m = m_next
