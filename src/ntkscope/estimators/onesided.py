"""One-sided estimators: one AD mode per probe (VJP-only in R^D or JVP-only in R^P).

``‖Jᵀw‖²`` and ``‖Ju‖²`` are unbiased samples of ``tr K``; the probe Gram of the kept vectors
gives ``‖K‖_F²`` and alignment numerators as U-statistics (:mod:`ntkscope.core.jackknife`).
Reference: Hazelden, "Fast NTK alignment, norm and effective rank via trace estimation",
arXiv 2511.10796.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.executor import map_probes
from ..core.probes import Probe, ProbeStream, Stream
from ..operators.base import FactoredKernel
from .products import chunk_of


def onesided(
    op: FactoredKernel,
    side: str,
    columns: Callable[[int, int], torch.Tensor],
    m: int,
    *,
    keep: bool,
    chunk_size: int | None = None,
    project: torch.Tensor | None = None,
    gram_only: bool = False,
    per_block: bool = False,
) -> torch.Tensor:
    """One-sided passes: rows ``Jᵀw`` (side "vjp", probes in R^D) or ``Ju`` (side "jvp", R^P).

    ``columns(start, stop)`` gives the probes (a :meth:`ProbeStream.columns`).  Returns
    ``(m, out_dim)`` vectors when ``keep`` (for Gram-based statistics), else the squared norms
    ``(m,)`` — unbiased samples of ``tr K`` (``E‖Jᵀw‖² = E‖Ju‖² = tr K``).  ``project``
    (orthonormal columns in probe space) deflates each probe first: ``(I − QQᵀ)w``.
    ``gram_only``: the kept rows serve only inner products among themselves, so an operator may
    return a shorter isometric image of them (:meth:`FactoredKernel.gram_rows`).
    ``per_block`` (side "vjp", squared norms, isotropic probes ``E wwᵀ = I`` only): the samples
    ``Σ_b ‖J_bᵀw_b‖²`` over the kernel's per-example blocks (:meth:`FactoredKernel.trace_blocks`),
    of the same mean ``Σ_b tr K_bb = tr K`` without the cross-example terms: Rademacher variance
    ``2 Σ_b (‖K_bb‖_F² − Σ_{i∈b} Kᵢᵢ²)``, ``≤`` the plain one's.  Where they fail on a chunk, the
    plain ``‖Jᵀw‖²``, samples of the same mean, stand in.

    Cost: one AD pass of a single mode per probe (Hazelden 2025).  Variance of one sample
    ``‖Jᵀw‖² = wᵀKw``: ``2(‖K‖_F² − Σᵢ Kᵢᵢ²)`` (Rademacher) or ``2‖K‖_F²`` (Gaussian); of
    ``‖Ju‖² = uᵀGu`` with ``G = JᵀJ``: ``2(‖G‖_F² − Σⱼ Gⱼⱼ²)`` (Rademacher) or ``2‖K‖_F²``
    (Gaussian, as ``‖G‖_F = ‖K‖_F``).  With Rademacher probes the better side is the one whose
    trace mass sits on fewer diagonal entries — usually the smaller of D and P.
    """
    apply = op.vjp if side == "vjp" else op.jvp
    Qd = project.to(torch.float64) if project is not None else None

    def fn(s: int, e: int) -> torch.Tensor:
        X = columns(s, e)
        if Qd is not None:
            Xd = X.to(torch.float64)
            X = (Xd - Qd @ (Qd.T @ Xd)).to(X.dtype)
        if not keep:  # only the squared norms: a fast path need not write the block (op.sqnorms)
            if per_block:
                try:
                    return op.block_sqnorms(X).cpu()
                except RuntimeError:
                    pass
            return op.sqnorms(side, X).cpu()
        if gram_only:
            return op.gram_rows(side, X).contiguous()
        return apply(X).T.contiguous()

    return map_probes(m, chunk_of([op], chunk_size), fn)


def probe_dim(op: FactoredKernel, side: str) -> int:
    return op.dim if side == "vjp" else op.num_params


def onesided_projected_trace(
    op: FactoredKernel, side: str, stream: ProbeStream, m: int, chunk_size: int | None = None
) -> tuple[float, torch.Tensor, int]:
    """The paper's one-sided variant with a projected low-rank part.

    A *random* orthonormal block Q of ``q = m // 6`` columns in probe space is handled exactly
    (``Σ‖JᵀQ‖²``), the rest by one-sided Hutchinson on deflated probes ``(I − QQᵀ)w``:
    ``tr K = tr(QᵀKQ) + tr(P⊥KP⊥)``.  Returns (exact part, residual samples, q).

    Cost: m passes of one mode (q for the block, m − q for the residual) plus ``O(d·q²)``
    probe-space algebra.  Unbiased; because Q is random rather than range-finding, it removes
    only a fraction of order q/d of the variance (the reference code's variant, kept for
    comparison; :func:`hutchpp_grams` is the range-finding version).
    """
    d = probe_dim(op, side)
    q = min(m // 6, d)
    Q = None
    exact = 0.0
    if q > 0:
        gauss = ProbeStream(d, Probe.GAUSSIAN, stream.seed, Stream.SKETCH, torch.float64, stream.device)
        Q, _ = torch.linalg.qr(gauss.columns(0, q))
        Qt = Q.to(op.dtype)
        exact = float(onesided(op, side, lambda s, e: Qt[:, s:e], q, keep=False, chunk_size=chunk_size).sum())
    resid = onesided(op, side, stream.child(Stream.RESIDUAL).columns, m - q, keep=False, chunk_size=chunk_size, project=Q)
    return exact, resid, q


# -- U-statistics over one-sided Gram matrices ------------------------------------------------
