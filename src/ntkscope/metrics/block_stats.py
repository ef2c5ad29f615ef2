"""Statistics of the parameter blocks ``K_g = J_g J_gᵀ`` from probe samples, with leave-one-probe-out values.

Used by :func:`~ntkscope.metrics.blocks.parameter_blocks` (whose docstring gives the
estimators): from VJP samples through the per-block probe Grams ``Γ^g_ij = w_iᵀ K_g w_j``
(:func:`vjp_stats`), from per-block JVP samples (:func:`jvp_stats`), or exactly from the dense
Jacobian (:func:`exact_stats`).  Means and U-statistics with their jackknife values come from
:mod:`ntkscope.core.jackknife`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core import jackknife as jk

__all__ = ["BlockStats", "gram_pairs", "vjp_stats", "pair_matrix", "jvp_stats", "exact_stats", "max_rel_error"]


@dataclass
class BlockStats:
    """Full and leave-one-out values (loo None: exact) of the block statistics."""

    tr: torch.Tensor  # (G,)
    tr_loo: torch.Tensor | None  # (m, G)
    fro: torch.Tensor  # (G, G)
    fro_loo: torch.Tensor | None  # (m, G, G)
    tr0: torch.Tensor | None = None
    tr0_loo: torch.Tensor | None = None
    fro0: torch.Tensor | None = None
    fro0_loo: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # (G, G): ⟨K_g, K0_h⟩_F
    cross_loo: torch.Tensor | None = None


def gram_pairs(Ga: torch.Tensor, Gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_{i≠j} Γa^g_ij Γb^h_ij`` for all (g, h) with leave-one-out values.

    ``Ga``, ``Gb``: ``(G, m, m)`` symmetric per-block probe Grams.  The same U-statistic as
    :func:`ntkscope.core.jackknife.pair_mean_loo` on ``Γa^g ⊙ Γb^h``, for every pair at once.
    """
    m = Ga.shape[1]
    if m < 2:
        raise ValueError(f"block Frobenius products need num_probes >= 2, got {m}")
    rows = torch.einsum("gij,hij->igh", Ga, Gb) - torch.einsum("gii,hii->igh", Ga, Gb)  # Σ_{j≠i}
    return jk.pair_mean_loo_from_sums(rows, rows)


def vjp_stats(grams: torch.Tensor, grams0: torch.Tensor | None) -> BlockStats:
    """From the ``(G, m, m)`` per-block probe Grams ``Γ^g`` of K (and of other, ``grams0``):
    ``tr K_g = E Γ^g_ii`` and ``⟨K_g, K_h⟩_F = E_{i≠j} Γ^g_ij Γ^h_ij``."""
    tr, tr_loo = jk.mean_loo(torch.diagonal(grams, dim1=1, dim2=2).T)
    fro, fro_loo = gram_pairs(grams, grams)
    raw = BlockStats(tr, tr_loo, fro, fro_loo)
    if grams0 is not None:
        raw.tr0, raw.tr0_loo = jk.mean_loo(torch.diagonal(grams0, dim1=1, dim2=2).T)
        raw.fro0, raw.fro0_loo = gram_pairs(grams0, grams0)
        raw.cross, raw.cross_loo = gram_pairs(grams, grams0)
    return raw


def pair_matrix(Ba: list[torch.Tensor], Bb: list[torch.Tensor], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``E (b_{g,i}·b'_{h,j})²`` for all (g, h): pairs i ≠ j within a block, all pairs across."""
    G, m = len(Ba), Ba[0].shape[0]
    full = torch.zeros(G, G, dtype=torch.float64)
    loo = torch.zeros(m, G, G, dtype=torch.float64)
    for g in range(G):
        for h in range(g if symmetric else 0, G):
            C = Ba[g] @ Bb[h].T
            f, lo = jk.pair_mean_loo(C.square().cpu(), independent_diag=g != h)
            full[g, h], loo[:, g, h] = f, lo
            if symmetric:
                full[h, g], loo[:, h, g] = f, lo
    return full, loo


def jvp_stats(B: list[torch.Tensor], B0: list[torch.Tensor] | None) -> BlockStats:
    """From per-block JVP samples ``B[g]`` (``(m, D)``, rows ``b_{g,i} = J_g u_{g,i}``; ``B0`` for
    other): ``tr K_g = E‖b_{g,i}‖²`` and ``⟨K_g, K_h⟩_F = E (b_{g,i}·b_{h,j})²`` (:func:`pair_matrix`)."""
    tr, tr_loo = jk.mean_loo(torch.stack([b.square().sum(1) for b in B], 1).cpu())
    fro, fro_loo = pair_matrix(B, B, True)
    raw = BlockStats(tr, tr_loo, fro, fro_loo)
    if B0 is not None:
        raw.tr0, raw.tr0_loo = jk.mean_loo(torch.stack([b.square().sum(1) for b in B0], 1).cpu())
        raw.fro0, raw.fro0_loo = pair_matrix(B0, B0, True)
        raw.cross, raw.cross_loo = pair_matrix(B, B0, False)
    return raw


def exact_stats(J: torch.Tensor, J0: torch.Tensor | None, slices: list[list[tuple[int, int]]]) -> BlockStats:
    """Exact statistics from the dense Jacobians (``D × P``), split into blocks by the column ranges ``slices``."""
    def blocks(M: torch.Tensor) -> torch.Tensor:
        Ks = []
        for sl in slices:
            Jg = torch.cat([M[:, s:e] for s, e in sl], 1).double()
            Ks.append(Jg @ Jg.T)
        return torch.stack(Ks)

    Ks = blocks(J)
    raw = BlockStats(torch.diagonal(Ks, dim1=1, dim2=2).sum(1), None, torch.einsum("gij,hij->gh", Ks, Ks), None)
    if J0 is not None:
        K0s = blocks(J0)
        raw.tr0 = torch.diagonal(K0s, dim1=1, dim2=2).sum(1)
        raw.fro0 = torch.einsum("gij,hij->gh", K0s, K0s)
        raw.cross = torch.einsum("gij,hij->gh", Ks, K0s)
    return raw


def max_rel_error(r: BlockStats) -> float:
    """Worst relative error: block entries against the totals, and the totals themselves."""
    assert r.tr_loo is not None and r.fro_loo is not None
    tt, tt_loo = r.tr.sum(), r.tr_loo.sum(1)
    ft, ft_loo = r.fro.sum(), r.fro_loo.sum((1, 2))
    se_tr, _ = jk.stderr_and_corrected(r.tr, r.tr_loo)
    se_fr, _ = jk.stderr_and_corrected(r.fro, r.fro_loo)
    se_tt, _ = jk.stderr_and_corrected(tt, tt_loo)
    se_ft, _ = jk.stderr_and_corrected(ft, ft_loo)
    errs = [float(se_tt / tt.abs()), float(se_ft / ft.abs()), float(se_tr.max() / tt.abs()), float(se_fr.max() / ft.abs())]
    return max(e if math.isfinite(e) else math.inf for e in errs)
