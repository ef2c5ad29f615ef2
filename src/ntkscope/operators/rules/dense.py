"""Rules for dense layers: ``nn.Linear`` (any leading shape).

For ``a = x Wᵀ + b`` with the probes on a leading axis (the per-example-gradient trick of
Goodfellow 2015, "Efficient per-example gradient computations", as in BackPACK and Opacus):

    tangent:  da = dx Wᵀ + x dWᵀ + db       (every probe's dW in one GEMM: (m·out, in) @ (in, N))
    adjoint:  dx = g W,  dW = gᵀ x,  db = Σ_n g
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .core import BatchedOp

__all__ = ["LinearOp", "LINEAR"]


class LinearOp(BatchedOp):
    name = "linear"

    def primal(self, *inputs: torch.Tensor | None) -> tuple[Any, Any]:
        x, W, b = inputs
        assert x is not None and W is not None
        return F.linear(x, W, b), None

    def tangent(self, inputs: Sequence[torch.Tensor | None], state: Any, tangents: Sequence[torch.Tensor | None], m: int) -> tuple[torch.Tensor, ...]:
        x, W, _ = inputs
        dx, dW, db = tangents
        assert x is not None and W is not None
        d_out, d_in = W.shape
        x2 = x.reshape(-1, d_in)
        n = x2.shape[0]
        out: torch.Tensor | None = None
        if dx is not None:
            out = dx.reshape(m, n, d_in) @ W.T  # one GEMM over (m·n, in)
        if dW is not None:
            t = torch.matmul(dW, x2.T).transpose(1, 2)  # one GEMM over (m·out, in)
            out = t.contiguous() if out is None else out.add_(t)
        if db is not None:
            out = db[:, None, :].expand(m, n, d_out).clone() if out is None else out.add_(db[:, None, :])
        if out is None:
            out = x.new_zeros(m, n, d_out)
        return (out.view(m, *x.shape[:-1], d_out),)

    def adjoint(
        self,
        inputs: Sequence[torch.Tensor | None],
        state: Any,
        cotangents: Sequence[torch.Tensor | None],
        needs: Sequence[bool],
        m: int,
    ) -> tuple[torch.Tensor | None, ...]:
        x, W, b = inputs
        (g,) = cotangents
        assert x is not None and W is not None
        d_out, d_in = W.shape
        if g is None:
            return tuple(None if not n or t is None else t.new_zeros(m, *t.shape) for n, t in zip(needs, inputs))
        g2 = g.reshape(m, -1, d_out)
        gx = (g2 @ W).view(m, *x.shape) if needs[0] else None
        gW = torch.matmul(g2.transpose(1, 2), x.reshape(-1, d_in)) if needs[1] else None
        gb = g2.sum(1) if b is not None and needs[2] else None
        return gx, gW, gb


LINEAR = LinearOp()
