"""Launched by torchrun from tests: drives Trainer.train_step and records every collective it issues."""
import json
import sys

import torch
import torch.distributed as dist

from trainer.config import config_from_dict
from trainer.distributed import setup
from trainer.train import Trainer

out_path, loss, bucket_mb, overlap = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
micro_batches = int(sys.argv[5]) if len(sys.argv) > 5 else 1
info = setup("gloo")
cfg = config_from_dict({
    "run": {"output_dir": f"{out_path}.d", "progress": False},
    "data": {"name": "synthetic", "synthetic_train_size": 128, "synthetic_image_size": 16, "batch_size": 16},
    "model": {"name": "small_cnn", "width": 8},
    "attack": {"steps": 2, "eps": 0.1},
    "train": {"loss": loss, "micro_batches": micro_batches},
    "comm": {"bucket_mb": bucket_mb, "overlap": overlap},
})
trainer = Trainer(cfg, info)

calls = []
for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "all_to_all", "reduce", "barrier"):
    original = getattr(dist, name)

    def wrapped(*args, _name=name, _original=original, **kwargs):
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        calls.append({"op": _name, "bytes": tensor.numel() * tensor.element_size() if tensor is not None else 0})
        return _original(*args, **kwargs)

    setattr(dist, name, wrapped)

per_step = []
for step, (x, y) in zip(range(3), trainer.batches.epoch(1)):
    calls.clear()
    trainer.train_step(x, y, epoch=1, step=step)
    per_step.append(list(calls))

digest = float(sum(p.double().sum() * (i + 1) for i, p in enumerate(trainer.model.parameters())))
json.dump({"per_step": per_step, "param_bytes": sum(p.numel() * p.element_size() for p in trainer.params),
           "digest": digest, "buckets": len(trainer.grad_sync._buckets)},
          open(f"{out_path}.rank{info.rank}.json", "w"))
dist.destroy_process_group()
