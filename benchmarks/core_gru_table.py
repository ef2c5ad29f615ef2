"""Issue-2 table: each method's relative error at a fixed AD-pass budget on a GRU hidden NTK.

State = the whole hidden trajectory of ``nn.GRU`` (sequence-first, as in the paper).  For every
method and metric: median (and quartiles) of the relative error over seeds at ``--passes`` AD
passes, median wall time, and the wall time of the exact value (``min(D, P)`` one-sided passes
for the trace; the materialised Jacobian for the norm and effective rank).

    python benchmarks/core_gru_table.py [--quick] [--passes 100] [--seeds 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ntkscope as nk
from ntkscope.estimators import exact as ex

RESULTS = Path(__file__).parent / "results"

# AD passes per probe for each method and metric (two-sided: a VJP and a JVP per K-matvec;
# XTrace on K² for the norm: two K-matvecs per probe).
PASSES_PER_PROBE = {
    ("trace", "hutchinson"): 2, ("trace", "hutchpp"): 2, ("trace", "xtrace"): 2,
    ("trace", "vjp"): 1, ("trace", "jvp"): 1, ("trace", "vjp_proj"): 1, ("trace", "jvp_proj"): 1,
    ("frobenius_norm", "hutchinson"): 2, ("frobenius_norm", "hutchpp"): 2, ("frobenius_norm", "xtrace"): 4,
    ("frobenius_norm", "vjp"): 1, ("frobenius_norm", "jvp"): 1,
    ("effective_rank", "hutchinson"): 2, ("effective_rank", "hutchpp"): 2, ("effective_rank", "xtrace"): 6,
    ("effective_rank", "vjp"): 1, ("effective_rank", "jvp"): 1,
}
METRICS = {"trace": nk.trace, "frobenius_norm": nk.frobenius_norm, "effective_rank": nk.effective_rank}


def gru_ntk(T: int, B: int, H: int, I: int = 10) -> nk.NTK:
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    gru = torch.nn.GRU(I, H)
    h0 = torch.zeros(1, B, H)
    return nk.NTK(gru, (x, h0), output=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--passes", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--size", default="50,15,32", help="T,B,H of the GRU (sequence-first input T×B×10)")
    args = ap.parse_args()
    T, B, H = (int(v) for v in args.size.split(","))
    seeds = 5 if args.quick else args.seeds
    if args.quick:
        T, B, H = 20, 8, 16
    K = gru_ntk(T, B, H)
    K.pass_seconds("jvp"), K.pass_seconds("vjp")  # warm up both modes (first forward-mode call compiles)
    print(K.describe())
    t0 = time.perf_counter()
    tr = ex.exact_trace(K)
    t_exact_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    fro2 = ex.exact_frobenius_sq(K)
    t_exact_fro = time.perf_counter() - t0
    exact = {"trace": tr, "frobenius_norm": fro2**0.5, "effective_rank": tr**2 / fro2}
    exact_time = {"trace": t_exact_trace, "frobenius_norm": t_exact_fro, "effective_rank": t_exact_trace + t_exact_fro}
    rows = []
    for (metric, method), ppp in PASSES_PER_PROBE.items():
        m = max(1, args.passes // ppp)
        errs, times = [], []
        for s in range(seeds):
            e = METRICS[metric](K, method=method, num_probes=m, seed=s)
            errs.append(abs(e.value - exact[metric]) / exact[metric])
            times.append(e.seconds)
        q = statistics.quantiles(errs, n=4) if len(errs) > 1 else [errs[0]] * 3
        row = {
            "metric": metric, "method": method, "probes": m, "passes": m * ppp,
            "rel_err_median": statistics.median(errs), "rel_err_q1": q[0], "rel_err_q3": q[2],
            "seconds_median": statistics.median(times), "exact_seconds": exact_time[metric],
        }
        row["speedup_vs_exact"] = row["exact_seconds"] / row["seconds_median"]
        rows.append(row)
        print(f"{metric:15s} {method:11s} passes={m * ppp:4d} rel.err median {row['rel_err_median']:.3e} "
              f"[{q[0]:.2e}, {q[2]:.2e}]  {row['seconds_median']:.3f} s  (exact {row['exact_seconds']:.2f} s, "
              f"{row['speedup_vs_exact']:.0f}x)")
    out = {"D": K.dim, "P": K.num_params, "T": T, "B": B, "H": H, "exact": exact, "exact_seconds": exact_time,
           "seeds": seeds, "rows": rows, "threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    name = "core_gru_table_quick" if args.quick else "core_gru_table"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# GRU hidden NTK: relative error at {args.passes} AD passes (D={K.dim}, P={K.num_params}, {seeds} seeds)", "",
             f"Exact: trace {tr:.6g} ({t_exact_trace:.2f} s), ‖K‖_F {fro2**0.5:.6g}, r_eff {tr**2 / fro2:.4g} ({t_exact_fro:.2f} s for J and its Gram)", "",
             "| metric | method | probes | passes | median rel. err | IQR | time (s) | exact time (s) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['method']} | {r['probes']} | {r['passes']} | {r['rel_err_median']:.2e} | "
                     f"{r['rel_err_q1']:.1e}–{r['rel_err_q3']:.1e} | {r['seconds_median']:.3f} | {r['exact_seconds']:.2f} | {r['speedup_vs_exact']:.0f}× |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
