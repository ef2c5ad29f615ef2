"""Generic randomized estimators: *what* is averaged × *how probes are drawn* × *how combined*.

One module per method and its paper: :mod:`.hutchinson`, :mod:`.hutchpp`, :mod:`.xtrace`
(with XNysTrace), :mod:`.onesided` (Hazelden 2025) and :mod:`.exact` (dense reference).  All are
operator-agnostic: two-sided ones need only ``matmat`` on a
:class:`~ntkscope.operators.KernelOperator`, one-sided ones a
:class:`~ntkscope.operators.FactoredKernel` (``jvp`` or ``vjp`` alone).  They return raw,
per-probe statistics; :mod:`ntkscope.metrics` turns those into values with error bars.
"""

from . import exact
from .hutchinson import hutchinson_grams
from .hutchpp import HutchppResult, hutchpp_grams, hutchpp_split
from .onesided import onesided, onesided_projected_trace, probe_dim
from .xtrace import JACK_GROUPS, xnystrace_jackknife, xnystrace_samples, xtrace_jackknife, xtrace_samples

__all__ = [
    "exact",
    "hutchinson_grams",
    "HutchppResult",
    "hutchpp_grams",
    "hutchpp_split",
    "onesided",
    "onesided_projected_trace",
    "probe_dim",
    "JACK_GROUPS",
    "xtrace_samples",
    "xtrace_jackknife",
    "xnystrace_samples",
    "xnystrace_jackknife",
]
