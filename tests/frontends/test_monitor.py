"""ntkscope.Monitor in a user's own training loop: rows, no side effects, loggers, resuming."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ntkscope as nk
from ntkscope.monitor import CSVLogger, read_rows

KW: dict[str, Any] = dict(every=3, num_probes=8, seed=5)


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    return model, X, y, X[:12], y[:12]


def _train(
    monitor_kw: dict[str, Any] | None, steps: int = 10, seed: int = 0, autocast: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer, nk.Monitor | None, Any]:
    """A plain loop: shuffled minibatches, dropout, Adam, a LR scheduler; optionally a Monitor."""
    model, X, y, Xp, yp = _problem(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    mon = nk.Monitor(model, Xp, targets=yp, **monitor_kw) if monitor_kw is not None else None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True)
    step = 0
    while step < steps:
        for xb, yb in loader:
            if mon is not None:
                mon.step(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    if mon is not None:
        mon.close()
    return model, opt, mon, (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())


@pytest.mark.parametrize("autocast", [False, True])
def test_training_with_a_monitor_is_bitwise_identical(tmp_path: Path, autocast: bool) -> None:
    ref, ref_opt, _, ref_rng = _train(None, autocast=autocast)
    got, got_opt, mon, got_rng = _train({**KW, "method": "auto", "path": tmp_path / "m.csv"}, autocast=autocast)
    assert mon is not None and [r["step"] for r in mon.rows] == [0, 3, 6, 9]
    for (n, a), b in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(a, b), n
    for sa, sb in zip(ref_opt.state.values(), got_opt.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(ref_rng[0], got_rng[0]) and ref_rng[1] == got_rng[1] and np.array_equal(ref_rng[2], got_rng[2])
    assert all(m.training for m in got.modules())  # train mode restored
    assert got[0].weight.grad is not None  # the user's .grad is left alone


def test_state_is_restored_after_a_record() -> None:
    model, _, _, Xp, yp = _problem()
    mon = nk.Monitor(model, Xp, targets=yp, loggers=(), method="vjp", **KW)
    model[2].eval()  # mixed modes stay mixed
    grads = [p.grad for p in model.parameters()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        row = mon.step(0)
        assert not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    assert row is not None and math.isfinite(row["trace"])
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert [p.grad for p in model.parameters()] == grads
    # analysis in the parameters' dtype: autocast outside changes nothing
    again = nk.Monitor(model, Xp, targets=yp, loggers=(), method="vjp", **KW).measure(0)
    assert all(again[m] == row[m] for m in ("trace", "effective_rank", "kernel_alignment", "target_alignment"))


def test_rows_agree_with_the_api_and_exact_kernel() -> None:
    model, _, _, Xp, yp = _problem()
    model[2].p = 0.0
    mon = nk.Monitor(model, Xp, targets=yp, loggers=(), method="exact", metrics=nk.monitor.METRICS, every=2)
    assert mon.step(1) is None  # off-steps are skipped
    row = mon.step(0)
    assert row is not None and mon.step(0) is None  # once per step
    assert list(row) == nk.monitor.columns(nk.monitor.METRICS)
    K = nk.NTK(model.eval(), Xp)
    model.train()
    assert row["trace"] == pytest.approx(nk.trace(K, method="exact").value, rel=1e-6)
    assert row["frobenius_norm"] == pytest.approx(nk.frobenius_norm(K, method="exact").value, rel=1e-6)
    assert row["kernel_alignment"] == pytest.approx(1.0, abs=1e-6)  # K_0 against itself
    assert row["target_alignment"] == pytest.approx(nk.target_alignment(K, yp, method="exact").value, rel=1e-6)
    assert row["trace_stderr"] == 0.0 and row["passes"] > 0 and row["method"] == "exact"
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    moved = mon.step(2)
    assert moved is not None and moved["kernel_alignment"] < 0.999  # K_0 was snapshotted at construction
    # randomized rows carry standard errors, and equal the API's numbers for seed + step (2 probes:
    # from 3, the 3 outputs per example, the VJP trace is exact over its per-example blocks)
    mon2 = nk.Monitor(model, Xp, targets=yp, loggers=(), method="vjp", num_probes=2, seed=3, every=2)
    r = mon2.step(4)
    assert r is not None and r["trace_stderr"] > 0
    with nk.monitor.isolated(model):
        assert r["trace"] == nk.trace(nk.NTK(model, Xp), method="vjp", num_probes=2, seed=7).value


def test_k0_keeps_the_buffers_of_initialisation() -> None:
    """K_0 is the kernel at the parameters *and* buffers of initialisation: a BatchNorm model's
    running stats move while it trains, and K_0 must not follow them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    Xp = X[:8]
    K_init = nk.NTK(model.eval(), Xp, params={n: p.detach().clone() for n, p in model.named_parameters()})
    model.train()
    mon = nk.Monitor(model, Xp, every=10, method="exact", metrics=("kernel_alignment",), loggers=())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    row = mon.step(10)
    assert row is not None
    truth = nk.alignment(nk.NTK(model.eval(), Xp), K_init, method="exact").value
    live = nk.alignment(nk.NTK(model, Xp), nk.NTK(model, Xp, params=mon.init), method="exact").value
    assert row["kernel_alignment"] == pytest.approx(truth, rel=1e-9)
    assert abs(live - truth) > 1e-3  # K_0 with today's running stats is a different kernel
    with pytest.raises(ValueError, match=r"buffers=\['nope'\] are not buffers"):
        nk.NTK(model, Xp, buffers={"nope": torch.zeros(1)})


def test_bad_arguments_are_named() -> None:
    model, _, _, Xp, yp = _problem()
    with pytest.raises(ValueError, match="unknown metric"):
        nk.Monitor(model, Xp, metrics=("trace", "bogus"), loggers=())
    with pytest.raises(ValueError, match="targets"):
        nk.Monitor(model, Xp, metrics=("trace", "target_alignment"), loggers=())
    with pytest.raises(ValueError, match="every"):
        nk.Monitor(model, Xp, every=0, loggers=())
    with pytest.raises(ValueError, match="unknown logger"):
        nk.Monitor(model, Xp, loggers=("csvv",), method="vjp")
    with pytest.raises(ValueError, match="unknown method"):
        nk.Monitor(model, Xp, method="nope", loggers=())
    # without targets the default metrics drop target_alignment
    assert "target_alignment" not in nk.Monitor(model, Xp, loggers=(), method="vjp").metrics


def test_default_path_is_one_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, _, _, Xp, _ = _problem()
    with nk.Monitor(model, Xp, every=1, num_probes=4, method="vjp") as mon:
        mon.step(0)
    (csv_file,) = Path("runs").glob("ntkscope-*/ntk.csv")  # like SummaryWriter's runs/<time>-<host>
    assert Path(mon.path or "") == csv_file.parent and [r["step"] for r in read_rows(csv_file)] == [0]


def test_csv_logger_refuses_to_overwrite_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    kw = {**KW, "method": "vjp", "path": path}
    model, _, _, Xp, yp = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def steps(mon: nk.Monitor, a: int, b: int) -> None:
        for s in range(a, b):
            mon.step(s)
            loss = nn.functional.cross_entropy(model.eval()(Xp), yp)
            opt.zero_grad()
            loss.backward()
            opt.step()

    mon = nk.Monitor(model, Xp, targets=yp, **kw)
    steps(mon, 0, 7)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(), "mon": mon.state_dict()}
    steps(mon, 7, 13)
    mon.close()
    full = read_rows(path)
    assert [r["step"] for r in full] == [0, 3, 6, 9, 12] and list(full[0]) == nk.monitor.columns(nk.monitor.DEFAULT_METRICS)
    assert all(math.isnan(r["loss"]) for r in full)
    for a, b in zip(full, mon.rows):
        assert all(a[k] == b[k] or (k == "loss") for k in a)

    with pytest.raises(FileExistsError, match="already holds rows"):
        nk.Monitor(model, Xp, targets=yp, **kw).step(0)

    # interrupted after step 9's row was half written: resume from the checkpoint at step 6
    text = path.read_text()
    path.write_text(text[: text.rfind("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:5])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    mon = nk.Monitor(model, Xp, targets=yp, **kw)
    mon.load_state_dict(saved["mon"])
    steps(mon, 7, 13)
    mon.close()
    got = read_rows(path)
    assert [r["step"] for r in got] == [0, 3, 6, 9, 12]
    for a, b in zip(got, full):
        assert all(a[k] == b[k] for k in a if k not in ("seconds", "loss"))
    with pytest.raises(ValueError, match="every: saved 3, now 4"):
        nk.Monitor(model, Xp, targets=yp, **{**kw, "every": 4}).load_state_dict(saved["mon"])
    with pytest.raises(ValueError, match="columns"):
        lg = CSVLogger(path)
        lg.resume(3)
        lg.log(3, {"step": 3, "other": 1.0})


def test_callable_and_tensorboard_loggers(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    seen: list[tuple[int, dict[str, Any]]] = []
    writer = SummaryWriter(str(tmp_path / "own"))
    _, _, mon, _ = _train(
        {
            **KW,
            "method": "vjp",
            "path": tmp_path / "run",
            "loggers": ("csv", "tensorboard", writer, lambda s, r: seen.append((s, r))),
        }
    )
    writer.close()
    assert mon is not None
    assert [s for s, _ in seen] == [0, 3, 6, 9] and seen[-1][1] == mon.rows[-1]
    assert [r["step"] for r in read_rows(tmp_path / "run" / "ntk.csv")] == [0, 3, 6, 9]
    for d in (tmp_path / "run", tmp_path / "own"):
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for m in nk.monitor.DEFAULT_METRICS:
            assert f"ntk/{m}" in tags and f"ntk/{m}_stderr" in tags
        ev = acc.Scalars("ntk/effective_rank")
        assert [e.step for e in ev] == [0, 3, 6, 9]
        assert [e.value for e in ev] == pytest.approx([r["effective_rank"] for r in mon.rows], rel=1e-6)
        assert "ntk/loss" not in tags  # no loss was given


def test_wandb_logger_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    model, _, _, Xp, yp = _problem()
    mon = nk.Monitor(model, Xp, targets=yp, loggers=("wandb",), path=tmp_path / "run", method="vjp", **KW)
    for s in range(7):
        mon.step(s)
    run = mon.loggers[0].run
    assert run is not None and run.offline
    assert run.summary["ntk/trace"] == pytest.approx(mon.rows[-1]["trace"])
    assert run.summary["ntk/step"] == 6
    assert run.summary["ntk/kernel_alignment_stderr"] == pytest.approx(mon.rows[-1]["kernel_alignment_stderr"])
    mon.close()
    assert wandb.run is None  # the run the logger started is finished
    assert list((tmp_path / "run").rglob("*.wandb"))  # the offline run's data on disk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_under_autocast() -> None:
    def run(with_monitor: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 3)).cuda()
        X, y = torch.randn(64, 4, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mon = nk.Monitor(model, X[:16].cpu(), targets=y[:16].cpu(), loggers=(), every=2, num_probes=8) if with_monitor else None
        for s in range(6):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if mon is not None:
                    row = mon.step(s)
                    assert row is None or math.isfinite(row["trace"])
                loss = nn.functional.cross_entropy(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def _pp_worker(r: int, world: int, port: int, out: str) -> None:
    import json
    import os

    from ntkscope import distributed as ntd

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert ntd.init_from_env(timeout_s=60)
    model, _, _, Xp, yp = _problem()
    model[2].p = 0.0
    mon = nk.Monitor(model, Xp, targets=yp, loggers=("csv",), path=Path(out) / "pp.csv", method="auto", **KW)
    mon.probe_parallel = True
    mon.step(0)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    mon.step(3)
    mon.close()
    Path(out, f"rank{r}.json").write_text(json.dumps(mon.rows))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_probe_parallel_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_pp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, _, _, Xp, yp = _problem()
    model[2].p = 0.0
    assert ranks[0][0]["method"] == ranks[1][0]["method"]  # "auto" agreed on across ranks
    mon = nk.Monitor(model, Xp, targets=yp, loggers=(), method=ranks[0][0]["method"], **KW)  # auto's choice depends on timing
    ref = [mon.step(0)]
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    ref.append(mon.step(3))
    for rows in ranks:
        for a, b in zip(rows, ref):
            assert a["method"] == b["method"]
            for m in nk.monitor.DEFAULT_METRICS:
                assert a[m] == pytest.approx(b[m], rel=1e-5, abs=1e-7) and a[f"{m}_stderr"] == pytest.approx(
                    b[f"{m}_stderr"], rel=1e-4, abs=1e-7
                )
            # passes are totals across ranks (each rank's share is in the estimates' info): the
            # probes are split, and the one exact pass of yᵀKy is spent by one rank, not by each
            assert a["passes"] == b["passes"]
    assert [r["step"] for r in read_rows(tmp_path / "pp.csv")] == [0, 3]  # rank 0 alone wrote the CSV
