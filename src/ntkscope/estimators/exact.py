"""Exact reference: materialise J and K in chunks of basis vectors (small problems only).

The cheapest exact path uses the smaller side: ``min(D, P)`` one-sided passes give J (VJPs of
the D state basis vectors when D ≤ P, JVPs of the P parameter basis vectors otherwise).  The
trace needs no storage at all: ``tr K = ‖J‖_F²`` summed chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..core.executor import map_probes
from ..operators.base import FactoredKernel, KernelOperator

_T = TypeVar("_T")

__all__ = ["jacobian", "kernel", "gram_kernel", "smaller_kernel", "exact_trace", "exact_frobenius_sq", "exact_inner", "exact_quadratic"]


def _basis(n: int, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Columns ``start..stop`` of the n × n identity."""
    E = torch.zeros(n, stop - start, dtype=dtype, device=device)
    E[torch.arange(start, stop, device=device), torch.arange(stop - start, device=device)] = 1
    return E


def _basis_chunks(n: int, chunk: int, dtype: torch.dtype, device: torch.device):  # type: ignore[no-untyped-def]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield start, stop, _basis(n, start, stop, dtype, device)


def _basis_rows(
    op: FactoredKernel, side: str, fn: Callable[[torch.Tensor], torch.Tensor], apply: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """``fn(apply(E))`` over the basis of one side (``apply`` = VJP over R^D or JVP over R^P), as
    probe blocks: under probe-parallel execution the ranks split the basis, so an exact value
    costs ``min(D, P)`` passes in all, not on every rank."""
    n = op.dim if side == "vjp" else op.num_params
    apply = apply or (op.vjp if side == "vjp" else op.jvp)
    return map_probes(n, _chunk(op), lambda s, e: fn(apply(_basis(n, s, e, op.dtype, op.device))))


def gram_kernel(op: FactoredKernel) -> torch.Tensor:
    """The dense ``D × D`` kernel (float64) from the Gram rows of the D state basis vectors
    (:meth:`FactoredKernel.gram_rows`): ``K = E Eᵀ``, with the ghosted layers' rows ``A^½Δ``
    shorter than their gradients (:mod:`ntkscope.operators.ghost`).  D VJPs."""
    E = _basis_rows(op, "vjp", lambda rows: rows, apply=lambda X: op.gram_rows("vjp", X)).double()
    return E @ E.T


def basis_chunks(op: KernelOperator, chunk: int):  # type: ignore[no-untyped-def]
    """``(start, stop, E)`` over the identity's columns of ``op``'s dimension, ``chunk`` at a time."""
    return _basis_chunks(op.dim, chunk, op.dtype, op.device)


def _chunk(op: KernelOperator) -> int:
    return op.chunk_size


def _sides(op: FactoredKernel, side: str | None) -> list[str]:
    """Sides to try, best first: the one whose basis is smaller (``min(D, P)`` passes).

    No pilot passes: a side whose AD mode turns out unavailable raises ``RuntimeError`` and the
    other side is tried (:meth:`NTK.modes` would spend a check pass per mode to find out).
    """
    if side is not None:
        if side not in ("vjp", "jvp"):
            raise ValueError(f"side must be 'vjp' or 'jvp', got {side!r}")
        return [side]
    return ["vjp", "jvp"] if op.dim <= op.num_params else ["jvp", "vjp"]


def _try_sides(op: FactoredKernel, side: str | None, fn: Callable[[str], _T]) -> _T:
    sides = _sides(op, side)
    for i, s in enumerate(sides):
        try:
            return fn(s)
        except RuntimeError:  # this AD mode is unavailable for the model: use the other side
            if i == len(sides) - 1:
                raise
    raise AssertionError("unreachable")


def _jacobian_side(op: FactoredKernel, side: str) -> torch.Tensor:
    rows = _basis_rows(op, side, lambda X: X.T)  # VJP: rows of J; JVP: rows of Jᵀ
    return rows if side == "vjp" else rows.T


def jacobian(op: FactoredKernel, side: str | None = None) -> torch.Tensor:
    """The dense ``D × P`` Jacobian, from ``min(D, P)`` passes of the smaller side."""
    return _try_sides(op, side, lambda s: _jacobian_side(op, s))


def kernel(op: KernelOperator) -> torch.Tensor:
    """The dense ``D × D`` kernel (``J Jᵀ`` for factored kernels, ``K I`` otherwise)."""
    if isinstance(op, FactoredKernel):
        J = jacobian(op)
        return J @ J.T
    return torch.cat([op.matmat(E) for _, _, E in _basis_chunks(op.dim, _chunk(op), op.dtype, op.device)], 1)


def exact_trace(op: KernelOperator, side: str | None = None) -> float:
    """``tr K`` without storing J or K (for an NTK from the basis of ``side``, default the smaller)."""
    if isinstance(op, FactoredKernel):

        if side in (None, "vjp") and (blocks := _block_trace(op)) is not None:
            return blocks

        def side_trace(side: str) -> float:  # squared norms only: a fast path need not write the block
            norms = _basis_rows(op, side, lambda sq: sq.cpu()[:, None], apply=lambda X: op.sqnorms(side, X))
            return float(norms.sum())

        return _try_sides(op, side, side_trace)
    total = torch.zeros((), dtype=torch.float64)
    for start, stop, E in _basis_chunks(op.dim, _chunk(op), op.dtype, op.device):
        total += op.matmat(E)[start:stop].double().diagonal().sum().cpu()
    return float(total)


def block_trace(op: FactoredKernel) -> float:
    """``tr K = Σ_b tr K_bb`` in ``R`` VJP passes over a kernel's per-example blocks
    (:meth:`FactoredKernel.trace_blocks` must be ``R``): the ``r``-th probe holds a 1 at
    position ``r`` of every block, and its :meth:`~FactoredKernel.block_sqnorms` sums
    ``K_bb[r, r]`` over the blocks.  Under probe parallelism the ranks split the R passes."""
    R = op.trace_blocks()
    if R is None:
        raise RuntimeError("the kernel's trace does not separate over per-example blocks")
    # probe blocks, as every exact value: probe-parallel ranks split the R passes
    return float(map_probes(R, _chunk(op), lambda s, e: op.block_sqnorms(op.block_basis(s, e)).cpu()).sum())


def block_trace_passes(op: FactoredKernel) -> int | None:
    """``R`` where the exact trace over per-example blocks costs fewer passes than the plain
    basis's ``min(D, P)``, else None (without looking for blocks where no block basis could)."""
    axis_sizes = getattr(op, "state_shape", ()) or (op.dim,)
    if op.dim // max(axis_sizes) >= min(op.dim, op.num_params):
        return None
    R = op.trace_blocks()
    return R if R is not None and R < min(op.dim, op.num_params) else None


def _block_trace(op: FactoredKernel) -> float | None:
    """:func:`block_trace` where it is the cheaper exact trace (:func:`block_trace_passes`), else None."""
    if block_trace_passes(op) is None:
        return None
    try:
        return block_trace(op)
    except RuntimeError:  # the blocks failed on the way: the plain basis
        return None


def smaller_kernel(J: torch.Tensor) -> torch.Tensor:
    """The smaller kernel of a dense Jacobian: ``K = J Jᵀ`` (D ≤ P) or ``G = JᵀJ`` (P < D), the
    same nonzero spectrum as K (the dense twin of :func:`ntkscope.operators.base.smaller_kernel`)."""
    return J @ J.T if J.shape[0] <= J.shape[1] else J.T @ J


def frobenius_sq_of(J: torch.Tensor) -> float:
    """``‖J Jᵀ‖_F²`` of a dense Jacobian, through the smaller of ``J Jᵀ`` and ``JᵀJ``."""
    return float(smaller_kernel(J.double()).square().sum())


def inner_of(J1: torch.Tensor, J2: torch.Tensor) -> float:
    """``⟨J1 J1ᵀ, J2 J2ᵀ⟩_F`` of dense Jacobians, via ``‖J1ᵀ J2‖_F²`` when that is smaller."""
    J1, J2 = J1.double(), J2.double()
    if J1.shape[1] * J2.shape[1] < J1.shape[0] ** 2:
        return float((J1.T @ J2).square().sum())
    return float(((J1 @ J1.T) * (J2 @ J2.T)).sum())


def exact_frobenius_sq(op: KernelOperator, side: str | None = None) -> float:
    """``‖K‖_F² = tr K²`` (for an NTK from the Jacobian by ``side``, default the smaller)."""
    if isinstance(op, FactoredKernel):
        return frobenius_sq_of(jacobian(op, side))
    return float(kernel(op).double().square().sum())


def exact_inner(op1: KernelOperator, op2: KernelOperator, side: str | None = None) -> float:
    """``⟨K1, K2⟩_F = tr(K1 K2)``, via ``‖J1ᵀ J2‖_F²`` when that is smaller."""
    if isinstance(op1, FactoredKernel) and isinstance(op2, FactoredKernel):
        return inner_of(jacobian(op1, side), jacobian(op2, side))
    return float((kernel(op1).double() * kernel(op2).double()).sum())


def exact_quadratic(op: KernelOperator, y: torch.Tensor) -> float:
    """``yᵀ K y``: one VJP for a factored kernel (``‖Jᵀy‖²``), one matvec otherwise.

    It runs as a one-row probe block, so when probes are split over processes one rank spends
    the pass and the others receive the value (the pass is counted once in the totals)."""
    y = y.to(device=op.device, dtype=op.dtype).reshape(-1)

    def row(start: int, stop: int) -> torch.Tensor:
        if isinstance(op, FactoredKernel):
            try:
                value = op.vjp(y).double().square().sum()
            except RuntimeError:  # reverse mode unavailable: yᵀJ from the Jacobian by JVPs
                value = (y.double() @ jacobian(op, "jvp").double()).square().sum()
        else:
            value = (y.double() * op.matmat(y).double()).sum()
        return value.reshape(1, 1)

    return float(map_probes(1, 1, row)[0, 0])


def eigenvalues(op: KernelOperator) -> torch.Tensor:
    """All nonzero-spectrum eigenvalues of K, descending (from the smaller of K and G)."""
    dense = smaller_kernel(jacobian(op).double()) if isinstance(op, FactoredKernel) else kernel(op).double()
    return torch.linalg.eigvalsh(dense).flip(0)
