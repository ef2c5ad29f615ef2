"""Estimates over a grid of blocks, and how :mod:`~ntkscope.metrics.structure` and
:mod:`~ntkscope.metrics.blocks` build them from full and leave-one-probe-out values.

Every entry's error bar is the delete-one jackknife over probes
(:func:`ntkscope.core.jackknife.stderr_and_corrected`: ``std/√m`` for plain means, consistent for
pair U-statistics and ratios); ratios also carry the jackknife bias-corrected values (Quenouille
1956; Efron & Stein 1981).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core import jackknife as jk
from ..core.estimate import Estimate

__all__ = ["BlockEstimate", "RunCost", "block_estimate", "total_estimate"]


@dataclass
class BlockEstimate:
    """Estimates of one quantity for every block (or pair of blocks), with error bars and cost.

    Attributes:
        values: float64 tensor over the block grid: the kept axes' sizes, twice for pair
            quantities (``(T, T)`` for ``keep="time"``).
        stderr: same shape; ``None`` for exact values.
        axes: names of the grid axes (pair quantities repeat them, the second with a ``'``).
        quantity, method, num_probes, jvp_passes, vjp_passes, seconds: as in :class:`Estimate`
            (the passes are those of the whole call that produced it).
        bias_corrected: jackknife bias-corrected values (ratios), else None.
    """

    values: torch.Tensor
    stderr: torch.Tensor | None
    axes: tuple[str, ...]
    quantity: str
    method: str
    num_probes: int
    jvp_passes: int
    vjp_passes: int
    seconds: float
    bias_corrected: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def rel_stderr(self) -> torch.Tensor | None:
        return None if self.stderr is None else self.stderr / self.values.abs()

    def estimate(self, *index: int) -> Estimate:
        """One entry as an :class:`Estimate` (``info["index"]`` says which), with the jackknife's
        ``m − 1`` degrees of freedom, so that its :meth:`~ntkscope.Estimate.ci` uses Student's t
        as the whole-kernel estimates do (the normal quantile covered 0.85–0.92 at 8 probes)."""
        se = None if self.stderr is None else float(self.stderr[index])
        info: dict[str, Any] = {"index": list(index)}
        if se is not None and self.num_probes > 1:
            info["dof"] = self.num_probes - 1
        return Estimate(
            float(self.values[index]),
            se,
            self.jvp_passes,
            self.vjp_passes,
            self.num_probes,
            self.method,
            self.seconds,
            self.quantity,
            self.stderr is None,
            info,
        )

    def ci(self, *index: int, level: float = 0.95) -> tuple[float, float]:
        """The confidence interval of one entry (see :meth:`ntkscope.Estimate.ci`)."""
        return self.estimate(*index).ci(level)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantity": self.quantity,
            "axes": list(self.axes),
            "values": self.values.tolist(),
            "stderr": None if self.stderr is None else self.stderr.tolist(),
            "method": self.method,
            "num_probes": self.num_probes,
            "jvp_passes": self.jvp_passes,
            "vjp_passes": self.vjp_passes,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class RunCost:
    """What one call spent producing its estimates (shared by all of them).

    ``num_probes`` is 0 and every leave-one-out value ``None`` for ``method="exact"``.
    """

    method: str
    num_probes: int
    jvp_passes: int
    vjp_passes: int
    seconds: float


def block_estimate(
    quantity: str,
    full: torch.Tensor,
    loo: torch.Tensor | None,
    axes: tuple[str, ...],
    cost: RunCost,
    *,
    shape: tuple[int, ...] | None = None,
    ratio: bool = False,
) -> BlockEstimate:
    """A :class:`BlockEstimate` from values ``full`` and leave-one-out values ``loo`` (``(m, ...)``;
    ``None``: exact), reshaped to ``shape`` (default ``full``'s); ``ratio`` keeps the jackknife
    bias-corrected values."""
    grid = tuple(full.shape) if shape is None else shape
    se = corrected = None
    if loo is not None:
        se_full, bc = jk.stderr_and_corrected(full, loo)
        se = se_full.reshape(grid)
        corrected = bc.reshape(grid) if ratio else None
    return BlockEstimate(
        values=full.reshape(grid),
        stderr=se,
        axes=axes,
        quantity=quantity,
        method=cost.method,
        num_probes=cost.num_probes,
        jvp_passes=cost.jvp_passes,
        vjp_passes=cost.vjp_passes,
        seconds=cost.seconds,
        bias_corrected=corrected,
    )


def total_estimate(
    quantity: str, full: torch.Tensor, loo: torch.Tensor | None, cost: RunCost, info: dict[str, Any], *, ratio: bool = False
) -> Estimate:
    """A whole-kernel :class:`Estimate` from a scalar ``full`` and its leave-one-out values ``loo``
    (``(m,)``; ``None``: exact); ``ratio`` adds ``info["bias_corrected"]``."""
    info = dict(info)
    se: float | None = None
    if loo is not None:
        s, b = jk.stderr_and_corrected(full, loo)
        se = float(s)
        if loo.shape[0] > 1:
            info["dof"] = int(loo.shape[0]) - 1
        if ratio:
            info["bias_corrected"] = float(b)
    exact = cost.method == "exact"
    return Estimate(
        float(full), se, cost.jvp_passes, cost.vjp_passes, cost.num_probes, cost.method, cost.seconds, quantity, exact, info
    )
