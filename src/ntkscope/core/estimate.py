"""The result type every metric returns, and the statistics that fill in its error bars."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

#: Quantities that are positive for any nonzero kernel: their intervals are taken on the log scale.
#: Target alignment ``yᵀKy / (‖K‖_F‖y‖²)`` is too (K is PSD); its JVP-side numerator, a mean of
#: squares ``(yᵀJu)²``, is right-skewed: 0.89–0.94 coverage on the linear scale at 6–48 probes,
#: 0.93–0.96 on the log scale (300 seeds, an MLP with D = 120).
POSITIVE = frozenset({"trace", "frobenius_norm", "frobenius_norm_sq", "effective_rank", "target_alignment"})
#: Cosines ``⟨A, B⟩_F / (‖A‖_F‖B‖_F)``: their intervals are taken on Fisher's ``atanh`` scale.  Near 1
#: (a kernel against its own earlier self) a high estimate comes with a small stderr: the linear
#: intervals of per-block JVP alignments of 0.992 and 0.998 (a GRU with a readout, 96 probes, 200
#: seeds) covered 0.87 and 0.92, on the atanh scale 0.97 and 0.995.  Estimates outside (−1, 1)
#: (possible for the JVP side's U-statistics) keep the linear interval.
COSINES = frozenset({"alignment"})


@dataclass
class Estimate:
    """A number with its standard error and its cost.

    Attributes:
        value: the estimate (a Python float).
        stderr: its standard error; ``None`` only for exact values.  For ratios it comes from
            the delete-one jackknife over probes (see :func:`ntkscope.core.jackknife.combine`); for Hutch++ it is conditional on the
            sketch; for XTrace it is a grouped jackknife of the whole estimator (its own
            exchangeable error estimate under-covers).
        jvp_passes / vjp_passes: forward- and reverse-mode AD passes spent (one pass = one
            probe vector pushed through J or Jᵀ), including any pilot passes of ``method="auto"``.
        num_probes: random probe vectors used (matvecs with the estimated operator).
        method: the method that produced it (after ``"auto"`` resolved).
        seconds: wall time of the call.
        quantity: what was estimated (``"trace"``, ``"frobenius_norm"``, ...).
        exact: whether ``value`` is exact up to rounding.
        info: extra facts (why ``auto`` chose, which AD paths ran, bias-corrected value, ...).
        converged: with ``rtol=``/``atol=``, whether ``stderr`` met the tolerance before the pass
            budget ended; ``None`` when no tolerance was asked for.
    """

    value: float
    stderr: float | None
    jvp_passes: int
    vjp_passes: int
    num_probes: int
    method: str
    seconds: float
    quantity: str = ""
    exact: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    #: With ``rtol``/``atol``: whether the error estimate met the tolerance (None: no tolerance).
    converged: bool | None = None

    @property
    def passes(self) -> int:
        """Total AD passes (JVP + VJP)."""
        return self.jvp_passes + self.vjp_passes

    @property
    def rel_stderr(self) -> float | None:
        if self.stderr is None:
            return None
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """Confidence interval ``value ± q·stderr``: q is Student's t quantile with the
        jackknife's degrees of freedom (``info["dof"]``: probes − 1, or jackknife groups − 1),
        the normal quantile when they are unknown.  At a handful of probes the t quantile is
        what keeps the interval's coverage near ``level``.  Positive quantities (trace, norms,
        effective rank) get the interval on the log scale, ``value·exp(±q·stderr/value)``: their
        estimates are right-skewed (a low estimate comes with a small stderr), which a symmetric
        interval misses from above.  Alignments get it on Fisher's scale,
        ``tanh(atanh(value) ± q·stderr/(1 − value²))``, which keeps it inside (−1, 1)."""
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"level must be a probability strictly between 0 and 1, got {level!r}")
        if self.stderr is None:
            return (self.value, self.value)
        dof = self.info.get("dof")
        if isinstance(dof, int) and dof >= 1:
            from scipy.stats import t  # here, not at the top: scipy.stats adds ~1.4 s to `import ntkscope`

            q = float(t.ppf(0.5 + level / 2, dof))
        else:
            q = NormalDist().inv_cdf(0.5 + level / 2)
        if self.quantity in POSITIVE and self.value > 0 and math.isfinite(self.stderr):
            r = q * self.stderr / self.value
            # a wide interval (one degree of freedom, a level near 1) reaches to infinity, not an OverflowError
            return (self.value * math.exp(-r), self.value * math.exp(r) if r < 700 else math.inf)
        if self.quantity in COSINES and abs(self.value) < 1 and math.isfinite(self.stderr):
            z, r = math.atanh(self.value), q * self.stderr / (1 - self.value**2)
            return (math.tanh(z - r), math.tanh(z + r))
        return (self.value - q * self.stderr, self.value + q * self.stderr)

    def __float__(self) -> float:
        return self.value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["info"] = {k: v for k, v in self.info.items() if _jsonable(v)}
        return d

    def __str__(self) -> str:
        err = "exact" if self.stderr is None else f"± {self.stderr:.4g}"
        return (
            f"{self.quantity or 'estimate'} = {self.value:.6g} {err} "
            f"[{self.method}, {self.num_probes} probes, {self.jvp_passes} JVP + "
            f"{self.vjp_passes} VJP passes, {self.seconds:.3g} s]"
        )


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))
