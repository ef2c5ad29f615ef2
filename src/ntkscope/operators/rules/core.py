"""The mechanism: a primitive with batched-probe tangent and adjoint rules, inside ``torch.func``.

The NTK pushes a block of m probes through the model with ``vmap(jvp(f))`` (J·U) or
``vmap(vjp_fn)`` (Jᵀ·V).  ``torch.func`` handles every op of the user's code (the glue:
readouts, residuals, reshapes, indexing, tuple outputs) with its own batching rules; a
:class:`BatchedOp` is one primitive whose tangent and adjoint are written by hand for the whole
probe block at once, as large matrix products, where the generic batching of the module's own
kernels is slow (fused recurrent kernels, oneDNN gaps) or missing.

How it plugs in (``torch.autograd.Function`` with ``torch.func`` support):

* :class:`_Primal` computes the primal output once (the primal is never batched: probes only
  enter through tangents and cotangents) and keeps what the rules need in a :class:`_Saved`
  box, as plain tensors.
* its ``jvp`` calls :class:`_Tangent` and its ``backward`` calls :class:`_Adjoint`; under the
  probe ``vmap`` these two receive the physical probe block through their ``vmap``
  staticmethods (``in_dims`` says which tangents carry probes) and call
  :meth:`BatchedOp.tangent` / :meth:`BatchedOp.adjoint` with probes on a leading axis.
* outside ``vmap`` (one probe, or a Python loop over probes) the same rules run with m = 1.

A rule that meets a case it does not handle (a batched primal, a double backward) raises; the
NTK then falls back to the generic path, so nothing that works without rules stops working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["BatchedOp", "RuleUnsupported", "measure_probe_numel"]

_MEASURE: list[list[int]] = []  # open measurements of the rules' per-probe working set

#: no cap on the probes per chunk (see :meth:`BatchedOp.probe_cap`)
NO_CAP = 1 << 30


@contextlib.contextmanager
def measure_probe_numel() -> Iterator[list[int]]:
    """Sum, into ``box[0]`` of the yielded ``box``, the numbers per probe that the rules applied
    inside keep alive (their tangent/adjoint blocks), and keep in ``box[1]`` the smallest
    :meth:`BatchedOp.probe_cap`: the NTK sizes its probe chunks from both."""
    box = [0, NO_CAP]
    _MEASURE.append(box)
    try:
        yield box
    finally:
        _MEASURE.remove(box)


class RuleUnsupported(RuntimeError):
    """A rule met a case it does not handle; the evaluator falls back to the generic path."""


class _Saved:
    """What the primal pass left for the rules (plain tensors, outside torch.func's view)."""

    __slots__ = ("inputs", "state", "shapes")

    def __init__(self) -> None:
        self.inputs: tuple[torch.Tensor | None, ...] = ()
        self.state: Any = None
        self.shapes: tuple[torch.Size | None, ...] = ()


class BatchedOp:
    """A differentiable primitive whose J·u and Jᵀ·v are given for a whole block of probes.

    Subclasses implement:

    * ``primal(*inputs) -> (outputs, state)``: the forward on plain tensors (``outputs`` a tensor
      or a tuple of tensors; ``state`` anything the rules need: gates, activations);
    * ``tangent(inputs, state, tangents, m) -> outputs' tangents``: each tangent is ``None`` (zero)
      or a tensor with the probe index on a leading axis of size m, ``(m, *input.shape)``;
      returns ``(m, *output.shape)`` per output;
    * ``adjoint(inputs, state, cotangents, needs, m) -> input cotangents``: cotangents per output
      as ``(m, *output.shape)`` or ``None``; returns one ``(m, *input.shape)`` tensor or ``None``
      per input (``None`` where ``needs[i]`` is False).

    ``op(*inputs)`` applies it (inputs may include ``None`` for absent optional tensors).
    """

    name = "op"

    def primal(self, *inputs: torch.Tensor | None) -> tuple[Any, Any]:
        raise NotImplementedError

    def tangent(
        self, inputs: Sequence[torch.Tensor | None], state: Any, tangents: Sequence[torch.Tensor | None], m: int
    ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def adjoint(
        self,
        inputs: Sequence[torch.Tensor | None],
        state: Any,
        cotangents: Sequence[torch.Tensor | None],
        needs: Sequence[bool],
        m: int,
    ) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def probe_numel(self, inputs: Sequence[torch.Tensor | None], outputs: Sequence[torch.Tensor]) -> int:
        """Numbers per probe that the rules hold at once (default: a tangent of every input and
        output, twice)."""
        return 2 * (sum(x.numel() for x in inputs if x is not None) + sum(o.numel() for o in outputs))

    def probe_cap(self, inputs: Sequence[torch.Tensor | None]) -> int:
        """Most probes per chunk worth evaluating together (default: no cap).  Step-by-step rules
        cap it so that one step's probe block stays in cache."""
        return NO_CAP

    def __call__(self, *inputs: torch.Tensor | None) -> Any:
        saved = _Saved()
        out = _Primal.apply(self, saved, *inputs)
        if _MEASURE:
            n, cap = self.probe_numel(inputs, out), self.probe_cap(inputs)
            for box in _MEASURE:
                box[0] += n
                box[1] = min(box[1], cap)
        return out[0] if self._single else out

    _single = True  # one output (returned bare) or several (a tuple)


def _probe_major(t: torch.Tensor | None, d: int | None, m: int) -> torch.Tensor | None:
    """A tangent/cotangent as ``(m, ...)``: its probe axis moved first; an unbatched one is the
    same for every probe (expanded, or None when it is identically zero)."""
    if t is None:
        return None
    if d is not None:
        return t.movedim(d, 0)
    if not bool(t.any()):
        return None
    return t.expand(m, *t.shape)


class _Primal(torch.autograd.Function):
    @staticmethod
    def forward(op: BatchedOp, saved: _Saved, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        outs, state = op.primal(*inputs)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        saved.inputs = tuple(inputs)
        saved.state = state
        saved.shapes = tuple(None if x is None else x.shape for x in inputs)
        return outs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.op, ctx.saved = inputs[0], inputs[1]
        ctx.num_out = len(output)

    @staticmethod
    def jvp(ctx: Any, _op: Any, _saved: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return _Tangent.apply(ctx.op, ctx.saved, *tangents)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, *cotangents: torch.Tensor | None) -> tuple[Any, ...]:
        needs = tuple(ctx.needs_input_grad[2:])
        grads = _Adjoint.apply(ctx.op, ctx.saved, needs, *cotangents)
        return (None, None, *grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], op: BatchedOp, saved: _Saved, *inputs: Any) -> Any:
        raise RuleUnsupported(f"rule {op.name}: batched primal inputs (probes reach it only through tangents)")


class _Tangent(torch.autograd.Function):
    @staticmethod
    def forward(op: BatchedOp, saved: _Saved, *tangents: torch.Tensor | None) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ts = [None if t is None or not bool(t.any()) else t[None] for t in tangents]
        return tuple(o[0] for o in op.tangent(saved.inputs, saved.state, ts, 1))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], op: BatchedOp, saved: _Saved, *tangents: Any) -> Any:
        m = info.batch_size
        ts = [_probe_major(t, d, m) for t, d in zip(tangents, in_dims[2:])]
        outs = op.tangent(saved.inputs, saved.state, ts, m)
        return tuple(outs), tuple(0 for _ in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuleUnsupported("batched-probe rules have no second derivative")


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(op: BatchedOp, saved: _Saved, needs: tuple[bool, ...], *cotangents: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        cs = [None if c is None else c[None] for c in cotangents]
        grads = op.adjoint(saved.inputs, saved.state, cs, needs, 1)
        return tuple(None if g is None else g[0] for g in grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], op: BatchedOp, saved: _Saved, needs: tuple[bool, ...], *cotangents: Any) -> Any:
        m = info.batch_size
        cs = [_probe_major(c, d, m) for c, d in zip(cotangents, in_dims[3:])]
        grads = op.adjoint(saved.inputs, saved.state, cs, needs, m)
        return tuple(grads), tuple(None if g is None else 0 for g in grads)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuleUnsupported("batched-probe rules have no second derivative")
