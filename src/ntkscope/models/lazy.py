"""Lazy and rich training by output scaling (Chizat, Oyallon & Bach, NeurIPS 2019).

Train the centred, scaled model

    f_α(θ, x) = α · (f(θ, x) − f(θ₀, x))

on the loss scaled by ``1/α²``: ``L_α(θ) = L(f_α(θ)) / α²``.  The centring makes ``f_α(θ₀) = 0``
for every α, so all α start from the same function; the ``1/α²`` makes the linearised
(function-space) dynamics the same for every α at a given learning rate: a gradient step moves
θ by ``−(η/α) Jᵀ∇L`` and ``f_α`` by ``−η K ∇L + O(η²/α)``, with ``K = J Jᵀ`` the NTK of f.
Large α: the parameters barely move and the kernel stays put (lazy, the NTK regime); small α:
the parameters move a lot relative to their effect and the kernel can change (rich, feature
learning).  The init-scale knob of ``ntkscope track`` is *not* this construction.

The NTK of ``f_α`` is ``α² K(θ)``; alignments and effective ranks do not depend on α, so measure
the kernel of the inner model (``AlphaScaled.model``) — it is cheaper (fast paths apply) and the
numbers are the same.

Usage (any optimiser; plain SGD keeps the α-equivalence of the linearised dynamics)::

    net = AlphaScaled(model, alpha=10.0)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.1)
    loss = net.scale_loss(F.mse_loss(net(x), y))   # L(f_α) / α²
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..operators.modules import analysis_module

__all__ = ["AlphaScaled"]


class AlphaScaled(nn.Module):
    """``α · (f(θ) − f(θ₀))`` with θ₀ frozen as buffers (a snapshot taken at construction).

    Args:
        model: the network f; its parameters are the trainable θ (shared, not copied).
        alpha: the scale α > 0.
        theta0: the reference point θ₀ (name -> tensor); default: a copy of the model's
            parameters now.

    Attributes:
        alpha: the scale.
        loss_scale: ``1 / α²``, the factor of the training loss (:meth:`scale_loss`).

    The reference output ``f(θ₀, x)`` is computed without gradient tracking with the model's
    current buffers (e.g. BatchNorm statistics) and θ₀ in place of θ.  A model whose forward is
    random (dropout in training mode) makes the two terms use different noise: put it in eval
    mode, or remove the randomness, for the construction to hold.  ``state_dict`` holds θ₀ as
    buffers (``theta0.<i>``), so a checkpoint restores the reference point too.
    """

    def __init__(self, model: nn.Module, alpha: float, theta0: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or alpha == float("inf"):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        self.model = model
        self.alpha = float(alpha)
        named = dict(model.named_parameters())
        if not named:
            raise ValueError(f"{type(model).__name__} has no parameters to scale around")
        if theta0 is None:
            theta0 = {n: p.detach().clone() for n, p in named.items()}
        else:
            missing = [n for n in named if n not in theta0]
            extra = [n for n in theta0 if n not in named]
            if missing or extra:
                raise ValueError(f"theta0 must name every parameter of the model: missing {missing[:4]}, unknown {extra[:4]}")
            for n, p in named.items():
                if tuple(theta0[n].shape) != tuple(p.shape):
                    raise ValueError(f"theta0[{n!r}] has shape {tuple(theta0[n].shape)}, the parameter {tuple(p.shape)}")
        self._names = list(named)
        self.theta0 = nn.Module()
        for i, n in enumerate(self._names):
            self.theta0.register_buffer(str(i), theta0[n].detach().clone().to(named[n].dtype))

    @property
    def loss_scale(self) -> float:
        """``1 / α²``: multiply the training loss by this (see :meth:`scale_loss`)."""
        return 1.0 / self.alpha**2

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss / α²`` — the loss of the α-scaled objective."""
        return loss * self.loss_scale

    def initial_parameters(self, trainable: bool = True) -> dict[str, torch.Tensor]:
        """θ₀ as a dict name -> tensor (e.g. ``NTK(net.model, X, params=net.initial_parameters())``,
        the kernel at initialisation): of the parameters that require grad now, the ones
        ``NTK(net.model, X)`` analyses, so the two kernels are over the same parameters (frozen
        ones are constants of both); ``trainable=False``: of every parameter."""
        grad = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: getattr(self.theta0, str(i)) for i, n in enumerate(self._names) if not trainable or n in grad}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The inner model's parameters (θ; the wrapper adds none)."""
        return self.model.parameters()

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        """``f(θ₀, x)`` (no gradient)."""
        # on the analysis module: a module under two names keeps its Parameters, and train-mode
        # BatchNorm normalises with batch statistics without moving its running stats twice a step
        with torch.no_grad():
            return functional_call(analysis_module(self.model), self.initial_parameters(trainable=False), args, kwargs, strict=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        ref = self.reference(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"AlphaScaled needs a model that returns a tensor, got {type(out).__name__}")
        return self.alpha * (out - ref)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"
