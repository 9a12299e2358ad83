"""Launched by torchrun from tests/test_train_dist.py: each rank computes different gradients, GradientSync
reduces them, and every rank records its own gradients before and after (to check they became the mean)."""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.communication import GradientSync
from trainer.distributed import setup

out_path = sys.argv[1]
info = setup("gloo")
torch.manual_seed(0)  # the same initial model on every rank
model = nn.ModuleDict({"used": nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)),
                       "unused": nn.Linear(3, 3)})  # gets no gradient on any rank: reduced as zeros
params = list(model.parameters())
names = [name for name, _ in model.named_parameters()]
results = {}
for overlap in (True, False):
    sync = GradientSync(params, info.world_size, bucket_mb=100 / 2**20, overlap=overlap)  # ~100 B: several buckets
    torch.manual_seed(10 + info.rank)  # different data on each rank
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model["used"](x), y).backward()
    local = {n: p.grad.tolist() for n, p in zip(names, params) if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sync.prepare(params)
    nn.functional.cross_entropy(model["used"](x), y).backward()
    sync.wait()
    results[str(overlap)] = {"local": local, "synced": {n: p.grad.tolist() for n, p in zip(names, params)},
                             "buckets": len(sync._buckets), "calls": sync.stats.calls}
json.dump(results, open(f"{out_path}.rank{info.rank}.json", "w"))
dist.destroy_process_group()
