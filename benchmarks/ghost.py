"""Ghost norms against weight gradients: the VJP side with and without ``ntkscope.operators.ghost``.

    python benchmarks/ghost.py            # the table in benchmarks/results/ghost.md
    python benchmarks/ghost.py --quick    # seconds (tests)

The same ``NTK`` twice — ``NTK(model, x)`` and ``NTK(model, x, ghost=False)`` — timed
alternately in one process, medians over repeats, for the one-sided trace and ``‖K‖_F²`` by
``method="vjp"``, on MLPs from the paper's width to the wide layers of NTK analysis, GPT-2
(its ``Conv1D`` layers) and a Transformer encoder.  Each row also gives the numbers one stored
probe costs for the Gram statistics (``K.gram_width("vjp")``) against ``P``, and checks that
both estimates agree.  The trace rows time the plain samples ``‖Jᵀv‖²`` (``K.sqnorms``): the
per-example samples that ``nk.trace`` takes on these MLPs (all their parameters in linear
layers) are in ``engine.py``.  Writes ``benchmarks/results/ghost[_quick].{json,md}``.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ntkscope as nk  # noqa: E402
from common import save_table, table_args  # noqa: E402
from engine import _split, time_pair  # noqa: E402
from ntkscope.core.probes import Probe, ProbeStream, Stream  # noqa: E402
from ntkscope.estimators.onesided import onesided  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def _mlp(width: int, depth: int, d_in: int = 100, d_out: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    if d_out:
        layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def models(quick: bool) -> dict[str, tuple[nn.Module, Any, dict[str, int]]]:
    """name -> (model, inputs, probes per quantity)."""
    torch.manual_seed(0)
    if quick:
        return {"MLP 3 × Linear 32, N = 8": (_mlp(32, 3), torch.randn(8, 100), {"trace": 16, "frobenius_norm": 8})}
    out: dict[str, tuple[nn.Module, Any, dict[str, int]]] = {
        "paper MLP, 15 × Linear 64, N = 50": (_mlp(64, 15), torch.randn(50, 100), {"trace": 600, "frobenius_norm": 100}),
        "MLP 15 × Linear 256, N = 32": (_mlp(256, 15), torch.randn(32, 100), {"trace": 600, "frobenius_norm": 50}),
        "MLP 4 × Linear 512 + readout 10, N = 32": (_mlp(512, 4, d_out=10), torch.randn(32, 100), {"trace": 200, "frobenius_norm": 50}),
    }
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False).eval()
    out["TransformerEncoder (2 layers, d=32, eval)"] = (enc, torch.randn(4, 16, 32), {"trace": 600, "frobenius_norm": 100})
    try:
        from transformers import GPT2Config, GPT2Model

        gpt = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=100)).eval()
        ids = {"input_ids": torch.randint(0, 100, (2, 16)), "output": "last_hidden_state"}
        out["GPT-2 (2 layers, d=32, from config)"] = (gpt, ids, {"trace": 600, "frobenius_norm": 100})
    except ImportError:  # transformers is a test/hf extra
        pass
    return out


class _Value:
    def __init__(self, value: float) -> None:
        self.value = value


def plain_trace(K: nk.NTK, method: str, num_probes: int, seed: int) -> _Value:
    """The one-sided VJP trace from the plain samples ``‖Jᵀv‖²`` (never per-example blocks)."""
    stream = ProbeStream(K.dim, Probe.RADEMACHER, seed, Stream.MAIN, K.dtype)
    return _Value(float(onesided(K, method, stream.columns, num_probes, keep=False).mean()))


def run(quick: bool, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(2 if torch.get_num_threads() >= 2 else 1)
    rows = []
    for name, (model, inputs, probes) in models(quick).items():
        args, kwargs, output = _split(inputs)
        x = kwargs if kwargs else args[0]
        K, K_plain = nk.NTK(model, x, output=output), nk.NTK(model, x, output=output, ghost=False)
        for quantity, m in probes.items():
            f = plain_trace if quantity == "trace" else getattr(nk, quantity)
            a, b = f(K, method="vjp", num_probes=m, seed=0), f(K_plain, method="vjp", num_probes=m, seed=0)
            t_ghost, t_plain = time_pair(lambda: f(K, method="vjp", num_probes=m, seed=1), lambda: f(K_plain, method="vjp", num_probes=m, seed=1), repeats)
            rows.append({
                "model": name, "quantity": quantity, "m": m, "P": K.num_params, "width": K.gram_width("vjp"), "ghosted": len(K.ghosted),
                "ghost_s": t_ghost, "plain_s": t_plain, "ratio": t_ghost / t_plain, "agree": abs(a.value - b.value) <= 1e-4 * abs(b.value),
                "path": K.paths.get("vjp-norms"),
            })
            r = rows[-1]
            print(f"{name:42s} {quantity:15s} m={m:4d} ghost {t_ghost:.3f}s weight gradients {t_plain:.3f}s ratio {r['ratio']:.2f} "
                  f"row {r['width']} of P = {r['P']} ({r['ghosted']} layers) agree={r['agree']}", flush=True)
    return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "repeats": repeats, "quick": quick}


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Ghost norms ÷ weight gradients (the VJP side, float32)",
        "",
        f"{res['machine']}, torch {res['torch']}, {res['threads']} threads, medians of {res['repeats']} alternating repeats in one run. "
        "ratio < 1: ghost norms are faster; row = numbers one stored probe costs for ‖K‖_F² (P without ghost norms).",
        "",
        "| model | quantity | m | ghosted layers | ghost (s) | weight gradients (s) | ratio | row | P | estimates agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['quantity']} | {r['m']} | {r['ghosted']} | {r['ghost_s']:.3f} | {r['plain_s']:.3f} | "
                     f"**{r['ratio']:.2f}** | {r['width']:,} | {r['P']:,} | {'yes' if r['agree'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    a = table_args(__doc__, OUT).parse_args()
    res = run(a.quick, a.repeats or (1 if a.quick else 5))
    save_table(a.out, "ghost_quick" if a.quick else "ghost", res, markdown(res))


if __name__ == "__main__":
    main()
