"""The ntkscope benchmark suite: accuracy, speed-up, peers, floors and scaling, in one run.

    python benchmarks/run.py --quick          # CI smoke (< 3 min on 2 cores), small sizes
    python benchmarks/run.py                  # full size: the paper's settings, 50 seeds
    python benchmarks/run.py --only floors,peers --seeds 10

Writes ``benchmarks/results/<quick|full>/``: ``results.json`` (every number), ``results.md``
(the tables) and ``*.png`` figures.  Every comparison is a ratio of times measured in the same
run, each time a median over repeats: absolute seconds on a shared machine prove nothing.

Sections (see ``shared/paper.md`` and issue 7):

1. ``accuracy`` — relative error of tr K, ‖K‖_F, effective rank (and alignment for the digits
   MLP, initial vs trained NTK) against AD passes, for every estimator; median and quartiles
   over seeds, with the exact values.
2. ``speedup`` — wall time to 1 %, 2 %, 5 % relative error on tr K against the exact kernel done
   the best ``torch.func`` way (Jacobian contraction; NTK-vector products), swept over D and P.
3. ``peers`` — curvlinops' ``hutchinson_trace``/``hutchpp_trace``/``xtrace`` on its Jacobian
   operators (K = J Jᵀ) at equal matvec budget: time and error, beside ours.
4. ``floors`` — (a) a bare ``vmap(vjp)``/``vmap(jvp)`` loop doing the same passes (drawing its
   own Rademacher probes, timed right after ours: the ratio is a median over repeats); (b) the
   FLOPs of the passes (``FlopCounterMode``) over the best GEMM rate measured in this run.
5. ``scaling`` — time and peak RSS (a fresh subprocess per point) as D → 10⁶ and P → 10⁶.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import ntkscope as nk  # noqa: E402
from ntkscope.estimators import exact as ex  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = {"trace": nk.trace, "frobenius_norm": nk.frobenius_norm, "effective_rank": nk.effective_rank}
METHODS = {
    "trace": ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp", "vjp_proj", "jvp_proj"],
    "frobenius_norm": ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp"],
    "effective_rank": ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp"],
    "alignment": ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp"],
}
# Read off the paper's Figure 1 (speed-up to a tolerance vs the direct trace).
PAPER_SPEEDUP = {"mlp": {"1%": 90, "plateau": 35}, "gru": {"1%": 1.3e4, "0.1%": 9e3, "0.01%": 2e2}}
#: The paper's estimators: the MLPs' one-sided VJP samples are ‖Jᵀv‖² as in Hazelden (2025),
#: without the per-example blocks that make their trace exact from R = D/G passes (those are
#: measured in engine.py), so these tables stay comparable with the paper's and with earlier runs.
PAPER_GHOST = False


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def passes(e: nk.Estimate) -> int:
    return e.jvp_passes + e.vjp_passes


def probes_for(fn: Any, args: tuple, method: str, budget: int) -> int:
    """Number of probes whose AD-pass cost is closest to (not above) ``budget`` for this method."""
    e = fn(*args, method=method, num_probes=12, seed=0)
    per = passes(e) / 12
    return max(2, int(budget / per))


# ---------------------------------------------------------------------------------------------
# 1. accuracy


def accuracy_setting(name: str, K: Any, exact: dict[str, float], budgets: list[int], seeds: int, K2: Any = None) -> list[dict]:
    rows = []
    quantities = list(METRICS) + (["alignment"] if K2 is not None else [])
    for q in quantities:
        fn = nk.alignment if q == "alignment" else METRICS[q]
        args = (K, K2) if q == "alignment" else (K,)
        for method in METHODS[q]:
            try:
                per_probe = None
                for b in budgets:
                    if per_probe is None:
                        e = fn(*args, method=method, num_probes=12, seed=0)
                        per_probe = passes(e) / 12
                    m = max(2, int(b / per_probe))
                    vals, errs, secs, used = [], [], [], 0
                    for s in range(seeds):
                        e = fn(*args, method=method, num_probes=m, seed=1000 + s)
                        vals.append(e.value)
                        errs.append(C.rel_err(e.value, exact[q]))
                        secs.append(e.seconds)
                        used = passes(e)
                    q1, med, q3 = C.quartiles(errs)
                    rows.append(
                        {"setting": name, "quantity": q, "method": method, "budget": b, "num_probes": m, "passes": used,
                         "err_q1": q1, "err_median": med, "err_q3": q3, "value_median": statistics.median(vals),
                         "seconds_median": statistics.median(secs), "exact": exact[q], "seeds": seeds}
                    )
            except Exception as err:  # a method that does not apply is recorded, not fatal
                rows.append({"setting": name, "quantity": q, "method": method, "error": f"{type(err).__name__}: {err}"})
        log(f"accuracy {name} {q} done")
    return rows


def section_accuracy(cfg: dict) -> dict:
    out: dict[str, Any] = {"exact": {}, "rows": []}
    for name in ("mlp", "gru", "digits"):
        t0 = time.perf_counter()
        K2 = None
        if name == "mlp":
            model, x = C.mlp_setting(**cfg["mlp"])
            K = nk.NTK(model, x, ghost=PAPER_GHOST)
        elif name == "gru":
            model, x = C.gru_setting(**cfg["gru"])
            K = nk.NTK(model, x, output=0)
        else:
            model, init, xte, acc = C.digits_setting(**cfg["digits"])
            K = nk.NTK(model, xte, ghost=PAPER_GHOST)  # trained
            K2 = nk.NTK(model, xte, params=init, ghost=PAPER_GHOST)  # initial
        exact = C.exact_stats(K)
        t_exact = time.perf_counter() - t0
        if K2 is not None:
            exact["alignment"] = nk.alignment(K, K2, method="exact").value
            exact["test_accuracy"] = acc
        out["exact"][name] = {"D": K.dim, "P": K.num_params, **exact, "seconds": t_exact, "paths": K.paths}
        log(f"exact {name}: D={K.dim} P={K.num_params} {exact}")
        budgets = cfg["budgets"][name]
        out["rows"] += accuracy_setting(name, K, exact, budgets, cfg["seeds"], K2)
    return out


# ---------------------------------------------------------------------------------------------
# 2. speed-up against the exact kernel


def exact_torchfunc_seconds(model: torch.nn.Module, x: Any, output: int | None, max_bytes: float) -> dict[str, float | None]:
    """The exact trace the ``torch.func`` way (PyTorch's NTK tutorial), best of its two methods.

    * ``jacobian``: J by ``vmap`` of one-sided passes over the basis of the smaller side
      (``jacrev``/``jacfwd`` are exactly this), then ``tr K = ‖J‖_F²``; None if J does not fit.
    * ``ntk_vp``: NTK-vector products ``K e_i`` (a VJP then a JVP per basis vector, D of them);
      timed on a block of basis vectors and scaled to D (marked as extrapolated).
    """
    vjp_b, jvp_b, D, P = C.bare_funcs(model, x, output)
    out: dict[str, float | None] = {"jacobian": None, "ntk_vp": None}
    n, blk = (D, vjp_b) if D <= P else (P, jvp_b)
    if D * P * 4 <= max_bytes:
        chunk = max(1, min(n, int(2**28 // (4 * (D + P)))))

        def jac() -> float:
            tot = 0.0
            for s in range(0, n, chunk):
                E = torch.zeros(min(chunk, n - s), n)
                E[torch.arange(E.shape[0]), torch.arange(s, s + E.shape[0])] = 1
                tot += float(blk(E).double().square().sum())
            return tot

        out["jacobian"] = C.median_time(jac, repeats=1, warmup=0)
    k = min(D, 64)
    E = torch.zeros(k, D)
    E[torch.arange(k), torch.arange(k)] = 1
    t = C.median_time(lambda: jvp_b(vjp_b(E)), repeats=2, warmup=1)
    out["ntk_vp"] = t * D / k
    return out


def section_speedup(cfg: dict) -> dict:
    rows = []
    for kind, sizes in cfg["speedup_sizes"].items():
        for size in sizes:
            if kind == "gru":
                T, B, H = size
                model, x = C.gru_setting(T, B, H)
                output: int | None = 0
            else:
                n, width, layers = size
                model, x = C.mlp_setting(n=n, d_in=100, width=width, layers=layers)
                output = None
            K = nk.NTK(model, x, output=output, ghost=PAPER_GHOST)
            ex_t = exact_torchfunc_seconds(model, x, output, cfg["exact_max_bytes"])
            t0 = time.perf_counter()
            truth = ex.exact_trace(K)
            t_ours_exact = time.perf_counter() - t0
            best_exact = min(t for t in ex_t.values() if t is not None)
            row: dict[str, Any] = {"kind": kind, "size": size, "D": K.dim, "P": K.num_params, "exact_trace": truth,
                                   "torchfunc_jacobian_s": ex_t["jacobian"], "torchfunc_ntk_vp_s_extrapolated": ex_t["ntk_vp"],
                                   "ntkscope_exact_s": t_ours_exact, "best_torchfunc_exact_s": best_exact}
            # median error and time per (method, budget), measured once; every tolerance reads
            # the same table, so the speed-ups are consistent across tolerances
            table: dict[tuple[str, int], tuple[float, float]] = {}
            for method in ("jvp", "vjp", "hutchpp"):
                for b in cfg["speedup_budgets"]:
                    m = probes_for(nk.trace, (K,), method, b)
                    errs, secs = [], []
                    for s in range(cfg["speedup_seeds"]):
                        e = nk.trace(K, method=method, num_probes=m, seed=2000 + s)
                        errs.append(C.rel_err(e.value, truth))
                        secs.append(e.seconds)
                    table[(method, b)] = (statistics.median(errs), statistics.median(secs))
                    if table[(method, b)][0] <= min(cfg["tolerances"]):
                        break
            row["table"] = [{"method": k[0], "passes": k[1], "err_median": v[0], "seconds": v[1]} for k, v in table.items()]
            for tol in cfg["tolerances"]:
                cands = [(t, k[0], k[1]) for k, (err, t) in table.items() if err <= tol]
                key = f"{tol:g}"
                if not cands:
                    row[f"speedup@{key}"] = None
                    continue
                best = min(cands)
                row[f"speedup@{key}"] = best_exact / best[0]
                row[f"best@{key}"] = {"method": best[1], "passes": best[2], "seconds": best[0]}
            rows.append(row)
            log(f"speedup {kind} {size}: {({k: v for k, v in row.items() if k.startswith('speedup')})}")
    return {"rows": rows, "paper": PAPER_SPEEDUP}


# ---------------------------------------------------------------------------------------------
# 3. peers: curvlinops


def section_peers(cfg: dict) -> dict:
    try:
        import curvlinops as cl
    except ImportError:
        return {"skipped": "curvlinops not installed: pip install -c constraints.txt -e '.[bench]'"}
    rows = []

    class _State(torch.nn.Module):  # curvlinops wants a module returning a tensor
        def __init__(self, m: torch.nn.Module, output: int | None) -> None:
            super().__init__()
            self.m, self.output = m, output

        def forward(self, X: torch.Tensor) -> torch.Tensor:
            out = self.m(X)
            return out[self.output] if self.output is not None else out

    for name in ("mlp", "gru"):
        model, x, output = C.paper_setting(name, cfg)
        K = nk.NTK(model, x, output=output, ghost=PAPER_GHOST)
        truth = ex.exact_trace(K)
        wrapped = _State(model, output)
        ps = list(wrapped.parameters())
        # the data's leading dimension is curvlinops' "batch" (for the sequence-first GRU: time)
        kw = {"batch_size_fn": lambda X: X.shape[0], "check_deterministic": False}
        data = [(x, torch.zeros(1))]
        A = cl.JacobianLinearOperator(wrapped, ps, data, **kw) @ cl.TransposedJacobianLinearOperator(wrapped, ps, data, **kw)
        for budget in cfg["peer_budgets"]:  # K-matvecs (2 AD passes each)
            for theirs, ours in (("hutchinson_trace", "hutchinson"), ("hutchpp_trace", "hutchpp"), ("xtrace", "xtrace")):
                f = getattr(cl, theirs)
                f(A, budget)  # warm-up (first forward-mode call compiles)
                t_c, e_c, t_o, e_o, t_1, e_1 = [], [], [], [], [], []
                for s in range(cfg["peer_seeds"]):
                    torch.manual_seed(3000 + s)
                    t0 = time.perf_counter()
                    v = float(f(A, budget))
                    t_c.append(time.perf_counter() - t0)
                    e_c.append(C.rel_err(v, truth))
                    e = nk.trace(K, method=ours, num_probes=budget, seed=3000 + s)
                    t_o.append(e.seconds)
                    e_o.append(C.rel_err(e.value, truth))
                    # our best one-sided estimator at the same AD-pass budget (2 per K-matvec)
                    e = nk.trace(K, method="jvp" if name == "gru" else "vjp", num_probes=2 * budget, seed=3000 + s)
                    t_1.append(e.seconds)
                    e_1.append(C.rel_err(e.value, truth))
                med = statistics.median
                rows.append({"setting": name, "matvecs": budget, "method": ours,
                             "curvlinops_s": med(t_c), "curvlinops_err": med(e_c), "ntkscope_s": med(t_o), "ntkscope_err": med(e_o),
                             "time_ratio": med(t_o) / med(t_c), "onesided_s": med(t_1), "onesided_err": med(e_1)})
                log(f"peers {name} {budget} {ours}: ratio {rows[-1]['time_ratio']:.2f}")
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------
# 4. floors


def section_floors(cfg: dict) -> dict:
    # the best of several measurements: the arithmetic limit is what the machine can do
    gflops = max(C.gemm_gflops() for _ in range(5))
    rows = []
    m = cfg["floor_passes"]
    reps = cfg["repeats"]
    for name in ("mlp", "gru"):
        model, x, output = C.paper_setting(name, cfg)
        K = nk.NTK(model, x, output=output, ghost=PAPER_GHOST)
        vjp_b, jvp_b, D, P = C.bare_funcs(model, x, output)
        chunk = K.chunk_size
        g = torch.Generator().manual_seed(0)
        Vd = torch.randn(m, D, generator=g)
        Up = torch.randn(m, P, generator=g)

        def bare(side: str, k: int, draw: bool = True) -> None:
            """The naive loop: draw a chunk of Rademacher probes, one vmap'd pass, squared norms."""
            blk, X, n = (vjp_b, Vd, D) if side == "vjp" else (jvp_b, Up, P)
            for s in range(0, k, chunk):
                c = min(k, s + chunk) - s
                Z = torch.randint(0, 2, (c, n), dtype=X.dtype).mul_(2).sub_(1) if draw else X[s : s + c]
                blk(Z).square().sum()

        def bare_passes(nj: int, nv: int) -> float:
            t0 = time.perf_counter()
            if nv:
                bare("vjp", nv)
            if nj:
                bare("jvp", nj)
            return time.perf_counter() - t0

        bare("vjp", min(m, chunk))  # warm-up of both bare paths
        bare("jvp", min(m, chunk))
        # FLOPs of the passes: counted on our block path (pure GEMMs where a fast path applies)
        # and on the bare path; the smaller is the arithmetic the passes need.
        k = min(m, 32)
        fl = {}
        for side in ("vjp", "jvp"):
            X = Vd[:k].T.contiguous() if side == "vjp" else Up[:k].T.contiguous()
            op = K.vjp if side == "vjp" else K.jvp
            f_ours = C.count_flops(lambda: op(X)) / k
            f_bare = C.count_flops(lambda side=side: bare(side, k, draw=False)) / k
            fl[side] = min(v for v in (f_ours, f_bare) if v > 0) if max(f_ours, f_bare) > 0 else math.nan
        t_bare: dict[str, list[float]] = {"vjp": [], "jvp": []}
        for method in ("vjp", "jvp", "hutchinson", "hutchpp", "xtrace"):
            e = nk.trace(K, method=method, num_probes=12, seed=0)
            per = passes(e) / 12
            mm = max(2, int(m / per))
            ts, tb, ratios = [], [], []
            for r in range(reps + 1):
                e = nk.trace(K, method=method, num_probes=mm, seed=r)
                used = (e.jvp_passes, e.vjp_passes)
                # the bare loop doing the same passes right after ours: a ratio per repeat, so load
                # changes on a shared machine hit both sides alike
                b = bare_passes(*used)
                if r:
                    ts.append(e.seconds)
                    tb.append(b)
                    ratios.append(e.seconds / b)
                    if method in ("vjp", "jvp"):
                        t_bare[method].append(b / m)
            t = statistics.median(ts)
            floor_b = (fl["jvp"] * used[0] + fl["vjp"] * used[1]) / (gflops * 1e9)
            rows.append({"setting": name, "method": method, "jvp_passes": used[0], "vjp_passes": used[1], "seconds": t,
                         "floor_a_s": statistics.median(tb), "ratio_a": statistics.median(ratios), "floor_b_s": floor_b,
                         "ratio_b": t / floor_b, "paths": K.paths})
            log(f"floors {name} {method}: {t:.3f}s  (a) {rows[-1]['ratio_a']:.2f}x  (b) {t / floor_b:.2f}x")
        ms = {k2: statistics.median(v) * 1e3 for k2, v in t_bare.items()}
        rows.append({"setting": name, "method": "bare-vjp-per-pass-ms", "seconds": ms["vjp"],
                     "flops_per_vjp": fl["vjp"], "flops_per_jvp": fl["jvp"]})
        rows.append({"setting": name, "method": "bare-jvp-per-pass-ms", "seconds": ms["jvp"]})
    return {"gemm_gflops": gflops, "passes": m, "rows": rows}


# ---------------------------------------------------------------------------------------------
# 5. scaling (one subprocess per point: its peak RSS is the point's memory)


def section_scaling(cfg: dict) -> dict:
    rows = []
    script = Path(__file__).resolve().parent / "scaling_point.py"
    for kind, sizes in cfg["scaling_sizes"].items():
        for size in sizes:
            cmd = [sys.executable, str(script), "--kind", kind, "--size", ",".join(map(str, size)),
                   "--probes", str(cfg["scaling_probes"]), "--chunk", str(cfg["scaling_chunk"]), "--threads", str(torch.get_num_threads())]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["scaling_timeout"])
                row = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"error": res.stderr[-500:]}
            except Exception as err:
                row = {"error": f"{type(err).__name__}: {err}"}
            row.update({"kind": kind, "size": size})
            rows.append(row)
            log(f"scaling {kind} {size}: {row}")
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------


def config(quick: bool, seeds: int | None) -> dict:
    if quick:
        return {
            "seeds": seeds or 3, "repeats": 3,
            "mlp": {"n": 20, "d_in": 100, "width": 32, "layers": 6},
            "gru": {"T": 20, "B": 6, "H": 32},
            "digits": {"n_test": 32, "epochs": 2},
            "budgets": {"mlp": [24, 96], "gru": [24, 96], "digits": [24, 96]},
            "speedup_sizes": {"gru": [(20, 6, 32), (40, 10, 32)], "mlp": [(20, 32, 6)]},
            "speedup_budgets": [30, 120, 480], "speedup_seeds": 3, "tolerances": [0.05, 0.02],
            "exact_max_bytes": 2**29,
            "peer_budgets": [30], "peer_seeds": 2,
            "floor_passes": 96,
            "scaling_sizes": {"gru": [(200, 50, 32)], "mlp": [(50, 256, 4)]},
            "scaling_probes": 8, "scaling_chunk": 8, "scaling_timeout": 60,
        }
    return {
        "seeds": seeds or 50, "repeats": 5,
        "mlp": {}, "gru": {}, "digits": {"n_test": 128, "epochs": 5},
        # AD passes; the paper's grids reach 3,200 (MLP) / 12,000 (GRU): raise them with --budgets
        "budgets": {"mlp": [12, 60, 300, 1200], "gru": [12, 60, 300, 1200], "digits": [12, 60, 300, 1200]},
        "speedup_sizes": {"gru": [(50, 15, 64), (100, 30, 64), (200, 50, 64)], "mlp": [(50, 64, 15), (200, 128, 8)]},
        "speedup_budgets": [30, 60, 120, 300, 600, 1200, 3000, 6000], "speedup_seeds": 10, "tolerances": [0.05, 0.02, 0.01],
        "exact_max_bytes": 8 * 2**30,
        "peer_budgets": [60, 300], "peer_seeds": 5,
        "floor_passes": 600,
        "scaling_sizes": {
            # D = T·B·64 up to 1.0e6 (and 2e6); P = 100·w + 3·w² + 4w up to 1.1e6
            "gru": [(50, 15, 64), (100, 50, 64), (250, 63, 64), (500, 63, 64)],
            "mlp": [(50, 256, 4), (50, 512, 4), (50, 600, 4)],
        },
        "scaling_probes": 32, "scaling_chunk": 16, "scaling_timeout": 1200,
    }


SECTIONS = {"floors": section_floors, "peers": section_peers, "accuracy": section_accuracy,
            "speedup": section_speedup, "scaling": section_scaling}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: small models, few seeds")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per accuracy point (default 50; 3 with --quick)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<quick|full>)")
    ap.add_argument("--budgets", default=None, help="AD-pass budgets for the accuracy section, e.g. 60,300,1200,6000")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's). On an oversubscribed machine 1 thread avoids OpenMP spin-wait collapse")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args.quick, args.seeds)
    if args.budgets:
        cfg["budgets"] = {k: [int(b) for b in args.budgets.split(",")] for k in cfg["budgets"]}
    out_dir = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "full")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "ntkscope": nk.__version__},
        "mode": "quick" if args.quick else "full", "config": cfg, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    t0 = time.perf_counter()
    for name in args.only.split(","):
        log(f"== {name}")
        try:
            results[name] = SECTIONS[name](cfg)
        except Exception as err:  # keep the other sections' numbers
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            log(f"section {name} failed: {err}")
    results["seconds"] = time.perf_counter() - t0
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    from report import figures, markdown

    (out_dir / "results.md").write_text(markdown(results))
    if not args.no_figures:
        figures(results, out_dir)
    log(f"wrote {out_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
