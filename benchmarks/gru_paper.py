"""The seed paper's GRU experiments (Hazelden 2025, arXiv 2511.10796, Figs. 1-3), reproduced.

Setting (from the reference code): ``torch.manual_seed(0)``; ``x = randn(50, 15, 10)`` drawn
first; ``nn.GRU(10, 64)`` sequence-first; state = the output sequence (the hidden trajectory):
D = 50·15·64 = 48,000, P = 14,592.  The NTK is built with :func:`ntkscope.models.recurrent.hidden_ntk`.

Sections (``--only`` picks some):

* ``budget`` — relative error of tr K against the budget in AD passes for Hutch++, one-sided
  JVP, one-sided VJP and XTrace (median and quartiles over seeds), the wall time of each, and
  the speed-up against forming the exact trace (min(D, P) one-sided passes) to reach a given
  accuracy.  One-sided estimates at smaller budgets are prefixes of the largest run (their
  first m probes: the same numbers ``ntkscope.trace(K, method, m, seed)`` returns); their wall
  time is m × the measured seconds per pass.  Two-sided methods are rerun per budget.
* ``large`` — a GRU where only the estimators fit (T=100, B=32: D = 204,800, P = 14,592; the
  dense K would take 168 GB in float32, the paper's direct baseline forms it): each method at one
  budget, with its standard error and the exact path's time extrapolated from the measured
  seconds per pass.
* ``dge5`` — a GRU with D = 102,400 ≥ 10⁵ hidden-state entries: trace, Frobenius norm and
  effective rank to 2 % relative standard error, plus the per-time-step trace / effective rank
  curves and the time-block Frobenius map (:func:`ntkscope.metrics.structure.structure`), one set of
  JVP probes for all of it; wall time end to end.

Outputs in ``benchmarks/results/``: ``gru_paper[_quick].json``, ``gru_paper[_quick].md`` and
PNG figures ``gru_error_vs_budget*.png``, ``gru_time_curves*.png``.  ``--quick`` runs a small
GRU in well under a minute.  Timings on a shared machine are noisy: rerun on a quiet one.

    python benchmarks/gru_paper.py --quick
    python benchmarks/gru_paper.py --seeds 20 --max-budget 3840
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ntkscope as nk
from ntkscope import estimators as est
from ntkscope.core.probes import Probe, ProbeStream, Stream
from ntkscope.estimators import exact as ex
from ntkscope.metrics.structure import structure
from ntkscope.models.recurrent import hidden_ntk

RESULTS = Path(__file__).parent / "results"
METHODS = ("hutchpp", "jvp", "vjp", "xtrace")
TOLERANCES = (1e-2, 1e-3, 1e-4)

# Read off the paper's figures (see ../shared/paper.md): speed-up to reach an accuracy with the
# best method per rerun, against the direct trace; and the trend of Figs. 2-3.
PAPER = {
    "speedup": {"99%": 1.3e4, "99.9%": 9e3, "99.99%": 2e2, "99.999%": 60},
    "figs_2_3": "one-sided lowest error at low budgets (JVP side: P < D); Hutch++ overtakes at high budgets, "
    "reaching ~2e-6 relative error at 12,000",
}


def paper_gru(T: int = 50, B: int = 15, H: int = 64, I: int = 10, dtype: torch.dtype = torch.float32) -> nk.NTK:
    """The paper's construction: seed 0, input drawn first, then the GRU (sequence-first)."""
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    gru = nn.GRU(I, H)
    return hidden_ntk(gru.to(dtype), x.to(dtype))


def quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


# -- section: error vs budget ----------------------------------------------------------------------


def exact_reference(K: nk.NTK, cache: Path | None) -> dict[str, Any]:
    key = f"D={K.dim},P={K.num_params}"
    if cache is not None and cache.exists():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            print(f"exact trace from cache {cache.name}: {data['exact_trace']:.8g} ({data['exact_seconds']:.1f} s when measured)")
            return data
    before = K.counts()
    t0 = time.perf_counter()
    tr = ex.exact_trace(K)
    dt = time.perf_counter() - t0
    after = K.counts()
    data = {
        "key": key,
        "exact_trace": tr,
        "exact_seconds": dt,
        "jvp_passes": after[0] - before[0],
        "vjp_passes": after[1] - before[1],
    }
    print(f"exact trace {tr:.8g}: {data['jvp_passes'] + data['vjp_passes']} passes, {dt:.1f} s")
    if cache is not None:
        cache.write_text(json.dumps(data, indent=1))
    return data


def budget_section(K: nk.NTK, budgets: list[int], seeds: int, reference: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Estimates first, then the exact reference (``reference()``, possibly cached), then errors."""
    rows: dict[str, dict[int, dict[str, list[float]]]] = {m: {b: {"est": [], "time": []} for b in budgets} for m in METHODS}
    M = max(budgets)
    per_pass: dict[str, list[float]] = {"jvp": [], "vjp": []}
    for s in range(seeds):
        for side in ("jvp", "vjp"):
            dim = K.num_params if side == "jvp" else K.dim
            stream = ProbeStream(dim, Probe.RADEMACHER, s, Stream.MAIN, K.dtype, K.device)
            t0 = time.perf_counter()
            samples = est.onesided(K, side, stream.columns, M, keep=False).to(torch.float64)
            sec = (time.perf_counter() - t0) / M
            per_pass[side].append(sec)
            csum = samples.cumsum(0)
            for b in budgets:
                rows[side][b]["est"].append(float(csum[b - 1]) / b)
                rows[side][b]["time"].append(sec * b)
            if s == 0:  # the prefix equals the library's own estimate at that budget
                chk = nk.trace(K, method=side, num_probes=budgets[0], seed=s)
                assert math.isclose(chk.value, float(csum[budgets[0] - 1]) / budgets[0], rel_tol=1e-6), (chk.value, side)
        for meth in ("hutchpp", "xtrace"):
            for b in budgets:
                e = nk.trace(K, method=meth, num_probes=b // 2, seed=s)  # two passes per probe
                assert e.passes == b, (meth, b, e.passes)
                rows[meth][b]["est"].append(e.value)
                rows[meth][b]["time"].append(e.seconds)
        print(f"  seed {s}: " + ", ".join(f"{m} {rows[m][M]['est'][-1]:.8g}" for m in METHODS), flush=True)
    t_pass = {k: statistics.median(v) for k, v in per_pass.items()}
    raw = {m: {str(b): v for b, v in d.items()} for m, d in rows.items()}
    return finish_budget(raw, t_pass, reference(), K.dim, K.num_params)


def finish_budget(
    raw: dict[str, dict[str, dict[str, list[float]]]], t_pass: dict[str, float], ref: dict[str, Any], D: int, P: int
) -> dict[str, Any]:
    """Errors, the table and the speed-ups from raw estimates, times and the exact reference.

    Time baselines, all from this run's seconds per pass (the same load as the estimators):
    the exact trace (min(D, P) passes of the smaller side) and the paper's direct trace (K on all
    D basis vectors: a VJP and a JVP each).  The exact trace's own measured time is kept too.
    """
    true = ref["exact_trace"]
    table = []
    for m, d in raw.items():
        for b, v in d.items():
            v["err"] = [abs(x - true) / true for x in v["est"]]
            q1, med, q3 = quartiles(v["err"])
            table.append(
                {
                    "method": m,
                    "passes": int(b),
                    "median_rel_err": med,
                    "q1": q1,
                    "q3": q3,
                    "median_seconds": statistics.median(v["time"]),
                }
            )
    table.sort(key=lambda r: (METHODS.index(r["method"]), r["passes"]))
    exact_same = min(D, P) * (t_pass["jvp"] if P <= D else t_pass["vjp"])
    direct = D * (t_pass["jvp"] + t_pass["vjp"])
    speedups = []
    for tol in TOLERANCES:
        found = False
        for m in METHODS:
            hit = [r for r in table if r["method"] == m and r["median_rel_err"] <= tol]
            if hit:
                r = min(hit, key=lambda r: r["passes"])
                found = True
                speedups.append(
                    {
                        "tolerance": tol,
                        "method": m,
                        "passes": r["passes"],
                        "seconds": r["median_seconds"],
                        "speedup": exact_same / r["median_seconds"],
                        "speedup_vs_measured_exact": ref["exact_seconds"] / r["median_seconds"],
                        "speedup_vs_direct": direct / r["median_seconds"],
                    }
                )
        if not found:
            speedups.append({"tolerance": tol, "method": None, "passes": None, "seconds": None, "speedup": None})
    return {
        "exact": ref,
        "table": table,
        "speedups": speedups,
        "seconds_per_pass": t_pass,
        "exact_seconds_same_run": exact_same,
        "direct_seconds_extrapolated": direct,
        "raw": raw,
    }


def plot_budget(res: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        rows = [r for r in res["table"] if r["method"] == m]
        x = [r["passes"] for r in rows]
        ax[0].plot(x, [r["median_rel_err"] for r in rows], "o-", label=m)
        ax[0].fill_between(x, [r["q1"] for r in rows], [r["q3"] for r in rows], alpha=0.2)
        ax[1].plot([r["median_seconds"] for r in rows], [r["median_rel_err"] for r in rows], "o-", label=m)
    for a, xl in zip(ax, ("AD passes (budget)", "wall time (s)")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(xl)
        a.set_ylabel("relative error of tr K (median, IQR)")
        a.grid(alpha=0.3)
    ax[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- section: large size, estimators only ----------------------------------------------------------


def large_section(T: int, B: int, H: int, budget: int) -> dict[str, Any]:
    K = paper_gru(T, B, H)
    print(f"large: {K.describe()}")
    out: dict[str, Any] = {"T": T, "B": B, "H": H, "D": K.dim, "P": K.num_params, "budget": budget, "methods": []}
    K.pass_seconds("jvp"), K.pass_seconds("vjp")  # warm-up (and path selection) before timing
    for m in METHODS:
        n = budget if m in ("jvp", "vjp") else budget // 2
        e = nk.trace(K, method=m, num_probes=n, seed=0)
        out["methods"].append(
            {
                "method": m,
                "value": e.value,
                "stderr": e.stderr,
                "rel_stderr": e.rel_stderr,
                "passes": e.passes,
                "seconds": e.seconds,
            }
        )
        print(f"  {e}", flush=True)
    finish_large(out)
    return out


def finish_large(out: dict[str, Any]) -> None:
    """Extrapolated exact and direct times from the seconds per pass the one-sided runs measured."""
    per = {r["method"]: r["seconds"] / r["passes"] for r in out["methods"] if r["method"] in ("jvp", "vjp")}
    exact_passes = min(out["D"], out["P"])
    t_exact = exact_passes * (per["jvp"] if out["P"] <= out["D"] else per["vjp"])
    out.update(
        {
            "seconds_per_pass": per,
            "exact_passes": exact_passes,
            "exact_seconds_extrapolated": t_exact,
            "direct_seconds_extrapolated": out["D"] * (per["jvp"] + per["vjp"]),
        }
    )
    for r in out["methods"]:
        r["speedup_vs_exact"] = t_exact / r["seconds"]


# -- section: D >= 1e5, trace / norm / effective rank to 2 % ---------------------------------------


def dge5_section(T: int, B: int, H: int, target: float, start: int, plot: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    K = paper_gru(T, B, H)
    m = start
    while True:
        s = structure(K, "time", method="jvp", num_probes=m, seed=0)
        fro = s.total_frobenius_sq
        fro_rel = 0.5 * fro.stderr / fro.value  # delta method: rel. s.e. of ‖K‖_F is half that of ‖K‖_F²
        rels = {"trace": s.total_trace.rel_stderr, "frobenius_norm": fro_rel, "effective_rank": s.total_effective_rank.rel_stderr}
        if max(rels.values()) <= target or m >= 8 * start:
            break
        m *= 2
    wall = time.perf_counter() - t0
    out = {
        "T": T,
        "B": B,
        "H": H,
        "D": K.dim,
        "P": K.num_params,
        "num_probes": m,
        "jvp_passes": K.counts()[0],
        "seconds": wall,
        "trace": [s.total_trace.value, s.total_trace.stderr],
        "frobenius_norm": [math.sqrt(fro.value), 0.5 * fro.stderr / math.sqrt(fro.value)],
        "effective_rank": [s.total_effective_rank.value, s.total_effective_rank.stderr],
        "effective_rank_bias_corrected": s.total_effective_rank.info.get("bias_corrected"),
        "rel_stderr": rels,
        "trace_per_step": s.trace.to_dict(),
        "effective_rank_per_step": s.effective_rank.to_dict(),
    }
    print(f"dge5: D={K.dim}, m={m}, {wall:.1f} s, rel. stderr {rels}", flush=True)
    if plot is not None:
        plot_curves(s, plot, f"GRU hidden NTK, D={K.dim:,}, P={K.num_params:,}: {m} JVP probes, {wall:.0f} s")
    return out


def plot_curves(s: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    t = torch.arange(1, s.grid[0] + 1).numpy()
    for a, be, lab in ((ax[0], s.trace, "tr K_tt"), (ax[1], s.effective_rank, "effective rank of K_tt")):
        v, e = be.values.numpy(), be.stderr.numpy()
        a.plot(t, v, "-", color="C0")
        a.fill_between(t, v - 2 * e, v + 2 * e, alpha=0.3, color="C0", label="±2 s.e.")
        a.set_xlabel("time step t")
        a.set_ylabel(lab)
        a.grid(alpha=0.3)
        a.legend()
    F = s.frobenius.values.clamp(min=1e-30).log10().numpy()
    im = ax[2].imshow(F, origin="lower", cmap="viridis", extent=(0.5, s.grid[0] + 0.5, 0.5, s.grid[0] + 0.5))
    fig.colorbar(im, ax=ax[2], label="log10 ‖K_st‖_F² (estimate)")
    ax[2].set_xlabel("time step t")
    ax[2].set_ylabel("time step s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report ------------------------------------------------------------------------------------------


def write_markdown(res: dict[str, Any], path: Path) -> None:
    L = [f"# GRU hidden NTK: the paper's experiments ({res['mode']})", ""]
    L.append(f"Machine: {res['machine']}. Timings on a shared machine are noisy (load average {res['load']}).")
    L.append("")
    L.append(
        "Reproduce: `python benchmarks/gru_paper.py` (defaults: 20 seeds, budgets 12 … 3,840 passes; the paper used 50 "
        "seeds up to 12,000); `--quick` for a small GRU.  The exact trace is cached in `gru_paper_exact.json`."
    )
    L.append("")
    if "budget" in res:
        b = res["budget"]
        L += [
            f"## Error against budget — D={b['D']:,}, P={b['P']:,}, {b['seeds']} seeds",
            "",
            f"Exact trace {b['exact']['exact_trace']:.8g} from {min(b['D'], b['P']):,} one-sided passes "
            f"({b['exact']['exact_seconds']:.1f} s measured).",
            "",
            "| method | passes | median rel. err | IQR | median time (s) |",
            "|---|---|---|---|---|",
        ]
        for r in b["table"]:
            L.append(
                f"| {r['method']} | {r['passes']} | {r['median_rel_err']:.2e} | {r['q1']:.1e}–{r['q3']:.1e} | {r['median_seconds']:.3g} |"
            )
        L += [
            "",
            "Speed-up to reach a median relative error (smallest budget on the grid that does), against the exact trace "
            f"(min(D, P) passes: ≈ {b['exact_seconds_same_run']:.0f} s at this run's "
            f"{b['seconds_per_pass']['jvp'] * 1e3:.2f} ms/JVP; measured separately: {b['exact']['exact_seconds']:.0f} s) and against "
            f"the paper's direct baseline (K on all D basis vectors, 2D passes: ≈ {b['direct_seconds_extrapolated']:.0f} s at "
            f"{b['seconds_per_pass']['jvp'] * 1e3:.2f} ms/JVP + {b['seconds_per_pass']['vjp'] * 1e3:.2f} ms/VJP):",
            "",
        ]
        L += [
            "| tolerance | method | passes | time (s) | speed-up vs exact | vs direct (paper's baseline) | paper (best method, Fig. 1) |",
            "|---|---|---|---|---|---|---|",
        ]
        paper_map = {1e-2: "99%", 1e-3: "99.9%", 1e-4: "99.99%"}
        for r in b["speedups"]:
            pp = PAPER["speedup"].get(paper_map[r["tolerance"]], "")
            if r["method"] is None:
                L.append(f"| {r['tolerance']:.0e} | — (not reached on this grid) | | | | | ≈{pp:.2g}× |")
            else:
                L.append(
                    f"| {r['tolerance']:.0e} | {r['method']} | {r['passes']} | {r['seconds']:.3g} | {r['speedup']:.3g}× | "
                    f"{r['speedup_vs_direct']:.3g}× | ≈{pp:.2g}× |"
                )
        L += ["", f"Paper, Figs. 2–3: {PAPER['figs_2_3']}.", ""]
    if "large" in res:
        g = res["large"]
        direct = g["direct_seconds_extrapolated"]
        L += [
            f"## Larger GRU, estimators only — T={g['T']}, B={g['B']}, H={g['H']}: D={g['D']:,}, P={g['P']:,}",
            "",
            f"Exact path: {g['exact_passes']:,} passes ≈ {g['exact_seconds_extrapolated']:.0f} s (extrapolated from the one-sided runs' "
            f"{g['seconds_per_pass']['jvp'] * 1e3:.1f} ms/JVP, {g['seconds_per_pass']['vjp'] * 1e3:.1f} ms/VJP).",
            f"The paper's direct baseline (K on all D basis vectors, 2D = {2 * g['D']:,} passes) would take ≈ {direct:.0f} s.",
            "",
            "| method | passes | tr K | ± s.e. | rel. s.e. | time (s) | speed-up vs exact | vs direct |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in g["methods"]:
            L.append(
                f"| {r['method']} | {r['passes']} | {r['value']:.6g} | {r['stderr']:.3g} | {r['rel_stderr']:.2%} | {r['seconds']:.3g} | "
                f"{r['speedup_vs_exact']:.3g}× | {direct / r['seconds']:.3g}× |"
            )
        L.append("")
    if "dge5" in res:
        d = res["dge5"]
        head = "D ≥ 10⁵" if d["D"] >= 10**5 else "Small size (quick mode; the full run uses D ≥ 10⁵)"
        L += [
            f"## {head}: trace, norm, effective rank to 2 % — T={d['T']}, B={d['B']}, H={d['H']}: D={d['D']:,}, P={d['P']:,}",
            "",
            f"{d['num_probes']} JVP probes ({d['jvp_passes']} passes incl. checks), {d['seconds']:.1f} s end to end (NTK build included); "
            "per-time-step curves from the same probes (`gru_time_curves*.png`).",
            "",
            "| quantity | value | ± s.e. | rel. s.e. |",
            "|---|---|---|---|",
        ]
        for q in ("trace", "frobenius_norm", "effective_rank"):
            v, se = d[q]
            L.append(f"| {q} | {v:.6g} | {se:.3g} | {d['rel_stderr'][q]:.2%} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small GRU, under a minute")
    ap.add_argument("--seeds", type=int, default=20, help="reruns per budget (paper: 50)")
    ap.add_argument("--max-budget", type=int, default=3840, help="largest budget in AD passes (paper: 12,000)")
    ap.add_argument("--only", default="budget,large,dge5", help="sections to run")
    ap.add_argument("--budgets", default="", help="comma-separated budgets in AD passes (overrides the grid)")
    ap.add_argument("--merge", action="store_true", help="add --budgets to the budget section already in the results")
    ap.add_argument("--large-budget", type=int, default=120)
    args = ap.parse_args()
    sections = set(args.only.split(","))
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    import os

    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load": f"{os.getloadavg()[0]:.1f}",
        "paper": PAPER,
    }
    out_json = RESULTS / f"gru_paper{suffix}.json"
    if out_json.exists():  # keep sections not rerun
        old = json.loads(out_json.read_text())
        res.update({k: v for k, v in old.items() if k in ("budget", "large", "dge5") and (k not in sections or args.merge)})
    if "budget" in sections:
        if args.quick:
            K, seeds, budgets, cache = paper_gru(20, 8, 16), 3, [12, 24, 48, 96, 192], None
        else:
            K, seeds, cache = paper_gru(), args.seeds, RESULTS / "gru_paper_exact.json"
            budgets = [12, 30] + [60 * 2**k for k in range(12) if 60 * 2**k <= args.max_budget]  # incl. the low-sample grid
        if args.budgets:
            budgets = [int(v) for v in args.budgets.split(",")]
        print(K.describe())
        K.pass_seconds("jvp"), K.pass_seconds("vjp")  # warm-up: the first forward-mode call compiles
        b = budget_section(K, budgets, seeds, lambda: exact_reference(K, cache))
        b.update({"D": K.dim, "P": K.num_params, "seeds": seeds, "budgets": budgets})
        old_b = res.get("budget") if args.merge else None
        if old_b is not None and (old_b["D"], old_b["P"], old_b["seeds"]) == (K.dim, K.num_params, seeds):
            # add these budgets to an earlier run's (same size and seeds); keep the earlier ones
            raw = old_b["raw"]
            for m, d in b["raw"].items():
                raw[m].update(d)
            t_pass = {k: min(old_b["seconds_per_pass"][k], b["seconds_per_pass"][k]) for k in b["seconds_per_pass"]}
            merged = sorted({*old_b["budgets"], *budgets})
            b = finish_budget(raw, t_pass, b["exact"], K.dim, K.num_params)
            b.update({"D": K.dim, "P": K.num_params, "seeds": seeds, "budgets": merged})
        res["budget"] = b
        plot_budget(
            b,
            RESULTS / f"gru_error_vs_budget{suffix}.png",
            f"GRU hidden NTK trace: D={K.dim:,}, P={K.num_params:,}, {seeds} seeds",
        )
    if "large" in sections and not args.quick:
        res["large"] = large_section(100, 32, 64, args.large_budget)
    if "dge5" in sections:
        if args.quick:
            res["dge5"] = dge5_section(20, 8, 16, 0.02, 100, RESULTS / "gru_time_curves_quick.png")
        else:
            res["dge5"] = dge5_section(100, 16, 64, 0.02, 200, RESULTS / "gru_time_curves.png")
    out_json.write_text(json.dumps(res, indent=1, default=float))
    write_markdown(res, RESULTS / f"gru_paper{suffix}.md")
    print(f"wrote {out_json} and {RESULTS / f'gru_paper{suffix}.md'}")


if __name__ == "__main__":
    main()
