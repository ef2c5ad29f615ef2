"""The driver every metric runs: check the shared arguments, cap the budget, run, report.

:func:`estimate` takes a :class:`~ntkscope.metrics.components.Quantity`, the kernel(s) and the
:class:`MetricOptions` (the arguments every metric shares, explained in
:mod:`ntkscope.metrics.quantities`) and returns an :class:`~ntkscope.core.estimate.Estimate`.
In order:

1. check the arguments; refuse budgets far beyond the exact value's cost
   (:data:`BUDGET_FACTOR`, :data:`BUDGET_FLOOR`) and one-sided runs whose stored products would
   not fit in memory (:data:`MAX_STORED_ENTRIES`);
2. resolve ``auto`` (:func:`ntkscope.metrics.auto.resolve`) within its pass budget;
3. run the method's sampler once, or — with a tolerance or ``max_passes`` — grow the probes
   with :func:`ntkscope.metrics.adaptive.drive`, which switches to the exact value when that is
   cheaper than the next round;
4. report passes (all rounds, this rank's share under probe parallelism), timing and ``info``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ..core import executor
from ..core.estimate import Estimate
from ..core.jackknife import combine, dof
from ..core.linalg import NONFINITE_PRODUCTS
from ..core.probes import Probe, parse_probe, resolve_seed
from ..estimators import exact as ex
from ..operators.base import FactoredKernel, KernelOperator, as_operator
from . import adaptive as adapt
from . import auto
from .components import CHEAP_EXACT, SAMPLERS, Quantity, RunContext, exact_storable, measure
from .methods import DEFAULT_PROBES, ONE_SIDED, Method, parse_method

__all__ = ["MetricOptions", "estimate", "BUDGET_FACTOR", "BUDGET_FLOOR", "MAX_STORED_ENTRIES"]

#: A fixed budget may exceed the exact value's cost by this factor (and by BUDGET_FLOOR passes) at most.
BUDGET_FACTOR, BUDGET_FLOOR = 100, 10**5
#: One-sided norms and ratios keep the m one-sided products (m × out_dim numbers): at most this many.
MAX_STORED_ENTRIES = 5 * 10**7


@dataclass(frozen=True)
class MetricOptions:
    """The arguments every metric shares, as the public functions take them (see
    :mod:`ntkscope.metrics.quantities` for their meaning); :func:`estimate` checks them."""

    method: str | Method = "auto"
    num_probes: int | None = None
    seed: int | torch.Generator | None = None
    probes: str | Probe | None = None
    chunk_size: int | None = None
    rtol: float | None = None
    atol: float | None = None
    max_passes: int | None = None

    @property
    def adaptive(self) -> bool:
        """A tolerance or a pass budget: grow the probes instead of one fixed run."""
        return self.rtol is not None or self.atol is not None or self.max_passes is not None


def _passes_per_probe(meth: Method) -> int:
    """AD passes one probe costs per kernel (``auto``: its budget is counted in one-sided probes)."""
    return 0 if meth is Method.EXACT else (1 if meth in ONE_SIDED or meth is Method.AUTO else 2)


def _check_budget(per_probe: int, m: int, exact_cost: int, quantity: str) -> None:
    """Refuse budgets far beyond the exact value's cost (they would run for hours or months);
    ``per_probe``: the AD passes one probe costs the run, over all its kernels."""
    want = per_probe * m
    if want > max(BUDGET_FACTOR * exact_cost, BUDGET_FLOOR):
        raise ValueError(
            f"num_probes={m} would cost {want:.3g} AD passes for {quantity}, but the exact value costs {exact_cost} "
            f"(method='exact'); ask for at most {max(BUDGET_FACTOR * exact_cost, BUDGET_FLOOR) // max(per_probe, 1)} probes"
        )


def _stored_probe_limit(meth: Method, ops: Sequence[KernelOperator], quantity: Quantity) -> int | None:
    """Most probes whose one-sided products (m × out, or their shorter Gram rows: ghosted
    layers, :meth:`FactoredKernel.gram_width`) fit MAX_STORED_ENTRIES (the m × m probe
    Gram is only ever held in row blocks, :data:`~ntkscope.metrics.components.GRAM_BLOCK_ENTRIES`)."""
    if meth in (Method.HUTCHPP, Method.XTRACE):  # their sketches and products: m vectors in R^D, for any quantity
        return max(3, MAX_STORED_ENTRIES // max(ops[0].dim, 1))
    if quantity.trace_only or meth not in (Method.VJP, Method.JVP):
        return None
    return max(2, MAX_STORED_ENTRIES // max(_stored_width(meth, ops), 1))


def _stored_width(meth: Method, ops: Sequence[KernelOperator]) -> int:
    return max(o.gram_width("vjp" if meth is Method.VJP else "jvp") for o in ops if isinstance(o, FactoredKernel))


def _max_probes(meth: Method, ops: Sequence[KernelOperator], quantity: Quantity) -> int | None:
    """The most probes a tolerance loop may grow to (dimension limits; stored one-sided products)."""
    limit = _stored_probe_limit(meth, ops, quantity)
    if meth is Method.XTRACE:
        return ops[0].dim - 1 if limit is None else min(ops[0].dim - 1, limit)
    return limit


def _kernels(kernels: Sequence[Any], meth: Method) -> list[KernelOperator]:
    ops = [as_operator(k) for k in kernels]
    if meth in ONE_SIDED:
        for op in ops:
            if not isinstance(op, FactoredKernel):
                raise ValueError(
                    f"method {meth.value!r} is one-sided and needs the factor J (an ntkscope.NTK); "
                    f"{type(op).__name__} only multiplies by K: use 'hutchinson', 'hutchpp' or 'xtrace'"
                )
    return ops


def _check_options(opts: MetricOptions) -> None:
    adapt.check_tolerances(opts.rtol, opts.atol, opts.max_passes)
    c = opts.chunk_size
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise ValueError(f"chunk_size must be a positive int (probes per batch), got {c!r}")


def _first_probes(opts: MetricOptions) -> int:
    """``num_probes`` checked; a tolerance alone starts at :data:`~ntkscope.metrics.adaptive.FIRST_BLOCK`."""
    m = opts.num_probes
    if m is None:
        m = adapt.FIRST_BLOCK if opts.adaptive else DEFAULT_PROBES
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"num_probes must be an int, got {type(m).__name__}")
    if m < 1:
        raise ValueError(f"num_probes must be >= 1, got {m}")
    return m


@dataclass
class _Run:
    """One metric call: its kernels (and their memoising proxies), method, probes, pass counts."""

    quantity: Quantity
    opts: MetricOptions
    ops: list[KernelOperator]
    method: Method
    m: int
    seed: int
    probe_kind: Probe | None
    targets: torch.Tensor | None
    distinct: list[KernelOperator] = field(init=False)
    run_ops: list[KernelOperator] = field(init=False)
    before: list[tuple[int, int, int]] = field(init=False)
    info: dict[str, Any] = field(default_factory=dict)
    last_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.distinct = list({id(o): o for o in self.ops}.values())
        self.run_ops = self.ops
        self.before = [o.counts() for o in self.distinct]

    @cached_property
    def exact_cost(self) -> int:
        """Passes (products, for a kernel without a factor) of the exact value: ``Σ min(D, P)``,
        or a trace's ``R`` VJPs over per-example blocks (:meth:`FactoredKernel.trace_blocks`);
        found once per run (its kernels cannot change during it)."""
        if self.quantity.trace_only and len(self.distinct) == 1 and isinstance(o := self.distinct[0], FactoredKernel):
            blocks = ex.block_trace_passes(o)
            if blocks is not None:
                return blocks
        return sum(min(o.dim, o.num_params) if isinstance(o, FactoredKernel) else o.dim for o in self.distinct)

    def exact_fits(self) -> bool:
        """Whether the exact value's storage (J, or K) stays under
        :data:`~ntkscope.metrics.methods.EXACT_MAX_ENTRIES` (:func:`~ntkscope.metrics.components.exact_storable`)."""
        return self.quantity.trace_only or all(exact_storable(o) for o in self.distinct)

    def check_budget(self) -> None:
        name = self.quantity.name
        _check_budget(self.probe_passes(), self.m, self.exact_cost, name)
        limit = _stored_probe_limit(self.method, self.ops, self.quantity)
        if not self.opts.adaptive and limit is not None and self.m > limit:
            what, full = ("P", "num_params") if self.method is Method.VJP else ("D", "dim")
            if self.method in ONE_SIDED:
                width = _stored_width(self.method, self.ops)
                plain = width == max(getattr(o, full) for o in self.ops if isinstance(o, FactoredKernel))
            else:  # Hutch++'s and XTrace's sketches
                width, plain = self.ops[0].dim, True
            stored = f"m × {what} numbers" if plain else f"m × {width:,} numbers, after ghost norms"
            raise ValueError(
                f"{name} with method={self.method.value!r} keeps every probe's product ({stored}): "
                f"num_probes={self.m} exceeds the memory limit of {limit} probes; the exact value costs "
                f"{self.exact_cost} passes (method='exact')"
            )

    def probe_passes(self) -> int:
        """AD passes one probe costs this run in all: per distinct kernel for most methods (per
        kernel argument for Hutch++); XTrace of
        ``‖K‖²`` and ``⟨K₁, K₂⟩`` spends two products (4 passes) per probe on each part."""
        if self.method is Method.HUTCHPP:  # one sketch per kernel argument, a kernel passed twice included
            return _passes_per_probe(self.method) * len(self.ops)
        if self.method is not Method.XTRACE:
            return _passes_per_probe(self.method) * len(self.distinct)
        comps = self.quantity.components
        own = 4 if "sq" in comps else 2 if "tr" in comps else 0
        return own + 4 * ("cross" in comps) + 4 * ("sq2" in comps)

    def passes_now(self) -> int:
        return sum(sum(a[:2]) - sum(b[:2]) for a, b in zip((o.counts() for o in self.distinct), self.before))

    def memoise(self) -> None:
        """Run on memoising proxies: later rounds (and a method chosen after auto's pilot) reuse products."""
        proxies = {id(o): adapt.cached(o) for o in self.distinct}
        self.run_ops = [proxies[id(o)] for o in self.ops]

    def resolve_auto(self) -> None:
        budget = self.m  # auto's budget: m passes per kernel, never more than max_passes allows
        if self.opts.max_passes is not None:
            budget = max(1, min(budget, self.opts.max_passes // len(self.distinct)))
        self.method, self.m, self.info["reason"] = auto.resolve(
            self.ops, self.run_ops, self.quantity.name, budget, seed=self.seed, probes=self.probe_kind, info=self.info
        )
        if not self.opts.adaptive and (self.method not in ONE_SIDED or "pilot_passes" not in self.info):
            self.run_ops = self.ops  # only the one-sided methods reuse the pilot's products; skip the memo's cost

    def sample(self, m: int) -> tuple[float, float, Any]:
        """Value, jackknife standard error and bias-corrected value at ``m`` probes."""
        self.last_info = dict(self.info)
        ctx = RunContext(
            self.method, m, self.seed, self.probe_kind, self.opts.chunk_size, self.last_info, self.targets, fixed=not self.opts.adaptive
        )
        parts = measure(self.quantity, self.run_ops, ctx)
        value, se, bc = combine(parts, self.quantity.formula)
        k = dof(parts)
        if k is not None:
            self.last_info["dof"] = k
        if not math.isfinite(value):
            raise ValueError(
                f"{self.quantity.name} is not finite ({value}); the kernel may be zero or the estimate degenerate, or {NONFINITE_PRODUCTS}"
            )
        return value, se, bc

    def sample_exact(self) -> tuple[float, float, Any]:
        self.method = Method.EXACT
        return self.sample(0)

    def grow(self) -> tuple[float, float, Any, bool | None]:
        """The tolerance loop: grow the probes until the error bar, or the pass budget, says stop."""
        opts, meth = self.opts, self.method
        max_passes = adapt.DEFAULT_MAX_PASSES if opts.max_passes is None else opts.max_passes  # a tolerance alone must stop
        per_probe = self.probe_passes()
        # the exactly computed components (yᵀKy: one VJP) are spent once, before the first round
        once = sum(1 for c in self.quantity.components if c in CHEAP_EXACT and c not in SAMPLERS[meth].produces)
        fewest = 4 if meth is Method.XTRACE and "cross" in self.quantity.components else 2  # XTrace: two test vectors
        left = max_passes - self.passes_now() - once
        if left < fewest * per_probe:
            raise ValueError(
                f"max_passes={max_passes} cannot pay for the fewest probes of {self.quantity.name} with method={meth.value!r}: "
                f"{fewest} probes cost {fewest * per_probe + once} passes (the exact value costs {self.exact_cost})"
            )
        m = min(self.m, left // per_probe)
        res = adapt.drive(
            self.sample,
            self.passes_now,
            m,
            rtol=opts.rtol,
            atol=opts.atol,
            max_passes=max_passes,
            max_probes=_max_probes(meth, self.ops, self.quantity),
            max_growth=2.0 if meth in (Method.HUTCHPP, Method.XTRACE) else adapt.GROWTH_MAX,
            what=self.quantity.name,
            exact=self.sample_exact if self.exact_fits() else None,
            exact_passes=self.exact_cost,
            probe_cost=per_probe,
            incremental=meth not in (Method.HUTCHPP, Method.XTRACE),
        )
        self.m = res.num_probes
        self.last_info["adaptive"] = {
            "rounds": res.history,
            "stop": res.stop_reason,
            "rtol": opts.rtol,
            "atol": opts.atol,
            "max_passes": max_passes,
        }
        return res.value, res.stderr, res.payload, res.converged

    def report(self, value: float, se: float, bc: Any, converged: bool | None, seconds: float) -> Estimate:
        info, meth, probe_kind = self.last_info, self.method, self.probe_kind
        after = [o.counts() for o in self.distinct]
        jvps = sum(a[0] - b[0] for a, b in zip(after, self.before))
        vjps = sum(a[1] - b[1] for a, b in zip(after, self.before))
        if self.run_ops is self.ops:
            mvs = sum(a[2] - b[2] for a, b in zip(after, self.before))
        else:  # K-products requested through the proxies (cached ones included)
            mvs = sum(o.counts()[2] for o in {id(o): o for o in self.run_ops}.values())
        total = getattr(executor.current_executor(), "total_passes", None)
        if total is not None:  # probe-parallel: report the job's passes, and this rank's share in info
            info["rank_passes"] = {"jvp": jvps, "vjp": vjps}
            jvps, vjps = total(jvps, vjps)
        is_exact = meth is Method.EXACT or (se == 0 and "dof" not in info and "exact" in str(info.get("variants", "")))
        if is_exact and meth is not Method.EXACT:  # the budget covered the exact cost (see info["variants"])
            info["requested_method"] = meth.value
            meth = Method.EXACT
        if not is_exact:
            info["bias_corrected"] = bc
        paths = {i: p for i, p in enumerate(o.paths for o in self.distinct) if p is not None}
        if paths:
            info["paths"] = paths[0] if len(paths) == 1 else paths
        if probe_kind is not None or not is_exact:
            default = Probe.SPHERE if meth is Method.XTRACE else Probe.RADEMACHER
            info.setdefault("probes", (probe_kind or default).value)
        return Estimate(
            value=value,
            stderr=None if is_exact else se,
            jvp_passes=jvps,
            vjp_passes=vjps,
            num_probes=0 if is_exact else self.m,
            method=meth.value,
            seconds=seconds,
            quantity=self.quantity.name,
            exact=is_exact,
            info={"matvecs": mvs, **info},
            converged=converged,
        )


def estimate(quantity: Quantity, kernels: Sequence[Any], opts: MetricOptions, targets: torch.Tensor | None = None) -> Estimate:
    """Run ``quantity`` on ``kernels`` with the shared options (steps in the module docstring)."""
    t0 = time.perf_counter()
    _check_options(opts)
    meth = parse_method(opts.method)
    m = _first_probes(opts)
    ops = _kernels(kernels, meth)
    seed = resolve_seed(opts.seed)
    probe_kind = parse_probe(opts.probes) if opts.probes is not None else None
    run = _Run(quantity, opts, ops, meth, m, seed, probe_kind, targets)
    run.check_budget()
    if meth is Method.EXACT and opts.max_passes is not None and run.exact_cost > opts.max_passes:
        raise ValueError(
            f"method='exact' costs {run.exact_cost} passes, more than max_passes={opts.max_passes}: raise max_passes or choose a sampled method"
        )
    if opts.adaptive or meth is Method.AUTO:
        run.memoise()
    if meth is Method.AUTO:
        run.resolve_auto()
    if opts.adaptive and run.method is not Method.EXACT:
        value, se, bc, converged = run.grow()
    else:
        value, se, bc = run.sample(run.m)
        converged = True if opts.adaptive else None
    return run.report(value, se, bc, converged, time.perf_counter() - t0)
