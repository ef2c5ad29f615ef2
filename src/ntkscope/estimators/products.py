"""Chunked products and per-probe Gram rows shared by the estimators."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..core.executor import map_probes
from ..core.probes import Probe, ProbeStream
from ..operators.base import KernelOperator


def chunk_of(ops: Sequence[KernelOperator], chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return min(op.chunk_size for op in ops)


def gram_rows(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-column Gram: ``(c, k, k)`` from k blocks of shape ``(n, c)``, in float64."""
    X = torch.stack([v.to(torch.float64) for v in vectors])  # (k, n, c)
    return torch.einsum("anc,bnc->cab", X, X).cpu()


def colnorm2(X: torch.Tensor) -> torch.Tensor:
    return X.square().sum(0)


def diag_prod(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``diag(Aᵀ B)`` without forming AᵀB."""
    return (A * B).sum(0)


def gather_columns(matmat: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, chunk: int) -> torch.Tensor:
    """``matmat(X)`` evaluated ``chunk`` columns at a time through the executor."""
    rows = map_probes(X.shape[1], chunk, lambda s, e: matmat(X[:, s:e]).T)
    return rows.T


def require_independent(stream: ProbeStream, what: str) -> None:
    # each leave-one-out estimate needs ω_i independent of the others; orthogonal blocks are not
    if stream.kind is Probe.ORTHOGONAL:
        raise ValueError(f"{what} needs independent probes; orthogonal probes are dependent (use 'sphere' or 'gaussian')")

