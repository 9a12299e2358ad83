"""Figure 1: what one attack iteration costs next to one training step, on the trainer's own code paths.

An attack iteration needs a forward (F) and the gradient with respect to the *input* only (~F), a
training step a forward and a backward that also produces weight gradients (~2F) plus the optimizer:
the ratio's floor is 2F / 3F = 0.67. The "naive" attack leaves the parameters requiring grad and
backpropagates through everything, as most PGD code does; it pays for weight gradients it throws away
and sits near 1.0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import StepCounter, build_trainer, first_batch, local_dist_info, synthetic_overrides
from bench.timing import interleaved, ratio, summary
from trainer.attacks import attack_mode, craft, default_alpha


def naive_attack_iteration(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                           bn_eval: bool) -> torch.Tensor:
    """One PGD iteration the usual way: parameters keep requires_grad, loss.backward() fills weight
    gradients too (discarded afterwards)."""
    was_training = model.training
    if bn_eval:
        model.eval()
    delta = ((x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x).requires_grad_(True)
    F.cross_entropy(model(x + delta), y, reduction="sum").backward()
    delta = (delta.detach() + alpha * delta.grad.sign()).clamp(-eps, eps)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return ((x + delta).clamp(0, 1)).detach()


FAST_PATH = ["perf.amp=bf16", "perf.channels_last=on"]
FP32 = ["perf.amp=off", "perf.channels_last=off"]  # pinned: `auto` picks bf16 on CPUs with native bf16


def measure(model: str = "resnet18", batch: int = 32, reps: int = 10, warmup: int = 2, image_size: int = 32,
            optim: str = "lamb") -> dict:
    """Interleaved: the attack iteration, the naive one and the training step in fp32, plus the attack iteration and training step with the fast path (bf16 autocast,
    channels_last)."""
    base = synthetic_overrides(model, batch, 1, image_size) + ["train.loss=clean", f"optim.name={optim}"]
    trainer = build_trainer(base + FP32, local_dist_info())
    fast = build_trainer(base + FAST_PATH, local_dist_info())
    x, y = first_batch(trainer)
    xf, yf = first_batch(fast)
    variants = {
        "attack": lambda: one_attack_iteration(trainer, x, y),
        "naive_attack": lambda: naive_attack_iteration(trainer.model, x, y, *attack_settings(trainer)),
        "train": StepCounter(trainer, x, y),  # Trainer.train_step with loss=clean: forward, backward, optimizer
        "attack_bf16_cl": lambda: one_attack_iteration(fast, xf, yf),
        "train_bf16_cl": StepCounter(fast, xf, yf),
    }
    cpu: dict[str, list[float]] = {}
    times = interleaved(variants, reps=reps, warmup=warmup, cpu_times=cpu)
    return {
        "what": "one PGD iteration (trainer's attack_mode + craft, steps=1) vs one Trainer.train_step "
                "(loss=clean: forward + backward with weight gradients + optimizer), same batch; *_bf16_cl: "
                "the same with perf.amp=bf16, perf.channels_last=on",
        "model": model, "batch": batch, "image_size": image_size, "optimizer": optim,
        "reps": reps, "warmup": warmup,
        "seconds": {name: summary(t) for name, t in times.items()},
        "attack_over_train": ratio(times["attack"], times["train"]),
        "naive_attack_over_train": ratio(times["naive_attack"], times["train"]),
        "attack_over_train_bf16_cl": ratio(times["attack_bf16_cl"], times["train_bf16_cl"]),
        "bf16_cl_speedup": {"attack": ratio(times["attack"], times["attack_bf16_cl"]),
                            "train": ratio(times["train"], times["train_bf16_cl"])},
        "cpu_seconds": {name: summary(t) for name, t in cpu.items()},
        "cpu_time_ratios": {"attack_over_train": ratio(cpu["attack"], cpu["train"]),
                            "naive_attack_over_train": ratio(cpu["naive_attack"], cpu["train"]),
                            "attack_over_train_bf16_cl": ratio(cpu["attack_bf16_cl"], cpu["train_bf16_cl"])},
        "bound": 2 / 3,
        "target": 0.75,
    }


def attack_settings(trainer) -> tuple[float, float, bool]:
    cfg = trainer.cfg.attack
    return cfg.eps, cfg.alpha or default_alpha(cfg.name, cfg.eps, cfg.steps), cfg.bn_eval


def one_attack_iteration(trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exactly what Trainer.train_step runs for the attack, with steps=1."""
    cfg = trainer.cfg.attack
    with attack_mode(trainer.model, cfg.bn_eval):
        return craft("pgd", trainer.attack_forward, x, y, eps=cfg.eps, alpha=attack_settings(trainer)[1], steps=1,
                     random_start=cfg.random_start, autocast=trainer.autocast)
