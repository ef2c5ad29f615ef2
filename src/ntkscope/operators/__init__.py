"""How to multiply by J, Jᵀ and K = J Jᵀ: the operator base classes, the NTK of a PyTorch model,
the evaluators that push blocks of probes through it, and the per-module batched-probe rules."""

from .base import CallableOperator, DenseOperator, FactoredKernel, KernelOperator, ParameterKernel, as_operator, smaller_kernel
from .ntk import NTK

__all__ = [
    "KernelOperator",
    "FactoredKernel",
    "NTK",
    "DenseOperator",
    "CallableOperator",
    "as_operator",
    "ParameterKernel",
    "smaller_kernel",
]
