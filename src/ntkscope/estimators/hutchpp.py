"""Hutch++: a range-finding sketch handled exactly, Hutchinson on the deflated rest.

Reference: Meyer, Musco, Musco, Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.executor import map_probes
from ..core.probes import ProbeStream, Stream
from ..operators.base import KernelOperator
from .hutchinson import hutchinson_grams
from .products import chunk_of, gram_rows


@dataclass
class HutchppResult:
    exact: torch.Tensor  # (k+1, k+1): the sketch-space part, deterministic given the sketch
    residual: torch.Tensor  # (r, k+1, k+1): Hutchinson grams of the deflated probes
    sketch_size: int


def hutchpp_split(m: int, num_ops: int = 1) -> tuple[int, int]:
    """Hutch++'s budget split for m matvecs per operator: (sketch columns, residual probes).

    Thirds (Meyer et al.): ``q = m // 3`` sketch columns (shared out among the operators),
    ``q`` exact products with the basis, ``r = m − q − q`` residual probes — every matvec of the
    budget used, none wasted, whatever m.  Below 3 it is plain Hutchinson.
    """
    q = m // 3
    if q < num_ops:
        return 0, m
    share = q // num_ops
    q = share * num_ops
    return q, m - share - q


def hutchpp_grams(ops: Sequence[KernelOperator], stream: ProbeStream, m: int, chunk_size: int | None = None) -> HutchppResult:
    """Hutch++ for ``tr K_a`` and ``tr(K_a K_b)`` at once.

    Sketch Y = [K₁S₁, …] (q columns in all), Q = orth(Y); exact part ``Σ Gram([q, K₁q, …])``
    over Q's columns; residual: Hutchinson on the deflated probes ``(I − QQᵀ)g``.  Unbiased:
    ``tr(K_a K_b) = tr(Qᵀ K_a K_b Q) + tr(P⊥ K_a K_b P⊥)`` for any orthonormal Q.

    Cost: m matvecs per operator (:func:`hutchpp_split`; 2 AD passes each for an NTK).  Only
    the residual is random: its variance is ``2‖P⊥KP⊥‖_F²/r`` (Gaussian probes), and for PSD K
    ``‖K − QQᵀK‖_F ≤ O(1/√q)·tr K`` in expectation, so the relative error is ``O(1/m)``
    instead of Hutchinson's ``O(1/√m)`` (Meyer, Musco, Musco, Woodruff 2021, Thm. 1); the
    estimate is exact once Q spans K's range (a low-rank kernel).
    """
    k = len(ops)
    q, r = hutchpp_split(m, k)
    chunk = chunk_of(ops, chunk_size)
    if q == 0:
        return HutchppResult(torch.zeros(k + 1, k + 1, dtype=torch.float64), hutchinson_grams(ops, stream, m, chunk), 0)
    share = q // k
    sketch = stream.child(Stream.SKETCH)

    def sketch_rows(a: int) -> torch.Tensor:
        # operator a sketches its own columns [a*share, (a+1)*share) of the sketch stream
        def fn(s: int, e: int) -> torch.Tensor:
            return ops[a].matmat(sketch.columns(a * share + s, a * share + e)).T

        return map_probes(share, chunk, fn)

    Y = torch.cat([sketch_rows(a) for a in range(k)], 0).T
    Q, _ = torch.linalg.qr(Y.to(torch.float64))
    Q = Q.to(ops[0].dtype)

    def exact_fn(s: int, e: int) -> torch.Tensor:
        B = Q[:, s:e]
        return gram_rows([B, *(op.matmat(B) for op in ops)])

    exact = map_probes(Q.shape[1], chunk, exact_fn).sum(0)
    resid_stream = stream.child(Stream.RESIDUAL)
    Qd = Q.to(torch.float64)

    def resid_fn(s: int, e: int) -> torch.Tensor:
        G = resid_stream.columns(s, e).to(torch.float64)
        G = (G - Qd @ (Qd.T @ G)).to(ops[0].dtype)
        return gram_rows([G, *(op.matmat(G) for op in ops)])

    residual = map_probes(r, chunk, resid_fn) if r > 0 else torch.zeros(0, k + 1, k + 1, dtype=torch.float64)
    return HutchppResult(exact, residual, Q.shape[1])


