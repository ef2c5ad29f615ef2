"""Where probe blocks are evaluated: locally, chunk by chunk, or split over processes.

Estimators hand :func:`map_probes` a function of a probe range; the executor in :data:`EXECUTOR`
decides who evaluates which range.  :mod:`ntkscope.distributed` registers the probe-parallel
default (:func:`set_default_factory`), so the core never imports the distributed front end.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TypeVar

import torch

from .memory import scratch_scope

ProbeFn = Callable[[int, int], torch.Tensor]
_T = TypeVar("_T")
Executor = Callable[[int, int, ProbeFn], torch.Tensor]


def local_executor(m: int, chunk: int, fn: ProbeFn) -> torch.Tensor:
    """Evaluate probes ``0..m-1`` chunk by chunk; ``fn(start, stop)`` returns per-probe rows."""
    outs = [fn(s, min(m, s + chunk)) for s in range(0, m, chunk)]
    return torch.cat(outs, 0)


#: Where probe blocks are evaluated.  :mod:`ntkscope.distributed` sets an executor that splits
#: probes over ranks and gathers the per-probe rows, so every estimator scales out.
EXECUTOR: contextvars.ContextVar[Executor] = contextvars.ContextVar("ntkscope_executor", default=local_executor)


def map_probes(m: int, chunk: int, fn: ProbeFn) -> torch.Tensor:
    """Rows ``fn(s, e)`` for probes ``0..m-1``, evaluated by the current executor, concatenated
    (with the rules' scratch blocks kept from one chunk to the next)."""
    with scratch_scope():
        return current_executor()(m, max(1, chunk), fn)


def current_executor() -> Executor:
    """The executor set in :data:`EXECUTOR`; if none was, probe-parallel over the initialised world."""
    ex = EXECUTOR.get()
    if ex is local_executor and _DEFAULT is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        ex = _DEFAULT()
    return ex


_DEFAULT: Callable[[], Executor] | None = None


def set_default_factory(factory: Callable[[], Executor] | None) -> None:
    """Install what :func:`current_executor` uses when none is set and ``torch.distributed`` is
    initialised (:mod:`ntkscope.distributed` installs probe-parallel over its default group)."""
    global _DEFAULT
    _DEFAULT = factory


def agree(value: _T) -> _T:
    """The first rank's ``value`` when probes are split over processes (choices must match)."""
    fn = getattr(current_executor(), "agree", None)
    return fn(value) if fn is not None else value  # type: ignore[no-any-return]


