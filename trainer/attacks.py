"""L-inf PGD and FGSM with random start, computing input gradients only."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_eval: bool = True) -> Iterator[None]:
    """Parameters stop requiring grad (so no weight gradient is computed or touched) and, optionally,
    BatchNorm uses its running statistics; both are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    if bn_eval:
        model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def default_alpha(name: str, eps: float, steps: int) -> float:
    return 1.25 * eps if name == "fgsm" else 2.5 * eps / steps


def pgd_step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """One ascent step of the perturbation, projected onto the eps L-inf ball and the [0, 1] image box.
    Elementwise only: torch.compile fuses it into one kernel (eager, it is eight passes over the batch)."""
    delta = (delta + alpha * grad.sign()).clamp_(-eps, eps)  # in place on new tensors: no extra allocation eager
    return (x + delta).clamp_(0, 1) - x


PGDStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        random_start: bool = True, restarts: int = 1,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext, step: PGDStep = pgd_step) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy in the eps L-inf ball, clamped to [0, 1].

    With several restarts, a sample keeps the first perturbation that fools the model (else the first restart's).
    step: pgd_step, or a compiled one. Call it under ``attack_mode(model)``.
    """
    best = None
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
        delta = (x + delta).clamp_(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = step(x, delta.detach(), grad, alpha, eps)
        x_adv = (x + delta).detach()
        if restarts == 1:
            return x_adv
        if best is None:
            best = x_adv
        with torch.no_grad(), autocast():
            wrong = model(x_adv).argmax(1) != y
        newly = wrong & ~fooled
        best[newly] = x_adv[newly]
        fooled |= wrong
    return best


def craft(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
          steps: int, random_start: bool = True, restarts: int = 1,
          autocast: Callable[[], ContextManager] = contextlib.nullcontext, step: PGDStep = pgd_step) -> torch.Tensor:
    """``pgd`` (K steps) or ``fgsm`` (FGSM with random start: one step of 1.25 eps)."""
    alpha = alpha or default_alpha(name, eps, steps)
    if name == "fgsm":
        steps, random_start = 1, True
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
               restarts=restarts, autocast=autocast, step=step)
