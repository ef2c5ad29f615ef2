"""The model-spec contract: what the command line's ``--model`` names, loaded and checked.

A *model spec* is ``builtin:NAME`` (see :data:`BUILTINS`) or ``path/to/file.py:factory``.  A
factory is a function of no arguments that returns either a tuple
``(model, inputs[, targets[, output]])`` or a dict with keys ``model``, ``inputs`` and optionally
``targets`` and ``output``:

* ``model``: an ``nn.Module`` (no dropout; eval-mode is not required);
* ``inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments;
* ``targets``: the state's shape (or class labels, one-hot encoded over the last state axis);
  needed for ``target_alignment`` and for training in ``ntkscope track``;
* ``output``: which part of the model's return value is the state (an index, a key or a
  callable), as for :class:`ntkscope.NTK`.

:func:`load_spec` raises :class:`SpecError` for a spec that cannot be used and
:class:`UserCodeError` (with the traceback of the user's code only) when the user's file raises.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import tasks

__all__ = ["BUILTINS", "Spec", "SpecError", "UserCodeError", "load_spec"]


class SpecError(ValueError):
    """A ``--model`` spec that cannot be used (missing file, unknown name, wrong return value)."""


class UserCodeError(RuntimeError):
    """The user's file raised; ``user_traceback`` holds the traceback restricted to their code."""

    def __init__(self, message: str, user_traceback: str) -> None:
        super().__init__(message)
        self.user_traceback = user_traceback


@dataclass
class Spec:
    """A model with the inputs its NTK is measured on, and optional targets and output picker."""

    model: nn.Module
    inputs: Any
    targets: torch.Tensor | None = None
    output: Any = None
    name: str = ""
    description: str = ""
    #: Training data if different from ``inputs``/``targets`` (the built-ins train on more data).
    train_inputs: Any = None
    train_targets: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- built-ins -------------------------------------------------------------------------------


def _mlp_digits(seed: int = 0) -> Spec:
    X, y, _, _ = tasks.digits(400, seed=seed)
    model = tasks.mlp([64, 32, 10], seed=seed)
    return Spec(
        model, X[:100], y[:100], name="mlp-digits", description="MLP 64-32-10 (tanh) on sklearn digits, 100 images",
        train_inputs=X, train_targets=y,
    )  # fmt: skip


def _gru_flipflop(seed: int = 0) -> Spec:
    Xtr, ytr = tasks.flipflop(64, 20, 3, p=0.1, seed=seed)
    X, y = tasks.flipflop(8, 20, 3, p=0.1, seed=seed + 1000)
    model = tasks.RecurrentRegressor("gru", 3, 32, 3, seed=seed)
    return Spec(
        model, X, y, name="gru-flipflop", description="GRU(3→32)+readout on 3-bit flip-flop, 8 sequences × 20 steps",
        train_inputs=Xtr, train_targets=ytr,
    )  # fmt: skip


def _gru_digits(seed: int = 0) -> Spec:
    X, y, _, _ = tasks.sequential_digits(400, seed=seed)
    model = tasks.RecurrentClassifier("gru", 8, 32, 10, seed=seed)
    return Spec(
        model, X[:64], y[:64], name="gru-digits", description="GRU(8→32)+readout on digits read row by row, 64 images",
        train_inputs=X, train_targets=y,
    )  # fmt: skip


#: Built-in models: ``builtin:NAME`` on the command line.
BUILTINS: dict[str, Callable[..., Spec]] = {
    "mlp-digits": _mlp_digits,
    "gru-flipflop": _gru_flipflop,
    "gru-digits": _gru_digits,
}


# -- user files --------------------------------------------------------------------------------


def _user_traceback(exc: BaseException, path: Path) -> str:
    """The traceback of ``exc`` with our frames and importlib's dropped: only the user's code."""
    te = traceback.TracebackException.from_exception(exc)
    keep = [
        f
        for f in te.stack
        if Path(f.filename).resolve() == path or "ntkscope" not in f.filename and "importlib" not in f.filename
    ]
    te.stack = traceback.StackSummary.from_list(keep)
    return "".join(te.format())


def _import_file(path: Path) -> Any:
    name = f"_ntkscope_user_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # let the user's file import its neighbours
    # registered while it runs, as `import` does: dataclasses, pickling and typing look it up there
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserCodeError(f"{path.name} failed to import: {type(e).__name__}: {e}", _user_traceback(e, path)) from e
    finally:
        sys.path.remove(str(path.parent))
    return module


def _coerce(out: Any, where: str) -> Spec:
    contract = "a tuple (model, inputs[, targets[, output]]) or a dict with keys 'model', 'inputs'[, 'targets', 'output']"
    if isinstance(out, Spec):
        return out
    if isinstance(out, dict):
        unknown = set(out) - {"model", "inputs", "targets", "output"}
        if unknown:
            raise SpecError(f"{where} returned a dict with unknown keys {sorted(unknown)}; expected {contract}")
        if "model" not in out or "inputs" not in out:
            raise SpecError(f"{where} returned a dict without 'model' and 'inputs'; expected {contract}")
        model, inputs, targets, output = out["model"], out["inputs"], out.get("targets"), out.get("output")
    elif isinstance(out, (tuple, list)) and 2 <= len(out) <= 4:
        model, inputs, targets, output = (*out, None, None)[:4]
    else:
        raise SpecError(f"{where} returned {type(out).__name__}; expected {contract}")
    if not isinstance(model, nn.Module):
        raise SpecError(f"{where} returned a model of type {type(model).__name__}, not a torch.nn.Module; expected {contract}")
    if targets is not None and not isinstance(targets, torch.Tensor):
        try:
            targets = torch.as_tensor(targets)
        except Exception as e:
            raise SpecError(f"{where} returned targets that are not a tensor ({type(targets).__name__})") from e
    return Spec(model, inputs, targets, output)


def load_spec(spec: str, seed: int = 0) -> Spec:
    """Resolve ``builtin:NAME`` or ``path/to/file.py:factory`` to a :class:`Spec`.

    Raises :class:`SpecError` for a spec that cannot be used and :class:`UserCodeError` when
    the user's file or factory raises.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise SpecError(f"unknown built-in model {name!r}; choose one of {', '.join(sorted(BUILTINS))}")
        return BUILTINS[name](seed=seed)
    file, sep, func = spec.rpartition(":")
    if not sep or not file or not func:
        raise SpecError(f"--model must be 'path/to/file.py:factory' or 'builtin:NAME', got {spec!r}")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise SpecError(f"model file not found: {file}")
    module = _import_file(path)
    factory = getattr(module, func, None)
    if factory is None:
        raise SpecError(f"{path.name} has no function {func!r}")
    if not callable(factory):
        raise SpecError(f"{path.name}:{func} is not callable")
    try:
        out = factory()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserCodeError(f"{path.name}:{func}() raised {type(e).__name__}: {e}", _user_traceback(e, path)) from e
    s = _coerce(out, f"{path.name}:{func}()")
    s.name = s.name or f"{path.name}:{func}"
    s.description = s.description or type(s.model).__name__
    return s
