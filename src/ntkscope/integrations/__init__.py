"""Callbacks that put :class:`ntkscope.Monitor` into other people's training loops.

* :mod:`ntkscope.integrations.lightning` — ``NTKCallback`` for PyTorch Lightning's ``Trainer``
  (``pip install 'ntkscope[lightning]'``): rows go to every logger the Trainer has.
* :mod:`ntkscope.integrations.transformers` — ``NTKCallback`` for the Hugging Face ``Trainer``
  (``pip install 'ntkscope[hf]'``): rows go to ``trainer.state.log_history`` and to every
  ``report_to`` integration.

Both are imported on demand (this package imports neither library).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..monitor.loggers import scalars

__all__ = ["prefixed", "monitor_settings"]


def monitor_settings(every_n_steps: Any, **kw: Any) -> dict[str, Any]:
    """The :class:`~ntkscope.Monitor` keyword arguments of a callback (``every`` from
    ``every_n_steps``, which must be a positive integer), shared by both callbacks."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return dict(kw, every=every_n_steps)


def prefixed(row: Mapping[str, Any], prefix: str = "ntk/") -> dict[str, float]:
    """A Monitor row as loggable scalars: ``ntk/<metric>``, ``ntk/<metric>_stderr``, passes, seconds."""
    return scalars(row, prefix)
