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

__all__ = ["prefixed"]


def prefixed(row: Mapping[str, Any], prefix: str = "ntk/") -> dict[str, float]:
    """A Monitor row as loggable scalars: ``ntk/<metric>``, ``ntk/<metric>_stderr``, passes, seconds."""
    from ..monitor import _row_metrics, _scalars

    return _scalars(row, _row_metrics(row), prefix)
