"""How much memory a chunk of probes may use on a device."""

from __future__ import annotations

import torch

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

