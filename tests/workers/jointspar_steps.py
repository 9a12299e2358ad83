"""Launched by torchrun from tests/test_jointspar_dist.py: drives Trainer.train_step with JointSpar on and
records, per step and rank, the active set, p, the bytes handed to all_reduce, and whether frozen
parameters and their optimizer state stayed bit-identical."""
import json
import sys

import torch
import torch.distributed as dist

from trainer.config import config_from_dict
from trainer.distributed import setup
from trainer.train import Trainer

out_path, optim_name, sampling, bucket_mb = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
DENSE_STEPS, SPARSE_STEPS = 2, 8  # epoch 1 is the dense warm-up: every parameter gets optimizer state
info = setup("gloo")
cfg = config_from_dict({
    "run": {"output_dir": f"{out_path}.d", "progress": False, "seed": 3},
    "data": {"name": "synthetic", "synthetic_train_size": 256, "synthetic_image_size": 16, "batch_size": 32},
    "model": {"name": "small_cnn", "width": 8},
    "attack": {"steps": 2, "eps": 0.1},
    "optim": {"name": optim_name, "weight_decay": 5e-4},
    "comm": {"bucket_mb": bucket_mb},
    "jointspar": {"enabled": True, "budget": 6, "p_min": 0.05, "sampling": sampling, "warmup_epochs": 1},
})
trainer = Trainer(cfg, info)
names = {id(p): name for name, p in trainer.model.named_parameters()}
params = list(trainer.model.parameters())

all_reduce_calls = []
original_all_reduce = dist.all_reduce


def counting_all_reduce(tensor, *args, **kwargs):
    all_reduce_calls.append(tensor.numel() * tensor.element_size())
    return original_all_reduce(tensor, *args, **kwargs)


dist.all_reduce = counting_all_reduce  # GradientSync calls it through the module attribute

js = trainer.jointspar
seen = {}
original_begin_step = js.begin_step


def observed_begin_step(epoch, step_in_epoch):
    active = original_begin_step(epoch, step_in_epoch)
    seen["active"] = [names[id(p)] for p in active]
    seen["requires_grad"] = {names[id(p)]: p.requires_grad for p in params}
    seen["p"] = js.p.tolist()  # the p the mask was drawn with, and the 1/p the gradients get
    return active


js.begin_step = observed_begin_step


def optimizer_state(p):
    return {k: v.clone() for k, v in trainer.optimizer.state[p].items() if torch.is_tensor(v)}


records = []
schedule = [(1, step) for step in range(DENSE_STEPS)] + [(2, step) for step in range(SPARSE_STEPS)]
batches = {epoch: iter(trainer.batches.epoch(epoch)) for epoch in (1, 2)}
for epoch, step in schedule:
    x, y = next(batches[epoch])
    before = {names[id(p)]: (p.detach().clone(), optimizer_state(p)) for p in params}
    all_reduce_calls.clear()
    trainer.train_step(x, y, epoch=epoch, step=step)
    active = set(seen["active"])
    record = {"epoch": epoch, "active": seen["active"], "p": seen["p"], "bytes": list(all_reduce_calls),
              "predicted_bytes": sum(p.numel() * p.element_size() for p in params if names[id(p)] in active),
              "dense_bytes": sum(p.numel() * p.element_size() for p in params),
              "buckets": len(trainer.grad_sync._buckets),
              "frozen_during_step": sorted(n for n, rg in seen["requires_grad"].items() if not rg),
              "requires_grad_after": all(p.requires_grad for p in params),
              "frozen_param_same": {}, "frozen_state_same": {}, "frozen_state_size": {}, "active_param_changed": {}}
    for p in params:
        name = names[id(p)]
        old_value, old_state = before[name]
        state = optimizer_state(p)
        same_state = old_state.keys() == state.keys() and all(torch.equal(old_state[k], state[k]) for k in state)
        if name in active:
            record["active_param_changed"][name] = not torch.equal(old_value, p.detach())
        else:
            record["frozen_param_same"][name] = torch.equal(old_value, p.detach())
            record["frozen_state_same"][name] = same_state
            record["frozen_state_size"][name] = len(state)
    records.append(record)

digest = float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(params)))
json.dump({"steps": records, "digest": digest, "num_arms": js.num_arms, "final_p": js.p.tolist()},
          open(f"{out_path}.rank{info.rank}.json", "w"))
dist.destroy_process_group()
