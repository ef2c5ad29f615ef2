"""Estimates next to exact values: what ``ntkscope run`` and ``ntkscope estimate`` print.

:func:`evaluate` builds the NTK of a :class:`~ntkscope.cli.spec.Spec`, estimates the requested
metrics and, where the kernel is small enough (:func:`exact_feasible`), computes all of them
exactly from one dense Jacobian (:func:`exact_values`) for the relative error and the speed-up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import metrics as mt
from ..estimators.exact import jacobian, smaller_kernel
from ..operators.ntk import NTK
from .spec import Spec, SpecError

__all__ = ["METRICS", "EXACT_MAX_PASSES", "exact_feasible", "exact_values", "metric_row", "evaluate"]

#: Metric names the command line accepts.
METRICS = ("trace", "frobenius_norm", "effective_rank", "target_alignment")

#: Exact references are computed when min(D, P) AD passes stay under this.
EXACT_MAX_PASSES = 4000


def exact_feasible(K: Any) -> bool:
    """Whether the dense reference is cheap: ``min(D, P)`` passes and ``D·P`` entries within bounds."""
    return min(K.dim, K.num_params) <= EXACT_MAX_PASSES and K.dim * K.num_params <= mt.EXACT_MAX_ENTRIES


def exact_values(K: Any, targets: torch.Tensor | None) -> dict[str, Any]:
    """All four metrics exactly, from one dense Jacobian (``min(D, P)`` AD passes, float64 sums).

    ``tr K = ‖J‖_F²``; ``‖K‖_F² = ‖JᵀJ‖_F²`` or ``‖JJᵀ‖_F²`` (the smaller of K and G);
    effective rank ``(tr K)²/‖K‖_F²``; target alignment ``‖Jᵀy‖² / (‖K‖_F ‖y‖²)``.
    """
    t0 = time.perf_counter()
    c0 = K.counts()
    J = jacobian(K).to(torch.float64)
    G = smaller_kernel(J)
    tr = float(J.square().sum())
    fro = float(G.square().sum().sqrt())
    vals: dict[str, float] = {"trace": tr, "frobenius_norm": fro, "effective_rank": tr**2 / fro**2}
    if targets is not None:
        y = mt.as_targets(targets, K).to(torch.float64)
        vals["target_alignment"] = float((J.T @ y).square().sum()) / (fro * float(y.square().sum()))
    c1 = K.counts()
    return {"values": vals, "passes": (c1[0] - c0[0]) + (c1[1] - c0[1]), "seconds": time.perf_counter() - t0}


def metric_row(name: str, e: Any, exact: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-able record: the estimate, the exact value, relative error and speed-up."""
    row: dict[str, Any] = {"metric": name, "estimate": e.to_dict(), "reason": e.info.get("reason")}
    if exact is not None and name in exact["values"]:
        v = exact["values"][name]
        rel = abs(e.value - v) / abs(v) if v != 0 else math.inf
        row["exact"] = {"value": v, "passes": exact["passes"], "seconds": exact["seconds"]}
        row["rel_error"] = rel
        row["z"] = abs(e.value - v) / e.stderr if e.stderr else None
        row["speedup"] = exact["seconds"] / e.seconds if e.seconds > 0 else None
        row["pass_ratio"] = exact["passes"] / e.passes if e.passes else None
    return row


def evaluate(
    spec: Spec,
    metrics: tuple[str, ...] | list[str] = METRICS,
    *,
    exact: bool | None = None,
    progress: Callable[[str], None] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Build the NTK of ``spec`` and estimate ``metrics`` (keyword arguments go to each metric).

    ``exact=None`` adds exact values when :func:`exact_feasible`; the dense Jacobian is formed
    once per model (its passes and seconds are the "exact" cost every metric is compared with).
    """
    if not any(p.requires_grad for p in spec.model.parameters()):
        # the API's hint ("pass params=") has no command-line counterpart
        where = spec.name or type(spec.model).__name__
        raise SpecError(
            f"{where}: the model has no trainable parameters (none with requires_grad=True), so its NTK is empty; "
            "return a model with some trainable parameters from the factory"
        )
    K = NTK(spec.model, spec.inputs, output=spec.output, chunk_size=kw.get("chunk_size"))
    _warm_up(K)
    rows = []
    for m in metrics:
        if m == "target_alignment" and spec.targets is None:
            continue
        if progress:
            progress(m)
        fn = getattr(mt, m)
        args = (K, spec.targets) if m == "target_alignment" else (K,)
        rows.append((m, fn(*args, **kw)))
    reference = None
    if exact_feasible(K) if exact is None else exact:
        if progress:
            progress(f"exact reference ({min(K.dim, K.num_params)} passes)")
        reference = exact_values(K, spec.targets)
    return {
        "model": spec.name,
        "description": spec.description,
        "D": K.dim,
        "P": K.num_params,
        "exact_cost": None if reference is None else {"passes": reference["passes"], "seconds": reference["seconds"]},
        "metrics": [metric_row(m, e, reference) for m, e in rows],
    }


def _warm_up(K: Any) -> None:
    """One timed pass per AD mode before anything is timed: the first forward-mode call in a
    process compiles its decompositions (seconds), which would otherwise be charged to whichever
    measurement happens to run first."""
    for mode in ("vjp", "jvp"):
        try:
            K.pass_seconds(mode)
        except RuntimeError:  # that mode is unavailable for this model; auto will see it too
            pass
