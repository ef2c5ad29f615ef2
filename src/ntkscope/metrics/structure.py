"""Structure of an NTK over named state axes: partial traces and block statistics, with error bars.

The state of a kernel ``K = J Jᵀ`` is a tensor with named axes (e.g. ``("time", "batch",
"hidden")`` for a recurrent trajectory, see :mod:`ntkscope.models.recurrent`).  Choosing ``keep`` axes
splits the D state entries into G blocks (one per index of the kept axes; the other axes are
traced over), so ``K`` has G × G blocks ``K_gh`` of size R × R (R = D / G).  In the spirit of
neural-tangents' ``diagonal_axes``/``trace_axes``, but estimated without forming K:

* ``trace[g] = tr K_gg`` — e.g. the per-time-step trace curve (``keep="time"``), per-sequence
  traces (``keep="batch"``); ``total_trace = Σ_g tr K_gg = tr K``;
* ``cross_trace[g, h] = tr K_gh = Σ_r K_(g,r),(h,r)`` — neural-tangents' ``trace_axes`` result
  with the kept axes as kernel-pair axes;
* ``frobenius[g, h] = ‖K_gh‖_F²`` (or its diagonal ``‖K_gg‖_F²``); ``Σ_gh ‖K_gh‖_F² = ‖K‖_F²``;
* ``effective_rank[g] = (tr K_gg)² / ‖K_gg‖_F²`` and the whole kernel's ``(tr K)² / ‖K‖_F²``.

Estimators (one set of probes yields every block at once):

* ``method="jvp"`` (probes u ∈ R^P, one forward pass each; b = J u, ``b_g`` its block g):
  ``E‖b_g‖² = tr K_gg`` and ``E b_g·b_h = tr K_gh`` (since ``E b bᵀ = K``); with
  ``C^g_ij = b_{g,i}·b_{g,j} = u_iᵀ G_g u_j`` (``G_g = J_gᵀJ_g``) and independent probes i ≠ j,
  ``E[C^g_ij C^h_ij] = E u_iᵀ G_g u_j u_jᵀ G_h u_i = tr(G_g G_h) = ‖J_g J_hᵀ‖_F² = ‖K_gh‖_F²``:
  a U-statistic over pairs of the per-block Gram matrices (unbiased).
* ``method="vjp"`` (probes z ∈ R^R placed in each block, G × m reverse passes; a_{g,i} = Jᵀ E_g z_i):
  ``E a_{g,i}·a_{h,i} = E z_iᵀ K_gh z_i = tr K_gh`` and, for i ≠ j,
  ``E (a_{g,i}·a_{h,j})² = E (z_iᵀ K_gh z_j)² = ‖K_gh‖_F²``.  Use it where forward mode is
  unavailable, or where R ≪ P (then the block probe space is small and the variance low).
* ``method="exact"``: the dense Jacobian from min(D, P) passes (small problems, tests).

Errors: delete-one jackknife over probes for every entry (:mod:`ntkscope.core.jackknife`; equal
to ``std/√m`` for plain means; for the pair U-statistics and the ratios it accounts for the
shared probes).  Ratios are biased
at small m (O(1/m)); ``bias_corrected`` holds the jackknife correction.

References: Hutchinson (1989); Hazelden, arXiv 2511.10796 (one-sided estimators); Novak et al.,
"Fast finite width neural tangent kernel", ICML 2022 (``trace_axes``/``diagonal_axes``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import estimators as est
from ..core import jackknife as jk
from ..core.estimate import Estimate
from ..core.probes import Probe, ProbeStream, Stream, parse_probe, resolve_seed
from ..estimators import exact as ex
from ..operators.base import FactoredKernel
from .block_estimate import BlockEstimate, RunCost, block_estimate, total_estimate
from .state_axes import from_blocks, keep_index, resolve_axes, to_blocks

__all__ = ["MAX_PAIR_BLOCKS", "Structure", "structure", "block_traces", "block_frobenius", "block_effective_rank"]

#: Largest number of blocks for which the G × G pair statistics are formed.
MAX_PAIR_BLOCKS = 256


@dataclass
class Structure:
    """Everything :func:`structure` computes from one probe set."""

    keep: tuple[str, ...]
    grid: tuple[int, ...]
    trace: BlockEstimate
    frobenius: BlockEstimate  # ‖K_gh‖_F² over pairs, or ‖K_gg‖_F² (pairs=False)
    effective_rank: BlockEstimate
    cross_trace: BlockEstimate | None
    total_trace: Estimate
    total_frobenius_sq: Estimate
    total_effective_rank: Estimate
    info: dict[str, Any] = field(default_factory=dict)


# -- the estimators --------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Full values and leave-one-out values (``None``: exact) of the block statistics over the state."""

    tr: torch.Tensor  # (G,)
    tr_loo: torch.Tensor | None  # (m, G)
    fro: torch.Tensor  # (G, G) or (G,)
    fro_loo: torch.Tensor | None
    fro_total: torch.Tensor  # ()
    fro_total_loo: torch.Tensor | None  # (m,)
    cross: torch.Tensor | None  # (G, G)
    cross_loo: torch.Tensor | None


def _jvp_stats(B: torch.Tensor, pairs: bool, cross: bool) -> _Stats:
    """Statistics from JVP samples ``B`` of shape ``(m, G, R)`` (b_i = J u_i, blocked)."""
    m, G, _ = B.shape
    Bd = B.to(torch.float64)
    S = Bd.square().sum(-1)  # (m, G): ‖b_{g,i}‖²
    tr_full, tr_loo = jk.mean_loo(S)
    # per-block Gram matrices C^g_ij = b_{g,i}·b_{g,j}, diagonal removed (pairs i ≠ j only)
    C = torch.bmm(Bd.transpose(0, 1), Bd.transpose(0, 1).transpose(1, 2))  # (G, m, m)
    C.diagonal(dim1=1, dim2=2).zero_()
    if pairs:
        # r[k, g, h] = Σ_j C^g_kj C^h_kj (symmetric in the probe pair, so rowsum = colsum)
        r = torch.einsum("gkj,hkj->kgh", C, C)
        fro, fro_loo = jk.pair_mean_loo_from_sums(r, r)
        ftot_rows = r.sum((1, 2))
    else:
        r = C.square().sum(2).T  # (m, G)
        fro, fro_loo = jk.pair_mean_loo_from_sums(r, r)
        Ctot = C.sum(0)
        ftot_rows = Ctot.square().sum(1)
    fro_total, fro_total_loo = jk.pair_mean_loo_from_sums(ftot_rows, ftot_rows)
    cr = cr_loo = None
    if cross:
        P = torch.einsum("kgr,khr->kgh", Bd, Bd)  # (m, G, G): b_{g,k}·b_{h,k}
        cr, cr_loo = jk.mean_loo(P)
    return _Stats(tr_full, tr_loo, fro, fro_loo, fro_total, fro_total_loo, cr, cr_loo)


def _vjp_stats(A: torch.Tensor, pairs: bool, cross: bool) -> _Stats:
    """Statistics from VJP samples ``A`` of shape ``(G, m, P)`` (a_{g,i} = Jᵀ E_g z_i)."""
    G, m, _ = A.shape
    Ad = A.to(torch.float64)
    Nd = torch.empty(m, G, G, dtype=torch.float64)  # a_{g,i}·a_{h,i}
    rowsum = torch.empty(m, G, G, dtype=torch.float64)  # Σ_{j≠k} (a_{g,k}·a_{h,j})²
    colsum = torch.empty(m, G, G, dtype=torch.float64)  # Σ_{i≠k} (a_{g,i}·a_{h,k})²
    eye = torch.eye(m, dtype=torch.bool)
    for g in range(G):  # one block row at a time: O(G m²) memory, not O(G² m²)
        Ng = torch.einsum("ip,hjp->ihj", Ad[g], Ad).cpu()  # (m, G, m): a_{g,i}·a_{h,j}
        Nd[:, g, :] = torch.diagonal(Ng, dim1=0, dim2=2).T
        Qg = Ng.square().masked_fill(eye[:, None, :], 0.0)  # drop i = j: not an independent pair
        rowsum[:, g, :] = Qg.sum(2)
        colsum[:, g, :] = Qg.sum(0).T
    S = torch.diagonal(Nd, dim1=1, dim2=2)  # (m, G): ‖a_{g,i}‖²
    tr_full, tr_loo = jk.mean_loo(S)
    fro, fro_loo = jk.pair_mean_loo_from_sums(rowsum, colsum)
    fro_total, fro_total_loo = jk.pair_mean_loo_from_sums(rowsum.sum((1, 2)), colsum.sum((1, 2)))
    if not pairs:
        fro = torch.diagonal(fro)
        fro_loo = torch.diagonal(fro_loo, dim1=1, dim2=2)
    cr = cr_loo = None
    if cross:
        cr, cr_loo = jk.mean_loo(Nd)
    return _Stats(tr_full, tr_loo, fro, fro_loo, fro_total, fro_total_loo, cr, cr_loo)


def _exact_stats(J: torch.Tensor, shape: tuple[int, ...], keep_idx: list[int], pairs: bool, cross: bool) -> _Stats:
    """Exact block statistics from the dense Jacobian ``J`` (D × P)."""
    Jb = to_blocks(J.T.to(torch.float64), shape, keep_idx).permute(1, 2, 0)  # (G, R, P)
    G, R, P = Jb.shape
    tr = Jb.square().sum((1, 2))
    if R <= P:  # blocks of K directly
        Kb = torch.einsum("grp,hsp->ghrs", Jb, Jb)
        fro_pairs = Kb.square().sum((2, 3))
    else:  # via the P × P Grams: ‖K_gh‖² = tr(G_g G_h)
        Gg = torch.einsum("grp,grq->gpq", Jb, Jb)
        fro_pairs = torch.einsum("gpq,hpq->gh", Gg, Gg)
    fro = fro_pairs if pairs else torch.diagonal(fro_pairs)
    cr = torch.einsum("grp,hrp->gh", Jb, Jb) if cross else None
    return _Stats(tr, None, fro, None, fro_pairs.sum(), None, cr, None)


def _vjp_samples(
    K: FactoredKernel, kind: Probe, seed: int, m: int, shape: tuple[int, ...], keep_idx: list[int], chunk_size: int | None
) -> torch.Tensor:
    """``(G, m, P)`` VJP samples ``a_{g,i} = Jᵀ E_g z_i``: G × m reverse passes."""
    G = math.prod(shape[i] for i in keep_idx)
    R = K.dim // G
    # the same z_i ∈ R^R placed in every block (so that cross traces match positions)
    z = ProbeStream(R, kind, seed, Stream.MAIN, K.dtype, K.device).columns(0, m).T  # (m, R)
    outs = []
    for g in range(G):
        W = torch.zeros(m, G, R, dtype=K.dtype, device=K.device)
        W[:, g] = z
        Wf = from_blocks(W, shape, keep_idx).T.contiguous()  # (D, m)
        outs.append(est.onesided(K, "vjp", lambda s, e: Wf[:, s:e], m, keep=True, chunk_size=chunk_size))
    return torch.stack(outs)


def _sample(
    K: FactoredKernel,
    method: str,
    kind: Probe,
    seed: int,
    m: int,
    shape: tuple[int, ...],
    keep_idx: list[int],
    pairs: bool,
    cross: bool,
    chunk_size: int | None,
) -> _Stats:
    """The block statistics by ``method``: its probe passes, then the estimators above."""
    if method == "jvp":
        stream = ProbeStream(K.num_params, kind, seed, Stream.MAIN, K.dtype, K.device)
        rows = est.onesided(K, "jvp", stream.columns, m, keep=True, chunk_size=chunk_size)  # (m, D)
        return _jvp_stats(to_blocks(rows, shape, keep_idx), pairs, cross)
    if method == "vjp":
        return _vjp_stats(_vjp_samples(K, kind, seed, m, shape, keep_idx, chunk_size), pairs, cross)
    return _exact_stats(ex.jacobian(K), shape, keep_idx, pairs, cross)


def _assemble(
    st: _Stats, cost: RunCost, keep: tuple[str, ...], grid: tuple[int, ...], pairs: bool, info: dict[str, Any]
) -> Structure:
    """The :class:`Structure` of the statistics: blocks, ratios and whole-kernel totals."""
    pair_axes = keep + tuple(a + "'" for a in keep)
    fro_axes, fro_grid = (pair_axes, grid + grid) if pairs else (keep, grid)
    fro_diag = torch.diagonal(st.fro) if pairs else st.fro
    fro_diag_loo = None
    if st.fro_loo is not None:
        fro_diag_loo = torch.diagonal(st.fro_loo, dim1=1, dim2=2) if pairs else st.fro_loo
    reff_loo = st.tr_loo.square() / fro_diag_loo if st.tr_loo is not None and fro_diag_loo is not None else None
    cr = None
    if st.cross is not None:
        cr = block_estimate("cross_trace", st.cross, st.cross_loo, pair_axes, cost, shape=grid + grid)
    keep_info = {"keep": list(keep)}
    tt = st.tr.sum()
    tt_loo = st.tr_loo.sum(1) if st.tr_loo is not None else None
    reff_total_loo = tt_loo**2 / st.fro_total_loo if tt_loo is not None and st.fro_total_loo is not None else None
    return Structure(
        keep=keep,
        grid=grid,
        trace=block_estimate("trace", st.tr, st.tr_loo, keep, cost, shape=grid),
        frobenius=block_estimate("frobenius_sq", st.fro, st.fro_loo, fro_axes, cost, shape=fro_grid),
        effective_rank=block_estimate("effective_rank", st.tr.square() / fro_diag, reff_loo, keep, cost, shape=grid, ratio=True),
        cross_trace=cr,
        total_trace=total_estimate("trace", tt, tt_loo, cost, keep_info),
        total_frobenius_sq=total_estimate("frobenius_norm_sq", st.fro_total, st.fro_total_loo, cost, keep_info),
        total_effective_rank=total_estimate("effective_rank", tt**2 / st.fro_total, reff_total_loo, cost, keep_info, ratio=True),
        info=info,
    )


def _check_arguments(K: FactoredKernel, method: str, num_probes: int) -> None:
    if not isinstance(K, FactoredKernel):
        raise TypeError(f"structure needs a factored kernel (an ntkscope.NTK), got {type(K).__name__}")
    if method not in ("jvp", "vjp", "exact"):
        raise ValueError(f"method must be 'jvp', 'vjp' or 'exact', got {method!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 3:
        raise ValueError(f"num_probes must be an int >= 3 (pairs of probes estimate the norms), got {num_probes!r}")


def structure(
    K: FactoredKernel,
    keep: str | Sequence[str] = "time",
    *,
    method: str = "jvp",
    num_probes: int = 100,
    seed: int | torch.Generator | None = None,
    probes: str | Probe | None = None,
    chunk_size: int | None = None,
    pairs: bool = True,
    cross: bool = True,
    axes: Sequence[str] | None = None,
    shape: Sequence[int] | None = None,
) -> Structure:
    """Block traces, block Frobenius norms and effective ranks of K over the ``keep`` axes.

    Args:
        K: a factored kernel (an :class:`~ntkscope.NTK`, a :class:`~ntkscope.models.recurrent.RecurrentNTK`
            or ``NTK.from_jacobian``) whose state axes are named (``K.axes``) or given by
            ``axes=``/``shape=``.
        keep: the axes that index the blocks (the rest are traced over); e.g. ``"time"``,
            ``("batch",)``, ``("batch", "time")``.
        method: ``"jvp"`` (one forward pass per probe, every block from the same passes),
            ``"vjp"`` (one reverse pass per probe per block) or ``"exact"``.
        num_probes: probes m (per block for ``"vjp"``); the U-statistics need m ≥ 3.
        seed: probe seed, as for :func:`ntkscope.trace`.
        probes: probe distribution, as for :func:`ntkscope.trace` (default: Rademacher).
        chunk_size: probes per vectorised batch, as for :func:`ntkscope.trace`.
        pairs: also estimate the off-diagonal block norms ``‖K_gh‖_F²`` (a G × G grid; needs
            G ≤ :data:`MAX_PAIR_BLOCKS`); else only ``‖K_gg‖_F²``.
        cross: also estimate the block cross traces ``tr K_gh`` (G × G).

    Returns:
        A :class:`Structure`; every entry carries a jackknife standard error and the pass counts.

    Cost: ``num_probes`` JVPs for ``"jvp"`` (every block from the same passes),
    ``G·num_probes`` VJPs for ``"vjp"`` (probes placed in each of the G blocks), ``min(D, P)``
    passes for ``"exact"``.  Block traces are unbiased means; block norms unbiased
    U-statistics; ratios biased ``O(1/m)`` (see the module docstring for the estimators).
    """
    t0 = time.perf_counter()
    _check_arguments(K, method, num_probes)
    names, shp = resolve_axes(K, axes, shape)
    kidx = keep_index(names, keep)
    keep_names = tuple(names[i] for i in kidx)
    grid = tuple(shp[i] for i in kidx)
    G = math.prod(grid)
    if (pairs or cross) and G > MAX_PAIR_BLOCKS:
        raise ValueError(
            f"{G} blocks: the pair statistics would be a {G}×{G} grid (limit {MAX_PAIR_BLOCKS}); "
            "pass pairs=False, cross=False, or keep fewer axes"
        )
    kind = parse_probe(probes) if probes is not None else Probe.RADEMACHER
    if kind is Probe.ORTHOGONAL and method != "exact":
        raise ValueError("block norms need independent probes; orthogonal probes are dependent")
    base = resolve_seed(seed)
    before = K.counts()
    st = _sample(K, method, kind, base, num_probes, shp, kidx, pairs, cross, chunk_size)
    after = K.counts()
    m = 0 if method == "exact" else num_probes
    cost = RunCost(method, m, after[0] - before[0], after[1] - before[1], time.perf_counter() - t0)
    info = {"probes": kind.value, "blocks": G, "block_size": K.dim // G, "axes": list(names)}
    return _assemble(st, cost, keep_names, grid, pairs, info)


def block_traces(K: FactoredKernel, keep: str | Sequence[str] = "time", **kw: Any) -> BlockEstimate:
    """``tr K_gg`` for every block over the ``keep`` axes (e.g. the per-time-step trace curve).

    With ``cross=True`` returns the G × G cross traces ``tr K_gh`` instead.  Keywords as for
    :func:`structure`.
    """
    want_cross = bool(kw.pop("cross", False))
    s = structure(K, keep, pairs=False, cross=want_cross, **kw)
    if want_cross:
        assert s.cross_trace is not None
        return s.cross_trace
    return s.trace


def block_frobenius(K: FactoredKernel, keep: str | Sequence[str] = "time", *, pairs: bool = True, **kw: Any) -> BlockEstimate:
    """``‖K_gh‖_F²`` over pairs of blocks (``pairs=True``) or ``‖K_gg‖_F²``.  See :func:`structure`."""
    return structure(K, keep, pairs=pairs, cross=False, **kw).frobenius


def block_effective_rank(K: FactoredKernel, keep: str | Sequence[str] = "time", **kw: Any) -> BlockEstimate:
    """Per-block effective rank ``(tr K_gg)² / ‖K_gg‖_F²``.  See :func:`structure`."""
    return structure(K, keep, pairs=False, cross=False, **kw).effective_rank
