"""ntkscope: the empirical Neural Tangent Kernel of PyTorch models, measured without forming it.

Public API (the contract other tools build on):

* :class:`NTK` — the matrix-free kernel ``K = J Jᵀ`` of a model (``NTK.from_function``,
  ``NTK.from_jacobian``), with ``jvp``, ``vjp`` and ``matmat``.
* :func:`trace`, :func:`frobenius_norm`, :func:`effective_rank`, :func:`alignment`,
  :func:`target_alignment` — each returns an :class:`Estimate` (value, stderr, passes, ...).
* :class:`Method` and :class:`Probe` — the documented choices.
* Recurrent nets: :func:`hidden_ntk`, :func:`step_ntk` (the NTK over the hidden trajectory) and
  :func:`structure` / :func:`block_traces` (partial traces and blocks over named axes).
* Parameter blocks: :func:`parameter_blocks` (per-block traces, Frobenius products, effective
  ranks and alignments: where the kernel lives and which block moved it), :class:`ParameterBlocks`.
* Transformers: :func:`transformer_ntk`.  Spectrum: :func:`top_eigenvalues`,
  :func:`spectral_density`, :func:`entropy_effective_rank`.
* :class:`Monitor` — NTK metrics inside your own training loop, to CSV, TensorBoard, W&B or a
  callable; Lightning and Hugging Face callbacks in ``ntkscope.integrations``.
* Submodules: ``ntkscope.differentiable`` (statistics as training losses),
  ``ntkscope.distributed`` (torch.distributed probe- and data-parallel), ``ntkscope.cli.plot``,
  ``ntkscope.tasks`` (built-in data and models), ``ntkscope.estimators.exact`` (dense reference),
  ``ntkscope.models.lazy`` (the α-scaled model of lazy/rich training).
"""

from . import distributed as distributed  # registers the probe-parallel default executor
from .core.estimate import Estimate
from .core.probes import Probe
from .metrics import (
    BlockEstimate,
    ConvergenceWarning,
    Eigen,
    Method,
    ParameterBlocks,
    SpectralDensity,
    Structure,
    alignment,
    block_effective_rank,
    block_frobenius,
    block_traces,
    choose_method,
    effective_rank,
    entropy_effective_rank,
    frobenius_norm,
    parameter_blocks,
    spectral_density,
    structure,
    target_alignment,
    top_eigenvalues,
    trace,
)
from .models.recurrent import RecurrentNTK, hidden_ntk, step_ntk
from .models.transformer import TransformerNTK, transformer_ntk
from .monitor import Monitor
from .operators.base import CallableOperator, DenseOperator, FactoredKernel, KernelOperator, as_operator
from .operators.ntk import NTK

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
    "RecurrentNTK",
    "hidden_ntk",
    "step_ntk",
    "structure",
    "block_traces",
    "block_frobenius",
    "block_effective_rank",
    "transformer_ntk",
    "TransformerNTK",
    "Structure",
    "BlockEstimate",
    "Eigen",
    "SpectralDensity",
    "Monitor",
    "parameter_blocks",
    "ParameterBlocks",
]
