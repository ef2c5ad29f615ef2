"""NTK metrics while the Hugging Face ``Trainer`` trains: :class:`NTKCallback`.

::

    from ntkscope.integrations.transformers import NTKCallback

    probe = tokenizer(["a few", "fixed sentences"], return_tensors="pt", padding=True)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[NTKCallback(dict(probe), every_n_steps=50)])
    trainer.train()
    [r for r in trainer.state.log_history if "ntk/trace" in r]

At the start of training (``K_0`` is snapshotted then) and every ``every_n_steps`` optimizer
steps, the callback's :class:`~ntkscope.Monitor` measures the model's NTK on the fixed inputs
(the ``logits`` by default) and hands the row to ``Trainer.log``: it lands in
``trainer.state.log_history`` (keys ``ntk/<metric>``, ``ntk/<metric>_stderr``, ``ntk/passes``,
``ntk/seconds``) and goes to every integration chosen by ``report_to`` (TensorBoard shows
``train/ntk/trace`` …, W&B, MLflow, …).  The training itself is untouched (see
:class:`~ntkscope.Monitor`).  Under distributed training the world's process zero measures
(``probe_parallel=True``: every rank takes a share of the probes).

A run resumed with ``resume_from_checkpoint`` takes ``K_0`` at the resumed start (Hugging Face
keeps callback state as JSON, which cannot hold parameters): save the first run's
``callback.monitor.state_dict()`` (``torch.save``) and pass it as ``NTKCallback(..., resume_state=...)``
to measure against the original ``K_0`` and continue its rows.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:
    raise ImportError("ntkscope.integrations.transformers needs Hugging Face transformers: pip install 'ntkscope[hf]'") from e

from ..monitor import DEFAULT_METRICS, Monitor
from . import monitor_settings, prefixed

__all__ = ["NTKCallback"]


def _find_trainer(depth: int = 12) -> Trainer | None:
    """The ``Trainer`` whose callback handler is calling us (a few frames up the stack)."""
    f: Any = sys._getframe(2)
    for _ in range(depth):
        if f is None:
            return None
        obj = f.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        f = f.f_back
    return None


class NTKCallback(TrainerCallback):
    """Record NTK metrics of the model being trained, into the Trainer's logs.

    Args:
        inputs: fixed analysis inputs (e.g. ``{"input_ids": ..., "attention_mask": ...}``).
        targets: for ``target_alignment`` (the state's shape, or labels over its last axis).
        every_n_steps: record every this many optimizer steps (and at the start).
        output: the state: ``"logits"`` (default), another key of the model's output, or a callable.
        metrics, num_probes, method, seed: as for :class:`~ntkscope.Monitor`.
        loggers, path: extra Monitor loggers (default none: the Trainer's integrations log).
        probe_parallel: under distributed training, split probes over all ranks instead of
            measuring on process zero alone.
        trainer: the Trainer (found automatically when it calls the callback).
        resume_state: a ``Monitor.state_dict()`` of an earlier run to continue (its ``K_0`` and rows).

    Attributes:
        monitor: the :class:`~ntkscope.Monitor` (after training started); ``monitor.rows``.
    """

    def __init__(
        self,
        inputs: Any,
        targets: Any = None,
        *,
        every_n_steps: int = 100,
        output: Any = "logits",
        metrics: Sequence[str] = DEFAULT_METRICS,
        num_probes: int = 64,
        method: str = "auto",
        seed: int = 0,
        loggers: Sequence[Any] = (),
        path: str | Path | None = None,
        probe_parallel: bool = False,
        trainer: Trainer | None = None,
        resume_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.inputs = inputs
        self.targets = targets
        self.kw: dict[str, Any] = monitor_settings(
            every_n_steps, output=output, metrics=metrics, num_probes=num_probes, method=method, seed=seed, loggers=loggers, path=path
        )
        self.probe_parallel = probe_parallel
        self.trainer = trainer
        self.resume_state = resume_state
        self.monitor: Monitor | None = None

    def _active(self, state: Any) -> bool:
        return self.probe_parallel or bool(state.is_world_process_zero)

    def _log(self, row: dict[str, Any] | None, state: Any) -> None:
        if row is None or not state.is_world_process_zero:
            return
        logs = prefixed(row)
        if self.trainer is not None:
            self.trainer.log(logs)  # log_history and every report_to integration, as Trainer.log does
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            self.trainer = _find_trainer()
        if model is None or not self._active(state):
            return
        self.monitor = Monitor(model, self.inputs, targets=self.targets, **self.kw)
        self.monitor.probe_parallel = self.probe_parallel
        if self.resume_state is not None:
            self.monitor.load_state_dict(self.resume_state)
        self._log(self.monitor.step(state.global_step), state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self._log(self.monitor.step(state.global_step), state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
