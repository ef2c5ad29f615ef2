"""Plots are headless and write real PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

import ntkscope as nk
from ntkscope.cli import plot


def _png(path: Path, min_w: int = 300, min_h: int = 200) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img[..., :3].std() > 0.01  # not blank
    return img


def test_convergence_png(tmp_path: Path) -> None:
    J = torch.randn(12, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    K = nk.NTK.from_jacobian(J)
    fig = plot.convergence(K, "trace", budgets=(4, 8), seeds=(0, 1), methods=("vjp", "hutchinson"), path=tmp_path / "c.png")
    assert isinstance(fig, Figure)
    _png(tmp_path / "c.png")
    ax = fig.axes[0]
    exact = float(J.square().sum())
    assert any(np.allclose(line.get_ydata(), exact) for line in ax.get_lines())  # the exact reference line


def test_per_time_step_png(tmp_path: Path) -> None:
    v = np.array([[1.0, 2.0, 3.0, 2.5], [0.5, 0.7, 0.9, 1.0]])
    fig = plot.per_time_step(v, 0.1 * v, labels=["a", "b"], exact=v * 1.01, ylabel="trace per step", path=tmp_path / "t.png")
    assert isinstance(fig, Figure)
    _png(tmp_path / "t.png")
    with pytest.raises(ValueError, match="do not match"):
        plot.per_time_step(v, np.ones(3))


def test_training_png(tmp_path: Path) -> None:
    rows = [
        {
            "step": s,
            "loss": 1.0 / (s + 1),
            "effective_rank": 5 - s / 10,
            "effective_rank_stderr": 0.2,
            "kernel_alignment": 1 - s / 100,
        }
        for s in range(0, 30, 5)
    ]
    for r in rows:
        r["kernel_alignment_stderr"] = 0.0  # exact rows: the panel says so, the method column cannot
    fig = plot.training(rows, path=tmp_path / "new" / "dir" / "r.png")  # made, as `track --out` makes its own
    assert len([a for a in fig.axes if a.get_visible()]) == 3
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["", "", "exact at every step (stderr 0)"]
    _png(tmp_path / "new" / "dir" / "r.png")
    with pytest.raises(ValueError, match="not in the rows"):
        plot.training(rows, ["trace"])
