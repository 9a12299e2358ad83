"""Figures 2 and 3, run by torchrun on 2 gloo ranks (``python -m bench.cpu`` launches it).

2. our DAT step (Trainer.train_step) vs the re-created published step (bench/published.py);
3. dense vs JointSpar (Trainer with jointspar.enabled=true): bytes per step and step time, clean and DAT.
Every timed call starts after a barrier; a call's time is the slowest rank's. Rank 0 writes the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from bench.harness import JOINTSPAR_SETTINGS, StepCounter, build_trainer, first_batch, synthetic_overrides
from bench.published import PublishedStep
from bench.step_cost import FAST_PATH, FP32
from bench.timing import interleaved, ratio, summary
from trainer.config import ConfigError
from trainer.distributed import DistInfo, setup, teardown
from trainer.models import build_model
from trainer.optim import build_optimizer
from trainer.train import Trainer


def slowest_rank(times: dict[str, list[float]]) -> dict[str, list[float]]:
    names = sorted(times)
    t = torch.tensor([times[n] for n in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {n: row.tolist() for n, row in zip(names, t)}


def model_copy(trainer: Trainer) -> torch.nn.Module:
    """A fresh model with the trainer's current weights (none of the trainer's hooks attached)."""
    cfg = trainer.cfg
    model = build_model(cfg.model.name, 10, cfg.data.synthetic_channels, cfg.model.width)
    model.load_state_dict(trainer.model.state_dict())
    return model.to(trainer.device)


def published_step(trainer: Trainer, attack_sync: bool) -> PublishedStep:
    model = model_copy(trainer)
    optimizer = build_optimizer(trainer.cfg.optim, model, trainer.cfg.data.batch_size)
    return PublishedStep(model, trainer.cfg.attack, optimizer, attack_sync=attack_sync)


def count_published_comm(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, attack_sync: bool) -> dict:
    """One untimed published step on a copy with a counting comm hook (DDP's own all-reduce underneath)."""
    step = published_step(trainer, attack_sync)
    counts = {"calls": 0, "bytes": 0}

    def counting_allreduce(state, bucket):  # DDP checks hook annotations at runtime: none given here
        state["calls"] += 1
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    step.ddp.register_comm_hook(counts, counting_allreduce)
    x_adv = step.craft(x, y)
    attack_weight_grads = sum(p.grad is not None for p in step.ddp.module.parameters())
    attack_calls, attack_bytes = counts["calls"], counts["bytes"]
    step.train(x, x_adv, y)
    return {"attack_allreduce_calls": attack_calls, "attack_bytes": attack_bytes,
            "step_allreduce_calls": counts["calls"], "step_bytes": counts["bytes"],
            "params_with_grad_after_attack": attack_weight_grads,
            "params": len(list(step.ddp.module.parameters())),
            "find_unused_parameters": step.ddp.find_unused_parameters}


def published_vs_ours(base: list[str], info: DistInfo, reps: int, warmup: int) -> dict:
    """Ours in fp32 (NCHW), ours with the fast path (bf16 autocast + channels_last, what `auto` picks on a GPU
    and on CPUs with native bf16), the published step (fp32, as published; its attack
    under no_sync) and the published step whose attack also all-reduces every iteration."""
    ours = build_trainer(base + ["train.loss=dat", "optim.name=lamb"] + FP32, info)
    fast = build_trainer(base + ["train.loss=dat", "optim.name=lamb"] + FAST_PATH, info)
    published, published_sync = published_step(ours, False), published_step(ours, True)
    x, y = first_batch(ours)
    ours_step, fast_step = StepCounter(ours, x, y), StepCounter(fast, *first_batch(fast))
    cpu: dict[str, list[float]] = {}
    times = slowest_rank(interleaved({"ours": ours_step, "ours_bf16_cl": fast_step,
                                      "published": lambda: published(x, y),
                                      "published_attack_allreduce": lambda: published_sync(x, y)},
                                     reps=reps, warmup=warmup, sync=dist.barrier, cpu_times=cpu))
    cpu = slowest_rank(cpu)
    comm = ours.grad_sync.take_stats()
    cfg = ours.cfg
    return {
        "what": "Trainer.train_step (attack under attack_mode, one forward on cat([x_adv, x]), one backward, "
                "one overlapped bucketed all-reduce, LAMB) vs the re-created published step (bench/published.py); "
                "ours_bf16_cl: the same with perf.amp=bf16 and perf.channels_last=on",
        "model": cfg.model.name, "per_rank_batch": cfg.data.batch_size // info.world_size,
        "world_size": info.world_size, "attack": f"{cfg.attack.name}-{cfg.attack.steps}", "optimizer": "lamb",
        "ours_precision": {"amp": ours.autocast is not contextlib.nullcontext, "channels_last": ours.channels_last},
        "reps": reps, "warmup": warmup,
        "seconds": {name: summary(t) for name, t in times.items()},
        "speedup": ratio(times["published"], times["ours"]),
        "speedup_bf16_cl": ratio(times["published"], times["ours_bf16_cl"]),
        "speedup_vs_attack_allreduce": ratio(times["published_attack_allreduce"], times["ours"]),
        # CPU seconds of the busier rank (gloo's threads included, waits excluded): robust to other load
        "cpu_seconds": {name: summary(t) for name, t in cpu.items()},
        "cpu_time_speedup": ratio(cpu["published"], cpu["ours"]),
        "cpu_time_speedup_bf16_cl": ratio(cpu["published"], cpu["ours_bf16_cl"]),
        "target": 1.5,
        "ours_comm": {"bytes_per_step": comm.bytes / comm.steps, "allreduce_calls_per_step": comm.calls / comm.steps},
        "published_comm": count_published_comm(ours, x, y, False),
        "published_attack_allreduce_comm": count_published_comm(ours, x, y, True),
        "ours_phase_seconds": median_phases(ours_step.phases[warmup:]),
        "ours_bf16_cl_phase_seconds": median_phases(fast_step.phases[warmup:]),
        "published_phase_seconds": median_phases(published.phases[warmup:]),
        "published_attack_allreduce_phase_seconds": median_phases(published_sync.phases[warmup:]),
    }


def bucket_sweep(base: list[str], info: DistInfo, sizes_mb: list[float], reps: int, warmup: int) -> dict:
    """Clean steps (where communication weighs most) with GradientSync buckets of several sizes."""
    trainers = {mb: build_trainer(base + ["train.loss=clean", "optim.name=lamb", f"comm.bucket_mb={mb}"], info)
                for mb in sizes_mb}
    steps = {mb: StepCounter(t, *first_batch(t)) for mb, t in trainers.items()}
    times = slowest_rank(interleaved({f"{mb:g}": steps[mb] for mb in sizes_mb}, reps=reps, warmup=warmup,
                                     sync=dist.barrier))
    out = {}
    for mb, t in trainers.items():
        comm = t.grad_sync.take_stats()
        out[f"{mb:g}"] = {"seconds": summary(times[f"{mb:g}"]),
                          "phase_seconds": median_phases(steps[mb].phases[warmup:]),
                          "allreduce_calls_per_step": comm.calls / comm.steps}
    return {"what": "clean Trainer.train_step with comm.bucket_mb = each size (interleaved)", "reps": reps,
            "per_rank_batch": trainers[sizes_mb[0]].cfg.data.batch_size // info.world_size,
            "bucket_mb": out}


def median_phases(phases: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(p[name] for p in phases) for name in phases[0]} if phases else {}


def dense_vs_jointspar(base: list[str], info: DistInfo, loss: str, reps: int, warmup: int,
                       jointspar: list[str]) -> dict:
    overrides = base + [f"train.loss={loss}", "optim.name=lars"]
    dense = build_trainer(overrides, info)
    try:
        sparse = build_trainer(overrides + ["jointspar.enabled=true"] + [f"jointspar.{kv}" for kv in jointspar], info)
    except (ConfigError, ImportError, AttributeError, TypeError) as exc:
        return {"skipped": f"JointSpar could not be built from jointspar.enabled=true: {exc}"}
    if sparse.jointspar is None:
        return {"skipped": "the trainer ignores jointspar.enabled=true (JointSpar not wired into train.py yet)"}
    x, y = first_batch(dense)
    d, s = StepCounter(dense, x, y), StepCounter(sparse, x, y)
    for _ in range(warmup):
        d()
        s()
    # Count bytes and active parameters over the timed steps only: drop what the warm-up accumulated.
    dense.grad_sync.take_stats()
    sparse.grad_sync.take_stats()
    sparse.jointspar.epoch_stats()
    d.phases, s.phases = [], []
    times = slowest_rank(interleaved({"dense": d, "jointspar": s}, reps=reps, warmup=0, sync=dist.barrier))
    dc, sc = dense.grad_sync.take_stats(), sparse.grad_sync.take_stats()
    js = sparse.jointspar.epoch_stats()
    dense_phases = median_phases(d.phases)
    attack_share = statistics.median(p["attack"] / sum(p.values()) for p in d.phases) if loss != "clean" else None
    cfg = dense.cfg
    return {
        "loss": loss, "attack": f"{cfg.attack.name}-{cfg.attack.steps}" if loss != "clean" else None,
        "optimizer": "lars", "jointspar": {k: v for k, v in sparse.cfg.to_dict()["jointspar"].items()},
        "arms": sparse.jointspar.num_arms,
        "per_rank_batch": cfg.data.batch_size // info.world_size, "reps": reps, "warmup": warmup,
        "seconds": {name: summary(t) for name, t in times.items()},
        "time_ratio": ratio(times["jointspar"], times["dense"]),
        "bytes_per_step": {"dense": dc.bytes / dc.steps, "jointspar": sc.bytes / sc.steps},
        "bytes_ratio": (sc.bytes / sc.steps) / (dc.bytes / dc.steps),
        "active_fraction": js["jointspar_active_fraction"],
        "active_arms": js["jointspar_active_arms"],
        "allreduce_calls_per_step": {"dense": dc.calls / dc.steps, "jointspar": sc.calls / sc.steps},
        "phase_seconds": {"dense": dense_phases, "jointspar": median_phases(s.phases)},
        "attack_share_dense": attack_share,
        # JointSpar shrinks only the training part of a step: step time / attack time bounds its speed-up.
        "jointspar_speedup_bound": 1 / attack_share if attack_share else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--per-rank-batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=5, help="timed rounds for DAT steps")
    p.add_argument("--clean-reps", type=int, default=10, help="timed rounds for clean steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--jointspar", default=",".join(JOINTSPAR_SETTINGS),
                   help="figure 3: jointspar.* settings, KEY=VALUE,...")
    p.add_argument("--bucket-mb", default="1,5,25,100", help="bucket sizes for the sweep (MB)")
    p.add_argument("--figures", default="published,jointspar,buckets")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    info = setup("gloo")
    torch.set_num_threads(1)
    base = synthetic_overrides(args.model, args.per_rank_batch, info.world_size, args.image_size) + [
        f"attack.steps={args.attack_steps}", "dist.backend=gloo"]
    figures = args.figures.split(",")
    out: dict = {"world_size": info.world_size, "threads_per_rank": torch.get_num_threads()}
    try:
        if "published" in figures:
            out["published_vs_ours"] = published_vs_ours(base, info, args.reps, args.warmup)
        if "jointspar" in figures:
            out["jointspar"] = {
                "clean": dense_vs_jointspar(base, info, "clean", args.clean_reps, args.warmup, args.jointspar.split(",")),
                "dat": dense_vs_jointspar(base, info, "dat", args.reps, args.warmup, args.jointspar.split(",")),
            }
        if "buckets" in figures:
            out["bucket_sweep"] = bucket_sweep(base, info, [float(v) for v in args.bucket_mb.split(",")],
                                               args.clean_reps, args.warmup)
        if info.is_main:
            with open(args.out, "w") as fh:
                json.dump(out, fh, indent=1)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
