"""A tiny run of the benchmark suite: every section runs and writes its JSON, Markdown and PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        import run

        yield run
    finally:
        sys.path.remove(str(BENCH))


def test_tiny_suite(suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    base = suite.config

    def tiny(quick: bool, seeds: int | None) -> dict:
        cfg = base(True, seeds)
        cfg.update(
            mlp={"n": 6, "d_in": 100, "width": 8, "layers": 3},
            gru={"T": 5, "B": 3, "H": 6},
            digits={"n_test": 8, "epochs": 1},
            budgets={"mlp": [24], "gru": [24], "digits": [24]},
            speedup_sizes={"gru": [(5, 3, 6)]},
            speedup_budgets=[24, 96],
            speedup_seeds=2,
            tolerances=[0.5],
            peer_budgets=[8],
            peer_seeds=1,
            floor_passes=16,
            repeats=1,
            scaling_sizes={"gru": [(5, 3, 6)]},
            scaling_probes=4,
            scaling_chunk=2,
        )
        return cfg

    monkeypatch.setattr(suite, "config", tiny)
    sections = ["floors", "accuracy", "speedup", "scaling"]
    res = suite.main(["--quick", "--seeds", "2", "--out", str(tmp_path), "--only", ",".join(sections)])
    for name in sections:
        assert "error" not in res[name], res[name]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["mode"] == "quick"
    md = (tmp_path / "results.md").read_text()
    assert "Floors" in md and "Accuracy" in md and "Scaling" in md
    assert (tmp_path / "accuracy_gru.png").stat().st_size > 0
    assert (tmp_path / "scaling.png").exists() and (tmp_path / "floors.png").exists()
    # the exact values the accuracy section compares against are the library's exact ones
    ex = saved["accuracy"]["exact"]["gru"]
    assert ex["D"] == 5 * 3 * 6 and ex["trace"] > 0 and 1 <= ex["effective_rank"] <= ex["D"]
    errs = [r["err_median"] for r in saved["accuracy"]["rows"] if "err_median" in r]
    assert errs and all(e >= 0 for e in errs)
    sc = saved["scaling"]["rows"][0]
    assert sc["D"] == 90 and sc["peak_rss_mib"] > 0


def test_engine_table_smoke(tmp_path: Path) -> None:
    """benchmarks/engine.py (models as written vs a bare torch.func loop) runs and writes its table."""
    import subprocess

    r = subprocess.run(
        [sys.executable, str(BENCH / "engine.py"), "--quick", "--only", "paper GRU,LSTM,paper MLP", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "engine_quick.json").read_text())["rows"]
    mlp = "paper MLP (15×Linear 64, Sequential)"
    assert {row["model"] for row in rows} == {"paper GRU, wrapped", "LSTM, wrapped", mlp, mlp + ", per-example samples"}
    rnn = [row for row in rows if "MLP" not in row["model"]]
    assert all(row["path"].endswith("+rules") and row["ours_s"] > 0 and row["bare_s"] > 0 for row in rnn)
    # the quick MLP (10 examples × 16 outputs): exact over its blocks in 16 VJP passes at 24 probes, samples below
    blocks = {(row["model"], row["m"]): row for row in rows if row["side"] == "vjp" and "MLP" in row["model"]}
    assert blocks[(mlp, 24)]["note"].startswith("exact over 10 per-example blocks") and not blocks[(mlp, 8)]["note"]
    assert blocks[(mlp, 24)]["path"].startswith("per-example blocks") and (mlp + ", per-example samples", 24) in blocks
    assert "ours ÷ bare" in (tmp_path / "engine_quick.md").read_text()
    assert all(row["products_s"] > 0 and row["bare_products_s"] > 0 for row in rows)  # the replayed matrix products


def test_product_floor_replays_the_products_of_a_call() -> None:
    """common.product_floor times the matrix products a call made, at their shapes and strides
    (broadcast operands included), and nothing else."""
    sys.path.insert(0, str(BENCH))
    from common import product_floor

    A, B = torch.randn(64, 32), torch.randn(32, 16)
    e = torch.randn(8, 16).expand(4, 8, 16)  # a stride-0 operand, as vmap passes unbatched ones
    assert product_floor(lambda: (A @ B, torch.bmm(e, B.T.expand(4, 16, 32)))) > 0
    assert product_floor(lambda: (A + 1).relu()) == 0.0


def test_compiled_loop_benchmark_imports() -> None:
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "compiled_loop.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torch.compile" in r.stdout, r.stderr[-2000:]


def test_ghost_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/ghost.py (ghost norms against weight gradients) runs, and both ways agree."""
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "ghost.py"), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "ghost_quick.json").read_text())["rows"]
    assert rows and all(row["agree"] and row["ghosted"] == 3 and row["width"] < row["P"] for row in rows)


def test_gpu_benchmark_quick_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.py (the engine table on CUDA, float32 and bfloat16) runs its quick sizes on
    the CPU and writes both tables: it failed writing its results (``engine.json``) before a GPU
    was ever lent to run it."""
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for dtype in ("float32", "bfloat16"):
        rows = json.loads((tmp_path / f"engine_quick_cpu_{dtype}.json").read_text())["rows"]
        assert rows and all(row["ours_s"] > 0 and row["bare_s"] > 0 for row in rows)
        assert "ours ÷ bare" in (tmp_path / f"engine_quick_cpu_{dtype}.md").read_text()
