"""A tiny run of benchmarks/scale_410m.py (a 2-layer GPT-NeoX from a config): every state gets a
trace, Frobenius norm and effective rank with relative standard errors, and the files are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_scale(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCH))
    try:
        import scale_410m
    finally:
        sys.path.remove(str(BENCH))
    res = scale_410m.main(["--quick", "--budget", "1", "--max-probes", "6", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "scale_410m_quick.json").read_text())
    assert saved["model"] == "tiny-neox" and saved["floor"]["forward_backward"] > 0
    assert [s["state"] for s in res["states"]] == ["logits", "hidden"]
    for s in res["states"]:
        assert 3 <= s["probes"] <= 6 and s["vjp_passes"] == s["probes"]
        assert s["trace"] > 0 and s["frobenius_norm"] > 0 and 1 <= s["effective_rank"] <= s["D"]
        assert s["trace_rel_stderr"] > 0 and s["frobenius_rel_stderr"] > 0
        assert abs(sum(s["trace_shares"]) - 1) < 1e-9
    assert "relative standard error" in (tmp_path / "scale_410m_quick.md").read_text()
