"""Issue-6 rows: accuracy on demand, calibrated error bars, the spectrum, and auto's pilot.

1. **Stopping at 1 %**: over a family of kernels with known values (``NTK.from_jacobian``
   factors with spectra from flat to steep, and small real models), ``rtol=0.01`` per seed;
   passes spent vs a fixed budget sized for the worst case of the family (the largest probe
   count any (kernel, seed) needed, applied to all), and the relative error actually reached.
2. **Coverage**: fraction of seeds whose 95 % interval ``value ± 1.96·stderr`` covers the exact
   value, per ratio metric and method, with the mean relative bias (plug-in and jackknife
   bias-corrected).
3. **Spectrum**: top-5 eigenvalues (Nyström, randomized SVD, Lanczos) and the SLQ entropy /
   participation-ratio effective ranks vs the exact spectrum, with AD passes.
4. **auto**: what the pilot chose on a low-rank and on a flat kernel, its pilot passes, and the
   error reached at the same num_probes.

    python benchmarks/adaptive_coverage.py [--quick] [--seeds 500]

Writes ``benchmarks/results/adaptive_coverage[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.metrics import spectrum as sp
from ntkscope.tasks import jacobian_with_spectrum

RESULTS = Path(__file__).parent / "results"


def kernel_family(quick: bool) -> dict[str, Any]:
    D, P = 200, 300
    i = torch.arange(1, D + 1, dtype=torch.float64)
    fam: dict[str, Any] = {
        "flat": nk.NTK.from_jacobian(jacobian_with_spectrum(D, P, torch.ones(D, dtype=torch.float64))),
        "λ=i^-0.5": nk.NTK.from_jacobian(jacobian_with_spectrum(D, P, i**-0.5)),
        "λ=1/i": nk.NTK.from_jacobian(jacobian_with_spectrum(D, P, i**-1.0)),
        "λ=i^-1.5": nk.NTK.from_jacobian(jacobian_with_spectrum(D, P, i**-1.5)),
    }
    if not quick:
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        )
        # ghost=False: the plain samplers' coverage (per-example blocks would make this trace exact in 4 passes)
        fam["MLP 8-32-32-4, 50 inputs"] = nk.NTK(mlp.double(), torch.randn(50, 8, dtype=torch.float64), ghost=False)
        gru = torch.nn.GRU(4, 16).double()
        x = torch.randn(12, 6, 4, dtype=torch.float64)
        fam["GRU(4,16), 12×6"] = nk.NTK(gru, (x, torch.zeros(1, 6, 16, dtype=torch.float64)), output=0)
    return fam


def bench_stopping(seeds: int, quick: bool) -> list[dict[str, Any]]:
    fam = kernel_family(quick)
    rows = []
    for method in ["vjp", "jvp", "hutchpp"]:
        runs: list[tuple[str, int, int, float]] = []  # (kernel, probes, passes, rel err)
        for name, K in fam.items():
            truth = ex.exact_trace(K)
            for s in range(seeds):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    e = nk.trace(K, method=method, seed=s, rtol=0.01, max_passes=200_000)
                runs.append((name, e.num_probes, e.passes, abs(e.value - truth) / truth))
        worst_probes = max(r[1] for r in runs)
        # the fixed budget that meets 1 % on every case, in passes (one fixed-budget run at that m)
        K0 = next(iter(fam.values()))
        c0 = sum(K0.counts()[:2])
        nk.trace(K0, method=method, num_probes=worst_probes, seed=0)
        fixed_passes = sum(K0.counts()[:2]) - c0
        per_kernel = {}
        for name in fam:
            sel = [r for r in runs if r[0] == name]
            per_kernel[name] = {
                "median_passes": statistics.median(r[2] for r in sel),
                "median_rel_err": statistics.median(r[3] for r in sel),
                "frac_err_below_2pct": sum(r[3] <= 0.02 for r in sel) / len(sel),
            }
        mean_passes = statistics.mean(r[2] for r in runs)
        rows.append(
            {
                "method": method,
                "fixed_passes_worst_case": fixed_passes,
                "mean_adaptive_passes": mean_passes,
                "passes_saved": 1 - mean_passes / fixed_passes,
                "frac_within_1.96tol": sum(r[3] <= 0.0196 for r in runs) / len(runs),
                "per_kernel": per_kernel,
            }
        )
        print(
            f"[stop] {method}: fixed {fixed_passes} vs mean {mean_passes:.0f} passes ({rows[-1]['passes_saved']:.1%} saved)",
            flush=True,
        )
    return rows


def bench_coverage(seeds: int, methods: list[str], m: int) -> list[dict[str, Any]]:
    J1 = jacobian_with_spectrum(60, 90, torch.arange(1, 61, dtype=torch.float64) ** -1.0)
    g = torch.Generator().manual_seed(5)
    J2 = J1 + 0.7 * torch.randn(60, 90, dtype=torch.float64, generator=g) / 90**0.5
    y = torch.randn(60, dtype=torch.float64, generator=g)
    A, B = nk.NTK.from_jacobian(J1), nk.NTK.from_jacobian(J2)
    K1, K2 = J1 @ J1.T, J2 @ J2.T
    cases = {
        "frobenius_norm": (lambda **k: nk.frobenius_norm(A, **k), float(K1.norm())),
        "effective_rank": (lambda **k: nk.effective_rank(A, **k), float(K1.trace() ** 2 / K1.square().sum())),
        "alignment": (lambda **k: nk.alignment(A, B, **k), float((K1 * K2).sum() / (K1.norm() * K2.norm()))),
        "target_alignment": (lambda **k: nk.target_alignment(A, y, **k), float(y @ K1 @ y / (K1.norm() * (y @ y)))),
    }
    rows = []
    for q, (fn, truth) in cases.items():
        for method in methods:
            t0 = time.perf_counter()
            hits, errs, bcs, ses = 0, [], [], []
            mm = min(m, 40) if method == "xtrace" else m  # XNysTrace on K² needs fewer probes than D = 60
            for s in range(seeds):
                e = fn(method=method, num_probes=mm, seed=s)
                lo, hi = e.ci(0.95)
                hits += lo <= truth <= hi
                errs.append(e.value - truth)
                bcs.append(e.info["bias_corrected"] - truth)
                ses.append(e.stderr)
            sd = statistics.stdev(errs)
            rows.append(
                {
                    "quantity": q,
                    "method": method,
                    "num_probes": mm,
                    "seeds": seeds,
                    "coverage95": hits / seeds,
                    "rel_bias": statistics.mean(errs) / truth,
                    "rel_bias_corrected": statistics.mean(bcs) / truth,
                    "rel_sd": sd / truth,
                    "mean_stderr_over_sd": statistics.mean(ses) / sd,
                    "seconds": time.perf_counter() - t0,
                }
            )
            r = rows[-1]
            print(f"[cov] {q:16s} {method:10s} {r['coverage95']:.3f} (se/sd {r['mean_stderr_over_sd']:.2f})", flush=True)
    return rows


def bench_spectrum() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.Tanh(), torch.nn.Linear(24, 2)
    )
    K = nk.NTK(model.double(), torch.randn(80, 6, dtype=torch.float64))  # D = 160, P = 818
    lam = ex.eigenvalues(K).clamp(min=0)
    rows = []
    for method, kw in [
        ("nystrom", {"power_iters": 0}),
        ("nystrom", {"power_iters": 2}),
        ("rsvd", {"power_iters": 2}),
        ("lanczos", {"steps": 40}),
    ]:
        r = sp.top_eigenvalues(K, 5, method=method, seed=0, **kw)
        rel = float(((r.values - lam[:5]).abs() / lam[:5]).max())
        rows.append({"what": f"top-5 eigenvalues, {method} {kw}", "max_rel_err": rel, "passes": r.passes})
    ent, pr = sp.entropy_rank_of(lam), sp.participation_ratio_of(lam)
    es = [sp.entropy_effective_rank(K, num_probes=30, steps=30, seed=s) for s in range(5)]
    for what, exact, get in [
        ("entropy effective rank, SLQ 30 probes × 30 steps", ent, lambda e: (e.value, e.stderr)),
        ("participation ratio, same SLQ", pr, lambda e: (e.info["participation_ratio"], e.info["participation_ratio_stderr"])),
    ]:
        vals = [get(e) for e in es]
        rows.append(
            {
                "what": what + " (5 seeds)",
                "exact": exact,
                "mean_value": statistics.mean(v for v, _ in vals),
                "mean_stderr": statistics.mean(s for _, s in vals),
                "max_abs_z": max(abs(v - exact) / s for v, s in vals),
                "passes_per_seed": es[0].passes,
            }
        )
    for row in rows:
        print("[spec]", row, flush=True)
    return rows


def bench_auto() -> list[dict[str, Any]]:
    D, P, m = 400, 600, 90
    cases = {
        "rank 20": jacobian_with_spectrum(D, P, 0.8 ** torch.arange(20, dtype=torch.float64)),
        "λ=i^-2": jacobian_with_spectrum(D, P, torch.arange(1, D + 1, dtype=torch.float64) ** -2.0),
        "flat (λ uniform in [0.5, 1.5])": jacobian_with_spectrum(D, P, torch.linspace(0.5, 1.5, D, dtype=torch.float64)),
    }
    rows = []
    for name, J in cases.items():
        K = nk.NTK.from_jacobian(J)
        truth = ex.exact_trace(K)
        errs = {}
        for method in ["auto", "vjp", "hutchpp"]:
            es = [nk.trace(K, method=method, num_probes=m, seed=s) for s in range(10)]
            errs[method] = statistics.median(abs(e.value - truth) / truth for e in es)
            if method == "auto":
                chosen, reason, pilot, passes = (
                    es[0].method,
                    es[0].info["reason"],
                    es[0].info.get("pilot_passes", 0),
                    es[0].passes,
                )
            else:
                errs[method + "_passes"] = es[0].passes
        rows.append(
            {"kernel": name, "chosen": chosen, "pilot_passes": pilot, "passes": passes, "reason": reason, "median_rel_err": errs}
        )
        print("[auto]", rows[-1], flush=True)
    return rows


def fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) and math.isfinite(x) else str(x)


def write_md(res: dict[str, Any], path: Path) -> None:
    L = [f"# Issue 6: adaptive stopping, coverage, spectrum, auto ({'quick' if res['quick'] else 'full'})", ""]
    L += ["## Stopping at rtol = 1 % (trace) vs a fixed budget sized for the worst case", ""]
    L += ["| method | fixed passes (worst case) | mean adaptive passes | saved | runs within 1.96 % |", "|---|---|---|---|---|"]
    for r in res["stopping"]:
        L.append(
            f"| {r['method']} | {r['fixed_passes_worst_case']} | {r['mean_adaptive_passes']:.0f} | {r['passes_saved']:.1%} | {r['frac_within_1.96tol']:.1%} |"
        )
    L += ["", "Per kernel (median passes / median relative error):", ""]
    kernels = list(res["stopping"][0]["per_kernel"])
    L += ["| method | " + " | ".join(kernels) + " |", "|---" * (len(kernels) + 1) + "|"]
    for r in res["stopping"]:
        cells = [f"{v['median_passes']:.0f} / {v['median_rel_err']:.2%}" for v in r["per_kernel"].values()]
        L.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    L += ["", f"## Coverage of the 95 % interval (D = 60, P = 90, λ_i = 1/i, {res['coverage'][0]['seeds']} seeds)", ""]
    L += ["| quantity | method | probes | coverage | rel. bias | bias-corrected | stderr/sd |", "|---|---|---|---|---|---|---|"]
    for r in res["coverage"]:
        L.append(
            f"| {r['quantity']} | {r['method']} | {r['num_probes']} | {r['coverage95']:.3f} | {r['rel_bias']:+.2e} | "
            f"{r['rel_bias_corrected']:+.2e} | {r['mean_stderr_over_sd']:.2f} |"
        )
    L += ["", "## Spectrum (MLP 6-24-24-2 on 80 inputs: D = 160, P = 818)", ""]
    for r in res["spectrum"]:
        L.append("- " + ", ".join(f"{k}: {fmt(v)}" for k, v in r.items()))
    L += ["", "## auto (trace, D = 400, P = 600, num_probes = 90, 10 seeds)", ""]
    L += ["| kernel | chosen | pilot passes | passes | median rel. err auto / vjp / hutchpp |", "|---|---|---|---|---|"]
    for r in res["auto"]:
        e = r["median_rel_err"]
        L.append(
            f"| {r['kernel']} | {r['chosen']} | {r['pilot_passes']} | {r['passes']} | {e['auto']:.2e} / {e['vjp']:.2e} "
            f"({e['vjp_passes']} passes) / {e['hutchpp']:.2e} ({e['hutchpp_passes']} passes) |"
        )
    L += ["", "Reasons given:", ""] + [f"- {r['kernel']}: {r['reason']}" for r in res["auto"]]
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (< 1 min on an idle core)")
    ap.add_argument("--seeds", type=int, default=500, help="coverage seeds (full mode)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    quick = args.quick
    res: dict[str, Any] = {"quick": quick, "torch": torch.__version__}
    res["stopping"] = bench_stopping(5 if quick else 20, quick)
    res["coverage"] = (
        bench_coverage(200, ["vjp", "jvp", "hutchpp"], 120)
        if quick
        else bench_coverage(args.seeds, ["vjp", "jvp", "hutchinson", "hutchpp", "xtrace"], 120)
    )
    res["spectrum"] = bench_spectrum()
    res["auto"] = bench_auto()
    res["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    stem = "adaptive_coverage_quick" if quick else "adaptive_coverage"
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    write_md(res, RESULTS / f"{stem}.md")
    print(f"wrote {RESULTS / stem}.{{json,md}} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
