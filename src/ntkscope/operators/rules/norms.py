"""Normalisation layers as elementary operations, for second derivatives of NTK statistics.

``torch.func`` gets the *first* derivatives of the fused normalisation kernels right (every NTK
estimate uses only those), but not the derivatives of their derivatives that a loss on NTK
statistics differentiates (:mod:`ntkscope.differentiable`), measured against finite differences
in float64 with torch 2.13:

* reverse over ``vmap``-ed reverse mode (the VJP side's rows ``Jᵀw_i``): wrong for
  ``layer_norm``, ``instance_norm`` and ``batch_norm`` with batch statistics (a Python loop
  over probes is right);
* reverse over forward mode (the JVP side's rows ``Ju_i``): wrong for the same three, with or
  without ``vmap``.

``group_norm`` and everything written with elementary operations are right.  Inside
:func:`elementary_norms` the three functions (and ``rms_norm``) run as means, subtractions and
``rsqrt`` — the same values to rounding, whose derivatives of every order ``torch.func`` gets
right.  Running statistics are read, never updated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["elementary_norms"]

_LOW = (torch.float16, torch.bfloat16)  # normalised in float32, as the fused kernels do


def _normalise(x: torch.Tensor, dims: Sequence[int] | None, mean: torch.Tensor | None, var: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``(x − mean) / √(var + eps)``: the batch's own statistics over ``dims``, or the given ones."""
    if dims is not None:
        xc = x - x.mean(tuple(dims), keepdim=True)
        return xc * torch.rsqrt(xc.square().mean(tuple(dims), keepdim=True) + eps)
    assert mean is not None and var is not None
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple[int, ...] | None, dtype: torch.dtype) -> torch.Tensor:
    if weight is not None:
        y = y * (weight if shape is None else weight.reshape(shape))
    if bias is not None:
        y = y + (bias if shape is None else bias.reshape(shape))
    return y.to(dtype)


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW else x


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def layer_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    dims = range(-len(normalized_shape), 0)
    return _affine(_normalise(_up(input), dims, None, None, eps), weight, bias, None, input.dtype)


def rms_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    x = _up(input)
    dims = tuple(range(-len(normalized_shape), 0))
    e = torch.finfo(input.dtype).eps if eps is None else eps
    return _affine(x * torch.rsqrt(x.square().mean(dims, keepdim=True) + e), weight, None, None, input.dtype)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        if input.numel() // input.shape[1] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        y = _normalise(_up(input), [0, *range(2, input.dim())], None, None, eps)
    else:
        y = _normalise(_up(input), None, running_mean.reshape(shape), running_var.reshape(shape), eps)
    return _affine(y, weight, bias, shape, input.dtype)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    shape = _channel_shape(input)
    if use_input_stats or running_mean is None or running_var is None:
        y = _normalise(_up(input), range(2, input.dim()), None, None, eps)
    else:
        y = _normalise(_up(input), None, running_mean.reshape(shape), running_var.reshape(shape), eps)
    return _affine(y, weight, bias, shape, input.dtype)


_ELEMENTARY: dict[Any, Any] = {F.layer_norm: layer_norm, F.batch_norm: batch_norm, F.instance_norm: instance_norm}
if hasattr(F, "rms_norm"):
    _ELEMENTARY[F.rms_norm] = rms_norm


class _Elementary(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        replacement = _ELEMENTARY.get(func)
        return (replacement or func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def elementary_norms() -> Iterator[None]:
    """Run ``layer_norm``, ``batch_norm``, ``instance_norm`` and ``rms_norm`` (functional or as
    modules) as elementary operations for the duration of a forward (see the module docstring)."""
    with _Elementary():
        yield
