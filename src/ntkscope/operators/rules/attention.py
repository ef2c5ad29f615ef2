"""Rule for ``nn.MultiheadAttention``: its input projections as 2-D matrix products.

``F.multi_head_attention_forward`` projects a ``(L, N, E)`` query with a 3-D ``linear``.  Under
``vmap`` over weight tangents (J·u) that is a matmul of an unbatched or batched 3-D input with a
batched weight, which PyTorch evaluates by expanding the weight over L — an ``(m, L, E, 3E)``
copy and m·L tiny GEMMs; in the 2-layer encoder of ``benchmarks/engine.py`` it was 60 % of the
JVP side.  The rule runs the module's own forward (every mask, layout and option as PyTorch
handles them) with ``F.multi_head_attention_forward`` wrapped for the call: the wrapper projects
query, key and value as ``(L·N, E)`` matrices (one GEMM per probe block) and hands the results to
the original function with identity projection weights, which reproduce them exactly
(``x·1 + Σ 0 = x``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mha_forward"]

_ORIGINAL = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(_ORIGINAL)
_LOCK = threading.RLock()


def _linear_2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[0])


def _projected(*args: Any, **kwargs: Any) -> Any:
    a = _SIGNATURE.bind(*args, **kwargs).arguments
    if a.get("use_separate_proj_weight", False):
        ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        ws = tuple(a["in_proj_weight"].chunk(3))
    bias = a.get("in_proj_bias")
    bs = (None, None, None) if bias is None else tuple(bias.chunk(3))
    q, k, v = (_linear_2d(x, w, b) for x, w, b in zip((a["query"], a["key"], a["value"]), ws, bs))
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    a.update(query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None, use_separate_proj_weight=True)
    a.update(q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    return _ORIGINAL(**a)


@contextlib.contextmanager
def _projecting() -> Iterator[None]:
    with _LOCK:  # the module attribute is process-wide: one analysis at a time swaps it
        F.multi_head_attention_forward = _projected
        try:
            yield
        finally:
            F.multi_head_attention_forward = _ORIGINAL


def mha_forward(module: nn.MultiheadAttention, original: Any, *args: Any, **kwargs: Any) -> Any:
    """``nn.MultiheadAttention.forward`` with 2-D input projections (the rule)."""
    if F.multi_head_attention_forward is not _ORIGINAL:  # someone else's wrapper: leave it be
        return original(*args, **kwargs)
    with _projecting():
        return original(*args, **kwargs)
