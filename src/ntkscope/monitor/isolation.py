"""The state every :class:`~ntkscope.Monitor` record runs in, leaving no trace on training.

Eval mode with each module's flag restored (:func:`analysis_mode`), every random stream restored,
autocast off, gradient mode on and attention on PyTorch's ``MATH`` backend (:func:`isolated`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..operators.rules import math_attention

__all__ = ["isolated", "analysis_mode", "move_to"]


def move_to(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``x`` (a tensor or a tuple, list or dict of them) on ``device``, floating-point tensors cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, Mapping):
        return {k: move_to(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device, dtype) for v in x)
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
    npstate = np.random.get_state()
    cuda_devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_devices = sorted(set(cuda_devices) | {torch.cuda.current_device()})
    try:
        with torch.random.fork_rng(devices=cuda_devices, enabled=True):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npstate)


@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
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
    """The state every record runs in, leaving no trace: see :mod:`ntkscope.monitor`."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_rng_preserved(model))
        for dt in sorted(_device_types(model)):
            with contextlib.suppress(RuntimeError, ValueError):  # device types without autocast support
                stack.enter_context(torch.autocast(device_type=dt, enabled=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(analysis_mode(model))
        stack.enter_context(math_attention())
        yield
