"""The estimation methods, their trade-offs and what ``num_probes`` buys with each.

``num_probes = m`` has one meaning: **the number of probe vectors of the method** — what a run
costs follows from the method (``m`` AD passes per kernel one-sided, ``2m`` two-sided, see
:class:`Method`).  ``method="auto"`` has not picked a method yet, so there ``m`` is the cost of
``m`` one-sided probes, a budget of ``m`` AD passes per kernel, and the method it picks gets as
many of its own probes as fit in that budget.
"""

from __future__ import annotations

import enum

from ..core.choices import parse_choice

__all__ = ["Method", "ONE_SIDED", "parse_method", "DEFAULT_PROBES", "EXACT_MAX_ENTRIES"]

#: ``num_probes`` when none is given (and no tolerance either).
DEFAULT_PROBES = 100
#: The exact path for norms and ratios stores J (D×P) and the smaller kernel (min(D, P)²): cap it.
EXACT_MAX_ENTRIES = 2 * 10**8


class Method(str, enum.Enum):
    """Estimation methods and their trade-offs.

    ``num_probes = m`` is the number of probe vectors of the method; the passes per probe are
    given below (a K-matvec costs a VJP and a JVP).  Only ``auto``, which has no probes of its
    own, reads ``m`` as a budget: that of ``m`` one-sided probes, ``m`` AD passes per kernel.

    * ``exact``: basis vectors through the smaller side, ``min(D, P)`` passes; no error.
    * ``hutchinson``: ``E vᵀKv`` on K, 2 passes per probe; variance of the mean
      ``2(‖K‖_F² − Σᵢ Kᵢᵢ²)/m`` (Rademacher) or ``2‖K‖_F²/m`` (Gaussian) (Hutchinson 1989).
    * ``hutchpp``: Hutch++ — sketch, deflate, Hutchinson on the rest; error ``O(1/m)`` for
      decaying spectra, exact once the sketch spans K's range.  Best at high accuracy.
      2 passes per matvec, m split in thirds (Meyer, Musco, Musco, Woodruff, SOSA 2021).
    * ``xtrace``: XTrace/XNysTrace — every probe serves as sketch and as residual probe;
      needs both modes like Hutch++.  XNysTrace (the Nyström variant) runs for PSD operators:
      an NTK, G, K² (Epperly, Tropp, Webber, SIMAX 2024).  Half of m are test vectors.
      Unbiased; the error bar is a grouped jackknife of the whole estimator (its own
      exchangeable estimate under-covers), conservative once m nears the dimension.
    * ``vjp``: one-sided ``E‖Jᵀw‖²``, probes in R^D, reverse mode only, 1 pass per probe;
      sample variance that of Hutchinson on K (it *is* Hutchinson's sample, at half the cost).
    * ``jvp``: one-sided ``E‖Ju‖²``, probes in R^P, forward mode only, 1 pass per probe;
      sample variance ``2(‖G‖_F² − Σⱼ Gⱼⱼ²)`` (Rademacher) with ``G = JᵀJ``.
      One-sided methods win at low budgets, most when D and P are far apart (Hazelden,
      arXiv 2511.10796).  Norms and ratios use U-statistics over the probe Gram of the same
      passes (see :func:`~ntkscope.metrics.quantities.frobenius_norm`).
    * ``vjp_proj`` / ``jvp_proj``: the paper's one-sided variants with a random projected block
      of ``m // 6`` probe directions handled exactly (trace only).
    * ``auto``: spends the budget of ``m`` AD passes per kernel.  Exact if that costs
      no more than the budget, else a one-sided method on the
      side chosen by dimension, by which AD modes work and by measured pass cost — unless a
      cheap pilot sketch (``min(m // 10, 16)`` columns, 2 passes each, half reused by the
      one-sided method) finds a spectrum that decays
      fast enough for Hutch++ to win (see :func:`~ntkscope.metrics.auto.choose_method`).
      Timing and pilot passes count in the budget; ``info["reason"]`` says what was chosen and why.
    """

    EXACT = "exact"
    HUTCHINSON = "hutchinson"
    HUTCHPP = "hutchpp"
    XTRACE = "xtrace"
    VJP = "vjp"
    JVP = "jvp"
    VJP_PROJ = "vjp_proj"
    JVP_PROJ = "jvp_proj"
    AUTO = "auto"


#: Methods that use one AD mode and need the factor J (a :class:`~ntkscope.FactoredKernel`).
ONE_SIDED = frozenset({Method.VJP, Method.JVP, Method.VJP_PROJ, Method.JVP_PROJ})


def parse_method(method: str | Method) -> Method:
    """The :class:`Method` named by ``method``, or a ``ValueError`` listing the choices."""
    return parse_choice(Method, method, "method")
