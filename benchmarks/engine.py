"""Models as users write them: ntkscope's one-sided trace against a bare ``torch.func`` loop.

    python benchmarks/engine.py               # the table below, m = 120 and 600 probes
    python benchmarks/engine.py --quick       # a seconds-long smoke run (tests)
    python benchmarks/engine.py --device cuda --dtype bfloat16   # see benchmarks/gpu.py

For every model and side (VJP: ``tr K = E‖Jᵀv‖²``; JVP: ``E‖Ju‖²``) it times, in one run,
alternating, medians over repeats:

* **ours** — ``ntkscope.trace(K, method=side, num_probes=m, seed=0)`` on an ``NTK`` built once
  (probe generation, the passes and the reduction included);
* **bare** — the 20-line loop a user would write: chunks of 100 Rademacher probes drawn with
  ``torch.randint``, ``vmap`` over ``jvp``/``vjp`` of ``functional_call``, squared norms summed.
  Where the bare loop cannot run as written (forward mode through oneDNN's LSTM, fused
  attention) it runs with the switch a user would have to find (oneDNN off, math attention),
  and the table says so;
* **limit** — the matrix-product FLOPs of our passes (``FlopCounterMode``) over this run's
  measured GEMM rate: the arithmetic floor;
* **products** — every matrix product of a run (ours, and the bare loop's) replayed alone at its
  shapes and strides (``common.product_floor``): the floor at the model's own shapes, so
  ``ours ÷ products`` is what element-wise kernels, memory traffic and Python cost.

Writes ``benchmarks/results/engine[_quick].{json,md}``.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ntkscope as nk  # noqa: E402
from common import count_flops, gemm_gflops, product_floor, save_table, table_args  # noqa: E402
from ntkscope.operators.rules import math_attention  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


class Wrapped(nn.Module):
    """The paper's GRU as the paper writes it: a module around ``nn.GRU``."""

    def __init__(self, rnn: nn.Module, readout: nn.Module | None = None) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rnn(x)[0]
        return y if self.readout is None else self.readout(y)


def models(quick: bool) -> dict[str, tuple[nn.Module, Any]]:
    torch.manual_seed(0)
    T, B = (10, 4) if quick else (50, 15)
    H = 16 if quick else 64
    x_seq = torch.randn(T, B, 10)
    out: dict[str, tuple[nn.Module, Any]] = {}
    layers: list[nn.Module] = []
    width, depth = (16, 3) if quick else (64, 15)
    for i in range(depth):
        layers += [nn.Linear(100 if i == 0 else width, width), nn.ReLU()]
    out["paper MLP (15×Linear 64, Sequential)"] = (nn.Sequential(*layers), torch.randn(10 if quick else 50, 100))
    out["paper GRU, wrapped"] = (Wrapped(nn.GRU(10, H)), x_seq)
    out["2-layer GRU + Linear readout"] = (Wrapped(nn.GRU(10, H, num_layers=2), nn.Linear(H, 10)), x_seq)
    out["LSTM, wrapped"] = (Wrapped(nn.LSTM(10, H)), x_seq)
    out["bidirectional GRU"] = (Wrapped(nn.GRU(10, H, bidirectional=True)), x_seq)
    c = 8 if quick else 16
    cnn = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * c, 10),
    ).eval()
    out["CNN with BatchNorm (eval)"] = (cnn, torch.randn(4 if quick else 16, 1, 8, 8))
    d = 16 if quick else 32
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False).eval()
    out["TransformerEncoder (2 layers, d=32, eval)"] = (enc, torch.randn(4, 8 if quick else 16, d))
    try:
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(n_layer=2, n_embd=32 if not quick else 16, n_head=2, n_positions=32, vocab_size=100)
        gpt = GPT2Model(cfg).eval()
        ids = torch.randint(0, 100, (2, 8 if quick else 16))
        out["GPT-2 (2 layers, d=32, from config)"] = (gpt, {"input_ids": ids, "output": "last_hidden_state"})
    except ImportError:  # transformers is a test/hf extra
        pass
    return out


def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    if isinstance(inputs, dict):
        kw = dict(inputs)
        output = kw.pop("output", None)
        return (), kw, output
    return (inputs,), {}, None


def state_fn(model: nn.Module, inputs: Any) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """``(f, params)``: the flattened state as a function of the parameters, as a user writes it."""
    args, kwargs, output = _split(inputs)
    names = [n for n, _ in model.named_parameters()]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, ps)), args, kwargs)
        out = getattr(out, output) if output else out
        return out.reshape(-1)

    return f, tuple(p.detach() for p in model.parameters())


def bare_trace(model: nn.Module, inputs: Any, side: str, m: int, chunk: int = 100, switch: Callable[[], Any] | None = None) -> float:
    """The 20-line loop: Rademacher probes per chunk, vmap over jvp/vjp of functional_call."""
    f, params = state_fn(model, inputs)
    dev = params[0].device
    total = 0.0
    with switch() if switch else contextlib.nullcontext():
        if side == "vjp":
            z, vjp_fn = vjp(f, *params)
            for s in range(0, m, chunk):
                V = torch.randint(0, 2, (min(chunk, m - s), z.numel()), dtype=z.dtype, device=dev) * 2 - 1
                total += sum(float(g.square().sum()) for g in vmap(vjp_fn)(V))
        else:
            for s in range(0, m, chunk):
                c = min(chunk, m - s)
                U = tuple(torch.randint(0, 2, (c, *p.shape), dtype=p.dtype, device=dev) * 2 - 1 for p in params)
                total += float(vmap(lambda *t: jvp(f, params, t)[1])(*U).square().sum())
    return total / m


def _ntk(model: nn.Module, inputs: Any) -> nk.NTK:
    args, kwargs, output = _split(inputs)
    return nk.NTK(model, kwargs if kwargs else args[0], output=output)


def _no_mkldnn() -> Any:
    return torch.backends.mkldnn.flags(enabled=False)


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Medians of alternating timings (each call warmed up once)."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _flops(K: nk.NTK, side: str, m: int) -> int:
    n = K.dim if side == "vjp" else K.num_params
    X = torch.ones(n, m, dtype=K.dtype, device=K.device)
    if side == "vjp" and K.trace_blocks() is not None:  # the per-example samples' passes
        return count_flops(lambda: K.block_sqnorms(X))
    return count_flops(lambda: K.sqnorms(side, X))


def _to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(quick: bool, probes: list[int], repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
        only: list[str] | None = None) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(2 if torch.get_num_threads() >= 2 else 1)
    gemm = max(gemm_gflops(n, dtype=dtype, device=dev) for n in (512, 1024, 2048))
    rows = []
    for name, (model, inputs) in models(quick).items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        model, inputs = model.to(device=dev, dtype=dtype), _to(inputs, dev, dtype)
        K = _ntk(model, inputs)
        for side in ("vjp", "jvp"):
            for m in probes:
                switch = None
                note = ""
                try:
                    bare_trace(model, inputs, side, 2, chunk=2)
                except Exception:  # noqa: BLE001 — the loop as written cannot run: the switch a user needs
                    switch = _no_mkldnn if "LSTM" in name else math_attention
                    note = "bare needs " + ("oneDNN off" if "LSTM" in name else "math attention")
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t_ours, t_bare = time_pair(
                    lambda: (nk.trace(K, method=side, num_probes=m, seed=0), _sync(dev)),
                    lambda: (bare_trace(model, inputs, side, m, switch=switch), _sync(dev)),
                    repeats,
                )
                peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
                blocks = K.trace_blocks() if side == "vjp" else None
                if nk.trace(K, method=side, num_probes=m, seed=0).exact:  # the budget covers the side's exact cost
                    if blocks is not None:
                        n = blocks
                        note = (note + "; " if note else "") + f"exact over {K.dim // n} per-example blocks: {m} probes ≥ R = {n}, so {n} passes"
                    else:
                        n = K.dim if side == "vjp" else K.num_params
                        note = (note + "; " if note else "") + f"exact: {m} probes ≥ {'D' if side == 'vjp' else 'P'} = {n}, so {n} passes"
                    limit = _flops(K, side, n) / (gemm * 1e9)
                else:
                    limit = _flops(K, side, m) / (gemm * 1e9)
                row = {"model": name, "side": side, "m": m, "D": K.dim, "P": K.num_params, "rules": K.rules, "chunk": K.chunk_size, "peak_bytes": peak}
                _add_row(rows, row, t_ours, t_bare, limit, note, K, lambda: nk.trace(K, method=side, num_probes=m, seed=0), model, inputs, switch, dev)
                if blocks is not None and m >= blocks:  # the per-example samples too, exact switched off (a pass budget: no exact switch)
                    t_s, t_b = time_pair(
                        lambda: (nk.trace(K, method=side, num_probes=m, seed=0, max_passes=m), _sync(dev)),
                        lambda: (bare_trace(model, inputs, side, m, switch=switch), _sync(dev)),
                        repeats,
                    )
                    _add_row(rows, {**row, "model": name + ", per-example samples"}, t_s, t_b, _flops(K, side, m) / (gemm * 1e9),
                             "exact off (max_passes=m): samples Σ_b ‖J_bᵀv_b‖²", K,
                             lambda: nk.trace(K, method=side, num_probes=m, seed=0, max_passes=m), model, inputs, switch, dev)
    return {
        "rows": rows, "gemm_gflops": gemm, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "device": str(dev), "dtype": str(dtype), "repeats": repeats, "quick": quick,
    }


def _add_row(rows: list[dict[str, Any]], row: dict[str, Any], t_ours: float, t_bare: float, limit: float, note: str, K: nk.NTK,
             ours: Callable[[], Any], model: nn.Module, inputs: Any, switch: Callable[[], Any] | None, dev: torch.device) -> None:
    side, m = row["side"], row["m"]
    floor = product_floor(lambda: (ours(), _sync(dev)))
    floor_bare = product_floor(lambda: (bare_trace(model, inputs, side, m, switch=switch), _sync(dev)))
    path = (K.paths.get("vjp-trace") or K.paths.get("vjp-norms") or K.paths[side]) if side == "vjp" else K.paths[side]
    rows.append({
        **row, "path": path, "ours_s": t_ours, "bare_s": t_bare, "ratio_bare": t_ours / t_bare, "limit_s": limit,
        "ratio_limit": t_ours / limit if limit > 0 else None, "note": note, "products_s": floor, "bare_products_s": floor_bare,
    })
    r = rows[-1]
    print(f"{r['model']:44s} {side} m={m:4d} ours {t_ours:.3f}s bare {t_bare:.3f}s ratio {r['ratio_bare']:.2f} "
          f"limit×{r['ratio_limit'] or float('nan'):.1f} products ours {floor:.3f}s bare {floor_bare:.3f}s [{path}] {note}", flush=True)


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Models as written: ours ÷ a bare torch.func loop (one-sided trace)",
        "",
        f"{res['machine']} ({res['device']}, {res['dtype']}), torch {res['torch']}, {res['threads']} threads, GEMM rate {res['gemm_gflops']:.0f} GFLOP/s, medians of {res['repeats']} "
        "alternating repeats in one run. ours ÷ bare < 1 means ntkscope is faster; limit = matrix-product FLOPs ÷ GEMM rate. "
        "products = the run's own matrix products (mm/bmm/convolutions) replayed alone at their shapes: ours ÷ products is what "
        "everything else costs, and bare products ÷ bare the fastest the bare loop's own products allow.",
        "",
        "| model | D | P | side | m | ours (s) | bare (s) | ours ÷ bare | ours ÷ limit | ours ÷ products | bare products ÷ bare | path | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lim = f"{r['ratio_limit']:.1f}" if r["ratio_limit"] else "—"
        prod = f"{r['ours_s'] / r['products_s']:.2f}" if r.get("products_s") else "—"
        bprod = f"{r['bare_products_s'] / r['bare_s']:.2f}" if r.get("bare_products_s") else "—"
        lines.append(
            f"| {r['model']} | {r['D']} | {r['P']} | {r['side']} | {r['m']} | {r['ours_s']:.3f} | {r['bare_s']:.3f} | "
            f"**{r['ratio_bare']:.2f}** | {lim} | {prod} | {bprod} | {r['path']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = table_args(__doc__, OUT)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--only", default=None, help="comma-separated substrings of model names")
    a = ap.parse_args()
    probes = [8, 24] if a.quick else [120, 600]
    dtype = getattr(torch, a.dtype)
    res = run(a.quick, probes, a.repeats or (1 if a.quick else 3), a.device, dtype, a.only.split(",") if a.only else None)
    stem = ("engine_quick" if a.quick else "engine") + ("" if a.device == "cpu" and a.dtype == "float32" else f"_{a.device}_{a.dtype}")
    save_table(a.out, stem, res, markdown(res))


if __name__ == "__main__":
    main()
