"""NTK metrics while PyTorch Lightning trains: :class:`NTKCallback`.

::

    import lightning as L
    from ntkscope.integrations.lightning import NTKCallback

    trainer = L.Trainer(max_steps=1000, logger=L.pytorch.loggers.TensorBoardLogger("runs"),
                        callbacks=[NTKCallback(X_probe, y_probe, every_n_steps=50)])
    trainer.fit(module, loader)

At the start of training (``K_0`` is snapshotted then) and every ``every_n_steps`` optimizer
steps (``trainer.global_step``), the callback's :class:`~ntkscope.Monitor` measures the NTK of the
``LightningModule`` (its ``forward``) on the fixed inputs and sends ``ntk/<metric>``,
``ntk/<metric>_stderr``, ``ntk/passes`` and ``ntk/seconds`` through ``Logger.log_metrics`` to
every logger the Trainer has (TensorBoard, CSV, W&B, MLflow, …) at that step.  Training is
untouched (see :class:`~ntkscope.Monitor`).

**Ranks.**  By default only global rank 0 measures.  ``probe_parallel=True`` makes every rank
measure together, each evaluating a share of the probes (:mod:`ntkscope.distributed`), with the
same numbers as one process.

**Resuming.**  The callback's state (``K_0``'s parameters, the method, the rows) is saved in
Lightning checkpoints and restored with them, so a resumed fit keeps measuring against the
original ``K_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("ntkscope.integrations.lightning needs PyTorch Lightning: pip install 'ntkscope[lightning]'") from e

from torch import nn

from ..monitor import DEFAULT_METRICS, Monitor
from . import monitor_settings, prefixed

__all__ = ["NTKCallback"]


class NTKCallback(pl.Callback):
    """Record NTK metrics of the ``LightningModule`` into the Trainer's loggers.

    Args:
        inputs: fixed analysis inputs for the module's ``forward`` (moved to its device).
        targets: for ``target_alignment`` (the state's shape, or class labels).
        every_n_steps: record every this many optimizer steps (and at the start).
        output: which part of ``forward``'s return value is the state (as for :class:`ntkscope.NTK`).
        model: analyse a submodule instead of the whole module: an attribute name or a callable
            ``pl_module -> nn.Module``.
        metrics, num_probes, method, seed: as for :class:`~ntkscope.Monitor`.
        loggers, path: extra Monitor loggers besides the Trainer's (default none).
        probe_parallel: split probes over all ranks (every rank measures) instead of rank 0 alone.

    Attributes:
        monitor: the :class:`~ntkscope.Monitor` (on the ranks that measure, once training started).
    """

    def __init__(
        self,
        inputs: Any,
        targets: Any = None,
        *,
        every_n_steps: int = 100,
        output: Any = None,
        model: str | Callable[[Any], nn.Module] | None = None,
        metrics: Sequence[str] = DEFAULT_METRICS,
        num_probes: int = 64,
        method: str = "auto",
        seed: int = 0,
        loggers: Sequence[Any] = (),
        path: str | Path | None = None,
        probe_parallel: bool = False,
    ) -> None:
        self.inputs = inputs
        self.targets = targets
        self.model = model
        self.kw: dict[str, Any] = monitor_settings(
            every_n_steps, output=output, metrics=metrics, num_probes=num_probes, method=method, seed=seed, loggers=loggers, path=path
        )
        self.probe_parallel = probe_parallel
        self.monitor: Monitor | None = None
        self._restored: dict[str, Any] | None = None

    def _module(self, pl_module: Any) -> nn.Module:
        if self.model is None:
            return pl_module  # type: ignore[no-any-return]
        if isinstance(self.model, str):
            return pl_module.get_submodule(self.model)  # type: ignore[no-any-return]
        return self.model(pl_module)

    def _log(self, trainer: Any, row: dict[str, Any] | None) -> None:
        if row is None or not trainer.is_global_zero:
            return
        metrics = prefixed(row)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row["step"])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not (self.probe_parallel or trainer.is_global_zero):
            return
        self.monitor = Monitor(self._module(pl_module), self.inputs, targets=self.targets, **self.kw)
        self.monitor.probe_parallel = self.probe_parallel
        if self._restored:
            self.monitor.load_state_dict(self._restored)
        self._log(trainer, self.monitor.step(trainer.global_step))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            self._log(trainer, self.monitor.step(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
        for logger in trainer.loggers if trainer.is_global_zero else ():
            logger.save()

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._restored or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
