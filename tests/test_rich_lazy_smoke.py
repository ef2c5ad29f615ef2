"""A tiny run of benchmarks/rich_lazy.py: both models train, every kernel number has an error bar,
and the JSON, Markdown and PNG are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_tiny_rich_lazy(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import rich_lazy
    finally:
        sys.path.remove(str(BENCH))
    cfg = rich_lazy.config(True)
    cfg.update(
        alphas=[0.3, 30.0],
        probes=6,
        gru={"hidden": 4, "steps": 3, "train_batch": 4, "eval_batch": 2, "T": 5, "lr": 0.1, "checkpoints": 1},
        mlp={"hidden": 6, "steps": 3, "train_n": 64, "batch": 16, "eval_n": 4, "lr": 0.5, "checkpoints": 1},
    )
    res = rich_lazy.main(["--quick", "--out", str(tmp_path)], cfg=cfg)
    saved = json.loads((tmp_path / "rich_lazy_quick.json").read_text())
    assert saved["mode"] == "quick" and [r["alpha"] for r in saved["gru"]["runs"]] == [0.3, 30.0]
    for key in ("gru", "mlp"):
        for run in res[key]["runs"]:
            first, last = run["checkpoints"][0], run["checkpoints"][-1]
            assert first["step"] == 0 and last["step"] == 3
            assert abs(first["kernel_alignment"]["value"] - 1) < 1e-9  # K_0 against itself, same probes
            assert last["kernel_alignment"]["stderr"] is not None and last["target_alignment"]["stderr"] is not None
            assert set(last["blocks"]) == set(res[key]["blocks"])
            assert abs(sum(b["share"] for b in last["blocks"].values()) - 1) < 1e-9
    md = (tmp_path / "rich_lazy_quick.md").read_text()
    assert "GRU on 3-bit flip-flop" in md and "MLP on digits" in md
    assert (tmp_path / "rich_lazy_quick.png").stat().st_size > 0
