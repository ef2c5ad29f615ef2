"""Tracking NTK metrics over training: rows, K_0 alignment, resuming after an interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ntkscope.cli import track as tr
from ntkscope.cli.spec import Spec


def _spec(seed: int = 0) -> Spec:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    X, Y = torch.randn(8, 3), torch.randn(8, 2)
    return Spec(model, X, Y, name="tiny")


KW = dict(steps=12, every=3, optimizer="sgd", lr=0.2, method="vjp", num_probes=6, seed=1)


class _Stop(KeyboardInterrupt):
    pass


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in x:
            if k == "method":
                assert x[k] == y[k]
            elif k != "seconds":
                assert x[k] == pytest.approx(y[k], rel=1e-12), (k, x["step"])


def test_rows_and_initial_alignment(tmp_path: Path) -> None:
    spec = _spec()
    before = {n: p.detach().clone() for n, p in spec.model.named_parameters()}
    rows = tr.track(spec, tmp_path / "t.csv", jsonl=True, **KW)  # type: ignore[arg-type]
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]
    _same(tr.read_rows(tmp_path / "t.csv"), rows)  # the CSV holds the returned rows, to full precision
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 5
    # K_0 against itself: the shared-probe estimate of the alignment is exactly 1
    assert rows[0]["kernel_alignment"] == pytest.approx(1.0, abs=1e-6)
    assert rows[-1]["kernel_alignment"] < 1.0  # the kernel moved
    assert rows[-1]["loss"] < rows[0]["loss"]  # training happened
    moved = any(not torch.equal(before[n], p) for n, p in spec.model.named_parameters())
    assert moved


def test_resume_after_interrupt_equals_uninterrupted(tmp_path: Path) -> None:
    ref = tr.track(_spec(), tmp_path / "ref.csv", **KW)  # type: ignore[arg-type]

    def stop_after_two(row: dict) -> None:
        if row["step"] == 3:
            raise _Stop

    out = tmp_path / "run.csv"
    with pytest.raises(_Stop):
        tr.track(_spec(), out, on_row=stop_after_two, **KW)  # type: ignore[arg-type]
    assert len(tr.read_rows(out)) == 2
    _same(tr.track(_spec(), out, resume=True, **KW), ref)  # type: ignore[arg-type]


def test_resume_when_checkpoint_is_ahead_of_csv(tmp_path: Path) -> None:
    """Interrupted after the checkpoint but before (or in the middle of) writing its row."""
    ref = tr.track(_spec(), tmp_path / "ref.csv", **KW)  # type: ignore[arg-type]
    out = tmp_path / "run.csv"

    def stop(row: dict) -> None:
        if row["step"] == 6:
            raise _Stop

    with pytest.raises(_Stop):
        tr.track(_spec(), out, on_row=stop, **KW)  # type: ignore[arg-type]
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:7])  # the step-6 row half written
    _same(tr.track(_spec(), out, resume=True, **KW), ref)  # type: ignore[arg-type]


def test_resume_refuses_other_settings_and_missing_files(tmp_path: Path) -> None:
    out = tmp_path / "a.csv"
    tr.track(_spec(), out, **{**KW, "steps": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different settings"):
        tr.track(_spec(), out, resume=True, **{**KW, "lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        tr.track(_spec(), tmp_path / "none.csv", resume=True, **KW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets"):
        tr.track(Spec(nn.Linear(2, 2), torch.randn(3, 2)), out, **KW)  # type: ignore[arg-type]
