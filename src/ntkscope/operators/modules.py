"""Module plumbing: which parameters, which inputs, which output, and a safe analysis copy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .rules import shared_copy


def _select_params(
    model: nn.Module, params: Mapping[str, torch.Tensor] | Iterable[str | torch.Tensor] | None
) -> tuple[list[str], list[torch.Tensor], dict[str, torch.Tensor]]:
    named = dict(model.named_parameters())  # tied parameters appear once
    overrides: dict[str, torch.Tensor] = {}
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif isinstance(params, Mapping):
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(named)[:8]}...")
        names = list(params)
        for n in names:
            v = params[n]
            if not isinstance(v, torch.Tensor) or v.shape != named[n].shape:
                raise ValueError(f"parameter {n!r}: expected a tensor of shape {tuple(named[n].shape)}")
            overrides[n] = v.detach()
    else:
        by_id = {id(p): n for n, p in named.items()}
        names = []
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"unknown parameter name {item!r}")
                names.append(item)
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                names.append(by_id[id(item)])
            else:
                raise ValueError("params must hold parameter names or the model's own parameters")
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); pass params= to choose some"
        )
    primals = [overrides.get(n, named[n].detach()) for n in names]
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    return names, primals, fixed


def _analysis_module(model: nn.Module) -> nn.Module:
    """The model itself, or a shallow copy whose train-mode norm layers keep no running stats.

    A train-mode BatchNorm normalises with batch statistics and updates its running stats in
    place; torch.func cannot trace the in-place update, and the user's buffers must not move.
    The copy shares every parameter and buffer tensor (no memory) and only rebinds attributes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    if not norms:
        return model
    clone = shared_copy(model)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.track_running_stats = False
    return clone


def _check_no_dropout(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}, p={m.p}) is random in training "
                "mode, so the NTK is not defined: call model.eval() (or set p=0) first"
            )
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase,)) and m.training and m.dropout > 0 and m.num_layers > 1:
            raise ValueError(f"{name or type(model).__name__}: recurrent dropout is active; call model.eval() first")


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _check_finite_inputs(inputs: Any) -> None:
    for t in _tensors(inputs):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError("inputs contain non-finite values (nan or inf)")


def _describe_inputs(inputs: Any) -> str:
    shapes = [tuple(t.shape) for t in _tensors(inputs)]
    return "input shapes " + ", ".join(map(str, shapes)) if shapes else f"inputs of type {type(inputs).__name__}"


def _inputs_equal(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    return all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta, tb))


def _select_output(out: Any, output: int | str | Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        raise ValueError(
            f"the model returned a {type(out).__name__}, not a tensor: pass output= (an index, a key or "
            "attribute name, or a callable) to choose the state, e.g. output=0 for the output sequence of nn.GRU"
        )
    if callable(output):
        return output(out)
    if isinstance(output, int):
        return out[output]
    if isinstance(out, Mapping):
        return out[output]
    return getattr(out, output)
