"""Linear operators: how to multiply by J, Jᵀ and K = J Jᵀ without forming any of them.

* :class:`KernelOperator` is the small base every estimator talks to: a square, symmetric
  operator that multiplies a block of column vectors (``matmat``) and counts its products.
* :class:`FactoredKernel` adds the factor: ``jvp`` (J·, P→D) and ``vjp`` (Jᵀ·, D→P), which the
  one-sided estimators need.  :class:`~ntkscope.NTK` (:mod:`ntkscope.operators.ntk`) is the
  factored kernel of a PyTorch model.
* :class:`ParameterKernel` is ``G = JᵀJ``, the parameter-space kernel (same nonzero spectrum
  as K); :func:`smaller_kernel` picks the smaller of K and G.  ("Gram" is kept for the probe
  Grams, the m × m matrices of probe products the estimators average.)
* :func:`as_operator` adapts a dense tensor, a ``scipy.sparse.linalg.LinearOperator`` or a
  callable to :class:`KernelOperator` so the two-sided estimators accept any of them.

Blocks are columns throughout: ``vjp`` takes ``(D, m)`` and returns ``(P, m)``; ``jvp`` takes
``(P, m)`` and returns ``(D, m)``; one column is one AD pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


class KernelOperator:
    """A symmetric ``n × n`` operator that multiplies blocks of vectors.

    Subclasses implement :meth:`_matmat`.  ``matvec_count`` counts columns multiplied;
    ``jvp_count``/``vjp_count`` count AD passes (zero for operators that are not NTKs).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    #: Probes pushed through one product when an estimator evaluates a block.
    chunk_size: int = 64

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        #: The operator this one wraps (a cache or a restriction of it), else itself.
        self.base: KernelOperator = self
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

    @property
    def paths(self) -> dict[str, str | None] | None:
        """The evaluation path each AD mode took, for kernels that choose one (None otherwise)."""
        return None

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

    def gram_rows(self, side: str, X: torch.Tensor) -> torch.Tensor:
        """Rows ``e_i`` whose inner products are those of the one-sided products:
        ``e_i · e_j = (Jᵀx_i)·(Jᵀx_j)`` (or ``(Jx_i)·(Jx_j)``), for Gram-based statistics only.
        Here the products themselves, ``(m, P or D)``; subclasses may return a shorter isometric
        image (:mod:`ntkscope.operators.ghost`).  Counted as passes like :meth:`vjp`/:meth:`jvp`."""
        return (self.vjp(X) if side == "vjp" else self.jvp(X)).T

    def gram_width(self, side: str) -> int:
        """Numbers per row of :meth:`gram_rows` (what a stored probe costs)."""
        return self.num_params if side == "vjp" else self.dim

    #: Raised by :meth:`block_sqnorms` and :meth:`block_basis` where :meth:`trace_blocks` is None.
    NO_BLOCKS = "this kernel's trace does not separate over per-example blocks (trace_blocks() is None)"

    def trace_blocks(self) -> int | None:
        """``R`` where the VJP side's one-sided trace separates over ``G = D / R`` diagonal blocks
        of K, one per example: ``tr K = Σ_b tr K_bb`` with the samples of :meth:`block_sqnorms`,
        and exact in ``R`` passes from :meth:`block_basis`.  None (here): not known to."""
        return None

    def block_sqnorms(self, X: torch.Tensor) -> torch.Tensor:
        """Per-column ``Σ_b ‖J_bᵀx_b‖²`` (float64) over the blocks of :meth:`trace_blocks`, counted
        as VJP passes; raises ``RuntimeError`` where they cannot be had."""
        raise RuntimeError(self.NO_BLOCKS)

    def block_basis(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start … stop−1`` of the ``R`` probes that hold a 1 at the same position of
        every block of :meth:`trace_blocks`: ``Σ`` of their :meth:`block_sqnorms` is ``tr K``."""
        raise RuntimeError(self.NO_BLOCKS)

    def _block_basis(self, axis: int, start: int, stop: int) -> torch.Tensor:
        """:meth:`block_basis` for blocks along state axis ``axis`` (``state_shape``)."""
        shape = tuple(getattr(self, "state_shape", (self.dim,)))
        entries = torch.arange(self.dim, device=self.device).reshape(shape).movedim(axis, -1).reshape(-1, shape[axis])
        E = torch.zeros(self.dim, stop - start, dtype=self.dtype, device=self.device)
        E[entries[start:stop].T, torch.arange(stop - start, device=self.device)] = 1
        return E

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.jvp(self.vjp(V))

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def modes(self) -> dict[str, bool]:
        """Which AD modes work (``{"jvp": bool, "vjp": bool}``)."""
        return {"jvp": True, "vjp": True}

    #: Whether this kernel runs AD passes of its own: :meth:`modes` spends a check pass per mode
    #: (once; ``auto`` counts them in its budget) and :meth:`pass_seconds` times a few.
    times_passes: bool = False

    def pass_seconds(self, mode: str, probes: int = 4) -> float | None:
        """Measured seconds per AD pass in ``mode`` (None: this kernel does not time its passes)."""
        return None

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


class ParameterKernel(KernelOperator):
    """The parameter-space kernel ``G = JᵀJ`` (``P × P``) of a factored kernel ``K = J Jᵀ`` (``D × D``).

    G and K share their nonzero eigenvalues, hence trace, Frobenius norm, effective rank and
    spectrum; a G-product costs the same JVP + VJP as a K-product.  Two-sided estimators run on
    the smaller of the two (:func:`smaller_kernel`), so their probe-space algebra (QR,
    projections, probe Gram rows) scales with ``min(D, P)`` — for a recurrent hidden state, D ≫ P.
    """

    def __init__(self, factor: FactoredKernel) -> None:
        super().__init__(factor.num_params, factor.dtype, factor.device)
        self.factor = factor
        self.chunk_size = factor.chunk_size

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        self.factor.matvec_count += U.shape[1]
        return self.factor.vjp(self.factor.jvp(U))


def smaller_kernel(op: KernelOperator) -> KernelOperator:
    """The smaller of K and G: :class:`ParameterKernel` ``G = JᵀJ`` when a factored kernel has
    fewer parameters than state entries, else ``op``."""
    if isinstance(op, FactoredKernel) and op.num_params < op.dim:
        return ParameterKernel(op)
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



class _DenseFactor(FactoredKernel):
    def __init__(self, J: torch.Tensor) -> None:
        if not isinstance(J, torch.Tensor):
            raise TypeError(f"a Jacobian must be a torch.Tensor (D, P), got {type(J).__name__}")
        if J.dim() != 2 or J.numel() == 0:
            raise ValueError(f"a Jacobian must be a non-empty matrix (D, P), got shape {tuple(J.shape)}")
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


