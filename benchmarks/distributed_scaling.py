"""Time against number of processes for probe-parallel and data-parallel NTK estimation.

Runs, for N = 1 and 2 processes (gloo on CPU, ``torch.multiprocessing.spawn``, threads per process
= cores / N), two metrics on an MLP NTK:

* ``trace`` with ``hutchinson`` (two-sided: a VJP and a JVP per probe; gathered rows are tiny Gram
  matrices), and
* ``frobenius_norm`` with ``vjp`` (one-sided: probe-parallel gathers the ``m × P`` vectors Jᵀw).

Each job reports wall time, this rank's compute time, collective time and bytes (from
:class:`ntkscope.distributed.CommStats`), and a gloo micro-benchmark of all-reduce / all-gather
latency and bandwidth.  From these it predicts 8 GPUs with a simple cost model:

    T(N) = C/N + R + Σ_collectives (α + bytes_per_rank / B),

with C the probe-parallelisable compute (per-pass time × passes), R the replicated part (dense
algebra after gathers), and for the GPUs assumed constants: per-pass speed-up ``S`` of one GPU
over one core of this CPU, NCCL latency α and bus bandwidth B (``--gpu-*`` options).

Usage: ``python benchmarks/distributed_scaling.py [--quick]`` → ``benchmarks/results/distributed_scaling[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ntkscope as nk
from ntkscope import distributed as ntd
from ntkscope import estimators

RESULTS = Path(__file__).resolve().parent / "results"


def problem(n: int, width: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.randn(n, 64)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    return model, X


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _comm_micro(sizes: list[int], reps: int) -> list[dict[str, float]]:
    """Seconds per all-reduce / all-gather of ``n`` float32 numbers per rank (best of reps)."""
    out = []
    for n in sizes:
        x = torch.ones(n)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        row: dict[str, float] = {"floats": n}
        for name, op in (("all_reduce", lambda: dist.all_reduce(x)), ("all_gather", lambda: dist.all_gather(parts, x))):
            ts = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                op()
                ts.append(time.perf_counter() - t0)
            row[name] = float(np.min(ts))
        out.append(row)
    return out


def _worker(r: int, N: int, port: int, mode: str, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(max(1, cfg["cores"] // N))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=N, timeout=datetime.timedelta(seconds=120)
    )
    model, X = problem(cfg["n"], cfg["width"])
    m = cfg["probes"]
    res: dict[str, Any] = {"N": N, "mode": mode, "threads": torch.get_num_threads()}
    if mode == "probe":
        K: Any = nk.NTK(model, X)
        ex = ntd.ProbeParallel()
        estimators.EXECUTOR.set(ex)  # this worker process only
        stats = ex.stats
    else:
        shard = np.array_split(np.arange(cfg["n"]), N)[r]
        K = ntd.ShardedNTK(model, X[shard])
        stats = K.stats
    for name, call in (
        ("trace_hutchinson", lambda: nk.trace(K, "hutchinson", m, seed=0)),
        ("frobenius_vjp", lambda: nk.frobenius_norm(K, "vjp", m, seed=0)),
    ):
        call()  # warm-up: path selection, fast-path check, allocator
        runs = []
        for _ in range(cfg["reps"]):
            stats.reset()
            dist.barrier()
            t0 = time.perf_counter()
            e = call()
            dist.barrier()
            runs.append((time.perf_counter() - t0, stats.compute_s, stats.comm_s, stats.comm_bytes, stats.calls))
        # best of the runs, with all its parts: on a shared, oversubscribed machine the minimum is the
        # least disturbed measurement (multi-threaded BLAS barriers suffer most from preemption)
        wall, compute, comm, nbytes, calls = min(runs)
        res[name] = {
            "wall_s": wall,
            "all_walls_s": [r[0] for r in runs],
            "compute_s": compute,
            "comm_s": comm,
            "comm_bytes": nbytes,
            "collectives": calls,
            "passes_this_rank": e.passes,
            "value": e.value,
            "stderr": e.stderr,
        }
    if N > 1 and mode == "probe":
        res["micro"] = _comm_micro(cfg["micro_sizes"], cfg["micro_reps"])
    gathered: list[Any] = [None] * N
    dist.all_gather_object(gathered, res)
    if r == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()  # every rank done before any tears its connections down
    dist.destroy_process_group()


def run_job(N: int, mode: str, cfg: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    path = tmp / f"{mode}{N}.json"
    mp.spawn(_worker, args=(N, _free_port(), mode, cfg, str(path)), nprocs=N, join=True)
    return json.loads(path.read_text())


def _fit(micro: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Least-squares latency α (s) and bandwidth (bytes/s) from t = α + bytes/B."""
    b = np.array([4.0 * row["floats"] for row in micro])
    t = np.array([row[key] for row in micro])
    A = np.stack([np.ones_like(b), b], 1)
    (alpha, inv_bw), *_ = np.linalg.lstsq(A, t, rcond=None)
    return max(float(alpha), 0.0), 1.0 / max(float(inv_bw), 1e-15)


def predict(jobs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """The cost model for 8 GPUs (see the module docstring); per mode and metric."""
    S, alpha, bw, G = args.gpu_speedup, args.gpu_latency, args.gpu_bandwidth, 8
    out: dict[str, Any] = {
        "assumptions": {"gpus": G, "speedup_per_pass_vs_one_cpu_core": S, "nccl_latency_s": alpha, "nccl_bus_bandwidth_Bps": bw}
    }
    for mode in ("probe", "data"):
        one = jobs[f"{mode}1"][0]
        two = jobs[f"{mode}2"]
        for metric in ("trace_hutchinson", "frobenius_vjp"):
            r1 = one[metric]
            # compute that splits over ranks: measured compute with 1 process, on one core-equivalent
            C = r1["compute_s"] * one["threads"]
            R = max(r1["wall_s"] - r1["compute_s"] - r1["comm_s"], 0.0) * one["threads"]  # replicated (algebra, probes)
            r2 = two[0][metric]
            # bytes per collective and count scale with N: all-gather sends (N-1)/N of the gathered total per rank
            calls = r2["collectives"]
            # comm_bytes = 2 × Σ buffers with 2 ranks; a ring all-reduce moves 2(G−1)/G of its buffer per
            # rank, an all-gather (G−1)/G of the gathered total (= 2 × buffer here): both comm_bytes·(G−1)/G
            per_rank_g = r2["comm_bytes"] * (G - 1) / G
            t_comm = calls * alpha + per_rank_g / bw
            t1 = (C + R) / S
            tG = C / S / G + R / S + t_comm
            out[f"{mode}/{metric}"] = {
                "one_gpu_s": t1,
                "eight_gpu_s": tG,
                "speedup": t1 / tG,
                "compute_share": C / S / G / tG,
                "comm_s": t_comm,
                "replicated_s": R / S,
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, < 1 minute")
    ap.add_argument("--gpu-speedup", type=float, default=50.0, help="assumed per-pass speed of one GPU over one CPU core")
    ap.add_argument("--gpu-latency", type=float, default=30e-6, help="assumed NCCL latency per collective (s)")
    ap.add_argument("--gpu-bandwidth", type=float, default=150e9, help="assumed NCCL bus bandwidth (bytes/s, NVLink)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.quick:
        cfg = {"n": 100, "width": 128, "probes": 96, "reps": 5, "micro_sizes": [1_000, 100_000, 1_000_000], "micro_reps": 5}
    else:
        cfg = {
            "n": 200,
            "width": 256,
            "probes": 256,
            "reps": 5,
            "micro_sizes": [1_000, 30_000, 300_000, 3_000_000],
            "micro_reps": 9,
        }
    cfg["cores"] = cores
    tag = "_quick" if args.quick else ""
    tmp = RESULTS / f".distributed_tmp{tag}"
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = {f"{mode}{N}": run_job(N, mode, cfg, tmp) for mode in ("probe", "data") for N in (1, 2)}
    for f in tmp.glob("*.json"):
        f.unlink()
    tmp.rmdir()
    model, X = problem(cfg["n"], cfg["width"])
    P = sum(p.numel() for p in model.parameters())
    D = cfg["n"] * 10
    micro = jobs["probe2"][0]["micro"]
    fits = {k: _fit(micro, k) for k in ("all_reduce", "all_gather")}
    pred = predict(jobs, args, cfg)
    result = {
        "benchmark": "distributed_scaling",
        "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": cores, "python": platform.python_version(), "torch": torch.__version__, "backend": "gloo"},
        "problem": {"model": f"MLP 64-{cfg['width']}-{cfg['width']}-10 tanh", "D": D, "P": P, "probes": cfg["probes"]},
        "config": cfg,
        "jobs": jobs,
        "gloo_fit": {k: {"latency_s": a, "bandwidth_Bps": b} for k, (a, b) in fits.items()},
        "prediction_8gpu": pred,
        "seconds": time.perf_counter() - t0,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distributed_scaling{tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"distributed_scaling{tag}.md").write_text(report(result))
    print(report(result))


def report(res: dict[str, Any]) -> str:
    p = res["problem"]
    lines = [
        f"# Distributed scaling{' (quick)' if res['quick'] else ''}",
        "",
        f"{p['model']}, D={p['D']}, P={p['P']}, {p['probes']} probes; gloo on {res['machine']['cores']} CPU cores, "
        f"threads per process = cores / N; torch {res['machine']['torch']}; {res['date']}.  Best wall time of "
        f"{res['config']['reps']} runs after a warm-up; compute / communication are rank 0's.",
        "",
        "| mode | metric | N | wall s | speed-up | compute s | comm s | comm MB | collectives | passes (rank 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("probe", "data"):
        for metric in ("trace_hutchinson", "frobenius_vjp"):
            base = res["jobs"][f"{mode}1"][0][metric]["wall_s"]
            for N in (1, 2):
                r = res["jobs"][f"{mode}{N}"][0][metric]
                lines.append(
                    f"| {mode} | {metric} | {N} | {r['wall_s']:.3f} | {base / r['wall_s']:.2f}× | {r['compute_s']:.3f} | "
                    f"{r['comm_s']:.4f} | {r['comm_bytes'] / 1e6:.2f} | {r['collectives']} | {r['passes_this_rank']} |"
                )
    # same values whatever N
    for mode in ("probe", "data"):
        v = [res["jobs"][f"{mode}{N}"][0]["trace_hutchinson"]["value"] for N in (1, 2)]
        lines.append("")
        lines.append(f"{mode}: trace estimate with N=1 and N=2: {v[0]:.10g} vs {v[1]:.10g} (same seed, same probes).")
    lines += ["", "Gloo collectives on this machine (fit t = α + bytes/B over the micro-benchmark sizes):", ""]
    for k, f in res["gloo_fit"].items():
        lines.append(f"- {k}: α = {f['latency_s'] * 1e6:.0f} µs, B = {f['bandwidth_Bps'] / 1e9:.2f} GB/s")
    pred = res["prediction_8gpu"]
    a = pred["assumptions"]
    lines += [
        "",
        "## Predicted for 8 GPUs",
        "",
        f"Model T(N) = C/N + R + Σ(α + bytes/B).  C: measured single-process compute (probe evaluation / shard passes), "
        f"scaled to one core and divided by an assumed per-pass GPU speed-up S = {a['speedup_per_pass_vs_one_cpu_core']:g}; "
        f"R: the replicated rest (dense algebra, probe generation), also / S; collectives: the counts measured with 2 ranks, "
        f"NCCL α = {a['nccl_latency_s'] * 1e6:.0f} µs, bus bandwidth B = {a['nccl_bus_bandwidth_Bps'] / 1e9:.0f} GB/s, "
        "all-gather moving (N−1)/N of the gathered bytes per rank and all-reduce twice that.  These constants are "
        "assumptions (no GPU was measured), so read the ratios, not the seconds.",
        "",
        "| mode / metric | 1 GPU s | 8 GPUs s | speed-up | comm s | replicated s |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in pred.items():
        if k == "assumptions":
            continue
        lines.append(
            f"| {k} | {v['one_gpu_s']:.4f} | {v['eight_gpu_s']:.4f} | {v['speedup']:.2f}× | {v['comm_s']:.5f} | {v['replicated_s']:.5f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
