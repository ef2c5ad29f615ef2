"""NTK metrics inside your own training loop: :class:`Monitor` and its loggers.

A :class:`Monitor` holds fixed analysis inputs (and optional targets), snapshots the kernel at
initialisation ``K_0`` when it is built, and every ``every`` steps records — with standard errors
and AD-pass counts, exactly the columns of ``ntkscope track`` — the trace and effective rank of
the current kernel ``K_t``, its alignment with ``K_0`` (near 1: lazy; falling: the kernel moves,
features are learned) and the kernel-target alignment::

    monitor = ntkscope.Monitor(model, X_probe, targets=y_probe, every=50, loggers=("csv", "tensorboard"))
    for step, (x, y) in enumerate(loader):
        monitor.step(step)                 # a modulo test except every 50 steps
        loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    monitor.close()

**A record never changes training.**  Parameters are read detached; the model's modules are
switched to eval mode for the analysis (dropout off; their flags are set directly and restored
one by one, so overridden ``train()`` methods never run); the CPU and CUDA random number
generators (and Python's and NumPy's) are restored afterwards, so the user's random streams
(dropout masks, data shuffling) continue as if nothing had happened; autocast is switched off
(the analysis runs in the model's parameter dtype) and gradient mode on for its duration, and
both are restored; ``.grad`` and the optimizer are never touched.  Training with and without a
Monitor gives bitwise-identical parameters (tested).

**Where it runs.**  Inputs and targets are moved to the device of the model's first trainable
parameter (floating-point inputs cast to its dtype).  Attention runs with PyTorch's ``MATH``
backend for the analysis (fused kernels have no forward-mode AD).  Under ``torch.distributed`` a
Monitor evaluates locally by default (call it from any subset of ranks; only rank 0 logs); set
``monitor.probe_parallel = True`` (and optionally ``monitor.group``) to split probes over the
ranks with :func:`ntkscope.distributed.probe_parallel` — then every rank must call
:meth:`Monitor.step` at the same steps.

**Reproducible rows.**  Probes at step ``s`` use seed ``seed + s``; ``method="auto"`` is
resolved once, on ``K_0`` at the first record, and kept.  :meth:`Monitor.state_dict` holds
``K_0``'s parameters, the resolved method and the rows so far; a new Monitor that
:meth:`~Monitor.load_state_dict`\\ s it continues the same CSV (rows after the restored step are
dropped, a half-written line is cut) and TensorBoard run (later events purged).

**Loggers** (``loggers=``): ``"csv"`` (:class:`CSVLogger`, the default), ``"tensorboard"``
(:class:`TensorBoardLogger`: scalars ``ntk/<metric>`` and ``ntk/<metric>_stderr``, plus
``ntk/passes``, ``ntk/seconds`` and ``ntk/loss`` when given), ``"wandb"`` (:class:`WandbLogger`:
``wandb.log`` into the active run, or one it starts), a ``SummaryWriter``, any object with
``log(step, row)``, or any callable ``(step, row) -> None``.  String loggers write under ``path``:
a ``.csv`` file (TensorBoard then uses the directory of the same name beside it) or a run
directory (``ntk.csv`` and the event files inside it); default ``runs/ntkscope-<time>``, as
``SummaryWriter`` does.  A CSV that already holds rows is never overwritten: pass a new path,
remove it, or resume.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from .. import metrics as mt
from ..operators.ntk import NTK
from .isolation import isolated, move_to
from .loggers import (
    DEFAULT_METRICS,
    METRICS,
    CSVLogger,
    TensorBoardLogger,
    WandbLogger,
    columns,
    default_path,
    make_logger,
    read_rows,
)

__all__ = [
    "Monitor",
    "METRICS",
    "DEFAULT_METRICS",
    "columns",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "read_rows",
]

_RESOLVABLE = ("exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp")


class Monitor:
    """Record NTK metrics of ``model`` on fixed ``inputs`` every ``every`` training steps.

    Args:
        model: the ``nn.Module`` being trained (any device; trained in place by your loop).
        inputs: analysis inputs (a tensor, a tuple of arguments or a dict of keyword
            arguments), fixed for the whole run; moved to the model's device.
        targets: the state's shape or class labels, for ``target_alignment``.
        output: which part of the model's return value is the state (as for :class:`ntkscope.NTK`).
        metrics: any of ``trace``, ``frobenius_norm``, ``effective_rank``, ``kernel_alignment``
            (``K_t`` with ``K_0``) and ``target_alignment``.  Without targets the default drops
            ``target_alignment``.
        every: :meth:`step` records at steps that are multiples of ``every``.
        num_probes: probes per metric (see :mod:`ntkscope.metrics`).
        method: estimation method; ``"auto"`` is resolved once, on ``K_0`` at the first record, and kept.
        seed: probes at step ``s`` use ``seed + s``.
        loggers: where rows go (see the module docstring); ``()`` keeps them in :attr:`rows` only.
        path: where the string loggers write: a ``.csv`` file or a run directory.

    Attributes:
        rows: every recorded row (dicts with the CSV's columns).
        method: the estimation method (resolved from ``"auto"`` at the first record).
        probe_parallel, group: set ``probe_parallel = True`` to split probes over the ranks of
            ``group`` (default: the world) under ``torch.distributed``.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        targets: Any = None,
        output: Any = None,
        metrics: Sequence[str] = DEFAULT_METRICS,
        every: int = 100,
        num_probes: int = 64,
        method: str = "auto",
        seed: int = 0,
        loggers: Sequence[Any] = ("csv",),
        path: str | Path | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(metrics, str):
            metrics = (metrics,)
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"unknown metric(s) {unknown or list(metrics)}; choose from {', '.join(METRICS)}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics named twice: {list(metrics)}")
        if "target_alignment" in metrics and targets is None:
            if metrics != DEFAULT_METRICS:
                raise ValueError("target_alignment needs targets: pass targets=")
            metrics = tuple(m for m in metrics if m != "target_alignment")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
        mt.parse_method(method)
        trainable = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable floating-point parameters")
        self.model = model
        self.device = trainable[0].device
        self.dtype = trainable[0].dtype
        self.inputs = move_to(inputs, self.device, self.dtype)
        self.targets = None if targets is None else move_to(torch.as_tensor(targets), self.device, self.dtype)
        self.output = output
        self.metrics = metrics
        self.columns = columns(metrics)
        self.every = every
        self.num_probes = num_probes
        self.seed = seed
        if path is None and any(isinstance(spec, str) for spec in loggers):
            path = default_path()  # once, so that every string logger writes into the same run
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.loggers = [make_logger(spec, path) for spec in loggers]
        self.probe_parallel = False
        self.group: Any = None
        self._last_step: int | None = None
        # K_0: a snapshot of the trainable parameters (one copy of them) when alignment with it is asked for
        self.init: dict[str, torch.Tensor] | None = None
        self.init_buffers: dict[str, torch.Tensor] | None = None
        if "kernel_alignment" in metrics:
            self.init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            # and the buffers: K_0 of a BatchNorm model must not follow the running stats
            self.init_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.method = method  # "auto" is resolved at the first record, in that record's (maybe probe-parallel) context

    # -- kernels (a wrapper such as an α-scaled model plugs in here) -------------------------

    def kernel(self, params: Mapping[str, torch.Tensor] | None = None, buffers: Mapping[str, torch.Tensor] | None = None) -> Any:
        """The NTK of the monitored model on the analysis inputs (at ``params`` and ``buffers``
        if given)."""
        return NTK(self.model, self.inputs, output=self.output, params=params, buffers=buffers)

    def _resolve(self, method: str) -> str:
        if method != "auto":
            return method
        K = self.kernel(self.init, self.init_buffers)
        chosen = mt.effective_rank(K, method="auto", num_probes=self.num_probes, seed=self.seed).method
        return chosen if chosen in _RESOLVABLE else "vjp"

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with isolated(self.model):
            if self.probe_parallel and distributed.is_initialized():
                with distributed.probe_parallel(self.group):
                    yield
            else:
                with distributed.local():
                    yield

    # -- recording ----------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether :meth:`step` would record at ``step``."""
        return step % self.every == 0 and (self._last_step is None or step > self._last_step)

    def step(self, step: int, *, loss: float | torch.Tensor | None = None) -> dict[str, Any] | None:
        """Record at multiples of ``every`` (once per step); the row, or None.  ``loss`` fills the loss column."""
        if not self.due(step):
            return None
        return self.record(step, loss=loss)

    def measure(self, step: int) -> dict[str, Any]:
        """The metrics at the model's current parameters, as a row (nothing is logged)."""
        t0 = time.perf_counter()
        with self._context():
            self.method = self._resolve(self.method)
            Kt = self.kernel()
            kw: dict[str, Any] = {"method": self.method, "num_probes": self.num_probes, "seed": self.seed + step}
            ests: dict[str, Any] = {}
            for m in self.metrics:
                if m == "kernel_alignment":
                    ests[m] = mt.alignment(Kt, self.kernel(self.init, self.init_buffers), **kw)
                elif m == "target_alignment":
                    ests[m] = mt.target_alignment(Kt, self.targets, **kw)
                else:
                    ests[m] = getattr(mt, m)(Kt, **kw)
        row: dict[str, Any] = {"step": int(step), "loss": math.nan}
        for m, e in ests.items():
            row[m] = e.value
            row[f"{m}_stderr"] = e.stderr if e.stderr is not None else 0.0
        row["method"] = self.method
        row["passes"] = sum(e.passes for e in ests.values())
        row["seconds"] = time.perf_counter() - t0
        return row

    def record(self, step: int, *, loss: float | torch.Tensor | None = None) -> dict[str, Any]:
        """Record now, whatever the step (e.g. the last one), and send the row to every logger."""
        row = self.measure(step)
        if loss is not None:
            row["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.rows.append(row)
        self._last_step = int(step)
        if distributed.is_main_process():
            for lg in self.loggers:
                lg.log(int(step), row)
        return row

    def close(self) -> None:
        """Close the loggers' files (and a W&B run the Monitor started)."""
        for lg in self.loggers:
            close = getattr(lg, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- resuming -----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "every": self.every, "num_probes": self.num_probes, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: ``K_0``'s parameters, the resolved method, the rows, the settings."""
        return {
            "init": self.init,
            "init_buffers": self.init_buffers,
            "method": self.method,
            "rows": [dict(r) for r in self.rows],
            "last_step": self._last_step,
            "config": self.config(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a run: ``K_0`` and the method from ``state``; loggers continue after its last row.

        Raises :class:`ValueError` naming the settings that differ from the saved run's.
        """
        saved = dict(state.get("config", {}))
        diff = {k: (saved.get(k), v) for k, v in self.config().items() if k in saved and saved[k] != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume a Monitor with different settings ({detail})")
        init = state.get("init")
        if init is not None:
            self.init = {n: t.to(self.device) for n, t in init.items()}
        init_buffers = state.get("init_buffers")  # absent from runs saved before it was kept
        if init_buffers is not None:
            self.init_buffers = {n: t.to(self.device) for n, t in init_buffers.items()}
        self.method = str(state["method"])
        self.rows = [dict(r) for r in state.get("rows", [])]
        self._last_step = state.get("last_step")
        for lg in self.loggers:
            resume = getattr(lg, "resume", None)
            if resume is not None:
                resume(self._last_step)

    def __repr__(self) -> str:
        return (
            f"Monitor({type(self.model).__name__}, metrics={list(self.metrics)}, every={self.every}, "
            f"method={self.method!r}, num_probes={self.num_probes}, loggers={self.loggers})"
        )
