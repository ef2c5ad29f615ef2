"""Where the kernel lives: the NTK split over parameter blocks, with error bars.

The NTK is a sum over parameter blocks: with ``J = [J_1, …, J_G]`` split by columns (parameter
groups), ``K = J Jᵀ = Σ_g K_g`` with ``K_g = J_g J_gᵀ``.  :func:`parameter_blocks` estimates, from
**one** set of probes,

* ``trace[g] = tr K_g = ‖J_g‖_F²`` — the block's share of the kernel; ``Σ_g tr K_g = tr K``;
* ``frobenius[g, h] = ⟨K_g, K_h⟩_F = tr(K_g K_h)``; ``Σ_{g,h} ⟨K_g, K_h⟩_F = ‖K‖_F²``;
* ``effective_rank[g] = (tr K_g)² / ‖K_g‖_F²``;
* with ``other=K0`` (e.g. the same model's NTK at initialisation, same inputs and parameter
  names): ``alignment[g] = ⟨K_g, K0_g⟩_F / (‖K_g‖_F ‖K0_g‖_F)`` — which block's kernel moved —
  and the whole kernels' alignment ``total_alignment`` from the same probes.

Estimators (Hazelden 2025's one-sided estimators, block by block):

* ``method="vjp"`` (probes w ∈ R^D, one reverse pass each): the rows ``a_i = Jᵀw_i`` split by
  parameter block for free, ``a_{g,i} = J_gᵀ w_i``.  With the per-block Gram matrices
  ``Γ^g_ij = a_{g,i}·a_{g,j} = w_iᵀ K_g w_j``: ``E Γ^g_ii = tr K_g`` and, for independent probes
  i ≠ j, ``E Γ^g_ij Γ^h_ij = tr(K_g K_h)`` — the U-statistic of the one-sided Frobenius
  estimator of :func:`ntkscope.frobenius_norm` with ``Γ² `` replaced by ``Γ^g ⊙ Γ^h``.  Since
  ``Γ = Σ_g Γ^g``, the block sums equal the whole-kernel estimates of the same probes exactly
  (same seed, same probes as ``trace``/``frobenius_norm`` with ``method="vjp"``).  Cost: m VJPs
  (2m with ``other``), whatever the number of blocks.
* ``method="jvp"`` (probes u_g ∈ R^{P_g}, one forward pass per probe *per block*): the JVP of a
  block alone, ``b_{g,i} = J_g u_{g,i}``, through an NTK restricted to that block's parameters
  (``NTK(model, inputs, params=block)``; for an NTK without a model, the full JVP with the other
  rows of u zero).  ``E‖b_{g,i}‖² = tr K_g``; ``E (b_{g,i}·b_{h,j})² = ‖J_gᵀJ_h‖_F² = tr(K_g K_h)``
  for independent probes — pairs i ≠ j within a block, all pairs across blocks (their probe
  sets are independent).  Cost: G·m JVPs; worth it where forward mode is cheap or reverse mode
  unavailable.  The totals are the sums of the block estimates (unbiased, but not the
  whole-kernel JVP estimator).
* ``method="exact"``: the dense Jacobian (min(D, P) passes), split by columns; small models.
* ``method="auto"``: exact when its ``min(D, P)`` passes fit in ``num_probes``; otherwise the
  side with the lower measured cost per probe (one VJP vs the G block JVPs); ``side`` and
  ``info["reason"]`` say what ran and why.

Errors: the delete-one jackknife over probes (as everywhere in ntkscope: equal to ``std/√m`` for
the traces, consistent for the pair U-statistics and the ratios, whose bias-corrected values are
in ``bias_corrected``).  ``rtol=`` grows the probe set (reusing every product, see
:mod:`ntkscope.metrics.adaptive`) until every block trace and every block inner product is known to
``rtol`` of the corresponding total (``tr K``, ``‖K‖_F²``) and the totals to ``rtol`` relative.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import estimators as est
from ..core import jackknife as jk
from ..core.estimate import Estimate
from ..core.probes import Probe, ProbeStream, Stream, parse_probe, resolve_seed
from ..estimators import exact as ex
from ..operators.base import FactoredKernel
from ..operators.ntk import NTK
from . import adaptive as adapt
from .structure import BlockEstimate, _jack, _mean_loo, _pair_stats

__all__ = ["ParameterBlocks", "parameter_blocks", "resolve_groups"]

DEFAULT_PROBES = 100
#: The exact path stores J (D×P) and G dense D×D block kernels: cap both.
EXACT_MAX_ENTRIES = 2 * 10**8
ROOT = "(root)"
REST = "(rest)"


@dataclass
class ParameterBlocks:
    """Everything :func:`parameter_blocks` estimates from one probe set.

    Attributes:
        names: the G block names (module names, parameter names, or the dict's keys).
        params: block name -> the parameter names in it.
        numels: parameters per block (``P_g``).
        trace: ``tr K_g`` per block (shape ``(G,)``); ``trace.values.sum() == total_trace.value``.
        frobenius: ``⟨K_g, K_h⟩_F`` (shape ``(G, G)``); sums to ``total_frobenius_sq.value``.
        effective_rank: ``(tr K_g)² / ‖K_g‖_F²`` per block (NaN, like the alignment, for a block
            whose kernel is zero — parameters that do not reach the state; listed in
            ``info["zero_blocks"]``).
        total_trace / total_frobenius_sq / total_effective_rank: the whole kernel's, from the
            same probes (sums of the blocks).
        alignment: with ``other``: ``⟨K_g, K0_g⟩_F / (‖K_g‖_F ‖K0_g‖_F)`` per block, else None.
        total_alignment: with ``other``: ``⟨K, K0⟩_F / (‖K‖_F ‖K0‖_F)`` from the same probes.
        other_trace / other_frobenius: with ``other``: ``tr K0_g`` and ``⟨K0_g, K0_h⟩_F``.
        cross: with ``other``: ``⟨K_g, K0_h⟩_F`` (shape ``(G, G)``; its diagonal is the
            alignments' numerator, its sum ``⟨K, K0⟩_F``).
        method: ``"vjp"``, ``"jvp"`` or ``"exact"`` (after ``"auto"`` resolved).
        side: the AD side that ran (``"vjp"`` or ``"jvp"``; for exact, the Jacobian's side).
        num_probes: probes per block (0 for exact).
        jvp_passes / vjp_passes: AD passes spent by the whole call (all kernels, all blocks,
            timing probes of ``auto`` and every adaptive round included).
        seconds: wall time of the call.
        converged: with ``rtol``: whether the tolerance was met (None without one).
        info: probe distribution, why ``auto`` chose, how the JVP blocks were evaluated, ...
    """

    names: list[str]
    params: dict[str, list[str]]
    numels: list[int]
    trace: BlockEstimate
    frobenius: BlockEstimate
    effective_rank: BlockEstimate
    total_trace: Estimate
    total_frobenius_sq: Estimate
    total_effective_rank: Estimate
    alignment: BlockEstimate | None
    total_alignment: Estimate | None
    other_trace: BlockEstimate | None
    other_frobenius: BlockEstimate | None
    cross: BlockEstimate | None
    method: str
    side: str
    num_probes: int
    jvp_passes: int
    vjp_passes: int
    seconds: float
    converged: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passes(self) -> int:
        return self.jvp_passes + self.vjp_passes

    def shares(self) -> torch.Tensor:
        """``tr K_g / tr K`` per block (sums to 1)."""
        return self.trace.values / self.total_trace.value

    def block(self, name: str) -> int:
        """Index of the block called ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no block {name!r}; the blocks are {self.names}") from None

    def table(self) -> str:
        """A plain-text table: one row per block (trace share, effective rank, alignment)."""
        head = f"{'block':<28} {'P_g':>9} {'tr K_g':>22} {'share':>7} {'eff. rank':>18}"
        if self.alignment is not None:
            head += f" {'align. w/ other':>20}"
        rows = [head]

        def pm(b: BlockEstimate, i: int) -> str:
            v = float(b.values[i])
            return f"{v:.4g}" if b.stderr is None else f"{v:.4g} ± {float(b.stderr[i]):.2g}"

        sh = self.shares()
        for i, n in enumerate(self.names):
            row = (
                f"{n[:28]:<28} {self.numels[i]:>9} {pm(self.trace, i):>22} {float(sh[i]):>7.3f} {pm(self.effective_rank, i):>18}"
            )
            if self.alignment is not None:
                row += f" {pm(self.alignment, i):>20}"
            rows.append(row)
        rows.append(
            f"[{self.method}, side {self.side}, {self.num_probes} probes, {self.jvp_passes} JVP + {self.vjp_passes} VJP passes]"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        def bd(b: BlockEstimate | None) -> dict[str, Any] | None:
            if b is None:
                return None
            d = b.to_dict()
            d["bias_corrected"] = None if b.bias_corrected is None else b.bias_corrected.tolist()
            return d

        return {
            "names": list(self.names),
            "params": {k: list(v) for k, v in self.params.items()},
            "numels": list(self.numels),
            "trace": bd(self.trace),
            "frobenius": bd(self.frobenius),
            "effective_rank": bd(self.effective_rank),
            "alignment": bd(self.alignment),
            "other_trace": bd(self.other_trace),
            "other_frobenius": bd(self.other_frobenius),
            "cross": bd(self.cross),
            "total_trace": self.total_trace.to_dict(),
            "total_frobenius_sq": self.total_frobenius_sq.to_dict(),
            "total_effective_rank": self.total_effective_rank.to_dict(),
            "total_alignment": None if self.total_alignment is None else self.total_alignment.to_dict(),
            "method": self.method,
            "side": self.side,
            "num_probes": self.num_probes,
            "jvp_passes": self.jvp_passes,
            "vjp_passes": self.vjp_passes,
            "seconds": self.seconds,
            "converged": self.converged,
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))},
        }


# -- groups ------------------------------------------------------------------------------------


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ROOT


def resolve_groups(
    param_names: Sequence[str], groups: None | str | Mapping[str, str | Sequence[str]] = None
) -> dict[str, list[str]]:
    """Block name -> parameter names, in the kernel's parameter order.

    ``None``: one block per module that owns parameters directly, named by its qualified name
    (``"(root)"`` for the top module's own parameters).  ``"tensor"``: one block per parameter
    tensor.  A dict: block name -> parameter names or glob patterns (``fnmatch``, e.g.
    ``"layers.*.attn.*"``); a pattern that matches nothing, or a parameter claimed by two
    blocks, is an error; parameters no block claims go to a last block ``"(rest)"``.
    """
    names = list(param_names)
    if groups is None:
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(_owner(n), []).append(n)
        return out
    if isinstance(groups, str):
        if groups in ("tensor", "tensors"):
            return {n: [n] for n in names}
        if groups in ("module", "modules"):
            return resolve_groups(names, None)
        raise ValueError(f"groups={groups!r}: use None (one block per module), 'tensor', or a dict name -> patterns")
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be None, 'tensor' or a dict name -> parameter names/patterns, not {type(groups).__name__}")
    if not groups:
        raise ValueError("groups is an empty dict: name at least one block")
    claimed: dict[str, str] = {}
    out = {}
    for gname, pats in groups.items():
        if not isinstance(gname, str):
            raise TypeError(f"block names must be strings, got {gname!r}")
        plist = [pats] if isinstance(pats, str) else list(pats)
        if not plist:
            raise ValueError(f"block {gname!r} lists no parameters")
        members: list[str] = []
        for pat in plist:
            if not isinstance(pat, str):
                raise TypeError(f"block {gname!r}: entries must be parameter names or glob patterns, got {type(pat).__name__}")
            hit = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise ValueError(f"block {gname!r}: {pat!r} matches no parameter of the kernel (it has {names[:6]}...)")
            for n in hit:
                if n in claimed and claimed[n] != gname:
                    raise ValueError(f"parameter {n!r} is in two blocks: {claimed[n]!r} and {gname!r}")
                if n not in members:
                    claimed[n] = gname
                    members.append(n)
        out[gname] = [n for n in names if n in members]
    rest = [n for n in names if n not in claimed]
    if rest:
        if REST in out:
            raise ValueError(f"block name {REST!r} is reserved for the parameters no block claims")
        out[REST] = rest
    return out


def _column_slices(numels: Sequence[int], idx: Sequence[int]) -> list[tuple[int, int]]:
    offs = [0]
    for n in numels:
        offs.append(offs[-1] + n)
    slices: list[tuple[int, int]] = []
    for i in sorted(idx):
        s, e = offs[i], offs[i + 1]
        if slices and slices[-1][1] == s:
            slices[-1] = (slices[-1][0], e)
        else:
            slices.append((s, e))
    return slices


# -- JVP-side block operators -------------------------------------------------------------------


class _RestrictedFactor(FactoredKernel):
    """``J_g`` as the full factor with the other rows of u zero (one full JVP per probe)."""

    base: FactoredKernel

    def __init__(self, base: FactoredKernel, slices: list[tuple[int, int]]) -> None:
        super().__init__(base.dim, base.dtype, base.device)
        self.base = base
        self.slices = slices
        self.num_params = sum(e - s for s, e in slices)
        self.chunk_size = base.chunk_size

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.base.num_params, U.shape[1], dtype=U.dtype, device=U.device)
        at = 0
        for s, e in self.slices:
            full[s:e] = U[at : at + e - s]
            at += e - s
        return self.base.jvp(full)

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        A = self.base.vjp(V)
        return torch.cat([A[s:e] for s, e in self.slices], 0)

    def modes(self) -> dict[str, bool]:
        return self.base.modes()


def _block_operator(
    K: FactoredKernel, names: list[str], slices: list[tuple[int, int]], chunk_size: int | None
) -> tuple[FactoredKernel, str]:
    """An operator for ``J_g`` alone and how it was built ("subset NTK" or "masked JVP")."""
    model = getattr(K, "model", None)
    if not isinstance(K, NTK) or model is None:
        return _RestrictedFactor(K, slices), "masked JVP (the kernel has no model to restrict)"
    live = dict(model.named_parameters())
    values = dict(zip(K.param_names, getattr(K, "primals", ()) or ()))
    src = model
    if values and any(n not in live or values[n].shape != live[n].shape or not torch.equal(values[n], live[n]) for n in values):
        # the kernel was built at other parameter values (a snapshot): restrict a private copy
        src = copy.deepcopy(model)
        own = dict(src.named_parameters())
        with torch.no_grad():
            for n, v in values.items():
                own[n].copy_(v)
    try:
        sub = NTK(src, K.inputs, output=K.output, params=names, chunk_size=chunk_size)
    except (ValueError, TypeError, RuntimeError) as e:
        return _RestrictedFactor(K, slices), f"masked JVP (a subset NTK failed: {e})"
    return sub, "subset NTK"


# -- statistics ---------------------------------------------------------------------------------


@dataclass
class _Raw:
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


def _gram_pairs(Ga: torch.Tensor, Gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_{i≠j} Γa^g_ij Γb^h_ij`` for all (g, h) with leave-one-out values.

    ``Ga``, ``Gb``: ``(G, m, m)`` symmetric per-block probe Grams.  The same U-statistic as
    :func:`ntkscope.core.jackknife.pair_mean_loo` on ``Γa^g ⊙ Γb^h``, for every pair at once.
    """
    m = Ga.shape[1]
    if m < 2:
        raise ValueError(f"block Frobenius products need num_probes >= 2, got {m}")
    rows = torch.einsum("gij,hij->igh", Ga, Gb) - torch.einsum("gii,hii->igh", Ga, Gb)  # Σ_{j≠i}
    return _pair_stats(rows, rows, m)


def _vjp_raw(grams: torch.Tensor, grams0: torch.Tensor | None) -> _Raw:
    tr, tr_loo = _mean_loo(torch.diagonal(grams, dim1=1, dim2=2).T)
    fro, fro_loo = _gram_pairs(grams, grams)
    raw = _Raw(tr, tr_loo, fro, fro_loo)
    if grams0 is not None:
        raw.tr0, raw.tr0_loo = _mean_loo(torch.diagonal(grams0, dim1=1, dim2=2).T)
        raw.fro0, raw.fro0_loo = _gram_pairs(grams0, grams0)
        raw.cross, raw.cross_loo = _gram_pairs(grams, grams0)
    return raw


def _pair_matrix(Ba: list[torch.Tensor], Bb: list[torch.Tensor], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def _jvp_raw(B: list[torch.Tensor], B0: list[torch.Tensor] | None) -> _Raw:
    tr, tr_loo = _mean_loo(torch.stack([b.square().sum(1) for b in B], 1).cpu())
    fro, fro_loo = _pair_matrix(B, B, True)
    raw = _Raw(tr, tr_loo, fro, fro_loo)
    if B0 is not None:
        raw.tr0, raw.tr0_loo = _mean_loo(torch.stack([b.square().sum(1) for b in B0], 1).cpu())
        raw.fro0, raw.fro0_loo = _pair_matrix(B0, B0, True)
        raw.cross, raw.cross_loo = _pair_matrix(B, B0, False)
    return raw


def _exact_raw(J: torch.Tensor, J0: torch.Tensor | None, slices: list[list[tuple[int, int]]]) -> _Raw:
    def blocks(M: torch.Tensor) -> torch.Tensor:
        Ks = []
        for sl in slices:
            Jg = torch.cat([M[:, s:e] for s, e in sl], 1).double()
            Ks.append(Jg @ Jg.T)
        return torch.stack(Ks)

    Ks = blocks(J)
    raw = _Raw(torch.diagonal(Ks, dim1=1, dim2=2).sum(1), None, torch.einsum("gij,hij->gh", Ks, Ks), None)
    if J0 is not None:
        K0s = blocks(J0)
        raw.tr0 = torch.diagonal(K0s, dim1=1, dim2=2).sum(1)
        raw.fro0 = torch.einsum("gij,hij->gh", K0s, K0s)
        raw.cross = torch.einsum("gij,hij->gh", Ks, K0s)
    return raw


# -- the entry point -----------------------------------------------------------------------------


def _check_kernel(K: Any, what: str) -> FactoredKernel:
    if not isinstance(K, FactoredKernel) or not hasattr(K, "param_names") or not hasattr(K, "param_numels"):
        raise TypeError(
            f"{what} must be an ntkscope.NTK (a kernel with named parameters), got {type(K).__name__}; "
            "parameter blocks need to know which columns of J belong to which parameter"
        )
    return K


def parameter_blocks(
    K: Any,
    groups: None | str | Mapping[str, str | Sequence[str]] = None,
    *,
    other: Any = None,
    method: str = "vjp",
    num_probes: int | None = None,
    seed: int | torch.Generator | None = None,
    probes: str | Probe | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    max_passes: int | None = None,
    check_inputs: bool = True,
) -> ParameterBlocks:
    """The NTK's per-parameter-block traces, Frobenius inner products, effective ranks and
    (with ``other``) alignments, from one probe set, each with a standard error.

    Args:
        K: an :class:`ntkscope.NTK`.
        groups: ``None`` (one block per module owning parameters), ``"tensor"`` (one per
            parameter tensor) or a dict block name -> parameter names / glob patterns (see
            :func:`resolve_groups`).
        other: a second NTK over the same inputs with the same parameter names (e.g.
            ``NTK(model, X, params=theta0)``, the kernel at initialisation): adds per-block
            alignments ``⟨K_g, K0_g⟩_F / (‖K_g‖_F‖K0_g‖_F)`` and K0's block statistics.
        method: ``"vjp"`` (default; one reverse pass per probe for all blocks), ``"jvp"``
            (forward passes per block), ``"exact"`` or ``"auto"`` (see the module docstring).
        num_probes: probes (default 100; 32 to start with when ``rtol`` is given).
        seed: int, ``torch.Generator`` or None (fresh).  With ``method="vjp"`` the probes are
            those of :func:`ntkscope.trace` / :func:`ntkscope.frobenius_norm` under the same seed.
        probes: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"`` (VJP side only).
        rtol / max_passes: grow the probes until the block statistics meet ``rtol`` (see the
            module docstring), within ``max_passes`` AD passes.
        check_inputs: compare ``other``'s inputs with K's.
    """
    t0 = time.perf_counter()
    K = _check_kernel(K, "K")
    adapt.check_tolerances(rtol, None, max_passes)
    adaptive = rtol is not None or max_passes is not None
    m = num_probes if num_probes is not None else (adapt.FIRST_BLOCK if adaptive else DEFAULT_PROBES)
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"num_probes must be an int, got {type(m).__name__}")
    if m < 3:
        raise ValueError(f"num_probes must be >= 3 (pair statistics and their jackknife), got {m}")
    if method not in ("vjp", "jvp", "exact", "auto"):
        raise ValueError(f"unknown method {method!r}; choose 'vjp', 'jvp', 'exact' or 'auto'")
    kind = parse_probe(probes) if probes is not None else Probe.RADEMACHER
    if kind is Probe.ORTHOGONAL:
        raise ValueError("parameter_blocks needs independent probes; orthogonal probes are dependent")
    base_seed = resolve_seed(seed)
    names: list[str] = list(K.param_names)  # type: ignore[attr-defined]
    numels: list[int] = [int(n) for n in K.param_numels]  # type: ignore[attr-defined]
    K0: FactoredKernel | None = None
    if other is not None:
        K0 = _check_kernel(other, "other")
        if list(K0.param_names) != names or [int(n) for n in K0.param_numels] != numels:  # type: ignore[attr-defined]
            raise ValueError("other must have the same parameters (names and sizes, in the same order) as K")
        if K0.dim != K.dim:
            raise ValueError(f"other is over a different state: D = {K0.dim} vs {K.dim}")
        if check_inputs and K.same_inputs(K0) is False:
            raise ValueError("other was built on different inputs than K (pass check_inputs=False to skip this check)")
    blocks = resolve_groups(names, groups)
    bnames = list(blocks)
    idx = {n: i for i, n in enumerate(names)}
    slices = [_column_slices(numels, [idx[p] for p in blocks[b]]) for b in bnames]
    bnumels = [sum(e - s for s, e in sl) for sl in slices]
    G = len(bnames)
    leaves: list[FactoredKernel] = [K] + ([K0] if K0 is not None and K0 is not K else [])
    info: dict[str, Any] = {"probes": kind.value, "blocks": G}

    before_leaves = {id(o): o.counts() for o in leaves}

    def add_leaf(op: FactoredKernel) -> None:
        if not isinstance(op, _RestrictedFactor) and id(op) not in before_leaves:
            before_leaves[id(op)] = op.counts()
            leaves.append(op)

    def spent() -> tuple[int, int]:
        tot = [0, 0]
        for o in leaves:
            a, b = o.counts(), before_leaves[id(o)]
            tot[0] += a[0] - b[0]
            tot[1] += a[1] - b[1]
        return tot[0], tot[1]

    sub_ops: list[FactoredKernel] | None = None
    sub_ops0: list[FactoredKernel] | None = None

    def build_subs() -> None:
        nonlocal sub_ops, sub_ops0
        if sub_ops is not None:
            return
        how: list[str] = []
        sub_ops = []
        for b, sl in zip(bnames, slices):
            op, h = _block_operator(K, blocks[b], sl, chunk_size)
            sub_ops.append(op)
            add_leaf(op)
            how.append(h)
        if K0 is K:
            sub_ops0 = sub_ops
        elif K0 is not None:
            sub_ops0 = []
            for b, sl in zip(bnames, slices):
                op, h = _block_operator(K0, blocks[b], sl, chunk_size)
                sub_ops0.append(op)
                add_leaf(op)
        info["jvp_blocks"] = sorted(set(how))

    meth = method
    if meth == "auto":
        exact_cost = min(K.dim, K.num_params) * len(leaves)
        if exact_cost <= m * len(leaves) and K.dim * K.num_params <= EXACT_MAX_ENTRIES and G * K.dim**2 <= EXACT_MAX_ENTRIES:
            meth, reason = "exact", f"the exact Jacobian costs {exact_cost} passes, within the {m * len(leaves)}-pass budget"
        else:
            modes = K.modes()
            if not modes["vjp"] and not modes["jvp"]:
                raise RuntimeError("neither forward- nor reverse-mode AD works for this model")
            if not modes["jvp"]:
                meth, reason = "vjp", "forward-mode AD is unavailable for this model"
            elif not modes["vjp"]:
                meth, reason = "jvp", "reverse-mode AD is unavailable for this model"
            elif not isinstance(K, NTK):
                meth, reason = "vjp", "one VJP per probe serves every block"
            else:
                build_subs()
                assert sub_ops is not None
                t_v = K.pass_seconds("vjp")
                t_j = sum(o.pass_seconds("jvp") if isinstance(o, NTK) else K.pass_seconds("jvp") for o in sub_ops)
                if t_j < t_v:
                    meth = "jvp"
                else:
                    meth = "vjp"
                reason = (
                    f"measured cost per probe: one VJP {t_v * 1e3:.3g} ms (all {G} blocks) vs {G} block JVPs {t_j * 1e3:.3g} ms"
                )
        info["reason"] = reason
    if meth == "jvp" and kind is Probe.SPHERE:
        raise ValueError("method='jvp' needs probes with independent entries: use 'rademacher' or 'gaussian'")

    converged: bool | None = None
    if meth == "exact":
        for op in leaves:
            if op.dim * op.num_params > EXACT_MAX_ENTRIES or G * op.dim**2 > EXACT_MAX_ENTRIES:
                raise ValueError(
                    f"method='exact' would store a {op.dim}×{op.num_params} Jacobian and {G} dense {op.dim}×{op.dim} block "
                    "kernels: too large; use 'vjp'"
                )
        c0 = K.counts()
        J = ex.jacobian(K)
        side = "jvp" if K.counts()[0] > c0[0] else "vjp"
        J0 = ex.jacobian(K0) if K0 is not None else None
        raw = _exact_raw(J, J0, slices)
        m_used = 0
    else:
        side = meth
        dtype, device = K.dtype, K.device
        if meth == "jvp":
            build_subs()
            assert sub_ops is not None
        run_K: FactoredKernel = K
        run_K0: FactoredKernel | None = K0
        run_subs, run_subs0 = sub_ops, sub_ops0
        if adaptive:  # memoised proxies: later rounds reuse every product
            run_K = adapt.cached(K)  # type: ignore[assignment]
            run_K0 = adapt.cached(K0) if K0 is not None else None  # type: ignore[assignment]
            run_subs = [adapt.cached(o) for o in sub_ops] if sub_ops is not None else None  # type: ignore[misc]
            run_subs0 = [adapt.cached(o) for o in sub_ops0] if sub_ops0 is not None else None  # type: ignore[misc]

        def compute(mm: int) -> _Raw:
            if meth == "vjp":
                stream = ProbeStream(K.dim, kind, base_seed, Stream.MAIN, dtype, device)

                def grams(op: FactoredKernel) -> torch.Tensor:
                    A = est.onesided(op, "vjp", stream.columns, mm, keep=True, chunk_size=chunk_size)
                    out = torch.zeros(G, mm, mm, dtype=torch.float64)
                    for g, sl in enumerate(slices):
                        for s, e in sl:
                            Ag = A[:, s:e].to(torch.float64)
                            out[g] += (Ag @ Ag.T).cpu()
                    return out

                gK = grams(run_K)
                return _vjp_raw(gK, None if run_K0 is None else gK if K0 is K else grams(run_K0))
            assert run_subs is not None

            def rows(ops: list[FactoredKernel]) -> list[torch.Tensor]:
                out = []
                for g, op in enumerate(ops):
                    st = ProbeStream(op.num_params, kind, base_seed, Stream.BLOCK_JVP + g, dtype, device)
                    out.append(est.onesided(op, "jvp", st.columns, mm, keep=True, chunk_size=chunk_size).to(torch.float64))
                return out

            bK = rows(run_subs)
            return _jvp_raw(bK, None if run_subs0 is None else bK if K0 is K else rows(run_subs0))

        if adaptive:
            last: dict[str, Any] = {}

            def run(mm: int) -> tuple[float, float, Any]:
                r = compute(mm)
                last["raw"] = r
                return 1.0, _criterion(r), r

            def passes_now() -> int:
                return sum(spent())

            res = adapt.drive(run, passes_now, m, rtol=rtol, atol=None, max_passes=max_passes, what="parameter_blocks")
            raw, m_used, converged = res.payload, res.num_probes, res.converged
            info["adaptive"] = {
                "rounds": [
                    {"num_probes": h["num_probes"], "max_rel_error": h["stderr"], "passes": h["passes"]} for h in res.history
                ],
                "stop": res.stop_reason,
                "rtol": rtol,
                "max_passes": max_passes,
            }
        else:
            raw = compute(m)
            m_used = m
    jv, vj = spent()
    secs = time.perf_counter() - t0
    return _assemble(raw, bnames, blocks, bnumels, meth, side, m_used, jv, vj, secs, converged, info)


def _criterion(r: _Raw) -> float:
    """Worst relative error: block entries against the totals, and the totals themselves."""
    assert r.tr_loo is not None and r.fro_loo is not None
    tt, tt_loo = r.tr.sum(), r.tr_loo.sum(1)
    ft, ft_loo = r.fro.sum(), r.fro_loo.sum((1, 2))
    se_tr, _ = _jack(r.tr, r.tr_loo)
    se_fr, _ = _jack(r.fro, r.fro_loo)
    se_tt, _ = _jack(tt, tt_loo)
    se_ft, _ = _jack(ft, ft_loo)
    errs = [float(se_tt / tt.abs()), float(se_ft / ft.abs()), float(se_tr.max() / tt.abs()), float(se_fr.max() / ft.abs())]
    return max(e if math.isfinite(e) else math.inf for e in errs)


def _assemble(
    raw: _Raw,
    bnames: list[str],
    blocks: dict[str, list[str]],
    bnumels: list[int],
    method: str,
    side: str,
    m: int,
    jv: int,
    vj: int,
    secs: float,
    converged: bool | None,
    info: dict[str, Any],
) -> ParameterBlocks:
    exact = method == "exact"
    ax1: tuple[str, ...] = ("block",)
    ax2: tuple[str, ...] = ("block", "block'")

    def block(q: str, full: torch.Tensor, loo: torch.Tensor | None, ax: tuple[str, ...], ratio: bool = False) -> BlockEstimate:
        se = bc = None
        if not exact and loo is not None:
            se, bc = _jack(full, loo)
            bc = bc if ratio else None
        return BlockEstimate(full, se, ax, q, method, m, jv, vj, secs, bc)

    def total(q: str, full: torch.Tensor, loo: torch.Tensor | None, ratio: bool = False) -> Estimate:
        tinfo: dict[str, Any] = {"side": side}
        se: float | None = None
        if not exact and loo is not None:
            s, b = _jack(full, loo)
            se = float(s)
            if ratio:
                tinfo["bias_corrected"] = float(b)
        return Estimate(float(full), se, jv, vj, m, method, secs, q, exact, tinfo)

    def diag(x: torch.Tensor | None, batched: bool) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.diagonal(x, dim1=1, dim2=2) if batched else torch.diagonal(x)

    def loo_sum(x: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor | None:
        return None if x is None else x.sum(dims)

    fd, fd_loo = diag(raw.fro, False), diag(raw.fro_loo, True)
    assert fd is not None
    if bool((fd <= 0).all()):
        raise ValueError("the kernel is estimated as zero (the parameters do not affect the state): its statistics are undefined")
    zero = [bnames[i] for i in range(len(bnames)) if float(fd[i]) <= 0]
    if zero:  # parameters that do not reach the state (e.g. layers above a hidden state): ratios are NaN
        info["zero_blocks"] = zero
    reff = block(
        "effective_rank",
        raw.tr.square() / fd,
        raw.tr_loo.square() / fd_loo if raw.tr_loo is not None and fd_loo is not None else None,
        ax1,
        True,
    )
    tt, tt_loo = raw.tr.sum(), loo_sum(raw.tr_loo, (1,))
    ft, ft_loo = raw.fro.sum(), loo_sum(raw.fro_loo, (1, 2))
    out = ParameterBlocks(
        names=bnames,
        params={b: list(blocks[b]) for b in bnames},
        numels=bnumels,
        trace=block("trace", raw.tr, raw.tr_loo, ax1),
        frobenius=block("frobenius_inner", raw.fro, raw.fro_loo, ax2),
        effective_rank=reff,
        total_trace=total("trace", tt, tt_loo),
        total_frobenius_sq=total("frobenius_norm_sq", ft, ft_loo),
        total_effective_rank=total(
            "effective_rank", tt**2 / ft, tt_loo**2 / ft_loo if tt_loo is not None and ft_loo is not None else None, True
        ),
        alignment=None,
        total_alignment=None,
        other_trace=None,
        other_frobenius=None,
        cross=None,
        method=method,
        side=side,
        num_probes=m,
        jvp_passes=jv,
        vjp_passes=vj,
        seconds=secs,
        converged=converged,
        info=info,
    )
    if raw.cross is not None:
        assert raw.fro0 is not None and raw.tr0 is not None
        f0d, f0d_loo = diag(raw.fro0, False), diag(raw.fro0_loo, True)
        cd, cd_loo = diag(raw.cross, False), diag(raw.cross_loo, True)
        assert f0d is not None and cd is not None
        if bool((f0d <= 0).all()):
            raise ValueError("other is estimated as zero (its parameters do not affect the state): the alignment is undefined")

        def cos(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return c / torch.sqrt(a * b)

        al_loo = cos(cd_loo, fd_loo, f0d_loo) if cd_loo is not None and fd_loo is not None and f0d_loo is not None else None
        out.alignment = block("alignment", cos(cd, fd, f0d), al_loo, ax1, True)
        f0t, f0t_loo = raw.fro0.sum(), loo_sum(raw.fro0_loo, (1, 2))
        ct, ct_loo = raw.cross.sum(), loo_sum(raw.cross_loo, (1, 2))
        tal_loo = cos(ct_loo, ft_loo, f0t_loo) if ct_loo is not None and ft_loo is not None and f0t_loo is not None else None
        out.total_alignment = total("alignment", cos(ct, ft, f0t), tal_loo, True)
        out.other_trace = block("trace", raw.tr0, raw.tr0_loo, ax1)
        out.other_frobenius = block("frobenius_inner", raw.fro0, raw.fro0_loo, ax2)
        out.cross = block("cross_inner", raw.cross, raw.cross_loo, ax2)
    return out
