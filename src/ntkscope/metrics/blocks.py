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
  VJP side (one VJP per probe serves every block, against G block JVPs), or the JVP side where
  only forward mode works or the VJP side's path is slow — never by measured time, so a seed
  fixes the answer; ``side`` and ``info["reason"]`` say what ran and why.

Errors: the delete-one jackknife over probes (as everywhere in ntkscope: equal to ``std/√m`` for
the traces, consistent for the pair U-statistics and the ratios, whose bias-corrected values are
in ``bias_corrected``).  ``rtol=`` grows the probe set (reusing every product, see
:mod:`ntkscope.metrics.adaptive`) until every block trace and every block inner product is known to
``rtol`` of the corresponding total (``tr K``, ``‖K‖_F²``) and the totals to ``rtol`` relative.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import estimators as est
from ..core.estimate import Estimate
from ..core.probes import Probe, ProbeStream, Stream, parse_probe, resolve_seed
from ..estimators import exact as ex
from ..operators.base import FactoredKernel
from . import adaptive as adapt
from .auto import forced_side, slow_path
from .block_estimate import BlockEstimate, RunCost, block_estimate, total_estimate
from .block_operators import BlockKernels, PassCounter
from .block_stats import BlockStats, exact_stats, jvp_stats, max_rel_error, vjp_stats
from .param_groups import column_slices, resolve_groups

__all__ = ["ParameterBlocks", "parameter_blocks"]

DEFAULT_PROBES = 100
#: The exact path stores J (D×P) and G dense D×D block kernels: cap both.
EXACT_MAX_ENTRIES = 2 * 10**8


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


# -- the kernels of one call --------------------------------------------------------------------


def _check_kernel(K: Any, what: str) -> FactoredKernel:
    if not isinstance(K, FactoredKernel) or not hasattr(K, "param_names") or not hasattr(K, "param_numels"):
        raise TypeError(
            f"{what} must be an ntkscope.NTK (a kernel with named parameters), got {type(K).__name__}; "
            "parameter blocks need to know which columns of J belong to which parameter"
        )
    return K


def _check_other(K: FactoredKernel, other: Any, check_inputs: bool) -> FactoredKernel:
    K0 = _check_kernel(other, "other")
    if list(K0.param_names) != list(K.param_names) or [int(n) for n in K0.param_numels] != [int(n) for n in K.param_numels]:  # type: ignore[attr-defined]
        raise ValueError("other must have the same parameters (names and sizes, in the same order) as K")
    if K0.dim != K.dim:
        raise ValueError(f"other is over a different state: D = {K0.dim} vs {K.dim}")
    if check_inputs and K.same_inputs(K0) is False:
        raise ValueError("other was built on different inputs than K (pass check_inputs=False to skip this check)")
    return K0


# -- choosing and running a method ------------------------------------------------------------------


def _choose_method(K: FactoredKernel, num_kernels: int, m: int, G: int) -> tuple[str, str]:
    """``method="auto"``: the method to run and why (see the module docstring)."""
    exact_cost = min(K.dim, K.num_params) * num_kernels
    if exact_cost <= m * num_kernels and K.dim * K.num_params <= EXACT_MAX_ENTRIES and G * K.dim**2 <= EXACT_MAX_ENTRIES:
        return "exact", f"the exact Jacobian costs {exact_cost} passes, within the {m * num_kernels}-pass budget"
    if forced := forced_side(K.modes()):
        return forced
    # not by measured time, so that a seed fixes the answer: G block JVPs per probe against one
    # VJP for every block, so the JVP side only where the VJP side runs on a slow path
    paths = getattr(K, "paths", None) or {}
    if slow_path(paths.get("vjp")) and not slow_path(paths.get("jvp")):
        return "jvp", f"the VJP side runs on a slow path ({paths['vjp']}); {G} block JVPs per probe instead"
    return "vjp", f"one VJP per probe serves all {G} blocks (the JVP side needs {G} per probe)"


def _exact(
    K: FactoredKernel, K0: FactoredKernel | None, kernels: Sequence[FactoredKernel], slices: list[list[tuple[int, int]]]
) -> tuple[BlockStats, str]:
    """Exact statistics from the dense Jacobians, and the side that formed K's."""
    G = len(slices)
    for op in kernels:
        if op.dim * op.num_params > EXACT_MAX_ENTRIES or G * op.dim**2 > EXACT_MAX_ENTRIES:
            raise ValueError(
                f"method='exact' would store a {op.dim}×{op.num_params} Jacobian and {G} dense {op.dim}×{op.dim} block "
                "kernels: too large; use 'vjp'"
            )
    c0 = K.counts()
    J = ex.jacobian(K)
    side = "jvp" if K.counts()[0] > c0[0] else "vjp"
    J0 = ex.jacobian(K0) if K0 is not None else None
    return exact_stats(J, J0, slices), side


def _vjp_grams(
    op: FactoredKernel, stream: ProbeStream, m: int, slices: list[list[tuple[int, int]]], chunk_size: int | None
) -> torch.Tensor:
    """``(G, m, m)`` per-block probe Grams ``Γ^g_ij = a_{g,i}·a_{g,j}`` from m VJPs ``a_i = Jᵀw_i``."""
    A = est.onesided(op, "vjp", stream.columns, m, keep=True, chunk_size=chunk_size)
    out = torch.zeros(len(slices), m, m, dtype=torch.float64)
    for g, sl in enumerate(slices):
        for s, e in sl:
            Ag = A[:, s:e].to(torch.float64)
            out[g] += (Ag @ Ag.T).cpu()
    return out


def _jvp_rows(ops: list[FactoredKernel], K: FactoredKernel, kind: Probe, seed: int, m: int, chunk_size: int | None) -> list[torch.Tensor]:
    """Per block g, ``(m, D)`` JVP samples ``b_{g,i} = J_g u_{g,i}`` on the block's own probe stream (K's dtype and device)."""
    out = []
    for g, op in enumerate(ops):
        st = ProbeStream(op.num_params, kind, seed, Stream.BLOCK_JVP + g, K.dtype, K.device)
        out.append(est.onesided(op, "jvp", st.columns, m, keep=True, chunk_size=chunk_size).to(torch.float64))
    return out


def _sampler(
    side: str,
    K: FactoredKernel,
    K0: FactoredKernel | None,
    block_kernels: BlockKernels,
    kind: Probe,
    seed: int,
    chunk_size: int | None,
    memoise: bool,
) -> Callable[[int], BlockStats]:
    """``m -> statistics of m probes`` on ``side``; ``memoise``: later calls reuse every product."""

    def run_on(op: FactoredKernel) -> FactoredKernel:
        return adapt.cached(op) if memoise else op  # type: ignore[return-value]

    if side == "vjp":
        run_K, run_K0 = run_on(K), None if K0 is None else run_on(K0)
        stream = ProbeStream(K.dim, kind, seed, Stream.MAIN, K.dtype, K.device)
        slices = block_kernels.slices

        def vjp_side(m: int) -> BlockStats:
            gK = _vjp_grams(run_K, stream, m, slices, chunk_size)
            return vjp_stats(gK, None if run_K0 is None else gK if K0 is K else _vjp_grams(run_K0, stream, m, slices, chunk_size))

        return vjp_side
    ops, ops0 = block_kernels.ops()
    run_ops = [run_on(o) for o in ops]
    run_ops0 = None if ops0 is None else [run_on(o) for o in ops0]

    def jvp_side(m: int) -> BlockStats:
        bK = _jvp_rows(run_ops, K, kind, seed, m, chunk_size)
        return jvp_stats(bK, None if run_ops0 is None else bK if K0 is K else _jvp_rows(run_ops0, K, kind, seed, m, chunk_size))

    return jvp_side


def _adaptive(
    sample: Callable[[int], BlockStats],
    passes: PassCounter,
    m: int,
    rtol: float | None,
    max_passes: int | None,
    info: dict[str, Any],
    per_probe: int,
) -> tuple[BlockStats, int, bool | None]:
    """Grow the probes until :func:`~ntkscope.metrics.block_stats.max_rel_error` meets ``rtol``,
    within ``max_passes`` (``per_probe`` passes a probe costs in all)."""
    if max_passes is not None:
        if max_passes < 2 * per_probe:
            raise ValueError(f"max_passes={max_passes} cannot pay for 2 probes of parameter_blocks ({2 * per_probe} passes)")
        m = min(m, max_passes // per_probe)

    def run(mm: int) -> tuple[float, float, Any]:
        st = sample(mm)
        return 1.0, max_rel_error(st), st

    res = adapt.drive(
        run, lambda: sum(passes.spent()), m, rtol=rtol, atol=None, max_passes=max_passes, what="parameter_blocks", probe_cost=per_probe
    )
    info["adaptive"] = {
        "rounds": [{"num_probes": h["num_probes"], "max_rel_error": h["stderr"], "passes": h["passes"]} for h in res.history],
        "stop": res.stop_reason,
        "rtol": rtol,
        "max_passes": max_passes,
    }
    return res.payload, res.num_probes, res.converged


# -- the entry point -----------------------------------------------------------------------------


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
            :func:`~ntkscope.metrics.param_groups.resolve_groups`).
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
    K0 = None if other is None else _check_other(K, other, check_inputs)
    names: list[str] = list(K.param_names)  # type: ignore[attr-defined]
    numels: list[int] = [int(n) for n in K.param_numels]  # type: ignore[attr-defined]
    blocks = resolve_groups(names, groups)
    idx = {n: i for i, n in enumerate(names)}
    slices = [column_slices(numels, [idx[p] for p in members]) for members in blocks.values()]
    kernels = [K] + ([K0] if K0 is not None and K0 is not K else [])
    info: dict[str, Any] = {"probes": kind.value, "blocks": len(blocks)}
    passes = PassCounter(kernels)
    block_kernels = BlockKernels(K, K0, list(blocks.values()), slices, chunk_size, passes, info)
    meth = method
    if meth == "auto":
        meth, info["reason"] = _choose_method(K, len(kernels), m, len(blocks))
    if meth == "jvp" and kind is Probe.SPHERE:
        raise ValueError("method='jvp' needs probes with independent entries: use 'rademacher' or 'gaussian'")
    converged: bool | None = None
    if meth == "exact":
        st, side = _exact(K, K0, kernels, slices)
        m = 0
    else:
        side = meth
        sample = _sampler(side, K, K0, block_kernels, kind, base_seed, chunk_size, memoise=adaptive)
        if adaptive:
            if side == "vjp":
                per_probe = len({id(k) for k in kernels})  # one VJP per probe and kernel serves every block
            else:
                ops, ops0 = block_kernels.ops()
                per_probe = len(ops) + (0 if ops0 is None or K0 is K else len(ops0))  # one JVP per block and kernel
            st, m, converged = _adaptive(sample, passes, m, rtol, max_passes, info, per_probe)
        else:
            st = sample(m)
    jv, vj = passes.spent()
    cost = RunCost(meth, m, jv, vj, time.perf_counter() - t0)
    return _assemble(st, blocks, [sum(e - s for s, e in sl) for sl in slices], side, cost, converged, info)


# -- results ----------------------------------------------------------------------------------------

_AX1: tuple[str, ...] = ("block",)
_AX2: tuple[str, ...] = ("block", "block'")


def _diagonal(x: torch.Tensor | None) -> torch.Tensor | None:
    """The diagonal of a ``(G, G)`` grid, or of each of ``(m, G, G)`` leave-one-out grids."""
    if x is None:
        return None
    return torch.diagonal(x) if x.dim() == 2 else torch.diagonal(x, dim1=1, dim2=2)


def _loo_sum(x: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor | None:
    return None if x is None else x.sum(dims)


def _cosine(c: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``c / √(a b)`` (None if any part is: exact)."""
    return None if c is None or a is None or b is None else c / torch.sqrt(a * b)


def _add_other(out: ParameterBlocks, st: BlockStats, cost: RunCost, totals_info: dict[str, Any]) -> None:
    """With ``other``: the per-block and whole-kernel alignments, K0's blocks and the cross inner products."""
    assert st.fro0 is not None and st.tr0 is not None and st.cross is not None
    fd, fd_loo = _diagonal(st.fro), _diagonal(st.fro_loo)
    f0d, f0d_loo = _diagonal(st.fro0), _diagonal(st.fro0_loo)
    cd, cd_loo = _diagonal(st.cross), _diagonal(st.cross_loo)
    assert f0d is not None
    if bool((f0d <= 0).all()):
        raise ValueError("other is estimated as zero (its parameters do not affect the state): the alignment is undefined")
    alignment = _cosine(cd, fd, f0d)
    assert alignment is not None
    out.alignment = block_estimate("alignment", alignment, _cosine(cd_loo, fd_loo, f0d_loo), _AX1, cost, ratio=True)
    ft, ft_loo = st.fro.sum(), _loo_sum(st.fro_loo, (1, 2))
    f0t, f0t_loo = st.fro0.sum(), _loo_sum(st.fro0_loo, (1, 2))
    ct, ct_loo = st.cross.sum(), _loo_sum(st.cross_loo, (1, 2))
    total_alignment = _cosine(ct, ft, f0t)
    assert total_alignment is not None
    out.total_alignment = total_estimate(
        "alignment", total_alignment, _cosine(ct_loo, ft_loo, f0t_loo), cost, totals_info, ratio=True
    )
    out.other_trace = block_estimate("trace", st.tr0, st.tr0_loo, _AX1, cost)
    out.other_frobenius = block_estimate("frobenius_inner", st.fro0, st.fro0_loo, _AX2, cost)
    out.cross = block_estimate("cross_inner", st.cross, st.cross_loo, _AX2, cost)


def _assemble(
    st: BlockStats,
    blocks: dict[str, list[str]],
    numels: list[int],
    side: str,
    cost: RunCost,
    converged: bool | None,
    info: dict[str, Any],
) -> ParameterBlocks:
    """The :class:`ParameterBlocks` of the statistics: blocks, ratios, whole-kernel totals (sums of the blocks)."""
    names = list(blocks)
    fd, fd_loo = _diagonal(st.fro), _diagonal(st.fro_loo)
    assert fd is not None
    if bool((fd <= 0).all()):
        raise ValueError("the kernel is estimated as zero (the parameters do not affect the state): its statistics are undefined")
    zero = [names[i] for i in range(len(names)) if float(fd[i]) <= 0]
    if zero:  # parameters that do not reach the state (e.g. layers above a hidden state): ratios are NaN
        info["zero_blocks"] = zero
    reff_loo = st.tr_loo.square() / fd_loo if st.tr_loo is not None and fd_loo is not None else None
    tt, tt_loo = st.tr.sum(), _loo_sum(st.tr_loo, (1,))
    ft, ft_loo = st.fro.sum(), _loo_sum(st.fro_loo, (1, 2))
    totals_info = {"side": side}
    out = ParameterBlocks(
        names=names,
        params={b: list(blocks[b]) for b in names},
        numels=numels,
        trace=block_estimate("trace", st.tr, st.tr_loo, _AX1, cost),
        frobenius=block_estimate("frobenius_inner", st.fro, st.fro_loo, _AX2, cost),
        effective_rank=block_estimate("effective_rank", st.tr.square() / fd, reff_loo, _AX1, cost, ratio=True),
        total_trace=total_estimate("trace", tt, tt_loo, cost, totals_info),
        total_frobenius_sq=total_estimate("frobenius_norm_sq", ft, ft_loo, cost, totals_info),
        total_effective_rank=total_estimate(
            "effective_rank",
            tt**2 / ft,
            tt_loo**2 / ft_loo if tt_loo is not None and ft_loo is not None else None,
            cost,
            totals_info,
            ratio=True,
        ),
        alignment=None,
        total_alignment=None,
        other_trace=None,
        other_frobenius=None,
        cross=None,
        method=cost.method,
        side=side,
        num_probes=cost.num_probes,
        jvp_passes=cost.jvp_passes,
        vjp_passes=cost.vjp_passes,
        seconds=cost.seconds,
        converged=converged,
        info=info,
    )
    if st.cross is not None:
        _add_other(out, st, cost, totals_info)
    return out
