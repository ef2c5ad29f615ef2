"""Linear operators: how to multiply by J, Jᵀ and K = J Jᵀ without forming any of them.

* :class:`KernelOperator` is the small base every estimator talks to: a square, symmetric
  operator that multiplies a block of column vectors (``matmat``) and counts its products.
* :class:`FactoredKernel` adds the factor: ``jvp`` (J·, P→D) and ``vjp`` (Jᵀ·, D→P), which the
  one-sided estimators need.  :class:`NTK` is the factored kernel of a PyTorch model, evaluated
  with ``torch.func``; :meth:`NTK.from_jacobian` wraps a dense J.
* :func:`as_operator` adapts a dense tensor, a ``scipy.sparse.linalg.LinearOperator`` or a
  callable to :class:`KernelOperator` so the two-sided estimators accept any of them.

Blocks are columns throughout: ``vjp`` takes ``(D, m)`` and returns ``(P, m)``; ``jvp`` takes
``(P, m)`` and returns ``(D, m)``; one column is one AD pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import rules as _rules
from .evaluators import JVP_PATHS, VJP_PATHS, Evaluator, Path, quiet, sqnorms

__all__ = [
    "KernelOperator",
    "FactoredKernel",
    "NTK",
    "DenseOperator",
    "CallableOperator",
    "as_operator",
    "GramOperator",
    "smaller_kernel",
]

# Per chunk of probes we keep at most this many bytes alive (see chunk_budget_bytes), and never
# more probes than this: beyond it, larger GEMMs gain nothing and the per-step blocks of the
# recurrences fall out of cache.
_CHUNK_BYTES = 512 * 2**20
_MAX_AUTO_CHUNK = 256


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def chunk_budget_bytes(device: torch.device) -> int:
    """Memory one chunk of probes may use: ``_CHUNK_BYTES``, or less where the device has less
    than 8× that free (a sixteenth of free memory, at least 32 MiB)."""
    free = available_bytes(device)
    if free is None or free >= 8 * _CHUNK_BYTES:
        return _CHUNK_BYTES
    return max(32 * 2**20, free // 16)


class KernelOperator:
    """A symmetric ``n × n`` operator that multiplies blocks of vectors.

    Subclasses implement :meth:`_matmat`.  ``matvec_count`` counts columns multiplied;
    ``jvp_count``/``vjp_count`` count AD passes (zero for operators that are not NTKs).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.matvec_count = 0
        self.jvp_count = 0
        self.vjp_count = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def counts(self) -> tuple[int, int, int]:
        """``(jvp passes, vjp passes, matvecs)`` so far."""
        return (self.jvp_count, self.vjp_count, self.matvec_count)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``K V`` for a ``(dim, m)`` block (or a ``(dim,)`` vector)."""
        V, vec = _as_block(V, self.dim, "K·V")
        out = self._matmat(V.to(device=self.device, dtype=self.dtype))
        self.matvec_count += V.shape[1]
        return out[:, 0] if vec else out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.matmat(V)

    def describe(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype})"

    def __repr__(self) -> str:
        return self.describe()


class FactoredKernel(KernelOperator):
    """K = J Jᵀ given by its factor J (``D × P``): one-sided estimators work on these."""

    num_params: int

    def jvp(self, U: torch.Tensor) -> torch.Tensor:
        """``J U`` for a ``(P, m)`` block: m forward-mode passes."""
        U, vec = _as_block(U, self.num_params, "J·U")
        out = self._jvp(U.to(device=self.device, dtype=self.dtype))
        self.jvp_count += U.shape[1]
        return out[:, 0] if vec else out

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``Jᵀ V`` for a ``(D, m)`` block: m reverse-mode passes."""
        V, vec = _as_block(V, self.dim, "Jᵀ·V")
        out = self._vjp(V.to(device=self.device, dtype=self.dtype))
        self.vjp_count += V.shape[1]
        return out[:, 0] if vec else out

    def sqnorms(self, side: str, X: torch.Tensor) -> torch.Tensor:
        """Per-column ``‖Jᵀx‖²`` (side ``"vjp"``) or ``‖Jx‖²`` (``"jvp"``) in float64: the
        one-sided trace samples, counted as passes like :meth:`vjp`/:meth:`jvp`.  Subclasses may
        compute them without writing the output block."""
        A = self.vjp(X) if side == "vjp" else self.jvp(X)
        return A.to(torch.float64).square().sum(0)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.jvp(self.vjp(V))

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def modes(self) -> dict[str, bool]:
        """Which AD modes work (``{"jvp": bool, "vjp": bool}``)."""
        return {"jvp": True, "vjp": True}

    def same_inputs(self, other: FactoredKernel) -> bool | None:
        """Whether two kernels are over the same inputs (None: cannot tell)."""
        return None


def _as_block(V: torch.Tensor, dim: int, what: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(V).__name__}")
    vec = V.dim() == 1
    if vec:
        V = V[:, None]
    if V.dim() != 2 or V.shape[0] != dim:
        raise ValueError(f"{what}: expected shape ({dim},) or ({dim}, m), got {tuple(V.shape)}")
    return V, vec


class GramOperator(KernelOperator):
    """``G = JᵀJ`` (``P × P``) of a factored kernel ``K = J Jᵀ`` (``D × D``).

    G and K share their nonzero eigenvalues, hence trace, Frobenius norm, effective rank and
    spectrum; a G-product costs the same JVP + VJP as a K-product.  Two-sided estimators run on
    the smaller of the two, so their probe-space algebra (QR, projections, Gram rows) scales
    with ``min(D, P)`` — for a recurrent hidden state, D ≫ P.
    """

    def __init__(self, factor: FactoredKernel) -> None:
        super().__init__(factor.num_params, factor.dtype, factor.device)
        self.factor = factor
        self.chunk_size = int(getattr(factor, "chunk_size", 64))

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        self.factor.matvec_count += U.shape[1]
        return self.factor.vjp(self.factor.jvp(U))


def smaller_kernel(op: KernelOperator) -> KernelOperator:
    """``G = JᵀJ`` when a factored kernel has fewer parameters than state entries, else ``op``."""
    if isinstance(op, FactoredKernel) and op.num_params < op.dim:
        return GramOperator(op)
    return op


# --------------------------------------------------------------------------------------------
# Generic operators


class DenseOperator(KernelOperator):
    """A dense symmetric matrix as an operator (tests, small kernels, precomputed K)."""

    def __init__(self, K: torch.Tensor) -> None:
        if K.dim() != 2 or K.shape[0] != K.shape[1]:
            raise ValueError(f"a kernel must be a square matrix, got shape {tuple(K.shape)}")
        if not K.is_floating_point():
            K = K.to(torch.get_default_dtype())
        super().__init__(K.shape[0], K.dtype, K.device)
        self.K = K.detach()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.K @ V


class CallableOperator(KernelOperator):
    """Wraps ``fn(V) -> K V`` on ``(dim, m)`` blocks."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dim, dtype, device)
        self.fn = fn

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.fn(V)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        out = out.to(device=self.device, dtype=self.dtype)
        if out.dim() == 1:
            out = out[:, None]
        if out.shape != V.shape:
            raise ValueError(f"operator returned shape {tuple(out.shape)} for input {tuple(V.shape)}")
        return out


class _ScipyOperator(CallableOperator):
    def __init__(self, op: Any) -> None:
        import numpy as np

        n, n2 = op.shape
        if n != n2:
            raise ValueError(f"a kernel must be square, got shape {op.shape}")
        dtype = torch.from_numpy(np.zeros(0, dtype=op.dtype)).dtype if op.dtype is not None else torch.float64

        def fn(V: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(np.asarray(op.matmat(V.cpu().numpy())))

        super().__init__(fn, n, dtype)


def as_operator(K: Any, dim: int | None = None) -> KernelOperator:
    """Adapt ``K`` to :class:`KernelOperator`.

    Accepts a :class:`KernelOperator` (returned as is), a square tensor or array, a
    ``scipy.sparse.linalg.LinearOperator`` (or anything with ``matmat`` and ``shape``), or a
    callable ``V -> K V`` on ``(dim, m)`` blocks (then ``dim`` is required).
    """
    if isinstance(K, KernelOperator):
        return K
    if isinstance(K, torch.Tensor):
        return DenseOperator(K)
    if hasattr(K, "matmat") and hasattr(K, "shape"):
        return _ScipyOperator(K)
    if hasattr(K, "__array__"):
        return DenseOperator(torch.as_tensor(K))
    if callable(K):
        if dim is None:
            raise ValueError("a callable operator needs its dimension: as_operator(fn, dim=n)")
        return CallableOperator(K, dim)
    raise TypeError(
        f"cannot use {type(K).__name__} as a kernel: pass an ntkscope.NTK, a square tensor, a "
        "scipy LinearOperator or a callable V -> K V"
    )


# --------------------------------------------------------------------------------------------
# The NTK of a PyTorch model


# the evaluation paths, re-exported under their historical private names
_Path = Path
_JVP_PATHS = JVP_PATHS
_VJP_PATHS = VJP_PATHS
_quiet = quiet


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
        chunk_size: probes per vectorised batch; bounds memory.  Default: from D, P and dtype.
        jvp_path / vjp_path: force an evaluation path (see :attr:`paths`); default tries the
            fastest and falls back when a path fails (no forward-mode rule, ``vmap`` unsupported,
            oneDNN's LSTM forward-mode gap).
        rules: ``None`` (default) evaluates the submodules that have a batched-probe rule
            (the recurrent layers and cells; see :mod:`ntkscope.rules`) with it,
            wherever they sit in the model, after checking each mode once against the generic
            path; ``False`` never does; ``True`` requires some rule to apply.  ``fast`` is the
            same switch under its former name.

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
        chunk_size: int | None = None,
        jvp_path: str | None = None,
        vjp_path: str | None = None,
        rules: bool | None = None,
        fast: bool | None = None,
    ) -> None:
        if rules is None:
            rules = fast
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}; use NTK.from_function for functions")
        _check_no_dropout(model)
        self.model = model
        self.inputs = inputs
        self.output = output
        names, primals, fixed = _select_params(model, params)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        module = _rules.analysis_copy(_analysis_module(model))
        args, kwargs = _split_inputs(inputs)
        self.param_names = names

        def state_fn(net: nn.Module) -> Callable[..., torch.Tensor]:
            def fn(*tensors: torch.Tensor) -> torch.Tensor:
                values = dict(fixed)
                values.update(zip(names, tensors))
                values.update(buffers)
                return _select_output(functional_call(net, values, args, kwargs, strict=False), output)

            return fn

        ruled, self.rules = _rules.substitute(module) if rules is not False else (None, [])
        ruled_fn = None if ruled is None else state_fn(ruled)
        if rules is True and ruled_fn is None:
            raise ValueError(f"rules=True: no submodule of this {type(model).__name__} has a rule (see ntkscope.rules for the supported modules)")
        self._init_function(state_fn(module), primals, chunk_size, jvp_path, vjp_path, what=type(model).__name__, ruled_fn=ruled_fn)

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
        evaluated on modules with :mod:`ntkscope.rules` substituted (see :func:`ntkscope.rules.substitute`).
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
        self.inputs = inputs
        self.output = output
        names = list(params)
        self.param_names = names

        def f(*tensors: torch.Tensor) -> torch.Tensor:
            return _select_output(fn(dict(zip(names, tensors)), inputs), output)

        self.rules = list(ruled[1]) if ruled is not None else []
        f_ruled = None
        if ruled is not None:
            fn_r = ruled[0]

            def f_ruled(*tensors: torch.Tensor) -> torch.Tensor:
                return _select_output(fn_r(dict(zip(names, tensors)), inputs), output)

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
    ) -> None:
        self._fn_raw = fn
        self.primals = tuple(primals)
        self.param_shapes = [p.shape for p in self.primals]
        self.param_numels = [p.numel() for p in self.primals]
        num_params = sum(self.param_numels)
        if num_params == 0:
            raise ValueError("no trainable parameters: every selected parameter is empty")
        dtypes = {p.dtype for p in self.primals}
        if len(dtypes) > 1:
            raise ValueError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; cast the model to one dtype")
        _check_finite_inputs(self.inputs)
        empty = [tuple(t.shape) for t in _tensors(self.inputs) if t.numel() == 0]
        if empty:
            raise ValueError(f"inputs are empty (a tensor of shape {empty[0]}): the NTK needs at least one input")
        # fork_rng: a random model must not advance the user's (CPU) random stream
        with torch.no_grad(), _quiet(), torch.random.fork_rng(devices=[]):
            try:
                z = fn(*self.primals)
            except Exception as e:  # the user's model rejected the inputs
                raise ValueError(f"{what} failed on the given inputs ({_describe_inputs(self.inputs)}): {e}") from e
            if not isinstance(z, torch.Tensor) or not z.is_floating_point():
                raise TypeError(f"the state must be a floating-point tensor, got {type(z).__name__}")
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
                    f"{what} is random: two forward passes on the same inputs differ (e.g. dropout in training "
                    "mode), so its NTK is not defined: call model.eval() or remove the randomness first"
                )
        self.state_shape = tuple(z.shape)
        self.state = z.detach()
        super().__init__(z.numel(), self.primals[0].dtype, z.device)
        if z.dtype != self.dtype:
            raise ValueError(f"state dtype {z.dtype} differs from parameter dtype {self.dtype}")
        self.num_params = num_params
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        generic_chunk = chunk_size or self._default_chunk(self._fn_raw)
        ruled_chunk = None if ruled_fn is None else chunk_size or self._default_chunk(ruled_fn, rules=True)
        #: probes per vectorised batch (of the rules' paths where rules apply)
        self.chunk_size = ruled_chunk or generic_chunk
        flat_ruled = None if ruled_fn is None else (lambda *t: ruled_fn(*t).reshape(-1))
        self._evaluator = Evaluator(self._f, self.primals, flat_ruled, self.dim, generic_chunk, jvp_path, vjp_path, ruled_chunk_size=ruled_chunk)
        self._pass_seconds: dict[str, float] = {}

    def _default_chunk(self, fn: Callable[..., torch.Tensor], rules: bool = False) -> int:
        """Probes per vmap batch so that their working set fits the memory budget.

        A vmapped pass keeps, per probe, its input and output vectors (D + P numbers) and a
        tangent or cotangent for every intermediate the forward saves for backward (often far
        more than D for convolutional or recurrent models); the intermediates are measured once
        with ``saved_tensors_hooks`` on one forward.  With rules, the rules' own per-probe blocks
        (which they report) count instead of the saved activations of the modules they replace.
        The same chunk serves both modes.  Budget: :func:`chunk_budget_bytes`.
        """
        saved, cap = _saved_numel(fn, self.primals, rules)
        per_probe = self.dtype.itemsize * (self.dim + self.num_params + saved) * 2
        return max(1, min(_MAX_AUTO_CHUNK, cap, chunk_budget_bytes(self.device) // per_probe))

    def _f(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._fn_raw(*tensors).reshape(-1)

    # -- passes -------------------------------------------------------------------------------

    @property
    def paths(self) -> dict[str, str | None]:
        """The evaluation path each AD mode took (None: not used yet); ``+rules`` marks the
        per-module rules (:attr:`rules` lists the submodules they cover)."""
        return {k: p.name if p else None for k, p in self._evaluator.paths.items()}

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
        out = self._evaluator.run(side, rows, reduce=sqnorms)
        if side == "jvp":
            self.jvp_count += X.shape[1]
        else:
            self.vjp_count += X.shape[1]
        return out

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        return self._evaluator.run("vjp", V.T.contiguous()).T

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        return self._evaluator.run("jvp", U.T.contiguous()).T

    def modes(self) -> dict[str, bool]:
        """Which AD modes work, found by one pass each (counted) the first time."""
        out = {}
        for mode in ("jvp", "vjp"):
            if self._evaluator.paths[mode] is None and mode not in self._broken:
                try:
                    self.pass_seconds(mode)
                except RuntimeError:
                    pass
            out[mode] = mode not in self._broken
        return out

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
        return _inputs_equal(self.inputs, other.inputs)

    def describe(self) -> str:
        return (
            f"NTK(D={self.dim} state {self.state_shape}, P={self.num_params}, dtype={self.dtype}, "
            f"chunk_size={self.chunk_size}, paths={self.paths})"
        )


class _DenseFactor(FactoredKernel):
    def __init__(self, J: torch.Tensor) -> None:
        if J.dim() != 2:
            raise ValueError(f"a Jacobian must be a matrix (D, P), got shape {tuple(J.shape)}")
        if not J.is_floating_point():
            J = J.to(torch.get_default_dtype())
        super().__init__(J.shape[0], J.dtype, J.device)
        self.J = J
        self.num_params = J.shape[1]
        self.state_shape: tuple[int, ...] = (J.shape[0],)

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        return self.J @ U

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        return self.J.T @ V


# --------------------------------------------------------------------------------------------
# helpers for NTK


def _saved_numel(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], rules: bool = False) -> tuple[int, int]:
    """Numbers the forward of ``fn`` saves for backward (activations), parameters excluded, and
    a cap on the probes per chunk; with ``rules``, plus the per-probe working set and the cap
    the rules report (:mod:`ntkscope.rules`)."""
    seen = {p.data_ptr() for p in primals}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # tensors without storage (e.g. some wrapper subclasses)
            return t
        if ptr not in seen:
            seen.add(ptr)
            total += t.numel()
        return t

    try:
        with torch.enable_grad(), _quiet(), torch.random.fork_rng(devices=[]), _rules.measure_probe_numel() as ruled:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(*(p.detach().requires_grad_() for p in primals))
    except Exception:  # a measurement only: fall back to D + P
        return 0, _MAX_AUTO_CHUNK
    if not rules:
        return total, _MAX_AUTO_CHUNK
    return total + ruled[0], ruled[1]


def _select_params(
    model: nn.Module, params: Mapping[str, torch.Tensor] | Iterable[str | torch.Tensor] | None
) -> tuple[list[str], list[torch.Tensor], dict[str, torch.Tensor]]:
    named = dict(model.named_parameters())  # tied parameters appear once
    overrides: dict[str, torch.Tensor] = {}
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif isinstance(params, Mapping):
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(named)[:8]}...")
        names = list(params)
        for n in names:
            v = params[n]
            if not isinstance(v, torch.Tensor) or v.shape != named[n].shape:
                raise ValueError(f"parameter {n!r}: expected a tensor of shape {tuple(named[n].shape)}")
            overrides[n] = v.detach()
    else:
        by_id = {id(p): n for n, p in named.items()}
        names = []
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"unknown parameter name {item!r}")
                names.append(item)
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                names.append(by_id[id(item)])
            else:
                raise ValueError("params must hold parameter names or the model's own parameters")
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); pass params= to choose some"
        )
    primals = [overrides.get(n, named[n].detach()) for n in names]
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    return names, primals, fixed


def _analysis_module(model: nn.Module) -> nn.Module:
    """The model itself, or a shallow copy whose train-mode norm layers keep no running stats.

    A train-mode BatchNorm normalises with batch statistics and updates its running stats in
    place; torch.func cannot trace the in-place update, and the user's buffers must not move.
    The copy shares every parameter and buffer tensor (no memory) and only rebinds attributes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    if not norms:
        return model
    clone = _rules.shared_copy(model)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.track_running_stats = False
    return clone


def _check_no_dropout(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(m).__name__}, p={m.p}) is random in training "
                "mode, so the NTK is not defined: call model.eval() (or set p=0) first"
            )
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase,)) and m.training and m.dropout > 0 and m.num_layers > 1:
            raise ValueError(f"{name or type(model).__name__}: recurrent dropout is active; call model.eval() first")


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _check_finite_inputs(inputs: Any) -> None:
    for t in _tensors(inputs):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError("inputs contain non-finite values (nan or inf)")


def _describe_inputs(inputs: Any) -> str:
    shapes = [tuple(t.shape) for t in _tensors(inputs)]
    return "input shapes " + ", ".join(map(str, shapes)) if shapes else f"inputs of type {type(inputs).__name__}"


def _inputs_equal(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    return all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta, tb))


def _select_output(out: Any, output: int | str | Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        raise ValueError(
            f"the model returned a {type(out).__name__}, not a tensor: pass output= (an index, a key or "
            "attribute name, or a callable) to choose the state, e.g. output=0 for the output sequence of nn.GRU"
        )
    if callable(output):
        return output(out)
    if isinstance(output, int):
        return out[output]
    if isinstance(out, Mapping):
        return out[output]
    return getattr(out, output)
