"""Built-in models, the user-model contract, brief training, and the ``ntkscope run`` demo.

A *model spec* is what the command line's ``--model`` names: ``builtin:NAME`` (see
:data:`BUILTINS`) or ``path/to/file.py:factory``.  A factory is a function of no arguments that
returns either a tuple ``(model, inputs[, targets[, output]])`` or a dict with keys ``model``,
``inputs`` and optionally ``targets`` and ``output``:

* ``model``: an ``nn.Module`` (no dropout; eval-mode is not required);
* ``inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments;
* ``targets``: the state's shape (or class labels, one-hot encoded over the last state axis);
  needed for ``target_alignment`` and for training in ``ntkscope track``;
* ``output``: which part of the model's return value is the state (an index, a key or a
  callable), as for :class:`ntkscope.NTK`.

The demo (:func:`run_demo`) trains two small models for a few seconds — an MLP on
scikit-learn's digits and a GRU on the 3-bit flip-flop task (Sussillo & Barak 2013) — then
estimates trace, Frobenius norm, effective rank and kernel-target alignment of each, and, where
the kernel is small enough, the exact values for comparison.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import tasks

__all__ = [
    "BUILTINS",
    "Spec",
    "SpecError",
    "UserCodeError",
    "load_spec",
    "train",
    "loss_for",
    "METRICS",
    "evaluate",
    "run_demo",
]


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
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
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


# -- training ------------------------------------------------------------------------------------


def select_output(out: Any, output: Any) -> torch.Tensor:
    """The state picked from a model's return value (same rules as :class:`ntkscope.NTK`)."""
    from ..operators.modules import _select_output

    return _select_output(out, output)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def loss_for(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for integer class labels (over the last axis), mean squared error otherwise."""
    if targets.is_floating_point():
        return lambda z, y: torch.nn.functional.mse_loss(z, y.to(z.dtype).reshape(z.shape))
    return lambda z, y: torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


def train_step(spec: Spec, optimizer: torch.optim.Optimizer) -> float:
    """One full-batch step on the spec's training data; returns the loss before the step."""
    X = spec.train_inputs if spec.train_inputs is not None else spec.inputs
    y = spec.train_targets if spec.train_targets is not None else spec.targets
    if y is None:
        raise ValueError("training needs targets: return them from the factory (model, inputs, targets)")
    spec.model.train()
    optimizer.zero_grad(set_to_none=True)
    z = select_output(_call(spec.model, X), spec.output)
    loss = loss_for(y)(z, y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def evaluate_loss(spec: Spec) -> float:
    """The training loss at the current parameters (no update)."""
    X = spec.train_inputs if spec.train_inputs is not None else spec.inputs
    y = spec.train_targets if spec.train_targets is not None else spec.targets
    if y is None:
        raise ValueError("a loss needs targets")
    z = select_output(_call(spec.model, X), spec.output)
    return float(loss_for(y)(z, y))


def train(spec: Spec, steps: int, lr: float = 1e-2, optimizer: str = "adam") -> list[float]:
    """Train briefly (full batch); returns the loss per step."""
    opt = make_optimizer(spec.model, optimizer, lr)
    return [train_step(spec, opt) for _ in range(steps)]


# -- metrics -------------------------------------------------------------------------------------

#: Metric names the command line accepts.
METRICS = ("trace", "frobenius_norm", "effective_rank", "target_alignment")

#: Exact references are computed when min(D, P) AD passes stay under this.
EXACT_MAX_PASSES = 4000


def exact_feasible(K: Any) -> bool:
    from ..metrics import EXACT_MAX_ENTRIES

    return min(K.dim, K.num_params) <= EXACT_MAX_PASSES and K.dim * K.num_params <= EXACT_MAX_ENTRIES


def exact_values(K: Any, targets: torch.Tensor | None) -> dict[str, Any]:
    """All four metrics exactly, from one dense Jacobian (``min(D, P)`` AD passes, float64 sums).

    ``tr K = ‖J‖_F²``; ``‖K‖_F² = ‖JᵀJ‖_F²`` or ``‖JJᵀ‖_F²`` (the smaller of K and G);
    effective rank ``(tr K)²/‖K‖_F²``; target alignment ``‖Jᵀy‖² / (‖K‖_F ‖y‖²)``.
    """
    from ..estimators import exact as ex
    from ..metrics import as_targets as _as_targets

    t0 = time.perf_counter()
    c0 = K.counts()
    J = ex.jacobian(K).to(torch.float64)
    G = ex.smaller_kernel(J)
    tr = float(J.square().sum())
    fro = float(G.square().sum().sqrt())
    vals: dict[str, float] = {"trace": tr, "frobenius_norm": fro, "effective_rank": tr**2 / fro**2}
    if targets is not None:
        y = _as_targets(targets, K).to(torch.float64)
        vals["target_alignment"] = float((J.T @ y).square().sum()) / (fro * float(y.square().sum()))
    c1 = K.counts()
    return {"values": vals, "passes": (c1[0] - c0[0]) + (c1[1] - c0[1]), "seconds": time.perf_counter() - t0}


def metric_row(name: str, e: Any, exact: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-able record: the estimate, the exact value, relative error and speed-up."""
    row: dict[str, Any] = {"metric": name, "estimate": e.to_dict(), "reason": e.info.get("reason")}
    if exact is not None and name in exact["values"]:
        v = exact["values"][name]
        rel = abs(e.value - v) / abs(v) if v != 0 else math.inf
        row["exact"] = {"value": v, "passes": exact["passes"], "seconds": exact["seconds"]}
        row["rel_error"] = rel
        row["z"] = abs(e.value - v) / e.stderr if e.stderr else None
        row["speedup"] = exact["seconds"] / e.seconds if e.seconds > 0 else None
        row["pass_ratio"] = exact["passes"] / e.passes if e.passes else None
    return row


def evaluate(
    spec: Spec,
    metrics: tuple[str, ...] | list[str] = METRICS,
    *,
    exact: bool | None = None,
    progress: Callable[[str], None] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Build the NTK of ``spec`` and estimate ``metrics`` (keyword arguments go to each metric).

    ``exact=None`` adds exact values when :func:`exact_feasible`; the dense Jacobian is formed
    once per model (its passes and seconds are the "exact" cost every metric is compared with).
    """
    import ntkscope as nk

    if not any(p.requires_grad for p in spec.model.parameters()):
        # the API's hint ("pass params=") has no command-line counterpart
        where = spec.name or type(spec.model).__name__
        raise SpecError(
            f"{where}: the model has no trainable parameters (none with requires_grad=True), so its NTK is empty; "
            "return a model with some trainable parameters from the factory"
        )
    K = nk.NTK(spec.model, spec.inputs, output=spec.output, chunk_size=kw.get("chunk_size"))
    _warm_up(K)
    rows = []
    for m in metrics:
        if m == "target_alignment" and spec.targets is None:
            continue
        if progress:
            progress(m)
        fn = getattr(nk, m)
        args = (K, spec.targets) if m == "target_alignment" else (K,)
        rows.append((m, fn(*args, **kw)))
    ex = None
    if exact_feasible(K) if exact is None else exact:
        if progress:
            progress(f"exact reference ({min(K.dim, K.num_params)} passes)")
        ex = exact_values(K, spec.targets)
    return {
        "model": spec.name,
        "description": spec.description,
        "D": K.dim,
        "P": K.num_params,
        "exact_cost": None if ex is None else {"passes": ex["passes"], "seconds": ex["seconds"]},
        "metrics": [metric_row(m, e, ex) for m, e in rows],
    }


def _warm_up(K: Any) -> None:
    """One timed pass per AD mode before anything is timed: the first forward-mode call in a
    process compiles its decompositions (seconds), which would otherwise be charged to whichever
    measurement happens to run first."""
    for mode in ("vjp", "jvp"):
        try:
            K.pass_seconds(mode)
        except RuntimeError:  # that mode is unavailable for this model; auto will see it too
            pass


def demo_specs(seed: int = 0) -> Iterator[tuple[Spec, int, float]]:
    """The demo's models with their training budgets (steps, Adam learning rate)."""
    yield _mlp_digits(seed), 100, 1e-2
    yield _gru_flipflop(seed), 150, 1e-2


def run_demo(
    seed: int = 0, num_probes: int = 64, *, method: str = "auto", progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Train the demo models briefly and measure their NTKs; one record per model."""
    out = []
    for spec, steps, lr in demo_specs(seed):
        if progress:
            progress(f"training {spec.name}")
        losses = train(spec, steps, lr)
        spec.model.eval()
        res = evaluate(
            spec,
            progress=(lambda m, n=spec.name: progress(f"{n}: {m}")) if progress else None,  # type: ignore[misc]
            method=method,
            num_probes=num_probes,
            seed=seed,
        )
        res["train"] = {"steps": steps, "optimizer": "adam", "lr": lr, "loss_start": losses[0], "loss_end": losses[-1]}
        out.append(res)
    return out
