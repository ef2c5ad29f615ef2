"""The ``ntkscope run`` demo: two small models trained for a few seconds, then measured.

:func:`run_demo` trains an MLP on scikit-learn's digits and a GRU on the 3-bit flip-flop task
(Sussillo & Barak 2013), then estimates trace, Frobenius norm, effective rank and kernel-target
alignment of each NTK and, where the kernel is small enough, the exact values for comparison
(:func:`ntkscope.cli.compare.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .compare import evaluate
from .spec import BUILTINS, Spec
from .train import train

__all__ = ["demo_specs", "run_demo"]


def demo_specs(seed: int = 0) -> Iterator[tuple[Spec, int, float]]:
    """The demo's models with their training budgets (steps, Adam learning rate)."""
    yield BUILTINS["mlp-digits"](seed), 100, 1e-2
    yield BUILTINS["gru-flipflop"](seed), 150, 1e-2


def run_demo(
    seed: int = 0, num_probes: int = 64, *, method: str = "auto", progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Train the demo models briefly and measure their NTKs; one record per model."""
    out = []
    for spec, steps, lr in demo_specs(seed):
        if progress:
            progress(f"training {spec.name}")
        losses = train(spec, steps, lr)
        spec.model.eval()
        res = evaluate(
            spec,
            progress=(lambda m, n=spec.name: progress(f"{n}: {m}")) if progress else None,  # type: ignore[misc]
            method=method,
            num_probes=num_probes,
            seed=seed,
        )
        res["train"] = {"steps": steps, "optimizer": "adam", "lr": lr, "loss_start": losses[0], "loss_end": losses[-1]}
        out.append(res)
    return out
