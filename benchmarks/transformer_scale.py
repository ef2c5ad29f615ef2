"""Time and peak memory of one-sided NTK trace estimates on GPT-2-style models as P grows.

Each size runs in a fresh subprocess (clean peak-memory accounting): a ``GPT2LMHeadModel`` built
from a config with random weights (no download), float32, analysed in eval mode; the state is the
logits of ``batch × time`` tokens (axes ``batch, time, vocab``: D = B·T·V).  The AD side and
chunk size come from :func:`ntkscope.models.transformer.plan_memory` (VJP when D ≤ P); the script
records the plan, seconds per pass, the estimate with its standard error, and the peak resident
memory during the estimate (Linux ``VmHWM`` after a reset; on CUDA, ``max_memory_allocated``)
next to the memory the model itself holds.

    python benchmarks/transformer_scale.py --quick      # two small sizes, < 1 min
    python benchmarks/transformer_scale.py              # tiny → GPT-2 small (124M)
    python benchmarks/transformer_scale.py --sizes gpt2-124M,gpt2-355M   # larger, opt-in
    python benchmarks/transformer_scale.py --device cuda

Outputs ``benchmarks/results/transformer_scale[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# (name, n_layer, n_embd, n_head, vocab)
SIZES = [
    ("tiny", 2, 64, 2, 1000),
    ("small", 4, 256, 4, 8192),
    ("mid", 6, 512, 8, 16384),
    ("gpt2-124M", 12, 768, 12, 50257),
    ("gpt2-355M", 24, 1024, 16, 50257),
]
# Needs ~12 GB and ~3x the 124M time on CPU: run it with --sizes ...,gpt2-355M (or on a GPU).
OPT_IN = {"gpt2-355M"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ntkscope import trace
    from ntkscope.models.transformer import transformer_ntk

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = GPT2Config(
        n_layer=spec["n_layer"],
        n_embd=spec["n_embd"],
        n_head=spec["n_head"],
        vocab_size=spec["vocab"],
        n_positions=max(64, spec["tokens"]),
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device).eval()
    P = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["tokens"]), generator=torch.Generator().manual_seed(1)).to(device)
    rss_model = _status_kib("VmRSS")
    t0 = time.perf_counter()
    K = transformer_ntk(model, ids, memory_budget=spec["budget"])
    setup = time.perf_counter() - t0
    side = K.plan["side"]
    trace(K, method=side, num_probes=1, seed=123)  # warm-up (path selection, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak()
    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    est = trace(K, method=side, num_probes=spec["probes"], seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "name": spec["name"],
        "params": P,
        "state_dim": K.dim,
        "state_shape": list(K.state_shape),
        "axes": list(K.axes),
        "side": side,
        "chunk_size": K.chunk_size,
        "plan": {k: v for k, v in K.plan.items()},
        "probes": spec["probes"],
        "trace": est.value,
        "stderr": est.stderr,
        "rel_stderr": est.rel_stderr,
        "seconds": seconds,
        "seconds_per_pass": seconds / spec["probes"],
        "setup_seconds": setup,
        "rss_model_mib": rss_model / 1024,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": _status_kib("VmHWM") / 1024 if reset else None,
        "param_mib": P * 4 / 2**20,
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small sizes, 4 probes (< 1 min)")
    ap.add_argument("--sizes", default=None, help="comma list of size names (default: all, or tiny,small with --quick)")
    ap.add_argument("--probes", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=2 * 2**30, help="memory budget in bytes for probe chunks")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per size before giving up")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    default = ["tiny", "small"] if args.quick else [s[0] for s in SIZES if s[0] not in OPT_IN]
    names = args.sizes.split(",") if args.sizes else default
    probes = args.probes or (4 if args.quick else 8)
    if args.quick:
        args.tokens = min(args.tokens, 8)
    rows = []
    for name, n_layer, n_embd, n_head, vocab in SIZES:
        if name not in names:
            continue
        spec = dict(
            name=name,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            vocab=vocab,
            batch=args.batch,
            tokens=args.tokens,
            probes=probes,
            threads=args.threads,
            device=args.device,
            budget=int(args.budget),
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {args.timeout:.0f} s", flush=True)
            rows.append({"name": name, "error": f"timeout after {args.timeout:.0f} s"})
            continue
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            if proc.returncode < 0:
                err = f"killed by signal {-proc.returncode} (out of memory or stopped by hand)"
            print(f"{name}: failed: {err}", flush=True)
            rows.append({"name": name, "error": err})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{name}: P={row['params']:,} D={row['state_dim']:,} side={row['side']} chunk={row['chunk_size']} "
            f"{row['seconds_per_pass']:.3g} s/pass, trace {row['trace']:.4g} ± {row['stderr']:.2g}, "
            f"peak RSS {row['peak_rss_mib'] or float('nan'):.0f} MiB (params {row['param_mib']:.0f} MiB)",
            flush=True,
        )
    ok = [r for r in rows if "error" not in r]
    largest = max(ok, key=lambda r: r["params"]) if ok else None
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "one"},
        "rows": rows,
        "largest_model_params": largest["params"] if largest else None,
        "largest_model": largest["name"] if largest else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "transformer_scale_quick" if args.quick else "transformer_scale"
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# One-sided NTK trace on GPT-2-style models ({args.device}, {args.threads} threads)",
        "",
        f"State: logits, batch {args.batch} × {args.tokens} tokens × vocab; {probes} probes; float32; random weights from a "
        "config; eval mode; MATH attention backend.  Side and chunk from `plan_memory` with a "
        f"{args.budget / 2**30:.1f} GiB budget.",
        "",
        "| model | P | D | side | chunk | s/pass | trace ± stderr | rel. stderr | params MiB | RSS before MiB | peak RSS MiB | planned MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | — | — | — | — | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['state_dim']:,} | {r['side']} | {r['chunk_size']} | {r['seconds_per_pass']:.3g} | "
            f"{r['trace']:.4g} ± {r['stderr']:.2g} | {r['rel_stderr']:.2%} | {r['param_mib']:.0f} | {r['rss_before_mib']:.0f} | "
            f"{r['peak_rss_mib'] if r['peak_rss_mib'] is None else round(r['peak_rss_mib'])} | "
            f"{r['plan']['estimated_peak_bytes'] / 2**20:.0f} |"
        )
    lines += [
        "",
        "Peak RSS is the process's resident peak during the estimate (it includes the model, the interpreter and "
        "the libraries: compare with 'RSS before'); 'planned' is `plan_memory`'s estimate of the estimate's own "
        "working set (saved activations + one chunk of probes).  Timings on a shared CPU are noisy.",
    ]
    if largest:
        lines += ["", f"Largest model measured: {largest['name']} with {largest['params']:,} parameters."]
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / tag}.{{json,md}}")


if __name__ == "__main__":
    main()
