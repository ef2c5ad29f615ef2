"""NTK metrics over training, written row by row, interruptible and resumable.

Every ``every`` optimizer steps (and at step 0) :func:`track` records, with standard errors:

* ``loss`` — the training loss at the recorded parameters;
* ``trace`` and ``effective_rank`` of ``K_t`` (the NTK at the current parameters);
* ``kernel_alignment`` — ``⟨K_t, K_0⟩_F / (‖K_t‖_F ‖K_0‖_F)``, the alignment of the current
  kernel with the kernel at initialisation (``K_0`` is ``NTK(model, X, params=snapshot)``).
  It stays near 1 in the *lazy* regime, where the network behaves like its linearisation, and
  falls when features are learned (*rich* regime; Chizat, Oyallon & Bach 2019, "On lazy training
  in differentiable programming"; Fort et al. 2020);
* ``target_alignment`` — ``yᵀK_t y / (‖K_t‖_F ‖y‖²)`` (Cristianini et al. 2001), which grows
  as the kernel aligns with the task (Baratin et al. 2021; Atanasov et al. 2022).

``init_scale`` multiplies every initial parameter before training: a knob for probing regimes.
Which regime a given scale produces depends on the architecture, optimizer and learning rate (the
clean lazy limit of Chizat et al. also rescales the output), so the tool measures rather than
assumes: ``kernel_alignment`` near 1 throughout means lazy, a falling one means the kernel moved.
(Measured on ``builtin:gru-flipflop``, 100 SGD steps at lr 0.05: K_100·K_0 = 1.000, 0.999 and
0.984 for scales 0.5, 1 and 2 — all nearly lazy; 200 Adam steps at lr 0.01 bring it to ≈ 0.18.)

Reproducibility and resuming.  :func:`track` is a front end over :class:`ntkscope.Monitor`
(which records the rows) with its own full-batch training loop for the built-in models and
``--model`` factories.  Probes at step ``s`` use the seed ``seed + s``; the estimation method is
resolved once (``"auto"`` measures pass times, which would make rows depend on the machine's
load) and stored.  Before each recorded step a checkpoint (model, optimizer, RNG state, the
Monitor's state with ``K_0``'s parameters, configuration) is written atomically, *then* the row
is measured and written to the CSV (flushed).  ``resume=True`` loads the checkpoint, keeps the
CSV rows up to the checkpoint's last row (a half-written last line or a row written after the
checkpoint is dropped) and records from the checkpoint's step on; the rows then equal those of an
uninterrupted run.  A new run refuses to replace an existing CSV unless ``overwrite=True``.

The training loop (:func:`ntkscope.cli.train.train_step`) is kept separate from the measurement
(the Monitor), so that a reparametrised training form (such as an α-scaled model) can be added as
an option of the loop without touching the Monitor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..monitor import CSVLogger, Monitor, columns, read_rows
from ..monitor.isolation import analysis_mode
from ..monitor.loggers import make_logger
from .spec import Spec
from .train import evaluate_loss, make_optimizer, train_step

__all__ = ["TRACK_METRICS", "COLUMNS", "track", "read_rows", "checkpoint_path", "SettingsMismatchError"]

TRACK_METRICS = ("trace", "effective_rank", "kernel_alignment", "target_alignment")
COLUMNS = columns(TRACK_METRICS)


class SettingsMismatchError(ValueError):
    """``resume=True`` with settings other than the interrupted run's (a usage error)."""


def checkpoint_path(csv_path: str | Path) -> Path:
    """Where :func:`track` keeps its checkpoint for ``csv_path``."""
    p = Path(csv_path)
    return p.with_name(p.name + ".ckpt.pt")


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a checkpoint is either the old one or the new one, never half of each


class _JSONLLogger:
    """Rows as JSON lines beside the CSV, resumable like it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._resume_after: int | None = None
        self._file: Any = None

    def resume(self, last_step: int | None) -> None:
        self._resume_after = -1 if last_step is None else last_step

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        if self._file is None:
            kept = ""
            if self._resume_after is not None and self.path.is_file():
                for line in self.path.read_text().splitlines(keepends=True):
                    if line.endswith("\n") and json.loads(line)["step"] <= self._resume_after:
                        kept += line
            self.path.write_text(kept)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(dict(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _loss(spec: Spec) -> float:
    """The training loss at the current parameters, in eval mode (modes restored), no update."""
    with analysis_mode(spec.model), torch.no_grad():
        return evaluate_loss(spec)


def _restore(spec: Spec, opt: torch.optim.Optimizer, out: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The interrupted run's checkpoint, its settings checked against ``config`` (all but ``steps``
    must match), with the model, the optimizer and the RNG restored from it."""
    ckpt_path = checkpoint_path(out)
    if not ckpt_path.is_file() or not out.is_file():
        raise FileNotFoundError(f"nothing to resume: {out} or its checkpoint {ckpt_path.name} is missing")
    state = torch.load(ckpt_path, weights_only=True)
    saved = state["config"]
    # (a key the checkpoint lacks was added after it was written: nothing to compare)
    diff = {k: (saved.get(k), v) for k, v in config.items() if k != "steps" and k in saved and saved[k] != v}
    if diff:
        detail = ", ".join(f"{k}: interrupted run {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SettingsMismatchError(f"--resume with different settings than the interrupted run ({detail})")
    spec.model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


def _row_loggers(
    out: Path, jsonl: bool, loggers: Sequence[Any], on_row: Callable[[dict[str, Any]], None] | None
) -> list[Any]:
    """Where :func:`track`'s rows go: the CSV ``out``, its JSON lines, the extra loggers, ``on_row``."""
    logs: list[Any] = [CSVLogger(out, overwrite=True)]
    if jsonl:
        logs.append(_JSONLLogger(out.with_suffix(".jsonl")))
    logs += [make_logger(lg, out) for lg in loggers]
    if on_row is not None:
        logs.append(lambda s, row: on_row(row))
    return logs


def track(
    spec: Spec,
    out: str | Path,
    *,
    steps: int = 200,
    every: int = 20,
    optimizer: str = "adam",
    lr: float = 1e-2,
    init_scale: float = 1.0,
    method: str = "auto",
    num_probes: int = 32,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    jsonl: bool = False,
    loggers: Sequence[Any] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``spec.model`` for ``steps`` full-batch steps, recording NTK metrics every ``every``.

    Rows go to the CSV ``out`` (and ``out`` with suffix ``.jsonl`` if ``jsonl``; and to every
    extra ``loggers`` entry, as for :class:`~ntkscope.Monitor`: ``"tensorboard"`` writes to the
    directory ``out`` without its suffix), one per recorded step, flushed as written.  Returns
    every row (old ones too when resuming).  The model is trained in place (that is the point);
    its NTK is measured in eval mode.
    """
    if spec.targets is None:
        raise ValueError("tracking needs targets: return (model, inputs, targets) from the factory")
    if every < 1 or steps < 0:
        raise ValueError("every must be >= 1 and steps >= 0")
    if not math.isfinite(init_scale) or init_scale <= 0:
        raise ValueError(f"init_scale must be a positive number, got {init_scale}")
    out = Path(out)
    ckpt_path = checkpoint_path(out)
    config = {
        "steps": steps,
        "every": every,
        "optimizer": optimizer,
        "lr": lr,
        "init_scale": init_scale,
        "num_probes": num_probes,
        "seed": seed,
        "model": spec.name,
        "method": method,
    }
    opt = make_optimizer(spec.model, optimizer, lr)
    state: dict[str, Any] | None = None
    if resume:
        state = _restore(spec, opt, out, config)
        step = int(state["step"])
    else:
        if out.exists() and out.stat().st_size > 0 and not overwrite:
            raise FileExistsError(f"{out} already exists: pass resume=True to continue it or overwrite=True to replace it")
        with torch.no_grad():
            for p in spec.model.parameters():
                p.mul_(init_scale)
        step = 0

    monitor = Monitor(
        spec.model,
        spec.inputs,
        targets=spec.targets,
        output=spec.output,
        metrics=TRACK_METRICS,
        every=every,
        num_probes=num_probes,
        method=str(state["monitor"]["method"]) if state is not None else method,
        seed=seed,
        loggers=_row_loggers(out, jsonl, loggers, on_row),
    )
    monitor.probe_parallel = distributed.is_initialized()  # under torchrun every rank records together
    if state is not None:
        monitor.load_state_dict(state["monitor"])

    def checkpoint(s: int) -> None:
        _save_atomic(
            {
                "step": s,
                "model": spec.model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
                "monitor": monitor.state_dict(),
                "config": config,
            },
            ckpt_path,
        )

    try:
        if state is None:
            checkpoint(step)
        monitor.record(step, loss=_loss(spec))  # the checkpoint's step: not yet in its rows
        while step < steps:
            train_step(spec, opt)
            step += 1
            if on_step:
                on_step(step)
            if step % every == 0 or step == steps:
                checkpoint(step)
                monitor.record(step, loss=_loss(spec))
    finally:
        monitor.close()
    return monitor.rows
