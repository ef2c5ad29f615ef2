"""NTK metrics while the Hugging Face Trainer trains a tiny GPT-2 (built from a config, no downloads).

The model learns to continue a repeating token pattern.  ntkscope's NTKCallback measures the NTK
of the logits on four fixed probe sequences at the start and every few steps; the rows appear in
``trainer.state.log_history`` and in TensorBoard (``report_to``) as ``train/ntk/trace`` etc.

    python examples/hf_trainer.py [--out runs/hf] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Patterns(torch.utils.data.Dataset):
    """Sequences ``a, a+k, a+2k, …`` (mod vocab): the next token is predictable from the last two."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out: str | Path | None = None, steps: int = 40, every: int = 10, quiet: bool = False) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from ntkscope.integrations.transformers import NTKCallback

    hf_logging.set_verbosity_error()
    out = Path(out or tempfile.mkdtemp(prefix="ntkscope-hf-"))
    torch.manual_seed(0)
    vocab = 32
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    data = Patterns(256, 12, vocab)
    probe = Patterns(4, 12, vocab, seed=1).ids  # fixed analysis inputs: 4 sequences × 12 tokens
    report = ["tensorboard"] if _has("tensorboard") else []
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")  # where report_to="tensorboard" writes
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=every,
        save_strategy="no",
        report_to=report,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = NTKCallback({"input_ids": probe}, every_n_steps=every, num_probes=16, method="vjp", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    rows = [r for r in trainer.state.log_history if "ntk/trace" in r]
    if not quiet:
        for r in rows:
            print(
                f"step {r['step']:>4}  tr K {r['ntk/trace']:.4g} ± {r['ntk/trace_stderr']:.2g}  "
                f"eff.rank {r['ntk/effective_rank']:.3g}  K_t·K_0 {r['ntk/kernel_alignment']:.3f}"
            )
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"rows": rows, "losses": losses, "out": out, "trainer": trainer, "callback": callback}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    main(a.out, a.steps, a.every)
