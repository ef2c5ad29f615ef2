"""The JVP side of :func:`~ntkscope.metrics.blocks.parameter_blocks`: an operator for one
parameter block's Jacobian ``J_g`` alone, so that a forward pass costs only that block.

:func:`block_operator` restricts the model to the block's parameters (a subset
:class:`~ntkscope.NTK`, ``NTK(model, inputs, params=block)``); where that is impossible (a kernel
without a model) :class:`RestrictedFactor` runs the full JVP with the other rows of u zero.
:class:`BlockKernels` builds them for K (and other) on first use; :class:`PassCounter` counts the
AD passes of all the kernels one call uses.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..operators.base import FactoredKernel
from ..operators.ntk import NTK

__all__ = ["RestrictedFactor", "block_operator", "PassCounter", "BlockKernels"]


class RestrictedFactor(FactoredKernel):
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


def block_operator(
    K: FactoredKernel, names: list[str], slices: list[tuple[int, int]], chunk_size: int | None
) -> tuple[FactoredKernel, str]:
    """An operator for ``J_g`` alone and how it was built ("subset NTK" or "masked JVP")."""
    model = getattr(K, "model", None)
    if not isinstance(K, NTK) or model is None:
        return RestrictedFactor(K, slices), "masked JVP (the kernel has no model to restrict)"
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
        return RestrictedFactor(K, slices), f"masked JVP (a subset NTK failed: {e})"
    return sub, "subset NTK"


class PassCounter:
    """AD passes spent since the start by the kernels of one call, each kernel counted once.

    A :class:`RestrictedFactor` runs its passes on K, so K's counts already hold them.
    """

    def __init__(self, kernels: Sequence[FactoredKernel]) -> None:
        self._kernels: list[FactoredKernel] = []
        self._before: dict[int, tuple[int, int, int]] = {}
        for op in kernels:
            self.add(op)

    def add(self, op: FactoredKernel) -> None:
        if not isinstance(op, RestrictedFactor) and id(op) not in self._before:
            self._before[id(op)] = op.counts()
            self._kernels.append(op)

    def spent(self) -> tuple[int, int]:
        jvp = vjp = 0
        for op in self._kernels:
            now, before = op.counts(), self._before[id(op)]
            jvp += now[0] - before[0]
            vjp += now[1] - before[1]
        return jvp, vjp


class BlockKernels:
    """The JVP side's per-block operators ``J_g`` of K (and of other), built on first use."""

    def __init__(
        self,
        K: FactoredKernel,
        K0: FactoredKernel | None,
        members: list[list[str]],
        slices: list[list[tuple[int, int]]],
        chunk_size: int | None,
        passes: PassCounter,
        info: dict[str, Any],
    ) -> None:
        self.K, self.K0, self.members, self.slices, self.chunk_size = K, K0, members, slices, chunk_size
        self.passes, self.info = passes, info
        self._ops: tuple[list[FactoredKernel], list[FactoredKernel] | None] | None = None

    def _build(self, K: FactoredKernel) -> tuple[list[FactoredKernel], list[str]]:
        ops, how = [], []
        for names, sl in zip(self.members, self.slices):
            op, h = block_operator(K, names, sl, self.chunk_size)
            ops.append(op)
            self.passes.add(op)
            how.append(h)
        return ops, how

    def ops(self) -> tuple[list[FactoredKernel], list[FactoredKernel] | None]:
        """K's block operators, and other's (the same list when other is K)."""
        if self._ops is None:
            ops, how = self._build(self.K)
            ops0 = ops if self.K0 is self.K else None if self.K0 is None else self._build(self.K0)[0]
            self.info["jvp_blocks"] = sorted(set(how))
            self._ops = ops, ops0
        return self._ops
