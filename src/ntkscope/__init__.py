"""ntkscope: the empirical Neural Tangent Kernel of PyTorch models, measured without forming it.

Public API (the contract other tools build on):

* :class:`NTK` — the matrix-free kernel ``K = J Jᵀ`` of a model (``NTK.from_function``,
  ``NTK.from_jacobian``), with ``jvp``, ``vjp`` and ``matmat``.
* :func:`trace`, :func:`frobenius_norm`, :func:`effective_rank`, :func:`alignment`,
  :func:`target_alignment` — each returns an :class:`Estimate` (value, stderr, passes, ...).
* :class:`Method` and :class:`Probe` — the documented choices.
"""

from .adaptive import ConvergenceWarning
from .estimate import Estimate
from .metrics import Method, alignment, choose_method, effective_rank, frobenius_norm, target_alignment, trace
from .operators import NTK, CallableOperator, DenseOperator, FactoredKernel, KernelOperator, as_operator
from .probes import Probe
from .spectrum import entropy_effective_rank, spectral_density, top_eigenvalues

__version__ = "0.1.0"

__all__ = [
    "NTK",
    "Estimate",
    "Method",
    "Probe",
    "trace",
    "frobenius_norm",
    "effective_rank",
    "alignment",
    "target_alignment",
    "choose_method",
    "KernelOperator",
    "FactoredKernel",
    "DenseOperator",
    "CallableOperator",
    "as_operator",
    "ConvergenceWarning",
    "top_eigenvalues",
    "spectral_density",
    "entropy_effective_rank",
]
