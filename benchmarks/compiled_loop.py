"""What ``torch.compile`` would buy: the bare ``torch.func`` loop of ``engine.py``, eager and compiled.

    python benchmarks/compiled_loop.py [--only substrings]

For each model and side, one chunk of 120 Rademacher probes (``vmap`` over ``vjp``/``jvp`` of
``functional_call``, squared norms summed) is timed eagerly and after ``torch.compile`` (Inductor,
CPU), medians of 5 after a warm-up; the compile time and the number of chunks after which it pays
for itself are reported, and a model the compiler cannot take says why.  ntkscope itself runs
eagerly: this measures the element-wise fusion its eager kernels leave on the table
(``docs/engine.md``).  Writes ``benchmarks/results/compiled_loop.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import OUT, models, state_fn  # noqa: E402

CHUNK = 120


def _chunk_fn(model: torch.nn.Module, inputs: Any, side: str) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """One chunk of the bare loop as a function of its probes and the parameters (compilable)."""
    f, params = state_fn(model, inputs)
    n = len(params)
    if side == "vjp":
        D = f(*params).numel()

        def run(V: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
            _, fn = vjp(f, *ps)
            return sum(g.square().sum() for g in vmap(fn)(V))  # type: ignore[return-value]

        return run, (torch.randint(0, 2, (CHUNK, D)).to(params[0].dtype) * 2 - 1, *params)

    def run_jvp(*t: torch.Tensor) -> torch.Tensor:
        U, ps = t[:n], t[n:]
        return vmap(lambda *u: jvp(f, ps, u)[1])(*U).square().sum()

    return run_jvp, (*(torch.randint(0, 2, (CHUNK, *p.shape)).to(p.dtype) * 2 - 1 for p in params), *params)


def _median(fn: Any, args: tuple[torch.Tensor, ...], repeats: int = 5) -> float:
    fn(*args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated substrings of model names")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2 if torch.get_num_threads() >= 2 else 1)
    from ntkscope.operators.rules import math_attention

    rows = []
    for name, (model, inputs) in models(False).items():
        if a.only and not any(o.lower() in name.lower() for o in a.only.split(",")):
            continue
        for side in ("vjp", "jvp"):
            fn, args = _chunk_fn(model, inputs, side)
            row: dict[str, Any] = {"model": name, "side": side}
            with math_attention(), torch.backends.mkldnn.flags(enabled="LSTM" not in name or side == "vjp"):
                try:
                    row["eager_s"] = _median(fn, args)
                    torch._dynamo.reset()
                    t0 = time.perf_counter()
                    compiled = torch.compile(fn)
                    compiled(*args)
                    row["compile_s"] = time.perf_counter() - t0
                    row["compiled_s"] = _median(compiled, args)
                    saved = row["eager_s"] - row["compiled_s"]
                    row["break_even_chunks"] = row["compile_s"] / saved if saved > 0 else None
                except Exception as e:  # noqa: BLE001 — the compiler cannot take it: say why
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(row, flush=True)
    res = {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(), "chunk": CHUNK}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compiled_loop.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# The bare torch.func loop, eager and under torch.compile (one chunk of 120 probes)",
        "",
        f"torch {res['torch']}, {res['threads']} threads, CPU, medians of 5 after a warm-up; compile = the first compiled call.",
        "",
        "| model | side | eager (s) | compiled (s) | compiled ÷ eager | compile (s) | pays off after (chunks) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['side']} | {r.get('eager_s', float('nan')):.4f} | — | — | — | {r['error']} |")
            continue
        be = "never" if r["break_even_chunks"] is None else f"{r['break_even_chunks']:.0f}"
        lines.append(
            f"| {r['model']} | {r['side']} | {r['eager_s']:.4f} | {r['compiled_s']:.4f} | **{r['compiled_s'] / r['eager_s']:.2f}** | "
            f"{r['compile_s']:.1f} | {be} |"
        )
    (a.out / "compiled_loop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
