"""Hutchinson's estimator on one or several kernels at once (two-sided: a VJP and a JVP per probe).

Per probe v it records ``g = Gram([v, K₁v, …, K_kv])`` so that ``E g[0, a] = tr K_a`` and
``E g[a, b] = tr(K_a K_b)``: trace, squared Frobenius norm and alignment numerators all come from
the same products.  Reference: Hutchinson (1989); Avron & Toledo (2011).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.executor import map_probes
from ..core.probes import ProbeStream
from ..operators.base import KernelOperator
from .products import chunk_of, gram_rows


def hutchinson_grams(ops: Sequence[KernelOperator], stream: ProbeStream, m: int, chunk_size: int | None = None) -> torch.Tensor:
    """Hutchinson: per probe v, ``Gram([v, K₁v, …])`` → ``(m, k+1, k+1)``.

    ``mean[:, 0, a]`` is unbiased for ``tr K_a`` and ``mean[:, a, b]`` for ``tr(K_a K_b)``
    (a, b ≥ 1): one matvec per operator per probe (2 AD passes for an NTK: a VJP, then a JVP).

    Variance of one sample ``vᵀKv``: ``2(‖K‖_F² − Σᵢ Kᵢᵢ²)`` for Rademacher probes,
    ``2‖K‖_F²`` for Gaussian ones, so the mean of m has error ``O(‖K‖_F/√m)`` (Hutchinson 1989;
    Avron & Toledo 2011).  For an NTK with Rademacher probes ``vᵀKv = ‖Jᵀv‖²``: the trace
    samples equal the one-sided VJP samples of the same probes, at twice the cost.
    """

    def fn(s: int, e: int) -> torch.Tensor:
        V = stream.columns(s, e)
        products: dict[int, torch.Tensor] = {}  # a kernel passed twice (K against itself) is multiplied once

        def product(op: KernelOperator) -> torch.Tensor:
            if id(op) not in products:
                products[id(op)] = op.matmat(V)
            return products[id(op)]

        return gram_rows([V, *(product(op) for op in ops)])

    return map_probes(m, chunk_of(ops, chunk_size), fn)


