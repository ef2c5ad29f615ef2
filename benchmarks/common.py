"""Shared pieces of the benchmark suite: the paper's settings, timing, FLOP counting, exact values.

Settings follow ``shared/paper.md`` (reference code meeree/kpflow, ``examples/trace_paper``):

* MLP: ``torch.manual_seed(0)``; ``x = randn(50, 100)`` drawn first; 15 ``nn.Linear`` of width 64
  (first 100→64) with ReLU between and a final ReLU; state = last hidden layer (D=3,200, P=64,704).
* GRU: ``torch.manual_seed(0)``; ``x = randn(50, 15, 10)`` drawn first; ``nn.GRU(10, 64)``
  sequence-first; state = the output sequence (D=48,000, P=14,592).
* digits: an MLP 64-64-64-10 trained on scikit-learn's digits (the paper used MNIST, which cannot
  be downloaded here); NTK of the logits on held-out images at initialisation and after training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ntkscope as nk
from ntkscope.estimators import exact as ex


def mlp_setting(n: int = 50, d_in: int = 100, width: int = 64, layers: int = 15, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(n, d_in)  # drawn first, as in the reference code
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*mods), x


def gru_setting(T: int = 50, B: int = 15, H: int = 64, I: int = 10, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(T, B, I)
    return nn.GRU(I, H), x


def paper_setting(name: str, cfg: dict) -> tuple[nn.Module, torch.Tensor, int | None]:
    """``(model, inputs, output)`` of the paper's ``"mlp"`` or ``"gru"`` setting (``cfg[name]`` its sizes)."""
    if name == "mlp":
        model, x = mlp_setting(**cfg["mlp"])
        return model, x, None
    model, x = gru_setting(**cfg["gru"])
    return model, x, 0


def digits_setting(n_test: int = 128, epochs: int = 5, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, float]:
    """Trained digits MLP: (model at the end, its initial parameters, test inputs, test accuracy)."""
    from ntkscope import tasks

    Xtr, ytr, Xte, yte = tasks.digits(seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    for p in model.parameters():
        p.grad = None
    return model, init, Xte[:n_test].contiguous(), acc


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_gflops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """This machine's matrix-multiply throughput now (GFLOP/s, median over repeats)."""
    A, B = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t = median_time(lambda: (A @ B, sync()), repeats, warmup=2)
    return 2 * n**3 / t / 1e9


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products ``fn`` runs (``torch.utils.flop_counter``; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return (math.nan,) * 3
    if len(xs) == 1:
        return (xs[0],) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def rel_err(value: float, truth: float) -> float:
    return abs(value - truth) / abs(truth)


def exact_stats(K: nk.NTK) -> dict[str, float]:
    """Exact tr K, ‖K‖_F, effective rank from the dense Jacobian (float64 Gram accumulation)."""
    tr = ex.exact_trace(K)
    J = ex.jacobian(K)
    # the smaller Gram matrix (K = JJᵀ if D ≤ P, else G = JᵀJ; same ‖·‖_F) accumulated in float64
    # over blocks of J, so only one float64 block of J is alive at a time
    A = J if J.shape[0] <= J.shape[1] else J.T
    gram = torch.zeros(A.shape[0], A.shape[0], dtype=torch.float64)
    for s in range(0, A.shape[1], 4096):
        blk = A[:, s : s + 4096].double()
        gram.addmm_(blk, blk.T)
    fro2 = float(gram.square().sum())
    del J
    return {"trace": tr, "frobenius_norm": fro2**0.5, "effective_rank": tr**2 / fro2}


def bare_funcs(model: nn.Module, x: Any, output: int | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], int, int]:
    """Floor (a): plain ``vmap(vjp)`` / ``vmap(jvp)`` over ``torch.func.functional_call``.

    Returns ``(vjp_block, jvp_block, D, P)``: ``vjp_block(V: (m, D)) -> (m, P)``,
    ``jvp_block(U: (m, P)) -> (m, D)``, exactly as PyTorch's NTK tutorial writes them.
    """
    from torch.func import functional_call, jvp, vjp, vmap

    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    args = x if isinstance(x, tuple) else (x,)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, ps)), args)
        return (out[output] if output is not None else out).reshape(-1)

    z, vjp_fn = vjp(f, *params)

    def vjp_block(V: torch.Tensor) -> torch.Tensor:
        parts = vmap(vjp_fn)(V)
        return torch.cat([p.reshape(V.shape[0], -1) for p in parts], 1)

    def jvp_block(U: torch.Tensor) -> torch.Tensor:
        tangents = tuple(t.reshape(U.shape[0], *s) for t, s in zip(torch.split(U, sizes, 1), shapes))
        return vmap(lambda *t: jvp(f, params, t)[1])(*tangents)

    return vjp_block, jvp_block, z.numel(), sum(sizes)


#: The matrix-product ops whose replay makes up :func:`product_floor`.
_PRODUCT_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward")


def product_floor(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Seconds the matrix products ``fn`` runs take on their own: every ``mm``/``bmm``/convolution
    call is recorded with its shapes and strides, then replayed on fresh tensors of the same layout
    (median of ``repeats`` per distinct call, times its count).  Unlike FLOPs ÷ a square GEMM's
    rate, this is the floor at the shapes the model has (a K = 64 GEMM runs well below the
    1024² rate), so ``time ÷ floor`` is what element-wise work, memory traffic and Python cost."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    calls: Counter[tuple[Any, ...]] = Counter()

    def spec(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), tuple(a.stride()), a.dtype, a.device.type)
        if isinstance(a, (list, tuple)):
            return tuple(spec(x) for x in a)
        return ("V", a)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ in _PRODUCT_OPS:
                calls[(func, spec(args), tuple(sorted((kwargs or {}).items())))] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        fn()

    def build(s: Any) -> Any:
        if isinstance(s, tuple) and s and s[0] == "T":
            _, shape, stride, dtype, dev = s
            n = 1 + sum((k - 1) * st for k, st in zip(shape, stride)) if all(shape) else 0
            flat = torch.randn(n, device=dev).to(dtype) if dtype.is_floating_point else torch.zeros(n, dtype=dtype, device=dev)
            return flat.as_strided(shape, stride)  # the same layout, broadcast (stride-0) axes included
        if isinstance(s, tuple) and s and s[0] == "V":
            return s[1]
        return type(s)(build(x) for x in s) if isinstance(s, tuple) else s

    total = 0.0
    for (func, args, kwargs), n in calls.items():
        built = build(args)
        total += n * median_time(lambda: func(*built, **dict(kwargs)), repeats, warmup=1)
    return total


def table_args(doc: str | None, out: Path) -> argparse.ArgumentParser:
    """The arguments every table benchmark takes: ``--quick``, ``--repeats``, ``--out``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=out)
    return ap


def save_table(out: Path, stem: str, res: dict[str, Any], md: str) -> None:
    """``out/stem.json`` and ``out/stem.md``, and the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)
