"""The NTK of a PyTorch model: :class:`NTK`, the factored kernel ``K = J Jᵀ`` evaluated with
``torch.func`` (through :mod:`~ntkscope.operators.evaluators`, with the per-module rules of
:mod:`~ntkscope.operators.rules` where they apply); :meth:`NTK.from_jacobian` wraps a dense J.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..core.memory import _MAX_AUTO_CHUNK, chunk_budget_bytes, reusable_block_bytes
from . import rules as _rules
from .base import FactoredKernel, _as_block, _DenseFactor
from .evaluators import Evaluator, quiet
from .ghost import GhostNorms, build_ghost
from .modules import (
    OutputError,
    ParameterWrite,
    RefuseWrites,
    analysis_module,
    check_finite_inputs,
    check_no_dropout,
    describe_inputs,
    detached,
    inputs_equal,
    saved_activations,
    select_output,
    select_params,
    split_inputs,
    tensors,
    unwrap_parallel,
)

__all__ = ["NTK"]


class NTK(FactoredKernel):
    """The empirical NTK ``K = J Jᵀ`` of a model on fixed inputs, never formed.

    ``z = f(θ, X)`` is the chosen output flattened to ``D`` numbers; ``J = ∂z/∂θ`` is ``D × P``
    over the chosen parameters.  ``jvp``/``vjp``/``matmat`` evaluate J·, Jᵀ· and K· on blocks
    of vectors with ``torch.func`` (``vmap`` over probes, ``chunk_size`` probes at a time).

    Args:
        model: any ``nn.Module``.  It is never modified: parameters are read (detached),
            buffers are cloned, train-mode normalisation layers run on a shallow copy that uses
            batch statistics without updating running stats, and ``.grad`` is never touched.
        inputs: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
        output: which part of the model's return value is the state: ``None`` (it must be a
            tensor), an index, a key or attribute name, or a callable ``out -> Tensor``.
        params: ``None`` (all parameters with ``requires_grad``), an iterable of names or of
            the model's parameters, or a dict ``name -> tensor`` whose values replace the
            model's (e.g. a snapshot from initialisation: the NTK at that point).
        buffers: a dict ``name -> tensor`` of buffer values (e.g. BatchNorm running stats) that
            replace the model's; default: the model's buffers, copied now.  With ``params``, a
            snapshot of both pins the kernel of an earlier point exactly.
        chunk_size: probes per vectorised batch; bounds memory.  Default: from D, P and dtype.
        jvp_path / vjp_path: force an evaluation path (see :attr:`paths`); default tries the
            fastest and falls back when a path fails (no forward-mode rule, ``vmap`` unsupported,
            oneDNN's LSTM forward-mode gap).
        rules: ``None`` (default) evaluates the submodules that have a batched-probe rule
            (the recurrent layers and cells; see :mod:`ntkscope.operators.rules`) with it,
            wherever they sit in the model, after checking each mode once against the generic
            path; ``False`` never does; ``True`` requires some rule to apply.  ``fast`` is the
            same switch under its former name.
        ghost: on the VJP side, squared norms and Gram rows of linear layers that see fewer rows
            than they have inputs are computed without their weight gradients
            (:mod:`ntkscope.operators.ghost`, checked once against the generic path); ``False``
            never does (nor does ``rules=False``).

    The parameters are read live: training the model in place changes this operator.  Pass
    ``params={n: p.detach().clone() ...}`` to pin a point.
    """

    model: nn.Module | None
    rules: list[str]  # the submodules evaluated with rules ("name: Type")

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        output: int | str | Callable[[Any], torch.Tensor] | None = None,
        params: Mapping[str, torch.Tensor] | Iterable[str | torch.Tensor] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
        chunk_size: int | None = None,
        jvp_path: str | None = None,
        vjp_path: str | None = None,
        rules: bool | None = None,
        fast: bool | None = None,
        ghost: bool = True,
    ) -> None:
        if rules is None:
            rules = fast
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}; use NTK.from_function for functions")
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                f"{type(model).__name__} is a torch.jit module, which torch.func cannot differentiate per parameter: "
                "pass the original nn.Module"
            )
        model, params, buffers = unwrap_parallel(model, params, buffers)
        check_no_dropout(model)
        self.model = model
        self.inputs = inputs = detached(inputs)
        self.output = output
        names, primals, fixed = select_params(model, params)
        own = {n: b.detach().clone() for n, b in model.named_buffers()}
        unknown = sorted(set(buffers or {}) - set(own))
        if unknown:
            raise ValueError(f"buffers={unknown} are not buffers of this {type(model).__name__}; it has {sorted(own)}")
        for n, b in (buffers or {}).items():
            if not isinstance(b, torch.Tensor) or b.shape != own[n].shape:
                raise ValueError(f"buffer {n!r}: expected a tensor of shape {tuple(own[n].shape)}")
        buffers = {**own, **{n: b.detach() for n, b in (buffers or {}).items()}}
        module = _rules.analysis_copy(analysis_module(model))
        args, kwargs = split_inputs(inputs)
        self.param_names = names

        def call(net: nn.Module, values: dict[str, torch.Tensor]) -> torch.Tensor:
            return select_output(functional_call(net, values, args, kwargs, strict=False), output)

        def state_fn(net: nn.Module) -> Callable[..., torch.Tensor]:
            def fn(*tensors: torch.Tensor) -> torch.Tensor:
                return call(net, {**fixed, **buffers, **dict(zip(names, tensors))})

            return fn

        ruled, self.rules = _rules.substitute(module) if rules is not False else (None, [])
        ruled_fn = None if ruled is None else state_fn(ruled)
        if rules is True and ruled_fn is None:
            raise ValueError(f"rules=True: no submodule of this {type(model).__name__} has a rule (see ntkscope.operators.rules for the supported modules)")
        ghost_net = module if ruled is None else ruled

        def ghost_norms(primals: Sequence[torch.Tensor], every: bool = False) -> GhostNorms | None:
            g = build_ghost(ghost_net, call, names, primals, {**fixed, **buffers}, every=every)  # fixed as _first_forward left it
            if g is not None and chunk_size is None:  # a probe keeps Δ, not the ghosted layers' gradients
                g.chunk_size = self._default_chunk(ruled_fn or self._fn_raw, rules=ruled_fn is not None, width=g.probe_numel)
            return g

        self._init_function(
            state_fn(module), primals, chunk_size, jvp_path, vjp_path, what=type(model).__name__, ruled_fn=ruled_fn, fixed=fixed,
            ghost=ghost_norms if rules is not False and ghost else None,
        )

    @classmethod
    def from_function(
        cls,
        fn: Callable[[dict[str, torch.Tensor], Any], Any],
        params: Mapping[str, torch.Tensor] | nn.Module,
        inputs: Any,
        *,
        output: int | str | Callable[[Any], torch.Tensor] | None = None,
        chunk_size: int | None = None,
        jvp_path: str | None = None,
        vjp_path: str | None = None,
        ruled: tuple[Callable[[dict[str, torch.Tensor], Any], Any], list[str]] | None = None,
    ) -> NTK:
        """The NTK of a plain function ``fn(params_dict, inputs) -> state``.

        ``ruled``: optionally ``(fn_with_rules, ruled_submodule_names)``, the same function
        evaluated on modules with :mod:`ntkscope.operators.rules` substituted (see :func:`ntkscope.operators.rules.substitute`).
        """
        if isinstance(params, nn.Module):
            params = {n: p for n, p in params.named_parameters() if p.requires_grad}
        if not isinstance(params, Mapping):
            raise TypeError("params must be a dict name -> tensor (or an nn.Module)")
        if len(params) == 0:
            raise ValueError("no trainable parameters: params is empty")
        for n, p in params.items():
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"parameter {n!r} must be a floating-point tensor")
        self = cls.__new__(cls)
        self.model = None
        self.inputs = inputs = detached(inputs)
        self.output = output
        names = list(params)
        self.param_names = names

        def f(*tensors: torch.Tensor) -> torch.Tensor:
            return select_output(fn(dict(zip(names, tensors)), inputs), output)

        self.rules = list(ruled[1]) if ruled is not None else []
        f_ruled = None
        if ruled is not None:
            fn_r = ruled[0]

            def f_ruled(*tensors: torch.Tensor) -> torch.Tensor:
                return select_output(fn_r(dict(zip(names, tensors)), inputs), output)

        self._init_function(f, [params[n].detach() for n in names], chunk_size, jvp_path, vjp_path, what="function", ruled_fn=f_ruled)
        return self

    @staticmethod
    def from_jacobian(J: torch.Tensor) -> FactoredKernel:
        """The kernel ``J Jᵀ`` of an explicit ``D × P`` Jacobian (tests, toy kernels)."""
        return _DenseFactor(J)

    # -- set-up -------------------------------------------------------------------------------

    def _init_function(
        self,
        fn: Callable[..., torch.Tensor],
        primals: Sequence[torch.Tensor],
        chunk_size: int | None,
        jvp_path: str | None,
        vjp_path: str | None,
        what: str,
        ruled_fn: Callable[..., torch.Tensor] | None = None,
        fixed: dict[str, torch.Tensor] | None = None,
        ghost: Callable[..., GhostNorms | None] | None = None,
    ) -> None:
        self._fn_raw = fn
        self.primals = tuple(primals)
        self.param_shapes = [p.shape for p in self.primals]
        self.param_numels = [p.numel() for p in self.primals]
        num_params = sum(self.param_numels)
        if num_params == 0:
            raise ValueError("no trainable parameters: every selected parameter is empty")
        dtypes = {p.dtype for p in self.primals}
        complex_ = [n for n, p in zip(self.param_names, self.primals) if p.is_complex()]
        if complex_:
            raise TypeError(
                f"complex parameters {complex_[:4]} are not supported: the NTK is over real parameters (store them as real "
                "tensors, e.g. torch.view_as_complex(self.w) in forward with w of shape (..., 2)); complex intermediates are fine"
            )
        if len(dtypes) > 1:
            raise ValueError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; cast the model to one dtype")
        check_finite_inputs(self.inputs)
        empty = [tuple(t.shape) for t in tensors(self.inputs) if t.numel() == 0]
        if empty:
            raise ValueError(f"inputs are empty (a tensor of shape {empty[0]}): the NTK needs at least one input")
        # fork_rng: a random model must not advance the user's (CPU) random stream
        with torch.no_grad(), quiet(), torch.random.fork_rng(devices=[]):
            z = self._first_forward(fn, what, {} if fixed is None else fixed)
            if not isinstance(z, torch.Tensor) or not z.is_floating_point():
                got = f"a tensor of dtype {z.dtype}" if isinstance(z, torch.Tensor) else f"a {type(z).__name__}"
                raise TypeError(f"the state must be a floating-point tensor, got {got}: choose it with output=")
            if not torch.isfinite(z).all():
                raise ValueError(f"{what} produced non-finite outputs (nan or inf) on the given inputs")
            # A random forward (functional dropout, noise injection) has no NTK.  vmap catches it
            # only where the forward runs inside vmap (not on the VJP path), so compare two runs.
            if z.numel() == 0:
                raise ValueError(f"the state is empty (shape {tuple(z.shape)}): the NTK needs at least one output")
            z2 = fn(*self.primals)
            scale = float(z.abs().max())
            if not (isinstance(z2, torch.Tensor) and z2.shape == z.shape and torch.allclose(z2, z, rtol=1e-4, atol=1e-6 * scale)):
                raise ValueError(
                    f"{what} is random or stateful: two forward passes on the same inputs differ (e.g. dropout in "
                    "training mode, or the power iteration of torch.nn.utils.spectral_norm), so its NTK is not defined: "
                    "call model.eval() or remove the randomness first"
                )
        self.state_shape = tuple(z.shape)
        self.state = z.detach()
        super().__init__(z.numel(), self.primals[0].dtype, z.device)
        if z.dtype != self.dtype:
            raise ValueError(f"state dtype {z.dtype} differs from parameter dtype {self.dtype}")
        self.num_params = num_params
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._saved_numel: dict[bool, tuple[int, int, int]] = {}  # per rules flag: one measuring forward
        generic_chunk = chunk_size or self._default_chunk(self._fn_raw)
        ruled_chunk = None if ruled_fn is None else chunk_size or self._default_chunk(ruled_fn, rules=True)
        self._chunk_size = ruled_chunk or generic_chunk
        flat_ruled = None if ruled_fn is None else (lambda *t: ruled_fn(*t).reshape(-1))
        self._evaluator = Evaluator(
            self._f, self.primals, flat_ruled, self.dim, generic_chunk, jvp_path, vjp_path, ruled_chunk_size=ruled_chunk, ghost=ghost
        )
        self._pass_seconds: dict[str, float] = {}
        self._example_ids_cache: dict[int, torch.Tensor] = {}

    def _first_forward(self, fn: Callable[..., torch.Tensor], what: str, fixed: dict[str, torch.Tensor]) -> torch.Tensor:
        """``fn(*primals)``, refusing writes into the user's tensors: the primals and ``fixed`` are
        detached views of them.  A parameter the forward writes in place (``nn.Embedding(max_norm=)``
        renormalises its rows) is replaced by a copy of its own, here and for every later pass."""
        copied: set[str] = set()
        inputs = {f"input tensor {i}": t for i, t in enumerate(tensors(self.inputs))}
        while True:
            watched = {n: t for n, t in (*zip(self.param_names, self.primals), *fixed.items()) if n not in copied}
            try:
                with RefuseWrites({**inputs, **watched}):
                    return fn(*self.primals)
            except OutputError:
                raise
            except ParameterWrite as w:
                if w.name in inputs:  # torch.func refuses it in every pass, after it changed the user's tensor
                    raise ValueError(
                        f"{what} writes into its {w.name} in place (e.g. x.mul_(), x += ..., ReLU(inplace=True) on an "
                        "input): torch.func cannot differentiate that, and it would change your tensor; clone the input "
                        "in forward (x = x.clone()) or use an out-of-place op"
                    ) from None
                copied.add(w.name)
                if w.name in fixed:
                    fixed[w.name] = fixed[w.name].clone()
                else:
                    i = list(self.param_names).index(w.name)
                    self.primals = (*self.primals[:i], self.primals[i].clone(), *self.primals[i + 1 :])
            except Exception as e:  # the user's model rejected the inputs
                raise ValueError(f"{what} failed on the given inputs ({describe_inputs(self.inputs)}): {e}") from e

    @property  # type: ignore[override]
    def chunk_size(self) -> int:
        """Probes per vectorised batch (of the rules' paths where rules apply).  Setting it sets
        the batch of every path, so a planned chunk (``transformer_ntk``) is the one that runs."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {value!r}")
        self._chunk_size = value
        self._evaluator.chunk_size = self._evaluator.ruled_chunk_size = value
        self._evaluator.ghost_chunk_size = value

    def _default_chunk(self, fn: Callable[..., torch.Tensor], rules: bool = False, width: int | None = None) -> int:
        """Probes per vmap batch so that their working set fits the memory budget.

        A vmapped pass keeps, per probe, its input and output vectors (D + P numbers) and a
        tangent or cotangent for every intermediate the forward saves for backward (often far
        more than D for convolutional or recurrent models); the intermediates are measured once
        with ``saved_tensors_hooks`` on one forward.  With rules, the rules' own per-probe blocks
        (which they report) count instead of the saved activations of the modules they replace.
        The same chunk serves both modes.  Budget: :func:`chunk_budget_bytes`; on the CPU the
        probe and result blocks (chunk × P and chunk × D) and a convolution's unfolded inputs
        (chunk × the largest ``largest_unfold``) also stay within :func:`reusable_block_bytes`,
        so that the allocator reuses them from chunk to chunk (the MLP's 66 MB blocks at 256
        probes ran 1.3× slower than 33 MB ones at 128; the benchmark CNN, whose 147k-number
        unfolded input made 150 MB blocks at 256 probes, ran 1.3–1.6× slower than at 64).
        """
        if rules not in self._saved_numel:  # fn is the function as written (rules=False) or with rules
            self._saved_numel[rules] = _saved_probe_numel(fn, self.primals, rules)
        saved, cap, unfold = self._saved_numel[rules]
        width = self.num_params if width is None else width  # numbers of one probe's result
        per_probe = self.dtype.itemsize * (self.dim + width + saved) * 2
        chunk = min(_MAX_AUTO_CHUNK, cap, chunk_budget_bytes(self.device) // per_probe)
        if self.device.type == "cpu":
            reuse = reusable_block_bytes() // (self.dtype.itemsize * max(self.dim, width, unfold))
            chunk = min(chunk, max(8, 1 << max(0, reuse.bit_length() - 1)) if reuse < chunk else chunk)
        return max(1, chunk)

    def _f(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._fn_raw(*tensors).reshape(-1)

    # -- passes -------------------------------------------------------------------------------

    @property
    def paths(self) -> dict[str, str | None]:
        """The evaluation path each AD mode took (None: not used yet); ``+rules`` marks the
        per-module rules (:attr:`rules` lists the submodules they cover)."""
        out = {k: p.name if p else None for k, p in self._evaluator.paths.items()}
        if self._evaluator.ghost_ok:
            out["vjp-norms"] = self._evaluator.ghost_path
        axis = self._example_axis()
        if self._evaluator.blocks_ok and axis is not None:
            out["vjp-trace"] = f"per-example blocks ({self.state_shape[axis]} over state axis {axis})"
        return out

    @property
    def ghosted(self) -> list[str]:
        """The linear layers whose share of ``‖Jᵀv‖²`` is computed as a ghost norm
        (:mod:`ntkscope.operators.ghost`), once the VJP side's squared norms have run."""
        g = self._evaluator.ghost
        return list(g.names_ghosted) if g is not None and self._evaluator.ghost_ok else []

    @property
    def _broken(self) -> dict[str, Exception]:
        return self._evaluator.broken

    def sqnorms(self, side: str, X: torch.Tensor) -> torch.Tensor:
        """Per-column ``‖Jᵀx‖²`` / ``‖Jx‖²`` (float64), reduced chunk by chunk: the ``(P or D) × m``
        block is never held whole."""
        if side not in ("jvp", "vjp"):
            raise ValueError(f"side must be 'jvp' or 'vjp', got {side!r}")
        n = self.num_params if side == "jvp" else self.dim
        X, _ = _as_block(X, n, "‖J·U‖²" if side == "jvp" else "‖Jᵀ·V‖²")
        rows = X.to(device=self.device, dtype=self.dtype).T.contiguous()
        out = self._evaluator.sqnorms(side, rows)
        if side == "jvp":
            self.jvp_count += X.shape[1]
        else:
            self.vjp_count += X.shape[1]
        return out

    def _example_axis(self) -> int | None:
        """The state axis of the examples: ``"batch"`` where the axes are named, else the first."""
        axes = tuple(getattr(self, "axes", ()))
        axis = axes.index("batch") if "batch" in axes else 0
        return axis if len(self.state_shape) > axis and self.state_shape[axis] > 1 else None

    def trace_blocks(self) -> int | None:
        """``R = D / G`` where the one-sided VJP trace separates over the ``G`` examples of the
        state (its ``"batch"`` axis, else its first): ``tr K = Σ_b tr K_bb``, sampled as
        ``Σ_b ‖J_bᵀv_b‖²`` and exact in ``R`` VJP passes.  That needs every analysed parameter
        in a ghosted linear layer, a LayerNorm/RMSNorm or an embedding (:mod:`ntkscope.operators.ghost`), a model that keeps the
        examples apart (no train-mode BatchNorm, no attention over the batch), both checked by
        uncounted probes (again when the values of the parameters or inputs change), and no example with more
        rows into a layer than it has inputs; None otherwise."""
        axis = self._example_axis()
        if axis is None or self._evaluator.blocks_ruled_out:
            return None
        G = self.state_shape[axis]
        found = self._evaluator.find_blocks(self._example_ids(axis), G, (axis, self.state_shape), tensors(self.inputs))
        return self.dim // G if found else None

    def _example_ids(self, axis: int) -> torch.Tensor:
        """Each state entry's example (flat order), kept per axis."""
        if axis not in self._example_ids_cache:
            shape = self.state_shape
            ids = torch.arange(shape[axis], device=self.device).reshape([-1 if i == axis else 1 for i in range(len(shape))])
            self._example_ids_cache[axis] = ids.expand(shape).reshape(-1)
        return self._example_ids_cache[axis]

    def block_sqnorms(self, X: torch.Tensor) -> torch.Tensor:
        if self.trace_blocks() is None:
            raise RuntimeError(self.NO_BLOCKS)
        X, _ = _as_block(X, self.dim, "Σ_b ‖J_bᵀ·V_b‖²")
        out = self._evaluator.block_sqnorms(X.to(device=self.device, dtype=self.dtype).T.contiguous())
        if out is None:
            raise RuntimeError("the per-example ghost norms failed on these probes")
        self.vjp_count += X.shape[1]
        return out

    def block_basis(self, start: int, stop: int) -> torch.Tensor:
        axis = self._example_axis()
        if self.trace_blocks() is None or axis is None:
            raise RuntimeError(self.NO_BLOCKS)
        return self._block_basis(axis, start, stop)

    def gram_rows(self, side: str, X: torch.Tensor) -> torch.Tensor:
        """Rows with the inner products of ``JᵀX``'s columns (or ``JX``'s): on the VJP side,
        ghosted linear layers contribute ``A^½Δ`` (``N · out`` numbers) instead of their
        gradients (``(in + 1) · out``; :mod:`ntkscope.operators.ghost`).  For Gram-based
        statistics only: the rows are not ``Jᵀx`` where a layer is ghosted."""
        if side != "vjp" or self._evaluator.ghost_norms() is None:
            return super().gram_rows(side, X)
        X, _ = _as_block(X, self.dim, "Jᵀ·V")
        out = self._evaluator.gram_rows("vjp", X.to(device=self.device, dtype=self.dtype).T.contiguous())
        self.vjp_count += X.shape[1]
        return out

    def gram_width(self, side: str) -> int:
        g = self._evaluator.ghost_norms() if side == "vjp" and self._evaluator.ghost_checked.get("gram_rows") is not False else None
        return super().gram_width(side) if g is None else g.probe_numel

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        return self._evaluator.run("vjp", V.T.contiguous()).T

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        return self._evaluator.run("jvp", U.T.contiguous()).T

    def modes(self) -> dict[str, bool]:
        """Which AD modes work (and by which path, :attr:`paths`), found by one pass each
        (counted) the first time."""
        out = {}
        for mode in ("jvp", "vjp"):
            if self._evaluator.paths[mode] is None and mode not in self._broken:
                n = self.num_params if mode == "jvp" else self.dim
                try:
                    (self.jvp if mode == "jvp" else self.vjp)(torch.ones(n, 1, dtype=self.dtype, device=self.device))
                except RuntimeError:
                    pass
            out[mode] = mode not in self._broken
        return out

    times_passes = True

    def pass_seconds(self, mode: str, probes: int = 4) -> float:
        """Measured seconds per AD pass in ``mode`` (cached; costs ``probes`` passes once)."""
        if mode not in self._pass_seconds:
            n = self.num_params if mode == "jvp" else self.dim
            x = torch.ones(n, min(probes, self.chunk_size), dtype=self.dtype, device=self.device)
            op = self.jvp if mode == "jvp" else self.vjp
            op(x[:, :1])  # warm-up, and path selection
            t0 = time.perf_counter()
            op(x)
            self._pass_seconds[mode] = (time.perf_counter() - t0) / x.shape[1]
        return self._pass_seconds[mode]

    def same_inputs(self, other: FactoredKernel) -> bool | None:
        if not isinstance(other, NTK):
            return None
        return inputs_equal(self.inputs, other.inputs)

    def describe(self) -> str:
        return (
            f"NTK(D={self.dim} state {self.state_shape}, P={self.num_params}, dtype={self.dtype}, "
            f"chunk_size={self.chunk_size}, paths={self.paths}" + (f", ghosted={self.ghosted}" if self.ghosted else "") + ")"
        )


def _saved_probe_numel(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], rules: bool = False) -> tuple[int, int, int]:
    """Numbers one probe's pass carries through the activations of ``fn``, a cap on the probes
    per chunk, and the numbers of the largest unfolded convolution input (see
    :func:`~ntkscope.operators.modules.saved_activations`); with ``rules``, the per-probe
    working set and the cap the rules report are included (:mod:`ntkscope.operators.rules`)."""
    try:
        with _rules.measure_probe_numel() as ruled:
            saved = saved_activations(fn, primals)
    except Exception:  # a measurement only: fall back to D + P
        return 0, _MAX_AUTO_CHUNK, 0
    if not rules:
        return saved.numel, _MAX_AUTO_CHUNK, saved.largest_unfold
    return saved.numel + ruled[0], ruled[1], saved.largest_unfold
