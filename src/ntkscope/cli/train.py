"""Brief full-batch training of a :class:`~ntkscope.cli.spec.Spec`: the loop ``ntkscope run``
trains the demo models with and ``ntkscope track`` measures the NTK along.

The loss is cross-entropy for integer class labels (over the last axis of the state) and mean
squared error for floating-point targets (:func:`loss_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..operators.modules import select_output as _select_output
from .spec import Spec

__all__ = ["select_output", "loss_for", "make_optimizer", "train_step", "evaluate_loss", "train"]


def select_output(out: Any, output: Any) -> torch.Tensor:
    """The state picked from a model's return value (same rules as :class:`ntkscope.NTK`)."""
    return _select_output(out, output)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def loss_for(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for integer class labels (over the last axis), mean squared error otherwise."""
    if targets.is_floating_point():
        return lambda z, y: torch.nn.functional.mse_loss(z, y.to(z.dtype).reshape(z.shape))
    return lambda z, y: torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


#: The optimizers ``track`` trains with, by name.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")
    return OPTIMIZERS[name](model.parameters(), lr=lr)


def train_step(spec: Spec, optimizer: torch.optim.Optimizer) -> float:
    """One full-batch step on the spec's training data; returns the loss before the step."""
    X = spec.train_inputs if spec.train_inputs is not None else spec.inputs
    y = spec.train_targets if spec.train_targets is not None else spec.targets
    if y is None:
        raise ValueError("training needs targets: return them from the factory (model, inputs, targets)")
    spec.model.train()
    optimizer.zero_grad(set_to_none=True)
    z = select_output(_call(spec.model, X), spec.output)
    loss = loss_for(y)(z, y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def evaluate_loss(spec: Spec) -> float:
    """The training loss at the current parameters (no update)."""
    X = spec.train_inputs if spec.train_inputs is not None else spec.inputs
    y = spec.train_targets if spec.train_targets is not None else spec.targets
    if y is None:
        raise ValueError("a loss needs targets")
    z = select_output(_call(spec.model, X), spec.output)
    return float(loss_for(y)(z, y))


def train(spec: Spec, steps: int, lr: float = 1e-2, optimizer: str = "adam") -> list[float]:
    """Train briefly (full batch); returns the loss per step."""
    opt = make_optimizer(spec.model, optimizer, lr)
    return [train_step(spec, opt) for _ in range(steps)]
