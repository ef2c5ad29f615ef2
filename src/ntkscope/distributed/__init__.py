"""Scale out on ``torch.distributed``: probe-parallel and data-parallel NTK estimation.

Two ways to spread the work over processes (launched by ``torchrun`` or
``torch.multiprocessing``; gloo on CPU, NCCL on GPUs), which combine on a 2-D grid of ranks:

**Probe-parallel** (:func:`probe_parallel`, :class:`ProbeParallel`).  Every estimator evaluates
its probes through :func:`ntkscope.estimators.map_probes` ("evaluate rows ``0..m-1`` chunk by
chunk").  The probe-parallel executor gives each rank a disjoint, contiguous range of probe
indices (aligned to the probe generator's blocks of :data:`~ntkscope.core.probes.BLOCK` columns once
``m`` is large enough), evaluates it locally and all-gathers the per-probe rows, so that every
rank holds exactly the tensor a single process would have computed.  Probe column ``j`` depends
only on ``(seed, stream, j)`` (:mod:`ntkscope.core.probes`), hence every rank returns the same
estimate, equal to the single-process one for the same seed and ``num_probes`` up to float
rounding, whatever the number of ranks.  Hutch++ and XTrace gather their sketch before the QR
step (it is a ``map_probes`` call like any other); the small dense algebra after a gather is
replicated.  When ``torch.distributed`` is initialised with more than one rank and no executor was
set explicitly, metrics run probe-parallel over the world automatically (see
:func:`default_executor`); :func:`local` turns that off.

**Data-parallel** (:class:`ShardedNTK`).  Inputs are sharded over the ranks of a *data group*;
each rank holds its shard's state ``z_r = f(θ, X_r)`` (``D_r`` numbers) and its Jacobian block
``J_r`` (``D_r × P``).  The kernel is that of all inputs, ``K = J Jᵀ`` with ``J = [J_1; …; J_N]``,
including the cross-shard blocks ``J_r J_sᵀ``.  Vectors in state space ``R^D`` are replicated
(probes are drawn over the global ``D``, so the same seed gives the same vectors as a single
process), and

* ``Jᵀ V = Σ_r J_rᵀ V_r``: each rank multiplies its slice ``V_r``, then an all-reduce (sum) of the
  ``P × m`` block;
* ``J U = [J_1 U; …; J_N U]``: each rank computes its rows locally, then an all-gather of the
  ``D_r × m`` blocks.

So ``K V = J (Jᵀ V)`` is the global kernel's product, and trace, Frobenius norm, effective rank
and alignment are of the kernel over *all* inputs.  The global state is the rank-major
concatenation of the flattened local states: it equals the single-process state (and the same
seed gives the same estimate) when the inputs are split along the state's leading axis (batch
first) and the model treats samples independently (no train-mode BatchNorm, no attention across
the batch).  Every metric is invariant to the order of state coordinates, so other layouts give
the same kernel quantities with different (equally valid) probes.

**Both at once** (:func:`grid`).  ``world = n_probe × n_data`` ranks: rank ``p·n_data + d`` holds
shard ``d`` in replica ``p``.  Ranks of one replica (a data group) evaluate the same probes
together; replicas split the probes (probe groups are the ranks holding the same shard).
Building a :class:`ShardedNTK` declares its layout: afterwards the implicit executor uses its
probe group (none when the data group is the whole world: pure data-parallel).

**Pass counts.**  ``Estimate.jvp_passes``/``vjp_passes`` are the job's totals: with
probe-parallel, the passes of every rank splitting the probes summed (the single-process count,
plus replicated work such as pilots and exact parts once per rank, and under ``rtol=`` the
products a rank recomputes because each round splits all its probes afresh: 20–30 % more than one
process in a measured 2-rank run); the rank's own share is in ``info["rank_passes"]``.  With data-parallel a pass is one pass over the rank's shard, counted
once per global probe like a single process.  :func:`job_passes` returns the totals.

**Failures.**  Errors while evaluating probes or shard passes are agreed on collectively: the
failing rank sends a failure flag in the same collective (no extra round trip on success), every
rank learns who failed and why, the failing rank re-raises its own exception and the others
raise :class:`RankFailedError` with its message, so no rank hangs.  Failures elsewhere end at the
process group's timeout (set by :func:`init_from_env`) or when the launcher (torchrun,
``torch.multiprocessing``) stops the remaining workers.

Reference: Hazelden, "Fast NTK alignment, norm and effective rank via trace estimation",
arXiv 2511.10796 (the estimators); PyTorch ``torch.distributed`` documentation.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..core import executor
from ..core.memory import scope_cache
from ..core.probes import BLOCK
from ..operators.base import FactoredKernel
from ..operators.ntk import NTK
from .comm import CommStats, Group, RankFailedError, comm_device, gather_rows, group_ranks, raise_agreed

__all__ = [
    "init_from_env",
    "shutdown",
    "is_initialized",
    "is_main_process",
    "rank",
    "world_size",
    "ProbeParallel",
    "probe_parallel",
    "local",
    "default_executor",
    "ShardedNTK",
    "Layout",
    "grid",
    "RankFailedError",
    "job_passes",
    "CommStats",
]


# -- launch helpers ------------------------------------------------------------------------------


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: Group = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0 or when not distributed: the process that prints and writes files."""
    return rank() == 0


def init_from_env(timeout_s: float = 300.0, backend: str | None = None) -> bool:
    """Initialise ``torch.distributed`` from torchrun's environment; True when running distributed.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1; returns True when the default
    group is already initialised with more than one rank.  Backend: NCCL when CUDA is available
    (each process on ``cuda:LOCAL_RANK``), else gloo.  ``timeout_s`` bounds every collective, so a
    rank that dies outside a collective cannot hang the others forever; for NCCL,
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (unless set) tears the process down on such a timeout.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    atexit.register(_destroy)
    return dist.get_world_size() > 1


def _destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """End a job that succeeded on this rank: wait for every rank (a barrier, bounded by the
    process group's timeout), then destroy the process group.  A rank that destroys it while a
    peer is still sending made gloo abort the process at exit.  Failing paths skip this (the
    ``atexit`` handler destroys the group without waiting for peers that may be gone)."""
    if not is_initialized():
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# -- probe-parallel ------------------------------------------------------------------------------

#: The probe-parallel executor evaluating its rows in this context, if any (ShardedNTK checks
#: compatibility; a nested map_probes runs locally).
_ACTIVE: contextvars.ContextVar[ProbeParallel | None] = contextvars.ContextVar("ntkscope_active_probe_parallel", default=None)


def split_probes(m: int, n: int) -> list[int]:
    """Boundaries ``b_0 = 0 ≤ … ≤ b_n = m`` of the contiguous probe ranges of n ranks.

    Ranges are balanced; once every rank gets at least 8 blocks the boundaries are rounded to
    whole probe blocks (:data:`~ntkscope.core.probes.BLOCK` columns, generated together), which moves
    each boundary by at most half a block (≤ 1/8 imbalance) and avoids drawing a block twice.
    """
    bounds = [r * m // n for r in range(n + 1)]
    if m >= 8 * n * BLOCK:
        bounds = [min(m, round(b / BLOCK) * BLOCK) for b in bounds[:-1]] + [m]
    return bounds


class ProbeParallel:
    """Executor that splits probe indices over the ranks of ``group`` and all-gathers the rows.

    Use as ``with probe_parallel(group): ...`` or set :data:`ntkscope.estimators.EXECUTOR`.
    ``stats`` accumulates local compute and collective time (:class:`CommStats`).
    """

    def __init__(self, group: Group = None) -> None:
        if not is_initialized():
            raise RuntimeError("probe_parallel needs torch.distributed to be initialised (see init_from_env)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = CommStats()

    def __call__(self, m: int, chunk: int, fn: executor.ProbeFn) -> torch.Tensor:
        # a map_probes nested inside another's rows runs locally: ranks are on different rows there
        if self.size == 1 or m == 0 or _ACTIVE.get() is not None:
            t = time.perf_counter()
            out = executor.local_executor(m, chunk, fn)
            self.stats.compute_s += time.perf_counter() - t
            self.stats.rows += m
            return out
        bounds = split_probes(m, self.size)
        start, stop = bounds[self.rank], bounds[self.rank + 1]
        t0 = time.perf_counter()
        rows: torch.Tensor | None = None
        error: BaseException | None = None
        token = _ACTIVE.set(self)
        try:
            if stop > start:
                rows = torch.cat([fn(s, min(stop, s + chunk)) for s in range(start, stop, chunk)], 0)
        except Exception as e:  # agreed on below, so that no rank waits for this one
            error = e
        finally:
            _ACTIVE.reset(token)
        self.stats.compute_s += time.perf_counter() - t0
        self.stats.rows += stop - start
        return gather_rows(self.group, rows, error, self.stats)

    def total_passes(self, jvp: int, vjp: int) -> tuple[int, int]:
        """``(jvp, vjp)`` summed over the ranks splitting the probes (collective)."""
        if self.size == 1:
            return jvp, vjp
        t = torch.tensor([jvp, vjp], dtype=torch.int64, device=comm_device(self.group))
        dist.all_reduce(t, group=self.group)
        return int(t[0]), int(t[1])

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions such as ``method="auto"`` must match)."""
        box = [value]
        dist.broadcast_object_list(box, src=group_ranks(self.group)[0], group=self.group)
        return box[0]

    def __repr__(self) -> str:
        return f"ProbeParallel(rank {self.rank} of {self.size})"


def _explicit_local(m: int, chunk: int, fn: executor.ProbeFn) -> torch.Tensor:
    return executor.local_executor(m, chunk, fn)


@contextlib.contextmanager
def probe_parallel(group: Group = None) -> Iterator[ProbeParallel]:
    """Run every metric inside the block probe-parallel over ``group`` (default: the world)."""
    ex = ProbeParallel(group)
    token = executor.EXECUTOR.set(ex)
    try:
        yield ex
    finally:
        executor.EXECUTOR.reset(token)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Evaluate every probe in this process (replicated work), even when distributed."""
    token = executor.EXECUTOR.set(_explicit_local)
    try:
        yield
    finally:
        executor.EXECUTOR.reset(token)


_WORLD = object()
#: The implicit probe group: the world unless a ShardedNTK declared a layout (None: no split).
_default_group: Any = _WORLD
_default_cache: dict[int, ProbeParallel] = {}


def default_executor() -> executor.Executor:
    """The executor used when none was set: probe-parallel over the initialised world.

    After a :class:`ShardedNTK` was built, its layout's probe group instead (local evaluation when
    its data group is the whole world).  Deterministic on every rank: it depends only on calls
    that all ranks make in the same order.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return executor.local_executor
    group = None if _default_group is _WORLD else _default_group
    if _default_group is None or (group is not None and dist.get_world_size(group) == 1):
        return executor.local_executor
    key = id(group)
    if key not in _default_cache:
        _default_cache[key] = ProbeParallel(group)
    return _default_cache[key]


executor.set_default_factory(default_executor)


# -- data-parallel -------------------------------------------------------------------------------


@dataclass
class Layout:
    """A 2-D grid of ranks: ``probe_group`` splits probes, ``data_group`` splits inputs."""

    probe_group: Group
    data_group: Group
    n_probe: int
    n_data: int


def grid(n_data: int) -> Layout:
    """Split the world into replicas of ``n_data`` ranks (rank ``p·n_data + d``: shard d, replica p).

    Collective: every rank must call it.  Returns this rank's groups; shard index is
    ``rank() % n_data``.
    """
    n = world_size()
    if n_data < 1 or n % n_data:
        raise ValueError(f"n_data={n_data} must divide the world size {n}")
    n_probe = n // n_data
    me = rank()
    data_group = probe_group = None
    for p in range(n_probe):
        ranks = [p * n_data + d for d in range(n_data)]
        g = dist.new_group(ranks)
        if me in ranks:
            data_group = g
    for d in range(n_data):
        ranks = [p * n_data + d for p in range(n_probe)]
        g = dist.new_group(ranks)
        if me in ranks:
            probe_group = g
    return Layout(probe_group, data_group, n_probe, n_data)


class ShardedNTK(FactoredKernel):
    """The NTK over the union of every rank's input shard; each rank holds only its own.

    ``ShardedNTK(model, local_inputs, group=...)`` builds the local :class:`~ntkscope.NTK` of
    ``local_inputs`` (other keyword arguments go to it); :meth:`from_local` wraps any local
    :class:`~ntkscope.FactoredKernel`.  Collective: every rank of ``group`` constructs it, with the
    same model and parameters.  ``dim`` is the global ``D = Σ D_r``; ``vjp`` takes and ``jvp``
    returns global state vectors (see the module docstring for the algebra and the state order).

    ``probe_group``: the group that splits probes when this kernel is combined with probe
    parallelism (from :func:`grid`); ``None`` (default) when ``group`` is the whole world.  Building
    the kernel makes it the implicit probe group of later metrics (:func:`default_executor`).
    """

    def __init__(
        self, model: torch.nn.Module, local_inputs: Any, *, group: Group = None, probe_group: Group = None, **ntk_kwargs: Any
    ) -> None:
        self._setup(NTK(model, local_inputs, **ntk_kwargs), group, probe_group)

    @classmethod
    def from_local(cls, op: FactoredKernel, group: Group = None, probe_group: Group = None) -> ShardedNTK:
        """Shard-combine an existing local factored kernel (e.g. ``NTK.from_jacobian(J_r)``)."""
        self = cls.__new__(cls)
        self._setup(op, group, probe_group)
        return self

    def _setup(self, op: FactoredKernel, group: Group, probe_group: Group) -> None:
        global _default_group
        if not is_initialized():
            raise RuntimeError("ShardedNTK needs torch.distributed to be initialised (see init_from_env)")
        self.local = op
        # as the local kernel: its modes() check passes count inside auto's budget, so a seed
        # gives the same answer sharded as in one process
        self.times_passes = bool(op.times_passes)
        self.group = group
        self.probe_group = probe_group
        self.stats = CommStats()
        self._checked: set[int] = set()
        shape = tuple(getattr(op, "state_shape", (op.dim,)))
        mine = (op.dim, op.num_params, str(op.dtype), op.chunk_size, shape)
        metas: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(metas, mine, group=group)
        if len({m[1] for m in metas}) > 1 or len({m[2] for m in metas}) > 1:
            raise ValueError(
                f"ShardedNTK: every rank must hold the same parameters; got (P, dtype) = {[(m[1], m[2]) for m in metas]}"
            )
        self.shard_dims = [int(m[0]) for m in metas]
        self.rank_in_group = dist.get_rank(group)
        self.offset = sum(self.shard_dims[: self.rank_in_group])
        super().__init__(sum(self.shard_dims), op.dtype, op.device)
        self.num_params = op.num_params
        self.chunk_size = min(int(m[3]) for m in metas)
        shapes = [m[4] for m in metas]
        if all(len(s) >= 1 and tuple(s[1:]) == tuple(shapes[0][1:]) for s in shapes):
            self.state_shape: tuple[int, ...] = (sum(int(s[0]) for s in shapes), *shapes[0][1:])
        else:
            self.state_shape = (self.dim,)
        _default_group = probe_group

    # -- products ---------------------------------------------------------------------------------

    def _check_executor(self) -> None:
        ex = _ACTIVE.get()
        if ex is None or ex.size == 1 or id(ex) in self._checked:
            return
        me = dist.get_rank()
        overlap = set(group_ranks(ex.group)) & set(group_ranks(self.group))
        if overlap != {me}:
            raise ValueError(
                "ShardedNTK: the probe-parallel group overlaps this kernel's data group, so ranks that must "
                "multiply the same probes were given different ones; use distributed.grid() for a 2-D layout "
                "(probe_group=layout.probe_group) or distributed.local()"
            )
        self._checked.add(id(ex))

    def _collect(self, kind: str, local: torch.Tensor | None, error: BaseException | None, numel: int) -> torch.Tensor:
        dev = comm_device(self.group)
        flat = torch.zeros(numel + 1, dtype=self.dtype, device=dev)
        if error is None and local is not None:
            flat[:numel] = local.reshape(-1).to(dev)
        else:
            flat[numel] = 1
        t0 = time.perf_counter()
        if kind == "all_reduce":
            dist.all_reduce(flat, group=self.group)
            flags = flat[numel:].cpu()
            out = flat
        else:
            parts = [torch.empty_like(flat) for _ in self.shard_dims]
            dist.all_gather(parts, flat, group=self.group)
            flags = torch.stack([p[numel] for p in parts]).cpu()
            out = torch.stack(parts)
        self.stats.add(kind, time.perf_counter() - t0, flat.numel() * flat.element_size() * len(self.shard_dims))
        if bool((flags != 0).any()):
            raise_agreed(self.group, error, f"ShardedNTK.{'vjp' if kind == 'all_reduce' else 'jvp'} on a shard")
        return out

    # -- per-example blocks: each rank's examples are its own, the samples add over the shards ------

    def trace_blocks(self) -> int | None:
        """The local kernels' ``R`` where every rank finds per-example blocks of the same size on
        its state's first axis (the one the shards stack along); collective, once per call (the
        local kernels look again when their values change; the chunks of one call share it)."""
        shared = scope_cache()
        if shared is not None and ("blocks", self) in shared:
            return shared[("blocks", self)]  # type: ignore[return-value]
        local = self.local
        first = getattr(local, "_example_axis", lambda: None)() == 0 and len(self.state_shape) == len(getattr(local, "state_shape", ()))
        mine = local.trace_blocks() if first else None
        every: list[Any] = [None] * len(self.shard_dims)
        dist.all_gather_object(every, mine, group=self.group)
        R = every[0] if every[0] is not None and all(r == every[0] for r in every) else None
        if shared is not None:
            shared[("blocks", self)] = R
        return R

    def block_sqnorms(self, X: torch.Tensor) -> torch.Tensor:
        """``Σ_b ‖J_bᵀx_b‖²`` over every rank's examples: the local sums, all-reduced."""
        if self.trace_blocks() is None:
            raise RuntimeError(self.NO_BLOCKS)
        self._check_executor()
        if X.dim() != 2 or X.shape[0] != self.dim:
            raise ValueError(f"Σ_b ‖J_bᵀ·V_b‖²: expected shape ({self.dim}, m), got {tuple(X.shape)}")
        out = self._run_local("all_reduce", lambda: self.local.block_sqnorms(X[self.offset : self.offset + self.local.dim]), X.shape[1])
        self.vjp_count += X.shape[1]
        return out[:-1].to(torch.float64)

    def block_basis(self, start: int, stop: int) -> torch.Tensor:
        if self.trace_blocks() is None:
            raise RuntimeError(self.NO_BLOCKS)
        return self._block_basis(0, start, stop)

    def _run_local(self, kind: str, fn: Callable[[], torch.Tensor], numel: int) -> torch.Tensor:
        """``fn()`` on this rank's shard, timed as compute, then ``kind`` over the group: a failure
        on any rank is agreed on there (:meth:`_collect`)."""
        t0 = time.perf_counter()
        local: torch.Tensor | None = None
        error: BaseException | None = None
        try:
            local = fn()
        except Exception as e:
            error = e
        self.stats.compute_s += time.perf_counter() - t0
        return self._collect(kind, local, error, numel)

    def _vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``Jᵀ V = Σ_r J_rᵀ V_r``: local VJP of this rank's slice, all-reduced."""
        self._check_executor()
        m = V.shape[1]
        out = self._run_local("all_reduce", lambda: self.local.vjp(V[self.offset : self.offset + self.local.dim]), self.num_params * m)
        return out[:-1].reshape(self.num_params, m).to(V.device)

    def _jvp(self, U: torch.Tensor) -> torch.Tensor:
        """``J U = [J_1 U; …; J_N U]``: local rows, all-gathered (padded to the largest shard)."""
        self._check_executor()
        m = U.shape[1]
        top = max(self.shard_dims)

        def padded() -> torch.Tensor:
            rows = self.local.jvp(U)
            local = torch.zeros(top, m, dtype=self.dtype, device=rows.device)
            local[: rows.shape[0]] = rows
            return local

        parts = self._run_local("all_gather", padded, top * m)
        blocks = [p[:-1].reshape(top, m)[:d] for p, d in zip(parts, self.shard_dims)]
        return torch.cat(blocks, 0).to(U.device)

    # -- facts that must agree on every rank ---------------------------------------------------

    def _all(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int64, device=comm_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def modes(self) -> dict[str, bool]:
        mine = self.local.modes()
        return {k: self._all(v) for k, v in mine.items()}

    @property
    def paths(self) -> dict[str, str | None]:
        """The local kernel's evaluation path per AD mode (``auto`` avoids a slow one)."""
        return dict(getattr(self.local, "paths", None) or {})

    def same_inputs(self, other: FactoredKernel) -> bool | None:
        if not isinstance(other, ShardedNTK):
            return None
        mine = self.local.same_inputs(other.local)
        return self._all(mine is not False)

    def describe(self) -> str:
        return (
            f"ShardedNTK(D={self.dim} over {len(self.shard_dims)} shards {self.shard_dims}, P={self.num_params}, "
            f"dtype={self.dtype}, local={self.local.describe()})"
        )


def job_passes(estimate: Any, group: Group = None) -> dict[str, int]:
    """AD passes of ``estimate`` summed over the ranks of ``group`` (the whole job's work).

    Collective.  A probe-parallel estimate already holds the totals (its own share is in
    ``info["rank_passes"]``) and is returned as it is; otherwise (data-parallel shards, or work
    each rank did on its own) the per-rank counts are summed, replicated work (pilots, exact
    parts) once per rank.
    """
    if "rank_passes" in getattr(estimate, "info", {}):  # already summed over the probe-splitting ranks
        return {"jvp_passes": int(estimate.jvp_passes), "vjp_passes": int(estimate.vjp_passes)}
    t = torch.tensor([estimate.jvp_passes, estimate.vjp_passes], dtype=torch.int64)
    if is_initialized():
        t = t.to(comm_device(group))
        dist.all_reduce(t, group=group)
    return {"jvp_passes": int(t[0]), "vjp_passes": int(t[1])}
