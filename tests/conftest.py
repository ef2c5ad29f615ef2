import os
import sys
from pathlib import Path

import torch

# The shared test models (model_zoo, lightning_models) live here; the tests sit in one folder per
# package room below, so put this folder on the path for all of them (and for spawned ranks).
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Two pytest-xdist workers on two cores: one thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
