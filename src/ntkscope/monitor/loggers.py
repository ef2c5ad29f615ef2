"""The rows a :class:`~ntkscope.Monitor` records and where they go: the CSV format
(:func:`columns`, :func:`read_rows`) and the loggers (:class:`CSVLogger`,
:class:`TensorBoardLogger`, :class:`WandbLogger`, :func:`make_logger`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS",
    "DEFAULT_METRICS",
    "columns",
    "read_rows",
    "scalars",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "make_logger",
    "default_path",
]

#: Metrics a Monitor can record.
METRICS = ("trace", "frobenius_norm", "effective_rank", "kernel_alignment", "target_alignment")
DEFAULT_METRICS = ("trace", "effective_rank", "kernel_alignment", "target_alignment")

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


def scalars(row: Mapping[str, Any], prefix: str = "ntk/") -> dict[str, float]:
    """The numbers of a row as ``ntk/<metric>``, ``ntk/<metric>_stderr``, passes, seconds, loss."""
    out: dict[str, float] = {}
    for m in (k for k in row if k in METRICS):
        out[f"{prefix}{m}"] = float(row[m])
        out[f"{prefix}{m}_stderr"] = float(row[f"{m}_stderr"])
    out[f"{prefix}passes"] = float(row["passes"])
    out[f"{prefix}seconds"] = float(row["seconds"])
    loss = row.get("loss")
    if loss is not None and math.isfinite(float(loss)):
        out[f"{prefix}loss"] = float(loss)
    return out


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
            try:  # on demand: tensorboard is an optional extra
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "the tensorboard logger needs the tensorboard package: pip install 'ntkscope[tensorboard]'"
                ) from e
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge)
        for k, v in scalars(row).items():
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
        try:  # on demand: wandb is an optional extra
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
        run.log({**scalars(row), "ntk/step": step})

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


def default_path() -> Path:
    """``runs/ntkscope-<time>-<host>``: where string loggers write by default, as ``SummaryWriter`` does."""
    return Path("runs") / f"ntkscope-{datetime.now():%Y%m%d-%H%M%S}-{socket.gethostname()}"


def _paths(path: str | Path | None) -> tuple[Path, Path]:
    """(CSV file, run directory) for the string loggers."""
    p = default_path() if path is None else Path(path)
    if p.suffix == ".csv":
        return p, p.with_suffix("")
    return p / "ntk.csv", p


def make_logger(spec: Any, path: str | Path | None) -> Any:
    """A logger object from a ``loggers=`` entry (see :mod:`ntkscope.monitor`)."""
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
