"""Headless plots of NTK estimates (matplotlib's object API; no pyplot, no display needed).

* :func:`convergence` — an estimate against the AD passes it cost, over several budgets and
  seeds, with ± one standard error and the exact value as a reference line;
* :func:`per_time_step` — curves over time steps of a recurrent model (values and stderrs);
* :func:`training` — metrics over training from a ``ntkscope track`` CSV (or its rows).

Each returns a :class:`matplotlib.figure.Figure` and, given ``path``, also writes a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError as e:
    raise ImportError("ntkscope plot needs matplotlib: pip install 'ntkscope[plot]'") from e

from .. import metrics as mt
from .track import COLUMNS, TRACK_METRICS, read_rows

__all__ = ["convergence", "per_time_step", "training", "training_pngs", "read_track_csv", "NotTrackCSV", "LABELS"]


class NotTrackCSV(ValueError):
    """A file given to :func:`training` that is not a CSV written by ``ntkscope track``."""

#: Axis labels of the quantities.
LABELS = {
    "trace": "trace  tr K",
    "frobenius_norm": "Frobenius norm  ‖K‖_F",
    "frobenius_norm_sq": "‖K‖_F²",
    "effective_rank": "effective rank  (tr K)²/‖K‖_F²",
    "alignment": "alignment",
    "kernel_alignment": "alignment of K_t with K_0",
    "target_alignment": "kernel–target alignment",
    "loss": "training loss",
}


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # as `track --out` does for its CSV
        fig.savefig(path, dpi=110)  # Figure.savefig uses the Agg canvas: no GUI backend involved
    return fig


def convergence(
    K: Any,
    quantity: str = "trace",
    *,
    targets: Any = None,
    budgets: Sequence[int] = (8, 16, 32, 64, 128),
    seeds: Sequence[int] = (0, 1, 2, 3),
    methods: Sequence[str] = ("auto",),
    exact: float | bool | None = True,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Estimates of ``quantity`` against AD passes for each budget, seed and method.

    Each point is one estimate with ± 1 stderr; the line joins the per-budget means.  ``exact``:
    ``True`` computes the exact value (``method="exact"``), a float uses it, ``None``/``False``
    draws none.  ``quantity`` names a metric of :mod:`ntkscope` (``"trace"``,
    ``"frobenius_norm"``, ``"effective_rank"``, ``"target_alignment"`` with ``targets``).
    """
    fn: Callable[..., Any] = getattr(mt, quantity)
    args = (K, targets) if quantity == "target_alignment" else (K,)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for k, meth in enumerate(methods):
        xs, means = [], []
        for b in budgets:
            ests = [fn(*args, method=meth, num_probes=int(b), seed=int(s)) for s in seeds]
            passes = np.array([e.passes for e in ests], dtype=float)
            vals = np.array([e.value for e in ests])
            errs = np.array([e.stderr if e.stderr is not None and math.isfinite(e.stderr) else 0.0 for e in ests])
            # small horizontal jitter so the seeds' error bars do not overlap
            jitter = passes * (1 + 0.03 * (np.arange(len(ests)) - (len(ests) - 1) / 2) / max(len(ests), 1))
            ax.errorbar(jitter, vals, yerr=errs, fmt="o", ms=3, color=f"C{k}", alpha=0.6, capsize=2)
            xs.append(passes.mean())
            means.append(vals.mean())
        used = {e.method for e in ests}
        ax.plot(xs, means, "-", color=f"C{k}", label=f"{meth} ({', '.join(sorted(used))})" if meth == "auto" else meth)
    if exact is True:
        exact = fn(*args, method="exact").value
    if exact is not None and exact is not False:
        ax.axhline(float(exact), color="k", ls="--", lw=1, label=f"exact = {float(exact):.5g}")
    ax.set_xscale("log")
    ax.set_xlabel("AD passes (JVP + VJP)")
    ax.set_ylabel(LABELS.get(quantity, quantity))
    ax.set_title(title or f"{quantity}: estimate ± stderr vs cost ({len(seeds)} seeds per budget)")
    ax.legend()
    return _save(fig, path)


def per_time_step(
    values: Any,
    stderrs: Any = None,
    *,
    labels: Sequence[str] | None = None,
    exact: Any = None,
    ylabel: str = "value",
    xlabel: str = "time step t",
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Curves over time steps: ``values`` is ``(T,)`` or ``(S, T)`` (S series), ``stderrs`` alike.

    Error bars are drawn as a ±1 stderr band; ``exact`` (same shape) as dashed lines.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    se = None if stderrs is None else np.atleast_2d(np.asarray(stderrs, dtype=float))
    if se is not None and se.shape != v.shape:
        raise ValueError(f"stderrs of shape {se.shape} do not match values of shape {v.shape}")
    ex = None if exact is None else np.atleast_2d(np.asarray(exact, dtype=float))
    if ex is not None and ex.shape != v.shape:
        raise ValueError(f"exact of shape {ex.shape} does not match values of shape {v.shape}")
    if labels is not None and len(labels) != v.shape[0]:
        raise ValueError(f"{len(labels)} labels for {v.shape[0]} series")
    t = np.arange(1, v.shape[1] + 1)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i in range(v.shape[0]):
        c = f"C{i}"
        ax.plot(t, v[i], "o-", ms=3, color=c, label=labels[i] if labels else None)
        if se is not None:
            ax.fill_between(t, v[i] - se[i], v[i] + se[i], color=c, alpha=0.25, lw=0)
        if ex is not None:
            ax.plot(t, ex[i], "--", color=c, lw=1, label=f"{labels[i]} (exact)" if labels else ("exact" if i == 0 else None))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if labels or ex is not None:
        ax.legend()
    return _save(fig, path)


def read_track_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``ntkscope track`` CSV; :class:`NotTrackCSV` for anything else."""
    p = Path(path)
    try:
        head = p.read_bytes()[:4096].decode("utf-8").split("\n", 1)[0]
    except UnicodeDecodeError:
        raise NotTrackCSV(f"{p} is not an ntkscope track CSV (it is not a text file)") from None
    cols = [c.strip() for c in head.split(",")]
    if "step" not in cols or not any(c in cols for c in COLUMNS if c not in ("step", "loss", "method", "passes", "seconds")):
        raise NotTrackCSV(f"{p} is not an ntkscope track CSV (its header has no 'step' and metric columns; got {head[:80]!r})")
    try:
        rows = read_rows(p)
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise NotTrackCSV(f"{p} is not an ntkscope track CSV ({type(e).__name__}: {e})") from None
    if not rows:
        raise NotTrackCSV(f"{p} has a header but no rows yet")
    return rows


def _subtitle(data: Sequence[Mapping[str, Any]]) -> str:
    methods = sorted({str(r["method"]) for r in data if r.get("method") not in (None, "")})
    passes = sorted({int(r["passes"]) for r in data if isinstance(r.get("passes"), (int, float)) and math.isfinite(r["passes"])})
    bits = ["error bars: ±1 stderr"]
    if methods:
        bits.append("method " + "/".join(methods))
    if passes:
        bits.append(f"{passes[0]} AD passes per row" if len(passes) == 1 else f"{passes[0]}–{passes[-1]} AD passes per row")
    return "; ".join(bits)


def training_pngs(
    rows: str | Path | Sequence[Mapping[str, Any]], out: str | Path, *, title: str | None = None
) -> list[Path]:
    """One PNG per metric (``OUT_<metric>.png``) and one with every panel (``OUT.png``)."""
    data = read_track_csv(rows) if isinstance(rows, (str, Path)) else list(rows)
    out = Path(out)
    name = title or out.stem
    written = []
    for m in ("loss", *TRACK_METRICS):
        if data and m in data[0]:
            png = out.with_name(f"{out.stem}_{m}.png")
            training(data, [m], title=f"{name}: {LABELS.get(m, m)}", path=png)
            written.append(png)
    training(data, title=f"{name}: NTK metrics over training", path=out.with_suffix(".png"))
    return [out.with_suffix(".png"), *written]


def training(
    rows: str | Path | Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Metrics over training steps with ± 1 stderr error bars, one panel per metric.

    ``rows``: a ``ntkscope track`` CSV path or its rows (:func:`ntkscope.cli.track.read_rows`).
    ``metrics`` defaults to every tracked metric present, plus the loss.
    """
    data = read_track_csv(rows) if isinstance(rows, (str, Path)) else list(rows)
    if not data:
        raise ValueError("no rows to plot")
    names = list(metrics) if metrics is not None else [m for m in ("loss", *TRACK_METRICS) if m in data[0]]
    missing = [m for m in names if m not in data[0]]
    if missing:
        raise ValueError(f"metrics {missing} are not in the rows (columns: {sorted(data[0])})")
    n = len(names)
    cols = 1 if n == 1 else 2
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(5.0 * cols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    steps = np.array([r["step"] for r in data], dtype=float)
    for ax, m in zip(axes, names):
        y = np.array([r[m] for r in data], dtype=float)
        se = np.array([r.get(f"{m}_stderr", 0.0) for r in data], dtype=float)
        ax.errorbar(steps, y, yerr=np.nan_to_num(se, posinf=0.0), fmt="o-", ms=3, capsize=2)
        if f"{m}_stderr" in data[0] and np.all(se == 0):  # e.g. a trace over per-example blocks within the budget
            ax.set_title("exact at every step (stderr 0)", fontsize=8)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(LABELS.get(m, m))
        if m == "loss" and np.all(y > 0):
            ax.set_yscale("log")
    for ax in axes[n:]:
        ax.set_visible(False)
    sub = _subtitle(data)
    fig.suptitle(f"{title}\n{sub}" if title else sub, fontsize=10)
    return _save(fig, path)
