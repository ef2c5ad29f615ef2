"""Markdown tables and PNG figures from the suite's ``results.json`` (see ``run.py``).

    python benchmarks/report.py benchmarks/results/full/results.json   # re-render only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGETS = {
    "floor_a": "≤ 1.0× the bare torch.func vmap(vjp)/vmap(jvp) loop, every method",
    "floor_b": "≤ 3× FLOPs/GEMM-rate for the one-sided estimators (MLP, GRU)",
    "peers": "no slower than curvlinops at equal budget, at least as accurate",
    "speedup": "GRU hidden NTK: ≥ 100× faster than exact at 2 % once D ≥ 10⁴",
    "scaling": "peak memory for a trace at D = 10⁶ under 4 GiB",
}


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    m = res.get("machine", {})
    out = [f"# ntkscope benchmarks ({res.get('mode')})\n",
           f"Run {res.get('started')}, {res.get('seconds', 0):.0f} s; torch {m.get('torch')}, {m.get('threads')} threads, "
           f"Python {m.get('python')}. Times are medians over repeats measured in this run; ratios compare numbers "
           "from the same run.\n"]
    fl = res.get("floors")
    if fl and "rows" in fl:
        out.append(f"\n## Floors ({fl['passes']} AD passes; GEMM rate measured now: {fl['gemm_gflops']:.0f} GFLOP/s)\n\n"
                   f"Targets: (a) {TARGETS['floor_a']}; (b) {TARGETS['floor_b']}.\n\n")
        rows = [[r["setting"], r["method"], r["jvp_passes"], r["vjp_passes"], r["seconds"], r["floor_a_s"], r["ratio_a"],
                 r["floor_b_s"], r["ratio_b"]] for r in fl["rows"] if "ratio_a" in r]
        out.append(_table(["setting", "method", "JVPs", "VJPs", "ours s", "(a) bare s", "ours/(a)", "(b) FLOP-limit s", "ours/(b)"], rows))
        extra = [[r["setting"], r["method"], r["seconds"], r.get("flops_per_vjp"), r.get("flops_per_jvp")] for r in fl["rows"] if "ratio_a" not in r]
        out.append("\n" + _table(["setting", "bare path", "ms per pass", "FLOPs/VJP", "FLOPs/JVP"], extra))
    pe = res.get("peers")
    if pe:
        out.append(f"\n## Against curvlinops (K = J Jᵀ from its Jacobian operators)\n\nTarget: {TARGETS['peers']}.\n\n")
        if "rows" in pe:
            rows = [[r["setting"], r["matvecs"], r["method"], r["curvlinops_s"], r["ntkscope_s"], r["time_ratio"],
                     r["curvlinops_err"], r["ntkscope_err"], r["onesided_s"], r["onesided_err"]] for r in pe["rows"]]
            out.append(_table(["setting", "K-matvecs", "method", "curvlinops s", "ntkscope s", "ours/theirs",
                               "curvlinops rel err", "ntkscope rel err", "one-sided (same passes) s", "one-sided rel err"], rows))
        else:
            out.append(f"{pe}\n")
    sp = res.get("speedup")
    if sp and "rows" in sp:
        tols = sorted({k.split("@")[1] for r in sp["rows"] for k in r if k.startswith("speedup@")}, key=float)
        out.append(f"\n## Speed-up against the exact trace (best torch.func way)\n\nTarget: {TARGETS['speedup']}. "
                   f"Paper (Fig. 1, read off): {sp.get('paper')}.\n\n")
        rows = []
        for r in sp["rows"]:
            row = [r["kind"], r["D"], r["P"], r["torchfunc_jacobian_s"], r["torchfunc_ntk_vp_s_extrapolated"], r["ntkscope_exact_s"]]
            for t in tols:
                b = r.get(f"best@{t}")
                row.append(f"{r[f'speedup@{t}']:.3g}× ({b['method']}, {b['passes']})" if b else "not reached")
            rows.append(row)
        out.append(_table(["model", "D", "P", "torch.func Jacobian s", "NTK-vp s (extrap.)", "ntkscope exact s"]
                          + [f"speed-up @ {float(t) * 100:g} %" for t in tols], rows))
    ac = res.get("accuracy")
    if ac and "rows" in ac:
        out.append("\n## Accuracy against AD passes (relative error: median [q1, q3] over seeds)\n\n")
        for name, ex in ac["exact"].items():
            out.append(f"* **{name}**: D={ex['D']}, P={ex['P']}; exact tr K={ex['trace']:.6g}, ‖K‖_F={ex['frobenius_norm']:.6g}, "
                       f"r_eff={ex['effective_rank']:.6g}" + (f", cos(K_final, K_init)={ex['alignment']:.6g} (test acc {ex['test_accuracy']:.3f})" if "alignment" in ex else "") + "\n")
        rows = [[r["setting"], r["quantity"], r["method"], r["passes"], f"{r['err_median']:.2e} [{r['err_q1']:.1e}, {r['err_q3']:.1e}]",
                 r["seconds_median"]] for r in ac["rows"] if "err_median" in r]
        out.append("\n" + _table(["setting", "quantity", "method", "AD passes", "rel err", "s"], rows))
        bad = [f"{r['setting']}/{r['quantity']}/{r['method']}: {r['error']}" for r in ac["rows"] if "error" in r]
        if bad:
            out.append("\nNot applicable / failed:\n\n" + "".join(f"* {b}\n" for b in bad))
    sc = res.get("scaling")
    if sc and "rows" in sc:
        out.append(f"\n## Scaling (one process per point; peak RSS)\n\nTarget: {TARGETS['scaling']}.\n\n")
        rows = [[r["kind"], r.get("D"), r.get("P"), r.get("method"), r.get("probes"), r.get("chunk"), r.get("seconds_per_pass"),
                 r.get("peak_rss_mib"), r.get("rss_before_mib"), r.get("error", "")[-80:] if r.get("error") else ""] for r in sc["rows"]]
        out.append(_table(["model", "D", "P", "method", "probes", "chunk", "s/pass", "peak RSS MiB", "RSS before MiB", "error"], rows))
    for k, v in res.items():
        if isinstance(v, dict) and "error" in v:
            out.append(f"\n**Section {k} failed**: {v['error']}\n")
    return "".join(out)


METHOD_COLORS = {
    m: f"C{i}" for i, m in enumerate(["hutchinson", "hutchpp", "xtrace", "vjp", "jvp", "vjp_proj", "jvp_proj", "exact"])
}


def figures(res: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ac = res.get("accuracy")
    if ac and "rows" in ac:
        for name in ac["exact"]:
            qs = [q for q in ("trace", "frobenius_norm", "effective_rank", "alignment") if any(r.get("setting") == name and r.get("quantity") == q and "err_median" in r for r in ac["rows"])]
            fig, axes = plt.subplots(1, len(qs), figsize=(4.2 * len(qs), 3.6), squeeze=False)
            for ax, q in zip(axes[0], qs):
                for meth in sorted({r["method"] for r in ac["rows"] if r.get("setting") == name and r.get("quantity") == q}):
                    rs = [r for r in ac["rows"] if r.get("setting") == name and r.get("quantity") == q and r["method"] == meth and "err_median" in r]
                    if not rs:
                        continue
                    x = [r["passes"] for r in rs]
                    color = METHOD_COLORS.get(meth)  # one colour per method across panels
                    ax.plot(x, [r["err_median"] for r in rs], "o-", label=meth, color=color)
                    ax.fill_between(x, [r["err_q1"] for r in rs], [r["err_q3"] for r in rs], alpha=0.15, color=color)
                ax.set(xscale="log", yscale="log", xlabel="AD passes", ylabel="relative error", title=f"{name}: {q}")
            for ax in axes[0]:
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / f"accuracy_{name}.png", dpi=110)
            plt.close(fig)
    sc = res.get("scaling")
    if sc and "rows" in sc:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for kind, key in (("gru", "D"), ("mlp", "P")):
            rs = [r for r in sc["rows"] if r["kind"] == kind and "peak_rss_mib" in r]
            if rs:
                axes[0].plot([r[key] for r in rs], [r["seconds_per_pass"] for r in rs], "o-", label=f"{kind} (x = {key})")
                axes[1].plot([r[key] for r in rs], [r["peak_rss_mib"] / 1024 for r in rs], "o-", label=f"{kind} (x = {key})")
        axes[0].set(xscale="log", yscale="log", xlabel="D or P", ylabel="s per AD pass")
        axes[1].set(xscale="log", xlabel="D or P", ylabel="peak RSS (GiB)")
        axes[1].axhline(4, ls="--", c="k", lw=0.8)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out_dir / "scaling.png", dpi=110)
        plt.close(fig)
    fl = res.get("floors")
    if fl and "rows" in fl:
        rs = [r for r in fl["rows"] if "ratio_a" in r]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [f"{r['setting']}\n{r['method']}" for r in rs]
        xs = range(len(rs))
        ax.bar([i - 0.2 for i in xs], [r["ratio_a"] for r in rs], 0.4, label="ours / bare vmap (a)")
        ax.bar([i + 0.2 for i in xs], [r["ratio_b"] for r in rs], 0.4, label="ours / FLOP limit (b)")
        ax.axhline(1, c="k", lw=0.8)
        ax.axhline(3, c="k", lw=0.8, ls="--")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set(yscale="log", ylabel="time ratio")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "floors.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    r = json.loads(path.read_text())
    (path.parent / "results.md").write_text(markdown(r))
    figures(r, path.parent)
