"""NTK metrics over training, written row by row, interruptible and resumable.

Every ``every`` optimizer steps (and at step 0) :func:`track` records, with standard errors:

* ``loss`` — the training loss at the recorded parameters;
* ``trace`` and ``effective_rank`` of ``K_t`` (the NTK at the current parameters);
* ``kernel_alignment`` — ``⟨K_t, K_0⟩_F / (‖K_t‖_F ‖K_0‖_F)``, the alignment of the current
  kernel with the kernel at initialisation (``K_0`` is ``NTK(model, X, params=snapshot)``).
  It stays near 1 in the *lazy* regime, where the network behaves like its linearisation, and
  falls when features are learned (*rich* regime; Chizat, Oyallon & Bach 2019, "On lazy training
  in differentiable programming"; Fort et al. 2020);
* ``target_alignment`` — ``yᵀK_t y / (‖K_t‖_F ‖y‖²)`` (Cristianini et al. 2001), which grows
  as the kernel aligns with the task (Baratin et al. 2021; Atanasov et al. 2022).

``init_scale`` multiplies every initial parameter before training: a knob for probing regimes.
Which regime a given scale produces depends on the architecture, optimizer and learning rate (the
clean lazy limit of Chizat et al. also rescales the output), so the tool measures rather than
assumes: ``kernel_alignment`` near 1 throughout means lazy, a falling one means the kernel moved.
(Measured on ``builtin:gru-flipflop``, 100 SGD steps at lr 0.05: K_100·K_0 = 1.000, 0.999 and
0.984 for scales 0.5, 1 and 2 — all nearly lazy; 200 Adam steps at lr 0.01 bring it to ≈ 0.18.)

Reproducibility and resuming.  Probes at step ``s`` use the seed ``seed + s``; the estimation
method is resolved once (``"auto"`` measures pass times, which would make rows depend on the
machine's load) and stored.  After each recorded step a checkpoint (model, optimizer, RNG state,
``K_0``'s parameters, configuration) is written atomically, *then* the CSV row is written and
flushed.  ``resume=True`` truncates a half-written last line, loads the checkpoint and, if the
checkpoint is one row ahead of the CSV (interrupted between the two writes), writes that row
first; the rows then equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .demo import Spec, evaluate_loss, make_optimizer, train_step

__all__ = ["TRACK_METRICS", "COLUMNS", "track", "read_rows", "checkpoint_path"]

TRACK_METRICS = ("trace", "effective_rank", "kernel_alignment", "target_alignment")
COLUMNS = ["step", "loss"] + [c for m in TRACK_METRICS for c in (m, f"{m}_stderr")] + ["method", "passes", "seconds"]


def checkpoint_path(csv_path: str | Path) -> Path:
    """Where :func:`track` keeps its checkpoint for ``csv_path``."""
    p = Path(csv_path)
    return p.with_name(p.name + ".ckpt.pt")


def _parse(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in ("step", "passes"):
            out[k] = int(v)
        elif k == "method":
            out[k] = v
        else:
            out[k] = float(v) if v != "" else math.nan
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a track CSV as dicts of numbers (a half-written last line is ignored)."""
    text = Path(path).read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [_parse(r) for r in csv.DictReader(io.StringIO(text))]


def _truncate_partial(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a checkpoint is either the old one or the new one, never half of each


def _row(spec: Spec, init: dict[str, torch.Tensor], step: int, method: str, num_probes: int, seed: int) -> dict[str, Any]:
    import ntkscope as nk

    t0 = time.perf_counter()
    was_training = spec.model.training
    spec.model.eval()
    try:
        with torch.no_grad():
            loss = evaluate_loss(spec)
        snap = {n: p.detach().clone() for n, p in spec.model.named_parameters() if p.requires_grad}
        Kt = nk.NTK(spec.model, spec.inputs, output=spec.output, params=snap)
        K0 = nk.NTK(spec.model, spec.inputs, output=spec.output, params=init)
        kw: dict[str, Any] = {"method": method, "num_probes": num_probes, "seed": seed + step}
        ests = {
            "trace": nk.trace(Kt, **kw),
            "effective_rank": nk.effective_rank(Kt, **kw),
            "kernel_alignment": nk.alignment(Kt, K0, **kw),
            "target_alignment": nk.target_alignment(Kt, spec.targets, **kw),
        }
    finally:
        spec.model.train(was_training)
    row: dict[str, Any] = {"step": step, "loss": loss}
    for m, e in ests.items():
        row[m] = e.value
        row[f"{m}_stderr"] = e.stderr if e.stderr is not None else 0.0
    row["method"] = method
    row["passes"] = sum(e.passes for e in ests.values())
    row["seconds"] = time.perf_counter() - t0
    return row


def _resolve_method(spec: Spec, method: str, num_probes: int, seed: int) -> str:
    """``auto`` resolved once, on the kernel at initialisation, for all rows."""
    if method != "auto":
        return method
    import ntkscope as nk

    K = nk.NTK(spec.model, spec.inputs, output=spec.output)
    chosen = nk.effective_rank(K, method="auto", num_probes=num_probes, seed=seed).method
    return chosen if chosen in ("exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp") else "vjp"


def _config(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items()}


def track(
    spec: Spec,
    out: str | Path,
    *,
    steps: int = 200,
    every: int = 20,
    optimizer: str = "adam",
    lr: float = 1e-2,
    init_scale: float = 1.0,
    method: str = "auto",
    num_probes: int = 32,
    seed: int = 0,
    resume: bool = False,
    jsonl: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``spec.model`` for ``steps`` full-batch steps, recording NTK metrics every ``every``.

    Rows go to the CSV ``out`` (and ``out`` with suffix ``.jsonl`` if ``jsonl``), one per recorded
    step, flushed as written.  Returns every row of the file (old ones too when resuming).  The
    model is trained in place (that is the point); its NTK is measured in eval mode.
    """
    if spec.targets is None:
        raise ValueError("tracking needs targets: return (model, inputs, targets) from the factory")
    if every < 1 or steps < 0:
        raise ValueError("every must be >= 1 and steps >= 0")
    if not math.isfinite(init_scale) or init_scale <= 0:
        raise ValueError(f"init_scale must be a positive number, got {init_scale}")
    out = Path(out)
    ckpt_path = checkpoint_path(out)
    jsonl_path = out.with_suffix(".jsonl") if jsonl else None
    config = _config(
        steps=steps,
        every=every,
        optimizer=optimizer,
        lr=lr,
        init_scale=init_scale,
        num_probes=num_probes,
        seed=seed,
        model=spec.name,
    )
    opt = make_optimizer(spec.model, optimizer, lr)
    rows: list[dict[str, Any]] = []
    if resume:
        if not ckpt_path.is_file() or not out.is_file():
            raise FileNotFoundError(f"nothing to resume: {out} or its checkpoint {ckpt_path.name} is missing")
        state = torch.load(ckpt_path, weights_only=True)
        diff = {k: (state["config"].get(k), v) for k, v in config.items() if k != "steps" and state["config"].get(k) != v}
        if diff:
            raise ValueError(f"--resume with different settings than the interrupted run: {diff}")
        spec.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        init, method_used, step = state["init"], state["method"], state["step"]
        _truncate_partial(out)
        rows = read_rows(out)
        if jsonl_path is not None and jsonl_path.is_file():
            _truncate_partial(jsonl_path)
        pending = not rows or rows[-1]["step"] < step  # checkpoint written, row not yet
    else:
        with torch.no_grad():
            for p in spec.model.parameters():
                p.mul_(init_scale)
        init = {n: p.detach().clone() for n, p in spec.model.named_parameters() if p.requires_grad}
        method_used = _resolve_method(spec, method, num_probes, seed)
        step, pending = 0, True
        out.write_text(",".join(COLUMNS) + "\n")
        if jsonl_path is not None:
            jsonl_path.write_text("")

    with open(out, "a", newline="") as f, open(jsonl_path, "a") if jsonl_path else _null() as fj:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)

        def record(s: int) -> None:
            row = _row(spec, init, s, method_used, num_probes, seed)
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
            f.flush()
            if fj is not None:
                fj.write(json.dumps(row) + "\n")
                fj.flush()
            rows.append(row)
            if on_row:
                on_row(row)

        def checkpoint(s: int) -> None:
            _save_atomic(
                {
                    "step": s,
                    "model": spec.model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                    "init": init,
                    "method": method_used,
                    "config": config,
                },
                ckpt_path,
            )

        if pending:
            if not resume:
                checkpoint(step)
            record(step)
        while step < steps:
            train_step(spec, opt)
            step += 1
            if on_step:
                on_step(step)
            if step % every == 0 or step == steps:
                checkpoint(step)
                record(step)
    return rows


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def iter_metric(rows: list[dict[str, Any]], metric: str) -> Iterator[tuple[int, float, float]]:
    """``(step, value, stderr)`` of one metric over rows."""
    for r in rows:
        yield r["step"], r[metric], r.get(f"{metric}_stderr", 0.0)
