"""Named state axes: one vocabulary for every model family, and indexing by name.

A state ``z`` (the output whose NTK is taken) is a tensor whose axes carry names, so that
:mod:`ntkscope.metrics.structure` can trace over some and keep others:

* ``batch`` — the input sequences or samples,
* ``time`` — the step of a recurrence or the token position of a Transformer,
* ``hidden`` — features (hidden units, embedding channels, per-head channels),
* ``direction`` — the two directions of a bidirectional recurrent layer,
* ``layer`` — the layers of a recurrent stack, stacked,
* ``head`` — the attention heads of a Transformer layer,
* ``vocab`` — the logits of a language-model head.

Aliases (:data:`AXIS_ALIASES`): ``token``/``tokens``/``position``/``seq`` → ``time``,
``feature``/``features`` → ``hidden``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["BATCH", "TIME", "HIDDEN", "DIRECTION", "LAYER", "HEAD", "VOCAB", "AXIS_ALIASES", "canonical_axis", "select_axes"]

BATCH, TIME, HIDDEN, DIRECTION, LAYER, HEAD, VOCAB = "batch", "time", "hidden", "direction", "layer", "head", "vocab"

AXIS_ALIASES = {"token": TIME, "tokens": TIME, "position": TIME, "seq": TIME, "feature": HIDDEN, "features": HIDDEN}

Index = int | slice | Sequence[int] | torch.Tensor


def canonical_axis(name: str) -> str:
    """The vocabulary's name for ``name`` (an alias is resolved, any other name kept)."""
    return AXIS_ALIASES.get(name, name)


def select_axes(
    state: torch.Tensor, axes: Sequence[str], select: Mapping[str, Index] | None
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Index a state with named axes: ``{axis: int | slice | list of ints | index tensor}``.

    An int removes its axis; a slice or a list keeps it (shorter).  Returns the selected state
    and its remaining axis names.
    """
    axes = tuple(canonical_axis(a) for a in axes)
    if len(axes) != state.dim():
        raise ValueError(f"{len(axes)} axis names {axes} for a state of shape {tuple(state.shape)}")
    if not select:
        return state, axes
    chosen = {canonical_axis(k): v for k, v in select.items()}
    unknown = [k for k in chosen if k not in axes]
    if unknown:
        raise ValueError(f"unknown axes {unknown} in select=; the state's axes are {axes}")
    out, names = state, list(axes)
    for name, idx in chosen.items():
        d = names.index(name)
        size = out.shape[d]
        if isinstance(idx, bool):
            raise TypeError(f"select[{name!r}]: expected an int, slice or list of ints, got a bool")
        if isinstance(idx, int):
            if not -size <= idx < size:
                raise IndexError(f"select[{name!r}]={idx} is out of range for an axis of length {size}")
            out = out.select(d, idx)
            names.pop(d)
        elif isinstance(idx, slice):
            out = out[(slice(None),) * d + (idx,)]
        else:
            ix = torch.as_tensor(idx, dtype=torch.long, device=out.device).reshape(-1)
            if ix.numel() and (int(ix.max()) >= size or int(ix.min()) < -size):
                raise IndexError(f"select[{name!r}] holds indices out of range for an axis of length {size}")
            out = out.index_select(d, ix % size)
        if out.numel() == 0:
            raise ValueError(f"select[{name!r}] leaves an empty state")
    return out, tuple(names)
