"""NTK metrics inside a plain PyTorch training loop: minibatches, a learning-rate schedule, ntkscope.Monitor.

An MLP learns scikit-learn's digits with SGD + momentum and a cosine schedule.  A Monitor on 100
fixed images records, every few steps, the NTK's trace and effective rank, its alignment with the
kernel at initialisation and with the labels, each ± stderr, to a CSV (and TensorBoard when it is
installed).  ``ntkscope plot RUN/ntk.csv`` draws them.

    python examples/monitor_loop.py [--out runs/monitor] [--epochs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ntkscope as nk
from ntkscope import tasks


def main(out: str | Path | None = None, epochs: int = 3, every: int = 10, quiet: bool = False) -> dict[str, Any]:
    out = Path(out or tempfile.mkdtemp(prefix="ntkscope-monitor-"))
    X, y, _, _ = tasks.digits(600, seed=0)
    model = tasks.mlp([64, 64, 10], seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=50, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    loggers = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    monitor = nk.Monitor(model, X[:100], targets=y[:100], every=every, num_probes=32, loggers=loggers, path=out)
    step = 0
    with monitor:
        for _ in range(epochs):
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                monitor.step(step, loss=loss)  # records at multiples of `every`; otherwise a modulo test
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
        monitor.record(step)  # the final parameters
    if not quiet:
        for r in monitor.rows:
            print(
                f"step {r['step']:>4}  loss {r['loss']:.3f}  tr K {r['trace']:.4g} ± {r['trace_stderr']:.2g}  "
                f"eff.rank {r['effective_rank']:.3g}  K_t·K_0 {r['kernel_alignment']:.3f}  "
                f"target-align {r['target_alignment']:.3f}  [{r['method']}, {r['passes']} passes]"
            )
        print(f"rows in {out / 'ntk.csv'}; plot them with: ntkscope plot {out / 'ntk.csv'}")
    return {"rows": monitor.rows, "out": out, "model": model}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    main(a.out, a.epochs, a.every)
