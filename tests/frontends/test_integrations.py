"""The examples run as tests: a plain loop with a Monitor, Lightning + TensorBoard, the Hugging Face Trainer."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ntkscope.monitor import DEFAULT_METRICS, read_rows

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_monitor_loop_example(tmp_path: Path) -> None:
    res = _example("monitor_loop").main(tmp_path, epochs=1, every=6, quiet=True)
    rows = read_rows(tmp_path / "ntk.csv")
    assert [r["step"] for r in rows] == [0, 6, 12]  # every 6 steps, and the final parameters
    for a, b in zip(rows, res["rows"]):  # the CSV holds the rows to full precision
        assert all(a[k] == b[k] or (k == "loss" and math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    # the trace is exact over its per-example blocks (one VJP per class), the ratios are sampled
    assert all(r["trace_stderr"] == 0 for r in rows)
    sampled = [m for m in DEFAULT_METRICS if m != "trace"]
    assert all(r[f"{m}_stderr"] > 0 for r in rows for m in sampled if not (m == "kernel_alignment" and r["step"] == 0))
    # K_0 against itself: exactly 1 with shared VJP probes; "auto" may pick JVP (independent probes), then within its error
    first = rows[0]
    assert abs(first["kernel_alignment"] - 1.0) <= 4 * first["kernel_alignment_stderr"] + 1e-6, first
    assert rows[1]["loss"] < rows[0]["loss"] and math.isnan(rows[2]["loss"])  # the last record was given no loss


def test_lightning_example_writes_ntk_scalars_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    res = _example("lightning_gru").main(tmp_path, steps=20, every=10, quiet=True)
    assert [r["step"] for r in res["rows"]] == [0, 10, 20]
    ev = _events(res["log_dir"])
    for m in ("trace", "effective_rank", "kernel_alignment", "target_alignment"):
        assert [s for s, _ in ev[f"ntk/{m}"]] == [0, 10, 20], m
        assert [v for _, v in ev[f"ntk/{m}"]] == pytest.approx([r[m] for r in res["rows"]], rel=1e-6)
        assert [v for _, v in ev[f"ntk/{m}_stderr"]] == pytest.approx([r[f"{m}_stderr"] for r in res["rows"]], rel=1e-6)
    assert "train_loss" in ev  # the module's own logging still works beside it


def test_hf_trainer_example_logs_ntk_rows(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    res = _example("hf_trainer").main(tmp_path, steps=4, every=2, quiet=True)
    rows = res["rows"]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        for m in DEFAULT_METRICS:
            if m != "target_alignment":
                assert math.isfinite(r[f"ntk/{m}"]) and r[f"ntk/{m}_stderr"] >= 0
        assert r["ntk/passes"] > 0
    assert rows[0]["ntk/kernel_alignment"] == pytest.approx(1.0, abs=1e-6)
    mon = res["callback"].monitor
    assert [r["ntk/trace"] for r in rows] == [r["trace"] for r in mon.rows]
    if importlib.util.find_spec("tensorboard"):  # report_to="tensorboard" received them too
        ev = _events(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent)
        assert [s for s, _ in ev["train/ntk/trace"]] == [0, 2, 4]


def _gru_module() -> object:
    from lightning_models import GRUModule

    return GRUModule()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("NTKSCOPE_SLOW_TESTS"),
    reason="about a minute on 2 cores (spawns 2 Lightning processes); set NTKSCOPE_SLOW_TESTS=1",
)
def test_lightning_probe_parallel_over_two_ranks(tmp_path: Path) -> None:
    """ddp on two CPU processes (gloo): each rank evaluates part of the probes; rank 0 logs the single-process numbers."""
    L = pytest.importorskip("lightning")
    import torch
    from lightning.pytorch.loggers import CSVLogger

    import ntkscope as nk
    from ntkscope import tasks
    from ntkscope.integrations.lightning import NTKCallback

    X, Y = tasks.flipflop(16, 6, 3, p=0.2, seed=0)
    Xp, Yp = tasks.flipflop(4, 6, 3, p=0.2, seed=1)
    kw = dict(num_probes=12, method="vjp", seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    cb = NTKCallback(Xp, Yp, every_n_steps=2, probe_parallel=True, **kw)  # type: ignore[arg-type]
    trainer = L.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=2, callbacks=[cb], logger=CSVLogger(str(tmp_path), name="pp"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_gru_module(), loader)
    import csv

    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("ntk/trace")]
    assert [int(r["step"]) for r in logged] == [0, 2]
    ref = nk.Monitor(_gru_module(), Xp, targets=Yp, loggers=(), every=2, **kw).step(0)  # type: ignore[arg-type]
    assert ref is not None
    for m in DEFAULT_METRICS:
        assert float(logged[0][f"ntk/{m}"]) == pytest.approx(ref[m], rel=1e-5, abs=1e-7), m
    assert 0 < float(logged[0]["ntk/passes"]) < ref["passes"]  # this rank's share of the probes


def test_lightning_resume_keeps_k0_and_rows(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    import torch

    from ntkscope import tasks
    from ntkscope.integrations.lightning import NTKCallback

    X, Y = tasks.flipflop(16, 6, 3, p=0.2, seed=0)
    Xp, Yp = tasks.flipflop(4, 6, 3, p=0.2, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    kw: dict = dict(every_n_steps=2, num_probes=8, method="vjp")
    opts: dict = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    first = NTKCallback(Xp, Yp, **kw)
    trainer = L.Trainer(max_steps=4, callbacks=[first], **opts)
    trainer.fit(_gru_module(), loader)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    again = NTKCallback(Xp, Yp, **kw)
    L.Trainer(max_steps=8, callbacks=[again], **opts).fit(_gru_module(), loader, ckpt_path=tmp_path / "a.ckpt")
    assert first.monitor is not None and again.monitor is not None
    assert [r["step"] for r in again.monitor.rows] == [0, 2, 4, 6, 8]  # the restored rows, then the new ones
    strip = lambda rows: [{k: v for k, v in r.items() if k != "loss"} for r in rows]  # noqa: E731  (loss: NaN)
    assert strip(again.monitor.rows[:3]) == strip(first.monitor.rows)
    assert again.monitor.init is not None and first.monitor.init is not None
    assert all(torch.equal(again.monitor.init[n], t) for n, t in first.monitor.init.items())  # the original K_0
    assert again.monitor.rows[-1]["kernel_alignment"] < 1.0
