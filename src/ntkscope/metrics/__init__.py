"""The public metrics — trace, Frobenius norm, effective rank, alignment — and what builds on
them: automatic method choice, tolerance-driven adaptive runs, structure over named axes,
parameter blocks and the spectrum."""

from .api import Method, alignment, choose_method, effective_rank, frobenius_norm, target_alignment, trace

__all__ = ["Method", "trace", "frobenius_norm", "effective_rank", "alignment", "target_alignment", "choose_method"]
