"""Module plumbing: which parameters, which inputs, which output, a safe analysis copy, and
what a forward saves for backward (the activations that size a chunk of probes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .evaluators import quiet
from .rules import shared_copy

__all__ = [
    "select_params",
    "analysis_module",
    "detached",
    "check_no_dropout",
    "split_inputs",
    "tensors",
    "check_finite_inputs",
    "describe_inputs",
    "inputs_equal",
    "select_output",
    "SavedActivations",
    "saved_activations",
]


def select_params(
    model: nn.Module, params: Mapping[str, torch.Tensor] | Iterable[str | torch.Tensor] | None
) -> tuple[list[str], list[torch.Tensor], dict[str, torch.Tensor]]:
    """The parameters to differentiate: ``(names, primals, fixed)``.

    ``params``: ``None`` (every parameter with ``requires_grad``), an iterable of names or of the
    model's own parameters, or a dict ``name -> tensor`` whose values replace the model's.
    ``primals`` are detached values in ``names`` order; ``fixed`` the other parameters, detached.
    Tied parameters appear once.
    """
    named = dict(model.named_parameters())  # tied parameters appear once
    # a tied parameter's other names (``out.weight`` tied to ``emb.weight``) mean its first one
    canonical = {id(p): n for n, p in named.items()}
    alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    overrides: dict[str, torch.Tensor] = {}
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif isinstance(params, Mapping):
        unknown = [n for n in params if n not in alias]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(named)[:8]}...")
        given = {alias[n]: v for n, v in params.items()}
        names = list(given)
        for n in names:
            v = given[n]
            if not isinstance(v, torch.Tensor) or v.shape != named[n].shape:
                raise ValueError(f"parameter {n!r}: expected a tensor of shape {tuple(named[n].shape)}")
            overrides[n] = v.detach()
    else:
        by_id = {id(p): n for n, p in named.items()}
        names = []
        for item in params:
            if isinstance(item, str):
                if item not in alias:
                    raise ValueError(f"unknown parameter name {item!r}; the model has {list(named)[:8]}...")
                names.append(alias[item])
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


def detached(inputs: Any) -> Any:
    """``inputs`` with every tensor in (nested) tuples, lists and dicts detached: the NTK is
    taken with respect to parameters, and results must not carry a graph back to the inputs."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, inputs)


def unwrap_parallel(model: nn.Module, *named: Any) -> tuple[Any, ...]:
    """``model``'s ``.module`` when it is a ``DistributedDataParallel`` or ``DataParallel``
    wrapper, with the ``module.`` prefix taken off the names in ``named`` (dicts keyed by
    parameter or buffer name, or iterables of names; ``None`` and tensors pass through).

    The wrappers only move data and gradients between processes or devices: their kernel is the
    wrapped module's, and their forward cannot be analysed (DDP synchronises buffers in place, a
    write torch.func refuses; DataParallel refuses the stateless API)."""
    if not isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return (model, *named)

    def strip(n: Any) -> Any:
        return n[len("module.") :] if isinstance(n, str) and n.startswith("module.") else n

    out: list[Any] = []
    for obj in named:
        if isinstance(obj, Mapping):
            obj = {strip(k): v for k, v in obj.items()}
        elif obj is not None and not isinstance(obj, torch.Tensor) and not isinstance(obj, str):
            obj = [strip(x) for x in obj]
        out.append(obj)
    return (model.module, *out)


def analysis_module(model: nn.Module, *, eval_mode: bool = False) -> nn.Module:
    """The module an analysis runs instead of ``model``: a shallow copy (:func:`~ntkscope.operators.rules.shared_copy`)
    that shares every parameter and buffer tensor (no memory) and only rebinds attributes.

    * ``eval_mode=False`` (:class:`~ntkscope.operators.NTK`): train-mode norm layers normalise with
      batch statistics but keep no running stats — a train-mode BatchNorm updates them in place,
      which ``torch.func`` cannot trace and which must not move the user's buffers.
    * ``eval_mode=True`` (:func:`~ntkscope.models.transformer.transformer_ntk`): the copy in
      eval mode (dropout off).
    * a module registered under two names (``self.a = self.b = lin``): a copy too, since
      ``functional_call`` on the model itself rebinds and restores its parameters through both
      names and left plain tensors where its Parameters were (an optimizer built before then
      no longer trained that layer).

    Otherwise the model itself is returned (the analysis sees later changes to its attributes,
    as a plain ``functional_call`` would).  The model itself, its mode and its hooks are never
    changed.
    """
    aliased = len(list(model.named_modules(remove_duplicate=False))) != len(list(model.named_modules()))
    if not eval_mode and not aliased and not any(_updates_running_stats(m) for m in model.modules()):
        return model
    try:
        clone = shared_copy(model)
    except Exception as e:  # a module holding something that cannot be copied
        hint = ""
        if "deepcopy protocol" in str(e):  # a computed (non-leaf) tensor stored on a module
            hint = "; old-style torch.nn.utils.weight_norm stores one: use torch.nn.utils.parametrizations.weight_norm"
        raise TypeError(f"cannot make an analysis copy of {type(model).__name__} ({e}){hint}") from e
    if eval_mode:
        return clone.eval()
    for m in clone.modules():
        if _updates_running_stats(m):
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.track_running_stats = False
    return clone


def _updates_running_stats(m: nn.Module) -> TypeGuard[nn.modules.batchnorm._NormBase]:
    return isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats


def check_no_dropout(model: nn.Module) -> None:
    """Refuse a model with active dropout: the NTK of a random map is not defined."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}, p={m.p}) is random in training "
                "mode, so the NTK is not defined: call model.eval() (or set p=0) first"
            )
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase,)) and m.training and m.dropout > 0 and m.num_layers > 1:
            raise ValueError(f"{name or type(model).__name__}: recurrent dropout is active; call model.eval() first")
        # parametrizations.spectral_norm runs a power-iteration step in every training-mode forward,
        # writing its vectors in place: two passes see different weights (and the user's buffers move)
        if type(m).__name__ == "_SpectralNorm" and m.training:
            raise ValueError(
                f"{name}: spectral_norm in training mode updates its power-iteration vectors on every forward, so the "
                "map is not fixed and its NTK is not defined: call model.eval() first"
            )


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a model call: a dict is keyword arguments, a tuple or list the
    positional ones, anything else the one positional argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (nested dicts, tuples and lists), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors(v)]
    return []


def check_finite_inputs(inputs: Any) -> None:
    """Refuse floating-point inputs holding nan or inf."""
    for t in tensors(inputs):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError("inputs contain non-finite values (nan or inf)")


def describe_inputs(inputs: Any) -> str:
    """The inputs' shapes, for error messages."""
    shapes = [tuple(t.shape) for t in tensors(inputs)]
    return "input shapes " + ", ".join(map(str, shapes)) if shapes else f"inputs of type {type(inputs).__name__}"


def inputs_equal(a: Any, b: Any) -> bool:
    """Whether two inputs hold the same tensors (shapes and values)."""
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb):
        return False
    return all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta, tb))


class OutputError(ValueError):
    """``output=`` does not fit what the model returned (raised as it is, never blamed on the inputs)."""


def select_output(out: Any, output: int | str | Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    """The state in a model's return value: ``out`` itself (``output=None``, it must be a
    tensor), an index, a key or attribute name, or ``output(out)``."""
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        raise OutputError(
            f"the model returned a {type(out).__name__}, not a tensor: pass output= (an index, a key or "
            "attribute name, or a callable) to choose the state, e.g. output=0 for the output sequence of nn.GRU"
        )
    if callable(output):
        return output(out)
    if isinstance(output, int):
        if isinstance(out, torch.Tensor):  # out[0] would silently be the first sample
            raise OutputError(
                f"output={output} indexes a tuple or list the model returns, but it returned one tensor of shape "
                f"{tuple(out.shape)}: leave output unset to use all of it (or pass a callable, e.g. lambda out: out[{output}])"
            )
        if isinstance(out, Mapping):
            raise OutputError(f"output={output} indexes a tuple or list, but the model returned a mapping with keys {list(out)}")
        if not isinstance(out, (tuple, list)):
            raise OutputError(f"output={output} indexes a tuple or list, but the model returned a {type(out).__name__}")
        if not -len(out) <= output < len(out):
            raise OutputError(f"output={output}: the model returned a {type(out).__name__} of {len(out)} items")
        return out[output]
    if isinstance(out, Mapping):
        if output not in out:
            raise OutputError(f"output={output!r} is not a key of the model's return value; its keys are {list(out)}")
        return out[output]
    if not hasattr(out, output):
        raise OutputError(f"output={output!r}: the model's {type(out).__name__} return value has no such attribute")
    return getattr(out, output)


@dataclass(frozen=True)
class SavedActivations:
    """What one forward pass saves for backward, parameters excluded.

    Attributes:
        numel: numbers in the distinct saved tensors — the size of the tangents or cotangents
            one probe's pass carries through them.
        nbytes: bytes of the distinct storages those tensors keep alive — the memory the
            forward holds until its backward has run (a saved view keeps its whole storage).
        largest_unfold: numbers in the largest unfolded input of a convolution (every output
            position times ``C_in · ∏kernel``): with per-probe weights, a convolution unfolds
            (im2col) its input once per probe, the largest block one probe's pass allocates.
    """

    numel: int
    nbytes: int
    largest_unfold: int = 0


class _WatchConvolutions(TorchDispatchMode):
    """Records the largest unfolded input of the convolutions it sees run (it changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_unfold = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and isinstance(out, torch.Tensor) and out.dim() > 2:
            weight, groups = args[1], args[8]
            columns = weight.shape[1] * math.prod(weight.shape[2:]) * groups  # C_in · ∏kernel
            self.largest_unfold = max(self.largest_unfold, out.numel() // out.shape[1] * columns)
        return out


class ParameterWrite(Exception):
    """Raised by :class:`RefuseWrites` before an operation writes into a watched tensor."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class RefuseWrites(TorchDispatchMode):
    """Raises :class:`ParameterWrite` *before* any operation writes into the storage of one of
    ``watched`` (name -> tensor): an in-place op, an ``out=`` argument (the schema marks both).
    ``nn.Embedding(max_norm=...)`` renormalises its rows in place on every forward, which would
    otherwise write through the analysis's detached views into the user's parameters."""

    def __init__(self, watched: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr(): n for n, t in watched.items() if t.numel()}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            t = args[i] if i < len(args) else kwargs.get(a.name)
            if isinstance(t, torch.Tensor):
                try:
                    name = self.storages.get(t.untyped_storage().data_ptr())
                except RuntimeError:  # a tensor without storage
                    continue
                if name is not None:
                    raise ParameterWrite(name)
        return func(*args, **kwargs)


def _never_unpacked(_: Any) -> torch.Tensor:
    raise RuntimeError("saved_activations measures a forward; nothing may run its backward")


def saved_activations(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor]) -> SavedActivations:
    """Measure the activations of one forward ``fn(*primals)`` with ``saved_tensors_hooks``.

    The primals become leaves that require grad, so every operation records what its backward
    needs; tensors (or storages) of the primals themselves are not counted.  The user's random
    stream is not advanced.  Tensors without storage (some wrapper subclasses) are skipped.
    """
    param_ptrs = {p.data_ptr() for p in primals}
    param_storages = {p.untyped_storage().data_ptr() for p in primals}
    seen_ptrs: set[int] = set()
    seen_storages: set[int] = set()
    numel = nbytes = 0

    def pack(t: torch.Tensor) -> None:
        # keeps nothing: no backward runs, and a kept output (tanh saves its own) would tie the
        # tensor to its own grad_fn in a cycle the garbage collector cannot see (a leak per NTK)
        nonlocal numel, nbytes
        try:
            ptr = t.data_ptr()
        except RuntimeError:
            return None
        if ptr not in param_ptrs and ptr not in seen_ptrs:
            seen_ptrs.add(ptr)
            numel += t.numel()
        try:
            storage = t.untyped_storage()
        except RuntimeError:
            return None
        key = storage.data_ptr()
        if key not in param_storages and key not in seen_storages:
            seen_storages.add(key)
            nbytes += storage.nbytes()
        return None

    leaves = [p.detach().requires_grad_() for p in primals]
    watch = _WatchConvolutions()
    with torch.enable_grad(), quiet(), torch.random.fork_rng(devices=[]):
        with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked), watch:
            fn(*leaves)
    return SavedActivations(numel, nbytes, watch.largest_unfold)
