"""The trainer's PGD attack captured into one CUDA graph (fixed batch shape), for bench/gpu.sh.

The K-iteration attack loop is hundreds of small kernels per iteration on 32x32 images; replaying
them as one graph removes the per-kernel launch cost from the host. Capture records
``trainer.attacks.craft`` itself (random start, K forward + input-gradient passes, projection), so
the graphed attack is the trainer's attack: parameters and BatchNorm statistics are read in place at
every replay, and the random start draws fresh numbers from the graph-safe CUDA generator.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from trainer.attacks import attack_mode, craft, default_alpha


class GraphedAttack:
    """Drop-in for ``craft`` inside Trainer.train_step, for inputs of one fixed shape."""

    def __init__(self, trainer, x: torch.Tensor, y: torch.Tensor, warmup: int = 3) -> None:
        if x.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        cfg = trainer.cfg.attack
        self.name = cfg.name
        self.kwargs = dict(eps=cfg.eps, alpha=cfg.alpha or default_alpha(cfg.name, cfg.eps, cfg.steps),
                           steps=cfg.steps, random_start=cfg.random_start, autocast=trainer.autocast)
        self.static_x, self.static_y = x.clone(), y.clone()
        model, forward = trainer.model, trainer.attack_forward
        # Warm up on a side stream (lazy initialisation, autotuning, compilation) before capturing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), attack_mode(model, cfg.bn_eval):
            for _ in range(warmup):
                craft(self.name, forward, self.static_x, self.static_y, **self.kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with attack_mode(model, cfg.bn_eval), torch.cuda.graph(self.graph):
            self.static_out = craft(self.name, forward, self.static_x, self.static_y, **self.kwargs)

    def __call__(self, name: str, model, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if name != self.name or x.shape != self.static_x.shape:
            raise ValueError(f"graphed attack captured for {self.name} on {tuple(self.static_x.shape)}, "
                             f"called for {name} on {tuple(x.shape)}")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.static_out  # overwritten by the next replay; train_step consumes it before that


@contextlib.contextmanager
def attack_replaced(trainer, attack) -> Iterator[None]:
    """Make this Trainer's training steps call `attack` where they call trainer.attacks.craft."""
    original, trainer.craft = trainer.craft, attack
    try:
        yield
    finally:
        trainer.craft = original
