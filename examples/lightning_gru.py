"""NTK metrics while PyTorch Lightning trains a GRU on the 3-bit flip-flop task, shown in TensorBoard.

ntkscope's NTKCallback measures the NTK of the GRU's outputs on 8 fixed probe sequences at the
start and every few steps, and writes ``ntk/trace``, ``ntk/effective_rank``,
``ntk/kernel_alignment`` (K_t with K_0), ``ntk/target_alignment`` and their ``_stderr`` through
the Trainer's TensorBoard logger.

    python examples/lightning_gru.py [--out runs/lightning] [--steps 150]
    tensorboard --logdir runs/lightning
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ntkscope import tasks


def main(out: str | Path | None = None, steps: int = 150, every: int = 10, quiet: bool = False) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from ntkscope.integrations.lightning import NTKCallback

    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # tiny in-memory data set
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")

    class FlipFlopGRU(L.LightningModule):
        def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
            super().__init__()
            self.net = tasks.RecurrentRegressor("gru", 3, hidden, 3, seed=0)
            self.lr = lr

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)  # type: ignore[no-any-return]

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    out = Path(out or tempfile.mkdtemp(prefix="ntkscope-lightning-"))
    L.seed_everything(0, verbose=False)
    X, Y = tasks.flipflop(256, 20, 3, p=0.1, seed=0)
    Xp, Yp = tasks.flipflop(8, 20, 3, p=0.1, seed=1000)  # fixed probe sequences for the NTK
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16, shuffle=True)
    logger = TensorBoardLogger(str(out), name="gru_flipflop", version=0, default_hp_metric=False)
    callback = NTKCallback(Xp, Yp, every_n_steps=every, num_probes=32, seed=0)
    trainer = L.Trainer(
        max_steps=steps,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FlipFlopGRU(), loader)
    rows = callback.monitor.rows if callback.monitor is not None else []
    if not quiet:
        for r in rows:
            print(
                f"step {r['step']:>4}  eff.rank {r['effective_rank']:.3g} ± {r['effective_rank_stderr']:.2g}  "
                f"K_t·K_0 {r['kernel_alignment']:.3f}  target-align {r['target_alignment']:.3f}  [{r['method']}]"
            )
        print(f"TensorBoard: tensorboard --logdir {out}")
    return {"rows": rows, "log_dir": Path(logger.log_dir), "out": out}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="TensorBoard root directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    main(a.out, a.steps, a.every)
