# scale_out.py -- run with:  torchrun --standalone --nproc-per-node 2 scale_out.py
import torch

import ntkscope as nk
from ntkscope import distributed, tasks

distributed.init_from_env()  # gloo on CPU, NCCL on GPUs; does nothing in a single process
rank, world = distributed.rank(), distributed.world_size()
torch.set_num_threads(1)

X, y, _, _ = tasks.digits(200)  # D = 2,000 outputs
model = tasks.mlp([64, 32, 10])

# 1. probe-parallel: every rank holds all inputs, the ranks split the probes
K = nk.NTK(model, X)
e = nk.effective_rank(K, method="vjp", num_probes=256, seed=0)

# 2. data-parallel: each rank holds a shard of the inputs; the kernel is over all of them
if distributed.is_initialized():
    Ks = distributed.ShardedNTK(model, X.chunk(world)[rank])
else:
    Ks = K  # one process: the shard is everything
t = nk.trace(Ks, method="vjp", num_probes=256, seed=0)  # exact: 256 probes cover the 10 per-example outputs
job = distributed.job_passes(t)  # collective: passes summed over ranks

if distributed.is_main_process():
    print(f"world size {world}")
    print(f"probe-parallel  effective rank = {e.value:.6f} ± {e.stderr:.4f}  ({e.vjp_passes} VJP passes in all, {e.info.get('rank_passes', {'vjp': e.vjp_passes})['vjp']} on rank 0)")
    error = "exact, over per-example blocks" if t.exact else f"± {t.stderr:.3f}"
    print(f"data-parallel   trace = {t.value:.4f} {error}  ({job['vjp_passes']} VJP passes over the job)")

distributed.shutdown()  # wait for every rank, then end the job (a rank exiting while a peer still sends makes gloo abort)
