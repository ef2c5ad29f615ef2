"""How much memory a chunk of probes may use on a device, and scratch blocks reused across chunks."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# Per chunk of probes we keep at most this many bytes alive (see chunk_budget_bytes), and never
# more probes than this: beyond it, larger GEMMs gain nothing and the per-step blocks of the
# recurrences fall out of cache.
_CHUNK_BYTES = 512 * 2**20
_MAX_AUTO_CHUNK = 256


def reusable_block_bytes() -> int:
    """Largest CPU block the allocator keeps for reuse after it is freed: glibc maps larger ones
    afresh on every allocation (page faults, zeroing).  Its mmap threshold grows to at most
    32 MiB on 64-bit systems; blocks a little over it (a power-of-two chunk of probes) still fit."""
    return 40 * 2**20


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



# -- scratch blocks reused across the chunks of one call -------------------------------------------
#
# A fresh CPU block above glibc's mmap threshold (32 MiB at most) is mapped, page-faulted and
# zeroed by the kernel on every allocation: a 37 MB block costs ~23 ms to allocate and first
# write, against ~2 ms to rewrite a kept one.  The rules' per-chunk working blocks (pre-activation
# tangents and adjoints of every step and probe) are therefore taken from a pool that lives while
# probes are being mapped (:func:`scratch_scope`, entered by ``map_probes``) and is dropped after.

_POOL = threading.local()


@contextlib.contextmanager
def scratch_scope() -> Iterator[None]:
    """Keep :func:`scratch` blocks for reuse until the outermost scope exits (scopes nest)."""
    depth = getattr(_POOL, "depth", 0)
    if depth == 0:
        _POOL.blocks = {}
    _POOL.depth = depth + 1
    try:
        yield
    finally:
        _POOL.depth = depth
        if depth == 0:
            _POOL.blocks = {}


def scratch(tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised block of ``shape`` with ``like``'s dtype and device: the pooled one for
    ``tag`` inside a :func:`scratch_scope`, a fresh one outside.  The caller must be done with the
    block before the next ``scratch(tag, …)`` call of the same shape (blocks never leave an op)."""
    if getattr(_POOL, "depth", 0) == 0:
        return like.new_empty(shape)
    key = (tag, shape, like.dtype, like.device)
    block = _POOL.blocks.get(key)
    if block is None:
        block = _POOL.blocks[key] = like.new_empty(shape)
    return block  # type: ignore[no-any-return]


def scope_cache() -> dict[object, object] | None:
    """A dict that lives as long as the outermost :func:`scratch_scope` (None outside one): for
    what every chunk of one call can share, such as the forward pass behind a VJP."""
    if getattr(_POOL, "depth", 0) == 0:
        return None
    return _POOL.blocks  # type: ignore[no-any-return]
