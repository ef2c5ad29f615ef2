"""A LightningModule at module level, so that ddp_spawn can pickle it (imported only where lightning is installed)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ntkscope import tasks


class GRUModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tasks.RecurrentRegressor("gru", 3, 8, 3, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)
