"""One scaling point in a fresh process: time and peak memory of a one-sided trace estimate.

    python benchmarks/scaling_point.py --kind gru --size T,B,H [--probes 32] [--chunk 16]
    python benchmarks/scaling_point.py --kind mlp --size N,WIDTH,LAYERS

Prints one JSON line: D, P, seconds, peak RSS in MiB (the process's high-water mark, which sees
torch's allocations; tracemalloc would not), the RSS before the estimate (interpreter, torch,
model and inputs), the estimate and its standard error.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
import ntkscope as nk  # noqa: E402


def rss_mib() -> float:
    """Peak resident memory of this process (MiB).

    ``VmHWM`` from /proc is this process's own high-water mark; ``ru_maxrss`` can carry the
    parent's peak across fork+exec, so it is only the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kind", choices=["gru", "mlp"], required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--method", default=None, help="default: the one-sided side with the smaller probe space")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    s = [int(v) for v in a.size.split(",")]
    if a.kind == "gru":
        model, x = C.gru_setting(*s)
        K = nk.NTK(model, x, output=0, chunk_size=a.chunk)
    else:
        model, x = C.mlp_setting(n=s[0], d_in=100, width=s[1], layers=s[2])
        K = nk.NTK(model, x, chunk_size=a.chunk, ghost=False)  # the paper's ‖Jᵀv‖² samples, not per-example blocks
    base = rss_mib()
    method = a.method or ("jvp" if K.num_params < K.dim else "vjp")
    nk.trace(K, method=method, num_probes=2, seed=1)  # warm-up: path check, first forward-mode call
    t0 = time.perf_counter()
    e = nk.trace(K, method=method, num_probes=a.probes, seed=0)
    t = time.perf_counter() - t0
    print(json.dumps({"D": K.dim, "P": K.num_params, "method": method, "probes": a.probes, "chunk": a.chunk, "seconds": t,
                      "seconds_per_pass": t / a.probes, "peak_rss_mib": rss_mib(), "rss_before_mib": base,
                      "value": e.value, "stderr": e.stderr, "paths": K.paths}))


if __name__ == "__main__":
    main()
