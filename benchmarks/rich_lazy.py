"""Rich vs lazy training (Chizat, Oyallon & Bach 2019): how far the NTK moves, against the scale α.

Each model is trained in the α-scaled form ``f_α = α (f(θ) − f(θ₀))`` on the loss ``L(f_α)/α²``
(:class:`ntkscope.models.lazy.AlphaScaled`) with plain SGD at one learning rate for every α, from the
same initialisation.  At checkpoints during training we measure, on fixed held-out inputs,

* the kernel alignment ``⟨K_t, K_0⟩_F / (‖K_t‖_F ‖K_0‖_F)`` of the inner model's NTK (the NTK of
  ``f_α`` is ``α² K``: alignments do not depend on α's prefactor);
* the kernel–target alignment ``yᵀK_t y / (‖K_t‖_F ‖y‖²)`` (one-hot labels / flip-flop targets);
* per parameter block: the alignment of ``K_t,g`` with ``K_0,g`` and the block's trace share
  (:func:`ntkscope.parameter_blocks` with ``other=K_0``, one probe set for everything);
* the relative parameter movement ``‖θ_t − θ₀‖ / ‖θ₀‖``.

Every kernel number is a one-sided (VJP) estimate with its jackknife standard error.

Models: a GRU (``nn.GRU``, hidden 32) with a linear readout at every step on the 3-bit flip-flop
task (``ntkscope.tasks.flipflop``), MSE loss; an MLP 64-64-64-10 (tanh) on scikit-learn's digits,
MSE loss on one-hot labels.

    nice -n 10 python benchmarks/rich_lazy.py [--quick] [--out DIR]

writes ``rich_lazy.{json,md,png}`` (``rich_lazy_quick.*`` with ``--quick``) to
``benchmarks/results`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ntkscope as nk
from ntkscope import tasks
from ntkscope.models.lazy import AlphaScaled

RESULTS = Path(__file__).parent / "results"
ALPHAS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


def config(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "alphas": [0.1, 1.0, 10.0, 100.0],
            "probes": 32,
            "gru": {"hidden": 16, "steps": 100, "train_batch": 32, "eval_batch": 4, "T": 20, "lr": 0.1, "checkpoints": 2},
            "mlp": {"hidden": 32, "steps": 150, "train_n": 512, "batch": 128, "eval_n": 64, "lr": 0.5, "checkpoints": 2},
        }
    return {
        "alphas": ALPHAS,
        "probes": 96,
        "gru": {"hidden": 32, "steps": 400, "train_batch": 32, "eval_batch": 8, "T": 40, "lr": 0.1, "checkpoints": 5},
        "mlp": {"hidden": 64, "steps": 1000, "train_n": None, "batch": 128, "eval_n": 100, "lr": 0.5, "checkpoints": 5},
    }


def _checkpoints(steps: int, n: int) -> list[int]:
    """0 and ``n`` roughly geometric steps up to ``steps``."""
    if n <= 1:
        return [0, steps]
    pts = {0, steps}
    for k in range(1, n):
        pts.add(int(round(steps ** (k / n))))
    return sorted(pts)


def _est(e: nk.Estimate) -> dict[str, float | None]:
    return {"value": e.value, "stderr": e.stderr}


def _measure(
    model: nn.Module, X: Any, y: torch.Tensor, K0: nk.NTK, groups: dict[str, Any], probes: int, seed: int, output: int | None
) -> dict[str, Any]:
    K = nk.NTK(model, X, output=output)
    pb = nk.parameter_blocks(K, groups, other=K0, method="vjp", num_probes=probes, seed=seed)
    ta = nk.target_alignment(K, y, method="vjp", num_probes=probes, seed=seed)
    assert pb.alignment is not None and pb.total_alignment is not None and pb.alignment.stderr is not None
    assert pb.trace.stderr is not None
    return {
        "kernel_alignment": _est(pb.total_alignment),
        "target_alignment": _est(ta),
        "trace": _est(pb.total_trace),
        "trace_ratio_to_init": pb.total_trace.value / pb.other_trace.values.sum().item() if pb.other_trace is not None else None,
        "blocks": {
            n: {
                "alignment": float(pb.alignment.values[i]),
                "alignment_stderr": float(pb.alignment.stderr[i]),
                "share": float(pb.shares()[i]),
                "trace": float(pb.trace.values[i]),
                "trace_stderr": float(pb.trace.stderr[i]),
            }
            for i, n in enumerate(pb.names)
        },
        "passes": pb.passes + ta.passes,
    }


def _movement(net: AlphaScaled) -> float:
    th0 = net.initial_parameters(trainable=False)
    num = sum(float((p.detach() - th0[n]).square().sum()) for n, p in net.model.named_parameters())
    den = sum(float(t.square().sum()) for t in th0.values())
    return math.sqrt(num / den)


def run_gru(cfg: dict[str, Any], alphas: list[float], probes: int, seed: int = 0) -> dict[str, Any]:
    c = cfg
    Xtr, Ytr = tasks.flipflop(batch=c["train_batch"], steps=c["T"], seed=seed)
    Xev, Yev = tasks.flipflop(batch=c["eval_batch"], steps=c["T"], seed=seed + 1)
    Xte, Yte = tasks.flipflop(batch=256, steps=c["T"], seed=seed + 2)
    groups = {
        "W_ih (input)": "rnn.weight_ih_l0",
        "W_hh (recurrent)": "rnn.weight_hh_l0",
        "GRU biases": "rnn.bias_*",
        "readout": "readout.*",
    }
    runs = []
    for alpha in alphas:
        inner = tasks.RecurrentRegressor("gru", 3, c["hidden"], 3, seed=seed)
        net = AlphaScaled(inner, alpha)
        K0 = nk.NTK(inner, Xev, params=net.initial_parameters())
        opt = torch.optim.SGD(net.trainable_parameters(), lr=c["lr"])
        marks = _checkpoints(c["steps"], c["checkpoints"])
        rows, t0 = [], time.perf_counter()
        for step in range(c["steps"] + 1):
            if step in marks:
                with torch.no_grad():
                    test = float(nn.functional.mse_loss(net(Xte), Yte))
                row = {"step": step, "test_mse": test, "movement": _movement(net)}
                if math.isfinite(test):
                    row.update(_measure(inner, Xev, Yev, K0, groups, probes, seed=100 + step, output=None))
                rows.append(row)
                print(
                    f"gru α={alpha:g} step {step}: test mse {test:.4f}, align {row.get('kernel_alignment', {}).get('value', float('nan')):.4f}",
                    flush=True,
                )
                if not math.isfinite(test):
                    break
            if step == c["steps"]:
                break
            opt.zero_grad()
            loss = net.scale_loss(nn.functional.mse_loss(net(Xtr), Ytr))
            loss.backward()
            opt.step()
        runs.append({"alpha": alpha, "checkpoints": rows, "seconds": time.perf_counter() - t0})
    return {
        "setting": c,
        "D": int(Yev.numel()),
        "P": sum(p.numel() for p in inner.parameters()),
        "runs": runs,
        "blocks": list(groups),
    }


def run_mlp(cfg: dict[str, Any], alphas: list[float], probes: int, seed: int = 0) -> dict[str, Any]:
    c = cfg
    Xtr, ytr, Xte, yte = tasks.digits(c["train_n"], seed=seed)
    Ytr = nn.functional.one_hot(ytr, 10).float()
    Xev, yev = Xte[: c["eval_n"]].contiguous(), yte[: c["eval_n"]]
    groups = {"layer 1": "0.*", "layer 2": "2.*", "readout": "4.*"}
    runs = []
    for alpha in alphas:
        inner = tasks.mlp([64, c["hidden"], c["hidden"], 10], seed=seed)
        net = AlphaScaled(inner, alpha)
        K0 = nk.NTK(inner, Xev, params=net.initial_parameters())
        opt = torch.optim.SGD(net.trainable_parameters(), lr=c["lr"])
        marks = _checkpoints(c["steps"], c["checkpoints"])
        g = torch.Generator().manual_seed(seed)
        perm, at = torch.randperm(len(ytr), generator=g), 0
        rows, t0 = [], time.perf_counter()
        for step in range(c["steps"] + 1):
            if step in marks:
                with torch.no_grad():
                    out = net(Xte)
                    acc = float((out.argmax(1) == yte).float().mean())
                    test = float(nn.functional.mse_loss(out, nn.functional.one_hot(yte, 10).float()))
                row = {"step": step, "test_mse": test, "test_accuracy": acc, "movement": _movement(net)}
                if math.isfinite(test):
                    row.update(_measure(inner, Xev, yev, K0, groups, probes, seed=100 + step, output=None))
                rows.append(row)
                print(
                    f"mlp α={alpha:g} step {step}: test acc {acc:.3f}, align {row.get('kernel_alignment', {}).get('value', float('nan')):.4f}",
                    flush=True,
                )
                if not math.isfinite(test):
                    break
            if step == c["steps"]:
                break
            if at + c["batch"] > len(ytr):
                perm, at = torch.randperm(len(ytr), generator=g), 0
            idx = perm[at : at + c["batch"]]
            at += c["batch"]
            opt.zero_grad()
            loss = net.scale_loss(nn.functional.mse_loss(net(Xtr[idx]), Ytr[idx]))
            loss.backward()
            opt.step()
        runs.append({"alpha": alpha, "checkpoints": rows, "seconds": time.perf_counter() - t0})
    return {
        "setting": c,
        "D": int(Xev.shape[0] * 10),
        "P": sum(p.numel() for p in inner.parameters()),
        "runs": runs,
        "blocks": list(groups),
    }


def _fmt(d: dict[str, Any] | None, digits: int = 3) -> str:
    if not d or d.get("value") is None:
        return "—"
    se = d.get("stderr")
    return f"{d['value']:.{digits}f} ± {se:.2g}" if se is not None else f"{d['value']:.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Rich vs lazy training: kernel movement against the output scale α",
        "",
        f"`{res['command']}` — {res['mode']} run, {res['seconds']:.0f} s wall on a shared 2-core CPU (under load), "
        f"torch {res['torch']}.  Training: f_α = α (f(θ) − f(θ₀)), loss L(f_α)/α², plain SGD, one learning "
        "rate for every α, the same initialisation and data order.  Kernel numbers: one-sided VJP estimates "
        f"({res['config']['probes']} probes) ± jackknife standard error, on fixed held-out inputs; alignment "
        "K_t·K_0 is the uncentred cosine ⟨K_t, K_0⟩_F / (‖K_t‖_F ‖K_0‖_F).",
        "",
    ]
    for key, title, metric in (("gru", "GRU on 3-bit flip-flop", "test MSE"), ("mlp", "MLP on digits", "test acc.")):
        r = res[key]
        s = r["setting"]
        lines += [
            f"## {title}",
            "",
            f"D = {r['D']} kernel entries per side, P = {r['P']} parameters; settings {json.dumps(s)}.",
            "",
        ]
        hdr = (
            f"| α | steps | {metric} (end) | ‖θ−θ₀‖/‖θ₀‖ | K_T·K_0 | target align. (init → end) | tr K_T / tr K_0 | "
            + " | ".join(f"{b}: K_T,g·K_0,g" for b in r["blocks"])
            + " |"
        )
        lines += [hdr, "|" + "---|" * (7 + len(r["blocks"]))]
        for run in r["runs"]:
            cps = run["checkpoints"]
            first, last = cps[0], cps[-1]
            if "kernel_alignment" not in last:
                lines.append(f"| {run['alpha']:g} | {last['step']} | diverged | | | | |" + " |" * len(r["blocks"]))
                continue
            m = last["test_accuracy"] if key == "mlp" else last["test_mse"]
            blocks = " | ".join(
                f"{last['blocks'][b]['alignment']:.4f} ± {last['blocks'][b]['alignment_stderr']:.2g}" for b in r["blocks"]
            )
            lines.append(
                f"| {run['alpha']:g} | {last['step']} | {m:.3f} | {last['movement']:.3g} | {_fmt(last['kernel_alignment'], 4)} | "
                f"{_fmt(first['target_alignment'])} → {_fmt(last['target_alignment'])} | {last['trace_ratio_to_init']:.3f} | {blocks} |"
            )
        lines.append("")
        lines.append("Trace shares tr K_g / tr K at the end of training (at initialisation in brackets):")
        lines.append("")
        lines.append("| α | " + " | ".join(r["blocks"]) + " |")
        lines.append("|" + "---|" * (1 + len(r["blocks"])))
        for run in r["runs"]:
            cps = run["checkpoints"]
            if "blocks" not in cps[-1]:
                continue
            lines.append(
                f"| {run['alpha']:g} | "
                + " | ".join(f"{cps[-1]['blocks'][b]['share']:.3f} ({cps[0]['blocks'][b]['share']:.3f})" for b in r["blocks"])
                + " |"
            )
        lines.append("")
    lines += [
        "Notes: one initialisation seed and one data order per model; the error bars are the probe noise of the "
        "kernel estimates only, not run-to-run variation.  Every α trains for the same number of steps at the same "
        "learning rate, so the runs also differ in how far training got (the test columns): at large α the "
        "function moves at the linearised rate, at small α it can move faster or slower.  The first row of each "
        "training curve (step 0) has alignment exactly 1 (K_0 against itself, same probes).",
    ]
    return "\n".join(lines) + "\n"


def figure(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for row, (key, title) in enumerate((("gru", "GRU, flip-flop"), ("mlp", "MLP, digits"))):
        r = res[key]
        cmap = plt.get_cmap("viridis")
        runs = [u for u in r["runs"] if "kernel_alignment" in u["checkpoints"][-1]]
        ax = axes[row, 0]
        for i, run in enumerate(r["runs"]):
            cps = [c for c in run["checkpoints"] if "kernel_alignment" in c]
            col = cmap(i / max(1, len(r["runs"]) - 1))
            steps = [max(c["step"], 0.5) for c in cps]
            ax.errorbar(
                steps,
                [c["kernel_alignment"]["value"] for c in cps],
                [c["kernel_alignment"]["stderr"] for c in cps],
                color=col,
                marker="o",
                ms=3,
                capsize=2,
                label=f"α={run['alpha']:g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("SGD step (0 plotted at 0.5)")
        ax.set_ylabel("kernel alignment K_t·K_0")
        ax.set_title(f"{title}: kernel alignment over training")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        al = [u["alpha"] for u in runs]
        ax.errorbar(
            al,
            [u["checkpoints"][-1]["kernel_alignment"]["value"] for u in runs],
            [u["checkpoints"][-1]["kernel_alignment"]["stderr"] for u in runs],
            color="k",
            marker="s",
            capsize=3,
            label="whole kernel",
        )
        for b in r["blocks"]:
            ax.errorbar(
                al,
                [u["checkpoints"][-1]["blocks"][b]["alignment"] for u in runs],
                [u["checkpoints"][-1]["blocks"][b]["alignment_stderr"] for u in runs],
                marker="o",
                ms=3,
                capsize=2,
                ls="--",
                label=b,
            )
        ax.set_xscale("log")
        ax.set_xlabel("α")
        ax.set_ylabel("alignment with K_0 at the end")
        ax.set_title(f"{title}: per-block movement")
        ax.legend(fontsize=7)
        ax = axes[row, 2]
        ax.errorbar(
            al,
            [u["checkpoints"][0]["target_alignment"]["value"] for u in runs],
            [u["checkpoints"][0]["target_alignment"]["stderr"] for u in runs],
            marker="o",
            capsize=3,
            label="at init",
        )
        ax.errorbar(
            al,
            [u["checkpoints"][-1]["target_alignment"]["value"] for u in runs],
            [u["checkpoints"][-1]["target_alignment"]["stderr"] for u in runs],
            marker="s",
            capsize=3,
            label="end of training",
        )
        ax.set_xscale("log")
        ax.set_xlabel("α")
        ax.set_ylabel("kernel–target alignment")
        ax.set_title(f"{title}: target alignment")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 4 values of α (about a minute)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", choices=["gru", "mlp"], default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on the shared 2-core CPU under load, "
        "2 threads made a GRU training step several times slower)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = cfg or config(args.quick)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "command": "nice -n 10 python benchmarks/rich_lazy.py" + (" --quick" if args.quick else ""),
        "mode": "quick" if args.quick else "full",
        "torch": torch.__version__,
        "config": cfg,
    }
    for key, fn in (("gru", run_gru), ("mlp", run_mlp)):
        if args.only in (None, key):
            res[key] = fn(cfg[key], cfg["alphas"], cfg["probes"])
    res["seconds"] = time.perf_counter() - t0
    res["threads"] = args.threads
    args.out.mkdir(parents=True, exist_ok=True)
    name = "rich_lazy_quick" if args.quick else "rich_lazy"
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=1))
    if "gru" in res and "mlp" in res:
        (args.out / f"{name}.md").write_text(markdown(res))
        figure(res, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.* in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
