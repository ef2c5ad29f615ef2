"""``method="auto"``: pick a method for a budget of AD passes, and size it to fit that budget.

:func:`choose_method` says what ``auto`` picks and why: the exact value when it fits the
budget, else a one-sided method on the side chosen by which AD modes work, by dimension and by
measured pass cost, unless a cheap Nyström pilot sketch finds a spectrum that decays fast
enough for Hutch++ to win.  :func:`resolve` is what the metrics run: the same choice, with the
pilot's products reused and its passes (and those of the pass timing) counted in the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import estimators as est
from ..core import executor
from ..core.linalg import nystrom_from_sketch
from ..core.probes import Probe, ProbeStream, Stream
from ..estimators.exact import block_trace_passes
from ..operators.base import FactoredKernel, KernelOperator
from .methods import EXACT_MAX_ENTRIES, ONE_SIDED, Method

__all__ = ["choose_method", "forced_side", "slow_path", "resolve", "PILOT_MAX", "MODE_CHECK_PASSES"]

#: Passes ``NTK.modes`` spends per AD mode, once per kernel, to find which modes work and by
#: which path (counted inside auto's budget, whether or not a call spends them).
MODE_CHECK_PASSES = 1
#: Largest pilot sketch of ``auto`` (2 AD passes per column, half of them reusable).
PILOT_MAX = 16
_PILOT_QUANTITIES = {"trace", "frobenius_norm", "frobenius_norm_sq", "effective_rank", "target_alignment"}


def forced_side(modes: dict[str, bool]) -> tuple[str, str] | None:
    """The only AD side that works, with the reason, or None when both do (raises if neither)."""
    if not modes["jvp"] and not modes["vjp"]:
        raise RuntimeError("neither forward- nor reverse-mode AD works for this model")
    if not modes["jvp"]:
        return "vjp", "forward-mode AD is unavailable for this model"
    if not modes["vjp"]:
        return "jvp", "reverse-mode AD is unavailable for this model"
    return None


def slow_path(path: str | None) -> bool:
    """A path that pushes probes one by one (``loop-*``) or J·u as a VJP of a VJP."""
    return path is not None and (path.startswith("loop-") or "double-vjp" in path)


def _side_for(op: FactoredKernel, modes: dict[str, bool]) -> tuple[str, str]:
    """The side by which modes work, then by the smaller probe space, unless that side's path is
    slow and the other's is not.  Never by measured time: a seed must fix auto's answer in every
    process, and timings move with load and warm-up (a first pass measured 7.5× "cheaper")."""
    if forced := forced_side(modes):
        return forced
    D, P = op.dim, op.num_params
    small, big = ("vjp", "jvp") if D <= P else ("jvp", "vjp")
    paths = getattr(op, "paths", None) or {}
    if slow_path(paths.get(small)) and not slow_path(paths.get(big)):
        return big, f"the {small.upper()} side runs on a slow path ({paths[small]}), the {big.upper()} side on {paths[big]}"
    return small, f"D={D} {'≤' if D <= P else '>'} P={P}: the {small.upper()} side's probe space is smaller"


def _pilot(op: KernelOperator, side: str, ell: int, seed: int, probes: Probe | None) -> dict[str, Any]:
    """Nyström pilot on the first ``ell`` probes of the one-sided method's own stream.

    Side "vjp": ``S`` in R^D, ``A = JᵀS`` then ``Y = JA = KS``.  Side "jvp": ``S`` in R^P,
    ``A = JS`` then ``Y = JᵀA = GS`` with ``G = JᵀJ`` (same nonzero spectrum as K).  The first
    half (``A``) is exactly what the one-sided method computes for its first ``ell`` probes, so
    when it is chosen (``op`` a memoising proxy) only the second half is extra.
    """
    assert isinstance(op, FactoredKernel)
    stream = ProbeStream(est.probe_dim(op, side), probes or Probe.RADEMACHER, seed, Stream.MAIN, op.dtype, op.device)
    S = stream.columns(0, ell)
    if side == "vjp":
        A = op.vjp(S)
        Y = op.jvp(A)
    else:
        A = op.jvp(S)
        Y = op.vjp(A)
    lam, _ = nystrom_from_sketch(S, Y, float(torch.finfo(op.dtype).eps))
    return {"eigs": lam.cpu(), "trace": float(A.double().square().sum(0).mean())}  # ‖Jᵀs‖²: free trace samples


def choose_method(
    ops: Sequence[KernelOperator],
    quantity: str,
    num_probes: int,
    *,
    seed: int | None = None,
    probes: Probe | None = None,
) -> tuple[Method, str]:
    """What ``method="auto"`` picks for these kernels, and why.

    1. Exact when ``min(D, P)`` passes fit in the budget.  For the trace of a kernel over
       per-example blocks (:meth:`~ntkscope.operators.base.FactoredKernel.trace_blocks`): exact
       in ``R`` passes if they fit, else one-sided VJP samples over the blocks (no pilot).
    2. Otherwise the AD side: by which modes work, by D vs P (the smaller probe space), and away
       from a side whose path is slow (a Python loop over probes, or J·u as a double VJP).
    3. With ``seed`` given (as the metrics do), a cheap pilot decides one- vs two-sided: a
       Nyström sketch of ``ℓ = min(m // 10, 16)`` columns on the chosen side's probe space
       (``2ℓ`` passes, reported in the metric's ``info["pilot_passes"]``; its first ``ℓ`` passes
       are the one-sided method's first probes, reused when it is chosen).  If the ℓ-th eigenvalue is
       below ``10³·eps·λ₁`` the sketch already spans K's range: Hutch++ is exact up to round-off
       and is chosen.  For the trace it also compares predicted
       variances per AD pass: one-sided ``≈ 2‖K‖_F²`` per pass vs Hutch++'s residual
       ``≤ 12·λ_ℓ·(tr K − Σ_{i≤ℓ} λ_i)`` (2 passes per matvec, a third of them residual probes;
       ``Σ_{i>ℓ} λ_i² ≤ λ_ℓ Σ_{i>ℓ} λ_i``), with tr K from the sketch's own Hutchinson samples.
    """
    return _choose(ops, quantity, num_probes, seed=seed, probes=probes, info=None, pilot_ops=None)


def _choose(
    ops: Sequence[KernelOperator],
    quantity: str,
    num_probes: int,
    *,
    seed: int | None,
    probes: Probe | None,
    info: dict[str, Any] | None,
    pilot_ops: Sequence[KernelOperator] | None,
) -> tuple[Method, str]:
    """:func:`choose_method`, reporting the pilot into ``info`` and running it on ``pilot_ops``
    (memoising proxies of ``ops`` whose products the chosen method reuses)."""
    if not all(isinstance(o, FactoredKernel) for o in ops):
        n = ops[0].dim
        if n <= num_probes:
            return Method.EXACT, f"dim {n} ≤ budget {num_probes}: the exact kernel is cheaper"
        return Method.HUTCHPP, "only K-matvecs are available (no factor J): Hutch++ is the safe two-sided choice"
    fops = [o for o in ops if isinstance(o, FactoredKernel)]
    if quantity == "trace" and len(fops) == 1 and (R := block_trace_passes(fops[0])) is not None:
        G = fops[0].dim // R
        if R <= num_probes:
            return Method.EXACT, f"the trace separates over {G} per-example blocks: exact in {R} VJP passes, within the {num_probes}-pass budget"
        return Method.VJP, f"one-sided VJP over {G} per-example blocks (no cross-example terms in the variance, half a VJP's products)"
    exact_passes = sum(min(o.dim, o.num_params) for o in fops)
    entries = sum(o.dim * o.num_params for o in fops)
    if exact_passes <= num_probes * len(fops) and (quantity == "trace" or entries <= EXACT_MAX_ENTRIES):
        return Method.EXACT, f"the exact value costs {exact_passes} passes, no more than the {num_probes * len(fops)}-pass budget"
    modes = {"jvp": True, "vjp": True}
    for o in fops:
        mo = o.modes()
        modes = {k: modes[k] and mo[k] for k in modes}
    side, why = _side_for(fops[0], modes)
    onesided = (Method.VJP if side == "vjp" else Method.JVP), f"one-sided {side.upper()}: {why}"
    ell = min(num_probes // 10, PILOT_MAX, est.probe_dim(fops[0], side))
    if seed is None or len(ops) != 1 or quantity not in _PILOT_QUANTITIES or not all(modes.values()) or ell < 4:
        return onesided
    op = (pilot_ops or ops)[0]
    base = op.base
    c0 = base.counts()
    try:
        pilot = _pilot(op, side, ell, seed, probes)
    except FloatingPointError as e:  # K's products overflow (or a derivative is infinite): no sketch to read
        pilot = None
        failed = str(e)
    c1 = base.counts()
    if info is not None:
        info["pilot_passes"] = (c1[0] - c0[0]) + (c1[1] - c0[1])
    if pilot is None:
        return onesided[0], onesided[1] + f"; no pilot sketch: {failed}"
    lam = pilot["eigs"]
    ratio = float(lam[-1] / lam[0]) if lam[0] > 0 else 0.0
    if info is not None:
        info["pilot"] = {"sketch": ell, "side": side, "eig_ratio": ratio, "top_eigs": [float(x) for x in lam[:4]]}
    # float32 round-off at least: a float16/bfloat16 sketch is noisier than its own eps suggests
    eps = float(torch.finfo(op.dtype if op.dtype.itemsize >= 4 else torch.float32).eps)
    return _one_or_two_sided(onesided, lam, ratio, ell, pilot["trace"], quantity, eps)


def _one_or_two_sided(
    onesided: tuple[Method, str], lam: torch.Tensor, ratio: float, ell: int, trace: float, quantity: str, eps: float
) -> tuple[Method, str]:
    """Hutch++ when the pilot sketch spans K's range or (trace) predicts a smaller variance per pass."""
    if ratio <= 1e3 * eps:
        return Method.HUTCHPP, (
            f"two-sided Hutch++: a {ell}-column pilot sketch spans K's range (λ_{ell}/λ_1 = {ratio:.2g}), so Hutch++'s "
            f"sketch makes it exact up to round-off"
        )
    if quantity == "trace":
        head = float(lam.sum())
        tail = max(trace - head, 0.0)
        v_hpp = 12 * float(lam[-1]) * tail
        v_one = 2 * float(lam.square().sum())  # ≤ 2‖K‖_F²: favours Hutch++ only when clearly better
        if v_hpp < v_one:
            return Method.HUTCHPP, (
                f"two-sided Hutch++: the pilot sketch predicts a residual variance per pass {v_hpp:.3g} below the "
                f"one-sided {v_one:.3g} (fast spectral decay, λ_{ell}/λ_1 = {ratio:.2g})"
            )
        return onesided[0], onesided[1] + f"; pilot sketch λ_{ell}/λ_1 = {ratio:.2g}: spectrum too flat for Hutch++ to win"
    return onesided[0], onesided[1] + f"; pilot sketch λ_{ell}/λ_1 = {ratio:.2g}: the sketch does not span K's range"


def resolve(
    ops: Sequence[KernelOperator],
    pilot_ops: Sequence[KernelOperator],
    quantity: str,
    budget: int,
    *,
    seed: int,
    probes: Probe | None,
    info: dict[str, Any],
) -> tuple[Method, int, str]:
    """The method ``auto`` runs, its probe count within ``budget`` AD passes per kernel, and why.

    Deterministic (same seed, same budget, whatever the chunk size, the process layout or an
    earlier call on the kernel): the budget loses the pilot's passes and an allowance for the
    one-off mode check (:data:`MODE_CHECK_PASSES` per mode); a one-sided method gets back the pilot passes it reuses,
    a two-sided one gets half the rest (a K-matvec costs a VJP and a JVP).
    """
    meth, reason = _choose(ops, quantity, budget, seed=seed, info=info, pilot_ops=pilot_ops, probes=probes)
    meth, reason = executor.agree((meth, reason))  # ranks splitting probes must run the same method
    n_kernels = len({id(o) for o in ops})
    checked = any(isinstance(o, FactoredKernel) and o.times_passes for o in ops)
    checks = 2 * MODE_CHECK_PASSES if meth is not Method.EXACT and checked else 0
    spent = (int(info.get("pilot_passes", 0)) + checks) // n_kernels
    m = budget
    if meth in ONE_SIDED:
        reused = int(info.get("pilot", {}).get("sketch", 0)) if "pilot_passes" in info else 0
        m = max(2, budget - spent + reused)
        if spent:
            reason += f" ({spent} mode-check and pilot passes, {reused} of them reused, inside the {budget}-pass budget)"
    elif meth in (Method.HUTCHINSON, Method.HUTCHPP) and all(isinstance(o, FactoredKernel) for o in ops):
        m = max(3, (budget - spent) // 2)
        reason += f" ({m} K-matvecs = {2 * m} AD passes per kernel, within the pass budget with {spent} pilot passes)"
    return meth, m, reason
