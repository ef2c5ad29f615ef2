"""The command line, run for real in subprocesses on tiny models."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ntkscope as nk
from ntkscope.cli.spec import load_spec
from ntkscope.cli.track import read_rows

USER_FILE = textwrap.dedent(
    """
    import os
    import time
    import torch
    from torch import nn


    class Slow(nn.Sequential):
        # a tiny MLP that sleeps per call, so that a test can interrupt a run mid-way (the sleep
        # changes no number; the interrupted run sleeps longer so that it cannot finish first)
        def forward(self, x):
            time.sleep(float(os.environ.get("NTKSCOPE_TEST_SLEEP", "0.002")))
            return super().forward(x)


    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, torch.randn(10, 4), torch.randint(0, 3, (10,))


    def make_dict():
        model, X, y = make()
        return {"model": model, "inputs": X, "targets": y}


    def make_slow():
        torch.manual_seed(0)
        model = Slow(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, torch.randn(10, 4), torch.randn(10, 3)


    def wrong():
        return 42


    def helper():
        return 1 / 0


    def raises():
        return helper()
    """
)


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ntkscope", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    p = tmp_path / "mymodel.py"
    p.write_text(USER_FILE)
    return p


def test_estimate_json_matches_api(user_file: Path, tmp_path: Path) -> None:
    r = _cli(
        "estimate", "--model", f"{user_file}:make", "--method", "vjp", "--num-probes", "8", "--seed", "3",
        "--metrics", "trace,effective_rank,target_alignment", "--json", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    res = out["results"][0]
    assert (res["D"], res["P"]) == (30, 4 * 8 + 8 + 8 * 3 + 3)
    spec = load_spec(f"{user_file}:make")
    K = nk.NTK(spec.model, spec.inputs)
    api = {
        "trace": nk.trace(K, method="vjp", num_probes=8, seed=3),
        "effective_rank": nk.effective_rank(K, method="vjp", num_probes=8, seed=3),
        "target_alignment": nk.target_alignment(K, spec.targets, method="vjp", num_probes=8, seed=3),
    }
    got = {m["metric"]: m for m in res["metrics"]}
    assert set(got) == set(api)
    for name, e in api.items():
        g = got[name]["estimate"]
        assert g["value"] == pytest.approx(e.value, rel=1e-5)
        assert (g["stderr"] is None) == (e.stderr is None) and (e.stderr is None or g["stderr"] == pytest.approx(e.stderr, rel=1e-4))
        assert g["vjp_passes"] == e.vjp_passes and g["method"] == e.method
        # tiny kernel: the exact reference is attached and agrees with the API's exact value
        exact = getattr(nk, name)(*((K, spec.targets) if name == "target_alignment" else (K,)), method="exact").value
        assert got[name]["exact"]["value"] == pytest.approx(exact, rel=1e-5)
    # 8 probes cover the 3 outputs per example: the trace is exact over its per-example blocks, the rest sampled
    assert api["trace"].exact and api["trace"].vjp_passes == 3 and api["effective_rank"].method == "vjp"


def test_estimate_dict_factory_and_builtin_table(user_file: Path, tmp_path: Path) -> None:
    r = _cli("estimate", "-m", f"{user_file}:make_dict", "-n", "6", "--metrics", "trace", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trace" in r.stdout and "±" in r.stdout
    r = _cli(
        "estimate", "-m", "builtin:mlp-digits", "--method", "jvp", "-n", "6", "--metrics", "trace", "--no-exact", "--json",
        "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    value = json.loads(r.stdout)["results"][0]["metrics"][0]["estimate"]["value"]
    spec = load_spec("builtin:mlp-digits")
    assert value == pytest.approx(nk.trace(nk.NTK(spec.model, spec.inputs), method="jvp", num_probes=6, seed=0).value, rel=1e-5)


@pytest.mark.parametrize(
    "spec_suffix, code, needle",
    [
        ("missing.py:make", 2, "model file not found"),
        ("mymodel.py:wrong", 2, "returned int"),
        ("mymodel.py:nope", 2, "has no function 'nope'"),
        ("mymodel.py:raises", 1, "ZeroDivisionError"),
        ("broken.py:make", 1, "broken.py failed to import"),
    ],
)
def test_bad_models_give_one_line_errors(user_file: Path, tmp_path: Path, spec_suffix: str, code: int, needle: str) -> None:
    (tmp_path / "broken.py").write_text("import torch\n\ndef make(:\n    pass\n")
    r = _cli("estimate", "--model", str(tmp_path / spec_suffix), "--quiet", cwd=tmp_path)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1]
    assert "ntkscope/cli/" not in r.stderr  # never our traceback
    if "raises" in spec_suffix:  # the user's own traceback, down to the failing line
        assert "mymodel.py" in r.stderr and "return 1 / 0" in r.stderr and "in helper" in r.stderr


def test_usage_errors(tmp_path: Path) -> None:
    r = _cli("estimate", "--model", "builtin:nope", "--metrics", "trace,volume", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown metric")
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "ntkscope run" in r.stdout


def _wait_rows(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError("no rows appeared")


def test_track_sigint_then_resume_equals_uninterrupted(user_file: Path, tmp_path: Path) -> None:
    args = ["track", "-m", f"{user_file}:make_slow", "--steps", "24", "--every", "2", "-n", "6", "--method", "vjp", "--quiet"]
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    r = _cli(*args, "-o", str(full), "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref = read_rows(full)
    assert [row["step"] for row in ref] == list(range(0, 25, 2))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NTKSCOPE_TEST_SLEEP": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ntkscope", *args, "-o", str(part), "--no-plots"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    _wait_rows(part, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    kept = read_rows(part)
    assert 3 <= len(kept) < len(ref)

    r = _cli(*args, "-o", str(part), "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = read_rows(part)
    assert [row["step"] for row in got] == [row["step"] for row in ref]
    for a, b in zip(got, ref):
        for k in a:
            if k in ("seconds",):
                continue
            if isinstance(a[k], float) and math.isfinite(a[k]):
                assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), (k, a["step"])
            else:
                assert a[k] == b[k]
    assert (tmp_path / "part_effective_rank.png").stat().st_size > 5000  # plots written at the end
    # the model file is the user's: tracking never wrote next to it
    assert sorted(p.name for p in user_file.parent.glob("mymodel*")) == ["mymodel.py"]


def _run_in_process(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from ntkscope.cli.app import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stderr


def test_track_refuses_to_overwrite_and_other_every_on_resume(user_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    base = ["track", "-m", f"{user_file}:make", "--steps", "2", "-n", "4", "--method", "vjp", "--quiet", "--no-plots", "-o", str(out)]
    tb = ["--logger", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    code, err = _run_in_process(*base, "--every", "1", *tb)
    assert code == 0, err
    first = out.read_text()
    assert [row["step"] for row in read_rows(out)] == [0, 1, 2]
    if tb:
        assert list((tmp_path / "t").glob("events.out.tfevents.*"))  # the TensorBoard run beside the CSV
    code, err = _run_in_process(*base, "--every", "1")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert out.read_text() == first  # untouched
    code, err = _run_in_process(*base, "--every", "2", "--resume")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "every: interrupted run 1, now 2" in err
    code, err = _run_in_process(*base, "--every", "1", "--overwrite", "--method", "jvp")
    assert code == 0, err
    assert {row["method"] for row in read_rows(out)} == {"jvp"}
    code, err = _run_in_process(*base, "--logger", "bogus", "--overwrite")
    assert code == 2 and "unknown --logger" in err


def test_trace_only_methods_in_commands_that_report_every_metric(tmp_path: Path) -> None:
    """track and run report every metric: their usage error must not suggest a --metrics they lack."""
    for cmd in (["track", "--steps", "1", "-o", str(tmp_path / "t.csv")], ["run"]):
        code, err = _run_in_process(*cmd, "--method", "vjp_proj")
        assert code == 2 and err.strip().count("\n") == 0, err
        assert "trace only" in err and "--metrics" not in err and "use vjp or jvp" in err
