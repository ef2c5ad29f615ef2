"""The ``ntkscope`` command line: ``run`` (the demo), ``estimate``, ``track`` and ``plot``.

Exit codes: 0 success; 1 an error while running (the user's code raised, an estimate failed);
2 a usage error (bad option, missing or unusable model file, factory returning the wrong thing);
130 interrupted (Ctrl-C; ``track`` keeps its rows and can ``--resume``).

Needs the ``cli`` extra (typer, rich); ``run`` and the built-in digits models the ``data`` extra
(scikit-learn), ``track``'s PNGs and ``plot`` the ``plot`` extra (matplotlib).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch

try:
    import typer
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError as e:
    raise ImportError(f"the ntkscope command line needs typer and rich ({e}): pip install 'ntkscope[cli]'") from e

from .. import distributed
from ..core.probes import Probe
from ..metrics import Method
from ..operators.modules import OutputError
from . import compare
from . import track as tr
from .demo import run_demo
from .spec import SpecError, UserCodeError, load_spec
from .train import OPTIMIZERS

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_METRICS = "trace,frobenius_norm,effective_rank,target_alignment"

MODEL_HELP = """\
The model to analyse: 'builtin:NAME' (mlp-digits, gru-flipflop, gru-digits) or
'path/to/file.py:factory'.  factory() takes no arguments and returns a tuple
(model, inputs[, targets[, output]]) or a dict {'model':..., 'inputs':..., 'targets':..., 'output':...}:
model is a torch.nn.Module; inputs a tensor, a tuple of arguments or a dict of keyword arguments;
targets (optional) the state's shape or integer class labels; output (optional) picks the state from
the model's return value (index, key or callable)."""

app = typer.Typer(
    help=(
        "Measure the empirical Neural Tangent Kernel K = J Jᵀ of PyTorch models without forming it: "
        "trace, Frobenius norm, effective rank and alignments, each with a standard error and its cost "
        "in AD passes.\n\nStart with 'ntkscope run' (a demo of well under two minutes), then "
        "'ntkscope estimate --model my_model.py:make' on your own model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"ntkscope {version('ntkscope')} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the versions of ntkscope and torch, then exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Measure the empirical NTK of PyTorch models without forming it."""


def _init_distributed() -> bool:
    """Join torchrun's process group if launched by it (metrics then run probe-parallel);
    True on the process that prints and writes files (rank 0, or the only one)."""
    distributed.init_from_env()
    return distributed.is_main_process()


def _finish_distributed() -> None:
    """A command that succeeded: under torchrun, every rank waits for the others before the
    process group is torn down (a rank destroying it while a peer still talked to it made gloo
    abort the process at exit, turning a good run into exit 1).  Failures skip this."""
    with _errors():
        distributed.shutdown()


def _fail(message: str, code: int = EXIT_ERROR, details: str | None = None) -> typer.Exit:
    """Print the user's traceback (if any) then a one-line ``error:`` message; return the Exit."""
    if details:
        sys.stderr.write(details if details.endswith("\n") else details + "\n")
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Map our exceptions to one-line messages and conventional exit codes."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED) from None
    except SpecError as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except tr.SettingsMismatchError as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except OutputError as e:  # the factory must pick the state: output= is the Python keyword
        hint = "from the command line, return {'model': m, 'inputs': x, 'output': 0} (or a key, or a callable) from the factory"
        raise _fail(f"{e}; {hint}", EXIT_USAGE) from None
    except UserCodeError as e:
        raise _fail(str(e), EXIT_ERROR, e.user_traceback) from None
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        raise _fail(f"{type(e).__name__}: {e}".replace("\n", " "), EXIT_ERROR) from None
    except Exception as e:  # anything else the user's model raised while being analysed
        raise _fail(f"{type(e).__name__}: {e}".replace("\n", " "), EXIT_ERROR) from None


@contextmanager
def _progress(quiet: bool, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress line on stderr (transient); ``update(text, advance=0)``."""
    if quiet:
        yield lambda *a, **k: None
        return
    cols: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        cols += [BarColumn(), MofNCompleteColumn()]
    cols.append(TimeElapsedColumn())
    with Progress(*cols, console=err_console, transient=True) as p:
        task = p.add_task("starting", total=total)

        def update(text: str | None = None, advance: int = 0) -> None:
            if text is not None:
                p.update(task, description=text)
            if advance:
                p.advance(task, advance)

        yield update


def _fmt(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "—"
    s = f"{v:.5g}"
    if se is not None:
        s += f" ± {se:.2g}"
    return s


def _table(res: dict[str, Any]) -> Table:
    head = f"[bold]{res['model']}[/bold] — {res.get('description', '')}; D={res['D']} outputs, P={res['P']} parameters"
    if res.get("train"):
        tr = res["train"]
        head += f"; trained {tr['steps']} steps (loss {tr['loss_start']:.3g} → {tr['loss_end']:.3g})"
    if res.get("exact_cost"):
        ec = res["exact_cost"]
        head += f"; exact reference: {ec['passes']} passes, {ec['seconds']:.2f} s"
    t = Table(title=head, title_justify="left", header_style="bold")
    for name, just in [
        ("metric", "left"),
        ("estimate ± stderr", "right"),
        ("exact", "right"),
        ("rel.err", "right"),
        ("passes", "right"),
        ("time", "right"),
        ("speed-up", "right"),
        ("method", "left"),
    ]:
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    for r in res["metrics"]:
        e, ex = r["estimate"], r.get("exact")
        t.add_row(
            r["metric"],
            _fmt(e["value"], e["stderr"]),
            _fmt(ex["value"]) if ex else "—",
            f"{r['rel_error']:.1%}" if ex else "—",
            f"{e['jvp_passes'] + e['vjp_passes']}",
            f"{e['seconds']:.2f}s",
            f"{r['speedup']:.1f}×" if ex and r.get("speedup") and not e.get("exact") else "—",
            e["method"],
        )
    return t


def _reasons(res: dict[str, Any]) -> list[str]:
    """Why auto chose each method, identical reasons merged."""
    by: dict[str, list[str]] = {}
    for r in res["metrics"]:
        if r.get("reason"):
            by.setdefault(r["reason"], []).append(r["metric"])
    return [f"  {', '.join(ms)}: {why}" for why, ms in by.items()]


def _print_results(results: list[dict[str, Any]], title: str, wall: float, as_json: bool, extra: dict[str, Any]) -> None:
    if as_json:
        print(json.dumps({**extra, "wall_seconds": wall, "results": results}, indent=2, default=str))
        return
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(f"[bold]{title}[/bold]")
    for res in results:
        console.print(_table(res))
        reasons = _reasons(res)
        if reasons:
            console.print("why 'auto' chose:", highlight=False)
            for line in reasons:
                console.print(line, highlight=False, soft_wrap=True)
        console.print()
    console.print(
        f"stderr: jackknife over probes; passes: each metric's AD passes (JVP + VJP, auto's pilot included; the warm-up "
        f"passes that time each AD mode once, before the first metric, are not); rel. err vs the exact kernel; "
        f"speed-up: exact time / estimate time.  Total wall time {wall:.1f} s.",
        highlight=False,
    )


ProbesOpt = Annotated[int, typer.Option("--probes", "--num-probes", "-n", help="Random probe vectors per estimate.", min=2)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for probes (and the built-in models' initialisation).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


@app.command()
def run(
    seed: SeedOpt = 0,
    probes: ProbesOpt = 64,
    method: Annotated[str, typer.Option(help="Estimation method ('auto' picks per metric and says why).")] = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The built-in demo: train a small MLP (sklearn digits) and a small GRU (3-bit flip-flop) briefly, then estimate trace, Frobenius norm, effective rank and kernel-target alignment of each NTK with ± stderr, AD passes and wall time, next to the exact values and the speed-up."""  # noqa: E501
    _check_method(method, compare.METRICS, fixed_metrics=True)  # the demo reports every metric
    main_process = _init_distributed()
    t0 = time.perf_counter()
    with _errors(), _progress(quiet or not main_process) as update:
        results = run_demo(seed, probes, method=method, progress=lambda s: update(s))
    if main_process:
        extra = {"command": "run", "seed": seed, "probes": probes, "method": method}
        _print_results(
            results,
            f"ntkscope demo — NTK metrics after brief training ({probes} probes, seed {seed})",
            time.perf_counter() - t0,
            as_json,
            extra,
        )
    _finish_distributed()


@app.command()
def estimate(
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)],
    method: Annotated[
        str, typer.Option(help="auto, exact, hutchinson, hutchpp, xtrace, vjp, jvp, vjp_proj, jvp_proj (see ntkscope.Method).")
    ] = "auto",
    num_probes: ProbesOpt = 64,
    seed: SeedOpt = 0,
    probe_kind: Annotated[
        str | None,
        typer.Option(
            help="Probe distribution: rademacher, gaussian, sphere or orthogonal (orthogonal: trace only; norms and ratios need independent probes)."
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Cast model and inputs to this dtype (float32 or float64); default: keep the model's own.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Probes per vectorised batch (bounds memory).", min=1)] = None,
    metrics: Annotated[
        str, typer.Option(help="Comma-separated: trace, frobenius_norm, effective_rank, target_alignment (needs targets).")
    ] = DEFAULT_METRICS,
    rtol: Annotated[float | None, typer.Option(help="Stop adding probes once stderr ≤ rtol·|value| (adaptive).")] = None,
    exact: Annotated[
        bool | None, typer.Option("--exact/--no-exact", help="Also compute exact values (default: when the kernel is small).")
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Estimate NTK metrics of a built-in model or of your own (--model file.py:factory).

    Example: ntkscope estimate --model my_model.py:make --metrics trace,effective_rank --json
    """
    main_process = _init_distributed()
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    bad = [m for m in names if m not in compare.METRICS]
    if bad or not names:
        raise _fail(f"unknown metric(s) {bad or metrics!r}; choose from {', '.join(compare.METRICS)}", EXIT_USAGE)
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if dtype is not None and dtype not in dtypes:
        raise _fail(f"--dtype must be float32 or float64, got {dtype!r}", EXIT_USAGE)
    _check_estimate_options(method, probe_kind, rtol, names)
    t0 = time.perf_counter()
    with _errors():
        spec = load_spec(model, seed=seed)
        if "target_alignment" in names and spec.targets is None:
            if metrics != DEFAULT_METRICS:  # asked for explicitly
                raise _fail("target_alignment needs targets: return (model, inputs, targets) from the factory", EXIT_USAGE)
            names.remove("target_alignment")
        if dtype is not None:  # an explicit override; by default the model keeps its own dtype
            dt = dtypes[dtype]
            if spec.model is not None and any(p.is_floating_point() and p.dtype != dt for p in spec.model.parameters()):
                spec.model.to(dt)
            spec.inputs = _cast(spec.inputs, dt)
            if spec.targets is not None and spec.targets.is_floating_point():
                spec.targets = spec.targets.to(dt)
        kw: dict[str, Any] = {"method": method, "num_probes": num_probes, "seed": seed, "chunk_size": chunk_size}
        if probe_kind is not None:
            kw["probes"] = probe_kind
        if rtol is not None:
            kw["rtol"] = rtol
        with _progress(quiet or not main_process) as update:
            res = compare.evaluate(spec, names, exact=exact, progress=lambda m: update(f"{spec.name}: {m}"), **kw)
    if main_process:
        extra = {"command": "estimate", "model": model, "seed": seed, "probes": num_probes, "method": method, "dtype": dtype}
        _print_results([res], f"NTK of {spec.name} ({num_probes} probes, seed {seed})", time.perf_counter() - t0, as_json, extra)
    _finish_distributed()


def _check_method(method: str, names: Sequence[str], fixed_metrics: bool = False) -> None:
    """An unknown ``--method``, or one that cannot estimate every metric asked for: exit 2
    before any model is loaded or trained (``fixed_metrics``: the command reports every metric,
    so there is no --metrics to narrow)."""
    methods = [m.value for m in Method]
    if method not in methods:
        raise _fail(f"unknown --method {method!r}; choose one of {', '.join(methods)}", EXIT_USAGE)
    if method in (Method.VJP_PROJ.value, Method.JVP_PROJ.value) and any(n != "trace" for n in names):
        others = ", ".join(n for n in names if n != "trace")
        fix = "use vjp or jvp (this command reports every metric)" if fixed_metrics else "add --metrics trace, or use vjp/jvp"
        raise _fail(f"--method {method} estimates the trace only (not {others}): {fix}", EXIT_USAGE)


def _check_estimate_options(method: str, probe_kind: str | None, rtol: float | None, names: list[str]) -> None:
    """Usage errors in the estimation options: exit 2 before any model is loaded."""
    _check_method(method, names)
    kinds = [p.value for p in Probe]
    if probe_kind is not None and probe_kind not in kinds:
        raise _fail(f"unknown --probe-kind {probe_kind!r}; choose one of {', '.join(kinds)}", EXIT_USAGE)
    if probe_kind == Probe.ORTHOGONAL.value and any(n != "trace" for n in names):
        others = ", ".join(n for n in names if n != "trace")
        raise _fail(
            f"--probe-kind orthogonal estimates the trace only ({others} need independent probes): add --metrics trace",
            EXIT_USAGE,
        )
    if rtol is not None and not (rtol > 0 and rtol < float("inf")):
        raise _fail(f"--rtol must be a finite number > 0, got {rtol!r}", EXIT_USAGE)


def _cast(x: Any, dt: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dt) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dt) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dt) for k, v in x.items()}
    return x


@app.command()
def track(
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP + "  Targets are required (the training loss).")] = (
        "builtin:gru-flipflop"
    ),
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file, written row by row (checkpoint beside it).")] = Path(
        "ntk_track.csv"
    ),
    steps: Annotated[int, typer.Option(help="Optimizer steps (full batch).", min=0)] = 200,
    every: Annotated[int, typer.Option(help="Record the NTK metrics every this many steps.", min=1)] = 20,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = "adam",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-2,
    init_scale: Annotated[
        float, typer.Option(help="Multiply the initial weights by this; compare kernel_alignment across scales (near 1 = lazy).")
    ] = 1.0,
    method: Annotated[str, typer.Option(help="Estimation method; 'auto' is resolved once at step 0 and kept.")] = "auto",
    num_probes: ProbesOpt = 32,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last row.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT (and its checkpoint) instead of refusing.")] = False,
    logger: Annotated[
        list[str] | None,
        typer.Option(
            "--logger",
            help="Also log to 'tensorboard' (scalars ntk/<metric> in the directory OUT without .csv) or 'wandb' (repeatable); the CSV is always written.",  # noqa: E501
        ),
    ] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Also write the rows as JSON lines (OUT with .jsonl).")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots of each metric at the end.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Train a model and record its NTK metrics every --every steps: trace, effective rank, alignment of K_t with K_0 (how far the kernel moved) and kernel-target alignment, each ± stderr.

    Ctrl-C keeps every row written so far; run the same command with --resume to continue; the rows equal those of an uninterrupted run (fixed probe seeds per step, checkpointed model, optimizer and RNG)."""  # noqa: E501
    _check_method(method, tr.TRACK_METRICS, fixed_metrics=True)
    if optimizer not in OPTIMIZERS:
        raise _fail(f"unknown --optimizer {optimizer!r}; choose sgd or adam", EXIT_USAGE)
    for flag, value in (("--lr", lr), ("--init-scale", init_scale)):
        if not (math.isfinite(value) and value > 0):
            raise _fail(f"{flag} must be a finite number > 0, got {value!r}", EXIT_USAGE)
    main_process = _init_distributed()
    quiet = quiet or not main_process
    with _errors():
        spec = load_spec(model, seed=seed)
        if spec.targets is None:
            raise _fail("track needs targets: return (model, inputs, targets) from the factory", EXIT_USAGE)
        if resume and overwrite:
            raise _fail("--resume and --overwrite exclude each other", EXIT_USAGE)
        if resume and not out.is_file():
            raise _fail(f"nothing to resume: {out} does not exist", EXIT_USAGE)
        if not resume and out.exists() and out.stat().st_size > 0 and not overwrite:
            raise _fail(f"{out} already exists: pass --resume to continue it or --overwrite to replace it", EXIT_USAGE)
        extra = [lg.strip() for lg in (logger or []) if lg.strip() and lg.strip() != "csv"]
        bad = [lg for lg in extra if lg not in ("tensorboard", "wandb")]
        if bad:
            raise _fail(f"unknown --logger {bad[0]!r}; choose csv, tensorboard or wandb", EXIT_USAGE)
        for lg, module, extra_name in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
            if lg in extra and importlib.util.find_spec(module) is None:
                raise _fail(f"--logger {lg} needs the {module} package: pip install 'ntkscope[{extra_name}]'", EXIT_USAGE)
        if quiet and "wandb" in extra:
            os.environ.setdefault("WANDB_SILENT", "true")  # -q: no banner or run summary either
        if plots and main_process and importlib.util.find_spec("matplotlib") is None:
            raise _fail("the PNG plots need matplotlib: pip install 'ntkscope[plot]', or pass --no-plots", EXIT_USAGE)
        with _progress(quiet, total=steps) as update:
            update(f"tracking {spec.name}")

            def on_row(row: dict[str, Any]) -> None:
                if not quiet:
                    err_console.print(
                        f"step {row['step']:>5}  loss {row['loss']:.4g}  eff.rank {row['effective_rank']:.4g}  "
                        f"K_t·K_0 {row['kernel_alignment']:.4f}  target-align {row['target_alignment']:.4f}",
                        highlight=False,
                    )

            done = {"n": 0}

            def on_step(s: int) -> None:
                if done["n"] == 0:  # resumed runs start the bar at the checkpoint's step
                    update(advance=s - 1)
                done["n"] += 1
                update(advance=1)

            rows = tr.track(
                spec,
                out if main_process else out.with_name(out.name + ".rank-local"),
                steps=steps,
                every=every,
                optimizer=optimizer,
                lr=lr,
                init_scale=init_scale,
                method=method,
                num_probes=num_probes,
                seed=seed,
                resume=resume,
                overwrite=overwrite,
                jsonl=jsonl,
                loggers=extra,
                on_row=on_row,
                on_step=on_step,
            )
        if main_process and plots:
            plot = _plot_module()
            written = []
            for m in ("loss", *tr.TRACK_METRICS):
                png = out.with_name(f"{out.stem}_{m}.png")
                plot.training(rows, [m], title=f"{spec.name}: {m}", path=png)
                written.append(str(png))
            all_png = out.with_name(f"{out.stem}.png")
            plot.training(rows, title=f"{spec.name}: NTK over training", path=all_png)
            if not quiet:
                err_console.print(f"wrote {out} ({len(rows)} rows) and plots {all_png}, " + ", ".join(written), highlight=False)
    _finish_distributed()


def _plot_module() -> Any:
    """:mod:`ntkscope.cli.plot`, imported when a figure is drawn: matplotlib is the optional ``plot`` extra."""
    try:
        from . import plot
    except ImportError as e:
        raise _fail(str(e), EXIT_ERROR) from None
    return plot


@app.command("plot")
def plot_cmd(
    csv_file: Annotated[Path, typer.Argument(help="A CSV written by 'ntkscope track'.", exists=True, dir_okay=False)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG path (default: CSV name with .png; per-metric PNGs beside it).")
    ] = None,
    metrics: Annotated[str | None, typer.Option(help="Comma-separated columns to plot in one figure (default: all tracked, plus one PNG each).")] = None,
) -> None:
    """Plot a 'ntkscope track' CSV: one PNG per metric over training steps (± 1 stderr error bars) and one with all of them."""
    plot = _plot_module()
    with _errors():
        path = out or csv_file.with_suffix(".png")
        try:
            rows = plot.read_track_csv(csv_file)
        except plot.NotTrackCSV as e:
            raise _fail(str(e), EXIT_USAGE) from None
        if metrics:
            names = [m.strip() for m in metrics.split(",") if m.strip()]
            missing = [m for m in names if m not in rows[0]]
            if missing:
                raise _fail(f"--metrics {missing} are not columns of {csv_file} ({', '.join(sorted(rows[0]))})", EXIT_USAGE)
            plot.training(rows, names, title=csv_file.stem, path=path)
            written = [path]
        else:
            written = plot.training_pngs(rows, path, title=csv_file.stem)
    for w in written:
        print(w)


def main() -> None:
    """Entry point of the ``ntkscope`` script and ``python -m ntkscope``."""
    try:
        app()
    except KeyboardInterrupt:  # outside any command body (e.g. while importing torch)
        sys.stderr.write("error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
