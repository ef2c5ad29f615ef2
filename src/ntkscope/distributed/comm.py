"""The collectives under :mod:`ntkscope.distributed`: bytes and time spent in them
(:class:`CommStats`), the agreed-failure protocol (:func:`raise_agreed`, :class:`RankFailedError`)
and the all-gather of per-probe rows whose shape only the senders know (:func:`gather_rows`).

Every collective carries a failure flag, so that a rank whose local work raised still takes part
in it (no rank hangs) and every rank learns who failed and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CommStats", "RankFailedError", "raise_agreed", "comm_device", "group_ranks", "gather_rows"]

Group = Any  # a torch.distributed ProcessGroup, or None for the default (world) group

_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
]
_MAXDIM = 6


class RankFailedError(RuntimeError):
    """Another rank failed during a collective step; the message carries its error."""


def comm_device(group: Group) -> torch.device:
    """Where ``group``'s collectives take their tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_ranks(group: Group) -> list[int]:
    """The global ranks of ``group`` (None: the world), in group-rank order."""
    return list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


# -- statistics for benchmarks --------------------------------------------------------------------


@dataclass
class CommStats:
    """Wall time split into local compute and collectives, with bytes moved (this rank)."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    comm_bytes: int = 0
    calls: int = 0
    rows: int = 0
    log: list[tuple[str, float, int]] = field(default_factory=list, repr=False)

    def add(self, what: str, seconds: float, nbytes: int) -> None:
        self.comm_s += seconds
        self.comm_bytes += nbytes
        self.calls += 1
        if len(self.log) < 10_000:
            self.log.append((what, seconds, nbytes))

    def reset(self) -> None:
        self.compute_s = self.comm_s = 0.0
        self.comm_bytes = self.calls = self.rows = 0
        self.log.clear()


# -- collective error protocol -----------------------------------------------------------------


def raise_agreed(group: Group, own: BaseException | None, where: str) -> None:
    """Called by every rank once a collective flagged a failure: all learn who failed and why.

    The failing ranks re-raise their own exception; the others raise :class:`RankFailedError`
    naming the failing ranks and their errors (secondary failures are shown only if no primary).
    """
    mine = "" if own is None else f"{type(own).__name__}: {own}"
    secondary = isinstance(own, RankFailedError)
    msgs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(msgs, (mine, secondary), group=group)
    granks = group_ranks(group)
    primary = [(granks[i], m) for i, (m, sec) in enumerate(msgs) if m and not sec]
    shown = primary or [(granks[i], m) for i, (m, _) in enumerate(msgs) if m]
    text = "; ".join(f"rank {r}: {m}" for r, m in shown)
    if own is not None and not secondary:
        raise own
    raise RankFailedError(f"ntkscope.distributed: {where} failed on rank(s) {[r for r, _ in shown]}: {text}") from own


def gather_rows(group: Group, rows: torch.Tensor | None, error: BaseException | None, stats: CommStats) -> torch.Tensor:
    """Every rank's ``rows`` (this rank's: ``None`` when it had none) concatenated in rank order.

    Collective over ``group``.  A first all-gather of small metadata (failure flag, row count,
    trailing shape, dtype, device) lets ranks with no rows learn the shape and every rank learn of
    a failure (then :func:`raise_agreed`); the rows are padded to the largest count for the second.
    """
    size = dist.get_world_size(group)
    dev = comm_device(group)
    # metadata: [failed, rows, ndim, dtype, cuda, *shape]; rows' trailing shape is the same everywhere
    meta = torch.zeros(5 + _MAXDIM, dtype=torch.int64, device=dev)
    if error is not None:
        meta[0] = 1
    elif rows is not None:
        if rows.dim() - 1 > _MAXDIM or rows.dtype not in _DTYPES:
            error = ValueError(f"probe rows of shape {tuple(rows.shape)} and dtype {rows.dtype} cannot be gathered")
            meta[0] = 1
        else:
            meta[1] = rows.shape[0]
            meta[2] = rows.dim() - 1
            meta[3] = _DTYPES.index(rows.dtype)
            meta[4] = int(rows.is_cuda)
            meta[5 : 5 + rows.dim() - 1] = torch.tensor(rows.shape[1:])
    metas = [torch.empty_like(meta) for _ in range(size)]
    t1 = time.perf_counter()
    dist.all_gather(metas, meta, group=group)
    allmeta = torch.stack(metas).cpu()
    stats.add("meta", time.perf_counter() - t1, meta.numel() * 8 * size)
    if bool(allmeta[:, 0].any()):
        raise_agreed(group, error, "probe evaluation")
    ref = allmeta[int(torch.nonzero(allmeta[:, 1] > 0)[0, 0])]
    shape = tuple(int(x) for x in ref[5 : 5 + int(ref[2])])
    dtype = _DTYPES[int(ref[3])]
    out_dev = torch.device("cuda", torch.cuda.current_device()) if int(ref[4]) else torch.device("cpu")
    counts = [int(c) for c in allmeta[:, 1]]
    top = max(counts)
    buf = torch.zeros((top, *shape), dtype=dtype, device=dev)
    if rows is not None:
        buf[: rows.shape[0]] = rows.to(dev)
    parts = [torch.empty_like(buf) for _ in range(size)]
    t2 = time.perf_counter()
    dist.all_gather(parts, buf, group=group)
    stats.add("all_gather", time.perf_counter() - t2, buf.numel() * buf.element_size() * size)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)], 0)
    return out.to(out_dev)
