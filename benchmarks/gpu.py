"""The engine table on a CUDA GPU: float32 and bfloat16 models, peak memory, in one run.

    python benchmarks/gpu.py            # on a machine with CUDA; writes results/engine_cuda_*.md
    python benchmarks/gpu.py --quick    # small sizes (also runs on CPU, for a smoke test)

Every path of the engine runs on the model's device with probes drawn there; float64 is used
only to accumulate squared norms, probe Gram matrices and the jackknife (a few numbers per
probe), never for the passes.  Peak memory is ``torch.cuda.max_memory_allocated`` over each
timed pair (ours and the bare loop).  ``torch.compile`` was left out: on these small
per-step recurrences it compiled for minutes on CPU and gave nothing on the fused ``nn.GRU``
(platform notes); on a GPU the bare loop's kernel launches are what a compile would save.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=engine.OUT)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probes = [8, 24] if a.quick else [120, 600]
    for dtype in (torch.float32, torch.bfloat16):
        res = engine.run(a.quick, probes, 1 if a.quick else 3, device, dtype)
        stem = f"engine{'_quick' if a.quick else ''}_{device}_{str(dtype).split('.')[-1]}"
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        (a.out / f"{stem}.md").write_text(engine.markdown(res))
        print(engine.markdown(res))


if __name__ == "__main__":
    main()
