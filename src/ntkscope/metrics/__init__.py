"""The public metrics — trace, Frobenius norm, effective rank, alignment — and what builds on
them: automatic method choice, tolerance-driven adaptive runs, structure over named axes,
parameter blocks and the spectrum.

The five metrics share one signature; :mod:`ntkscope.metrics.quantities` explains its
arguments once, among them the one meaning of ``num_probes`` (probe vectors of the method;
under ``method="auto"``, a budget of that many one-sided probes, i.e. AD passes per kernel).

Front ends import from this package, never from its modules: the names below are its surface.
"""

from .adaptive import ConvergenceWarning
from .auto import choose_method
from .blocks import ParameterBlocks, parameter_blocks
from .methods import DEFAULT_PROBES, EXACT_MAX_ENTRIES, Method, parse_method
from .quantities import alignment, as_targets, effective_rank, frobenius_norm, target_alignment, trace
from .spectrum import Eigen, SpectralDensity, entropy_effective_rank, spectral_density, top_eigenvalues
from .structure import BlockEstimate, Structure, block_effective_rank, block_frobenius, block_traces, structure

__all__ = [
    "Method",
    "parse_method",
    "DEFAULT_PROBES",
    "EXACT_MAX_ENTRIES",
    "as_targets",
    "trace",
    "frobenius_norm",
    "effective_rank",
    "alignment",
    "target_alignment",
    "choose_method",
    "ConvergenceWarning",
    "ParameterBlocks",
    "parameter_blocks",
    "top_eigenvalues",
    "spectral_density",
    "entropy_effective_rank",
    "structure",
    "block_traces",
    "block_frobenius",
    "block_effective_rank",
    "Structure",
    "BlockEstimate",
    "Eigen",
    "SpectralDensity",
]
