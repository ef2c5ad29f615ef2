"""Named state axes of a kernel, and state vectors split into blocks over some of them.

A kernel's state (``D`` entries) is a tensor with named axes, e.g. ``("time", "batch",
"hidden")`` for a recurrent trajectory.  Keeping some axes splits the state into
``G = Π kept sizes`` blocks of ``R = D / G`` entries (the other axes, traced over): the layout
:func:`ntkscope.metrics.structure.structure` estimates block statistics over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..operators.base import FactoredKernel

__all__ = ["resolve_axes", "keep_index", "to_blocks", "from_blocks"]


def resolve_axes(
    K: FactoredKernel, axes: Sequence[str] | None, shape: Sequence[int] | None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The state's axis names and sizes: ``axes``/``shape`` if given, else ``K.axes``/``K.state_shape``."""
    shp = tuple(int(s) for s in (shape if shape is not None else getattr(K, "state_shape", (K.dim,))))
    names = tuple(axes) if axes is not None else tuple(getattr(K, "axes", ()))
    if not names:
        raise ValueError("the kernel's state axes have no names: pass axes=(...) (and shape=(...) if needed)")
    if len(names) != len(shp) or len(set(names)) != len(names):
        raise ValueError(f"axes {names} must be distinct names, one per state axis of shape {shp}")
    if math.prod(shp) != K.dim:
        raise ValueError(f"shape {shp} has {math.prod(shp)} entries but the kernel's state has {K.dim}")
    return names, shp


def keep_index(names: tuple[str, ...], keep: str | Sequence[str]) -> list[int]:
    """Positions of the ``keep`` axes among ``names``, in ``keep``'s order."""
    ks = [keep] if isinstance(keep, str) else list(keep)
    bad = [k for k in ks if k not in names]
    if bad:
        raise ValueError(f"unknown axes {bad}; the state axes are {list(names)}")
    return [names.index(k) for k in ks]


def to_blocks(rows: torch.Tensor, shape: tuple[int, ...], keep_idx: list[int]) -> torch.Tensor:
    """``(m, D)`` state vectors → ``(m, G, R)``: kept axes first (row-major), the rest after."""
    m = rows.shape[0]
    x = rows.reshape(m, *shape)
    rest = [i for i in range(len(shape)) if i not in keep_idx]
    x = x.permute(0, *(1 + i for i in keep_idx), *(1 + i for i in rest))
    G = math.prod(shape[i] for i in keep_idx)
    return x.reshape(m, G, -1)


def from_blocks(block_rows: torch.Tensor, shape: tuple[int, ...], keep_idx: list[int]) -> torch.Tensor:
    """Inverse of :func:`to_blocks` for ``(m, G, R)`` → ``(m, D)``."""
    m = block_rows.shape[0]
    rest = [i for i in range(len(shape)) if i not in keep_idx]
    order = keep_idx + rest
    x = block_rows.reshape(m, *(shape[i] for i in order))
    inv = [order.index(i) for i in range(len(shape))]
    return x.permute(0, *(1 + i for i in inv)).reshape(m, -1)
