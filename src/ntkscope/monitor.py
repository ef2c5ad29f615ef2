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
import csv
import io
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

#: Metrics a Monitor can record.
METRICS = ("trace", "frobenius_norm", "effective_rank", "kernel_alignment", "target_alignment")
DEFAULT_METRICS = ("trace", "effective_rank", "kernel_alignment", "target_alignment")
_RESOLVABLE = ("exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp")


def columns(metrics: Sequence[str]) -> list[str]:
    """The CSV columns for ``metrics``: ``step, loss, <m>, <m>_stderr, …, method, passes, seconds``."""
    return ["step", "loss"] + [c for m in metrics for c in (m, f"{m}_stderr")] + ["method", "passes", "seconds"]


# -- reading and writing the CSV --------------------------------------------------------------------


def _parse(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in ("step", "passes"):
            out[k] = int(v)
        elif k == "method":
            out[k] = v
        else:
            out[k] = float(v) if v not in ("", None) else math.nan
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Monitor / ``track`` CSV as dicts of numbers (a half-written last line is ignored)."""
    text = Path(path).read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [_parse(r) for r in csv.DictReader(io.StringIO(text))]


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)  # repr: full precision, read back exactly
    return v


class CSVLogger:
    """Rows appended to a CSV file, flushed as written (``plot`` and ``read_rows`` read it).

    The file is opened at the first row.  A fresh logger refuses a file that already holds rows
    (:class:`FileExistsError`) unless ``overwrite=True``; after :meth:`resume` it keeps the rows
    up to the restored step, drops later ones and a half-written last line, and appends.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._resume_after: int | None = None
        self._file: Any = None
        self._writer: Any = None
        self._columns: list[str] | None = None

    def resume(self, last_step: int | None) -> None:
        """Continue the file after ``last_step`` (None: before the first row) at the first write."""
        self._resume_after = -1 if last_step is None else last_step

    def _open(self, cols: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._resume_after is not None and self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]  # a row cut by the interruption
            lines = text.splitlines(keepends=True)
            header = lines[0].rstrip("\r\n").split(",") if lines else []
            if lines and header != cols:
                raise ValueError(f"cannot resume {self.path}: its columns {header} are not this run's {cols}")
            kept = [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= self._resume_after]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(",".join(cols) + "\n" + "".join(kept))
            os.replace(tmp, self.path)
        else:
            if not self.overwrite and self.path.is_file() and len(self.path.read_text().splitlines()) > 1:
                raise FileExistsError(
                    f"{self.path} already holds rows: pass a new path, delete it, or resume it (Monitor.load_state_dict)"
                )
            self.path.write_text(",".join(cols) + "\n")
        self._file = open(self.path, "a", newline="")
        self._columns = cols
        self._writer = csv.DictWriter(self._file, fieldnames=cols)

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._open(list(row))
        self._writer.writerow({k: _cell(row.get(k, math.nan)) for k in self._columns or []})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"


def _scalars(row: Mapping[str, Any], metrics: Sequence[str], prefix: str = "ntk/") -> dict[str, float]:
    """The numbers of a row as ``ntk/<metric>``, ``ntk/<metric>_stderr``, passes, seconds, loss."""
    out: dict[str, float] = {}
    for m in metrics:
        out[f"{prefix}{m}"] = float(row[m])
        out[f"{prefix}{m}_stderr"] = float(row[f"{m}_stderr"])
    out[f"{prefix}passes"] = float(row["passes"])
    out[f"{prefix}seconds"] = float(row["seconds"])
    loss = row.get("loss")
    if loss is not None and math.isfinite(float(loss)):
        out[f"{prefix}loss"] = float(loss)
    return out


def _row_metrics(row: Mapping[str, Any]) -> list[str]:
    return [k for k in row if k in METRICS]


class TensorBoardLogger:
    """Scalars ``ntk/<metric>`` and ``ntk/<metric>_stderr`` through ``torch.utils.tensorboard``.

    ``log_dir`` creates a ``SummaryWriter`` at the first row (closed by :meth:`close`); or pass
    your own ``writer`` (left open).  Needs the ``tensorboard`` package (``ntkscope[tensorboard]``).
    """

    def __init__(self, log_dir: str | Path | None = None, *, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("give TensorBoardLogger a log_dir or a writer")
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writer = writer
        self._own = writer is None
        self._purge: int | None = None

    def resume(self, last_step: int | None) -> None:
        self._purge = 0 if last_step is None else last_step + 1

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "the tensorboard logger needs the tensorboard package: pip install 'ntkscope[tensorboard]'"
                ) from e
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge)
        for k, v in _scalars(row, _row_metrics(row)).items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None and self._own:
            self.writer.close()
            self.writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir) if self.log_dir else self.writer!r})"


class WandbLogger:
    """``wandb.log`` of ``ntk/<metric>`` and ``ntk/<metric>_stderr`` against ``ntk/step``.

    Logs into ``run`` or the active run (``wandb.run``); when there is none, starts one at the
    first row (``wandb.init(project=project, dir=dir, **init_kwargs)``, honouring ``WANDB_MODE``)
    and finishes it in :meth:`close`.  ``ntk/step`` is declared the x-axis of ``ntk/*``
    (``define_metric``), so the rows never disturb the run's own step counter.
    """

    def __init__(self, run: Any = None, *, project: str = "ntkscope", dir: str | Path | None = None, **init_kwargs: Any) -> None:
        self.run = run
        self.project = project
        self.dir = None if dir is None else Path(dir)
        self.init_kwargs = init_kwargs
        self._own = False
        self._defined = False

    def _ensure(self) -> Any:
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the wandb logger needs the wandb package: pip install 'ntkscope[wandb]'") from e
        if self.run is None:
            self.run = wandb.run
        if self.run is None:
            if self.dir is not None:
                self.dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=self.project, dir=None if self.dir is None else str(self.dir), **self.init_kwargs)
            self._own = True
        if not self._defined:
            self.run.define_metric("ntk/step")
            self.run.define_metric("ntk/*", step_metric="ntk/step")
            self._defined = True
        return self.run

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        run = self._ensure()
        run.log({**_scalars(row, _row_metrics(row)), "ntk/step": step})

    def close(self) -> None:
        if self._own and self.run is not None:
            self.run.finish()
            self.run = None
            self._own = False


class _CallableLogger:
    def __init__(self, fn: Callable[[int, dict[str, Any]], Any]) -> None:
        self.fn = fn

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        self.fn(step, dict(row))

    def __repr__(self) -> str:
        return f"_CallableLogger({self.fn!r})"


def _default_path() -> Path:
    import socket
    from datetime import datetime

    return Path("runs") / f"ntkscope-{datetime.now():%Y%m%d-%H%M%S}-{socket.gethostname()}"


def _paths(path: str | Path | None) -> tuple[Path, Path]:
    """(CSV file, run directory) for the string loggers."""
    p = _default_path() if path is None else Path(path)
    if p.suffix == ".csv":
        return p, p.with_suffix("")
    return p / "ntk.csv", p


def make_logger(spec: Any, path: str | Path | None) -> Any:
    """A logger object from a ``loggers=`` entry (see the module docstring)."""
    if isinstance(spec, str):
        csv_path, run_dir = _paths(path)
        if spec == "csv":
            return CSVLogger(csv_path)
        if spec == "tensorboard":
            return TensorBoardLogger(run_dir)
        if spec == "wandb":
            return WandbLogger(dir=run_dir)
        raise ValueError(f"unknown logger {spec!r}; choose 'csv', 'tensorboard', 'wandb', a SummaryWriter or a callable")
    if hasattr(spec, "add_scalar") and hasattr(spec, "flush"):  # a SummaryWriter (or one like it)
        return TensorBoardLogger(writer=spec)
    if hasattr(spec, "log") and callable(spec.log):
        return spec
    if callable(spec):
        return _CallableLogger(spec)
    raise TypeError(f"a logger must be 'csv', 'tensorboard', 'wandb', a SummaryWriter or a callable (step, row), got {spec!r}")


# -- isolation ----------------------------------------------------------------------------------


def _move(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, Mapping):
        return {k: _move(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_move(v, device, dtype) for v in x)
    return x


_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _device_types(model: nn.Module) -> set[str]:
    types = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    types |= {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    return {t for t in types if t in _AUTOCAST_TYPES}


@contextlib.contextmanager
def _rng_preserved(model: nn.Module) -> Iterator[None]:
    """Every random stream the user may rely on comes back exactly as it was."""
    py = random.getstate()
    try:
        import numpy as np

        npstate: Any = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, npstate = None, None  # type: ignore[assignment]
    cuda_devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_devices = sorted(set(cuda_devices) | {torch.cuda.current_device()})
    try:
        with torch.random.fork_rng(devices=cuda_devices, enabled=True):
            yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(npstate)


@contextlib.contextmanager
def _analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the analysis, each module's own flag restored (``train()`` is never called)."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """The state every record runs in, leaving no trace: see the module docstring."""
    from .operators.rules import math_attention

    with contextlib.ExitStack() as stack:
        stack.enter_context(_rng_preserved(model))
        for dt in sorted(_device_types(model)):
            with contextlib.suppress(RuntimeError, ValueError):  # device types without autocast support
                stack.enter_context(torch.autocast(device_type=dt, enabled=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_analysis_mode(model))
        stack.enter_context(math_attention())
        yield


# -- the Monitor -------------------------------------------------------------------------------


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
        from .metrics import parse_method as _parse_method

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
        _parse_method(method)
        trainable = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable floating-point parameters")
        self.model = model
        self.device = trainable[0].device
        self.dtype = trainable[0].dtype
        self.inputs = _move(inputs, self.device, self.dtype)
        self.targets = None if targets is None else _move(torch.as_tensor(targets), self.device, self.dtype)
        self.output = output
        self.metrics = metrics
        self.columns = columns(metrics)
        self.every = every
        self.num_probes = num_probes
        self.seed = seed
        if path is None and any(isinstance(spec, str) for spec in loggers):
            path = _default_path()  # once, so that every string logger writes into the same run
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.loggers = [make_logger(spec, path) for spec in loggers]
        self.probe_parallel = False
        self.group: Any = None
        self._last_step: int | None = None
        # K_0: a snapshot of the trainable parameters (one copy of them) when alignment with it is asked for
        self.init: dict[str, torch.Tensor] | None = None
        if "kernel_alignment" in metrics:
            self.init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.method = method  # "auto" is resolved at the first record, in that record's (maybe probe-parallel) context

    # -- kernels (a wrapper such as an α-scaled model plugs in here) -------------------------

    def kernel(self, params: Mapping[str, torch.Tensor] | None = None) -> Any:
        """The NTK of the monitored model on the analysis inputs (at ``params`` if given)."""
        from .operators.ntk import NTK

        return NTK(self.model, self.inputs, output=self.output, params=params)

    def _resolve(self, method: str) -> str:
        if method != "auto":
            return method
        from .metrics import effective_rank

        K = self.kernel(self.init)
        chosen = effective_rank(K, method="auto", num_probes=self.num_probes, seed=self.seed).method
        return chosen if chosen in _RESOLVABLE else "vjp"

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        from . import distributed

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
        from . import metrics as mt

        t0 = time.perf_counter()
        with self._context():
            self.method = self._resolve(self.method)
            Kt = self.kernel()
            kw: dict[str, Any] = {"method": self.method, "num_probes": self.num_probes, "seed": self.seed + step}
            ests: dict[str, Any] = {}
            for m in self.metrics:
                if m == "kernel_alignment":
                    ests[m] = mt.alignment(Kt, self.kernel(self.init), **kw)
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
        if _is_main():
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


def _is_main() -> bool:
    from . import distributed

    return distributed.is_main_process()
