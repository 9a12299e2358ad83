"""JointSpar: bandit layer sampling (Liu & Mozafari, ICML 2022).

Each step only a random subset of "arms" (parameter tensors, or modules) is trained: the others get
``requires_grad=False`` for the step, so autograd never computes their weight gradients, the gradient
sync never sends them and the optimizer (which skips ``grad is None``) never touches them. Arm l is
active with probability p_l; active gradients are scaled by 1/p_l so the gradient estimate is unbiased
(not the update: weight decay and momentum act on an arm's active steps only, so its decay is p_l times the
dense one; LARS's and LAMB's trust ratio divides the scale out again, so under them an arm's expected update
is p_l times its dense one). With scale=update the optimizer's update of an active arm is
scaled by 1/p_l instead, which makes the expected update the dense one under any optimizer (weight decay
included). p moves towards the arms whose gradients are large (lowering
the estimator's variance), within p_min <= p <= 1 and a budget:
- budget_unit=arms (as published): sum(p) = budget, p set by an EXP3 bandit. The variance-optimal p_l
  grows with |g_l| whatever the arm's size, so the large tensors end at p = 1 and nearly every byte is
  sent again once the bandit has learnt.
- budget_unit=bytes: sum(p_l * bytes_l) = budget * the dense bytes, so the bytes stay at the budget.
  The optimum, p_l proportional to |g_l| / sqrt(bytes_l), is set from a running estimate of each arm's
  gradient norm, updated whenever the arm is active (p_min keeps every arm observed). EXP3's multiplicative
  updates do not find it here: with costs spread over orders of magnitude its noisy steps on the large
  arms push the small ones to p_min (in a simulation with arms of 4 to 1024 parameters, 8.6x the optimum's
  second moment).

Every rank draws the active set from a generator seeded identically and advanced identically, and
updates the bandit from the all-reduced gradients only, so p and the active set agree everywhere
without any extra communication.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from trainer.config import Config, ConfigError, JointSparConfig
from trainer.data import image_channels
from trainer.models import build_model
from trainer.seeding import derive_seed

log = logging.getLogger("trainer.jointspar")

# G is a running bound on the norms of the 1/p-scaled arm gradients, |g_l| / p_l. It decays slowly so that
# one large early gradient (first steps, a warm-up spike) does not flatten the bandit's signal for good.
G_DECAY = 0.99
# exp() of anything below this would flush to zero, which would make an arm's KL weight vanish.
MIN_LOG_WEIGHT = -600.0
# budget_unit=bytes: weight of the earlier estimate of an arm's squared gradient norm at each new observation.
NORM_DECAY = 0.9


def variance_optimal_p(norms: torch.Tensor, cost: torch.Tensor, budget: float, p_min: float) -> torch.Tensor:
    """argmin_p sum |g_l|^2 / p_l (the second moment of the 1/p-scaled gradient) s.t. sum cost * p = budget,
    p_min <= p <= 1: p_l = clip(t |g_l| / sqrt(cost_l), p_min, 1) for one t > 0, the same clipped scaling
    project_kl solves. An arm with no gradient seen gets a vanishing weight: the budget is still spent, on it
    last."""
    g = norms.detach().to(dtype=torch.float64, device="cpu").flatten()
    c = cost.detach().to(dtype=torch.float64, device="cpu").flatten()
    if not (bool(torch.isfinite(g).all()) and bool((g >= 0).all()) and bool((c > 0).all())):
        raise ValueError("variance_optimal_p: norms must be finite and >= 0, costs > 0")
    ratio = g / c.sqrt()
    top = float(ratio.max())
    ratio = ratio.clamp(min=top * 1e-12) if top > 0 else torch.ones_like(ratio)  # all zero: nothing to prefer
    return project_kl(ratio, budget, p_min, cost=c)


def project_kl(w: torch.Tensor, budget: float, p_min: float, cost: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_q KL(q || w) s.t. sum cost * q = budget, p_min <= q <= 1, for positive weights w (cost 1 per arm
    unless given: then the budget counts arms).

    With equal costs the KKT conditions give q = clip(c * w, p_min, 1) for one scalar c > 0; variance_optimal_p
    needs the same clipped scaling with costs. f(c) = sum cost * clip(c w, p_min, 1) is continuous,
    nondecreasing and piecewise linear, with kinks where an arm leaves the lower bound (c = p_min / w_i) or
    reaches the upper one (c = 1 / w_i). We locate the linear piece that crosses the budget and solve it
    exactly.
    """
    w = w.detach().to(dtype=torch.float64, device="cpu").flatten()
    n = w.numel()
    cost = torch.ones(n, dtype=torch.float64) if cost is None else cost.to(dtype=torch.float64).flatten()
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()) or not bool((cost > 0).all()):
        raise ValueError("project_kl: weights and costs must be positive and finite")
    if not 0 < p_min <= 1:
        raise ValueError(f"project_kl: p_min must be in (0, 1], got {p_min}")
    total = float(cost.sum())
    tol = 1e-12 * max(1.0, total)
    if budget < total * p_min - tol or budget > total + tol:
        raise ValueError(f"project_kl: budget {budget} outside [{total * p_min}, {total}]")
    if budget >= total - tol:
        return torch.ones(n, dtype=torch.float64)
    if budget <= total * p_min + tol:
        return torch.full((n,), float(p_min), dtype=torch.float64)

    # Sorted by decreasing weight, both kink sequences are increasing, so at any c the arms split into
    # a prefix at the upper bound, a free middle and a suffix at the lower bound.
    order = w.argsort(descending=True)
    w_sorted, cost_sorted = w[order], cost[order]
    enter = p_min / w_sorted  # arm i leaves p_min once c > enter[i]
    cap = 1.0 / w_sorted  # arm i sits at 1 once c >= cap[i]
    cum_cost = torch.cat([w.new_zeros(1), cost_sorted.cumsum(0)])
    cum_cw = torch.cat([w.new_zeros(1), (cost_sorted * w_sorted).cumsum(0)])

    def pieces(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        free_end = torch.searchsorted(enter, c, right=True)  # arms [0, free_end) are above p_min
        at_one = torch.searchsorted(cap, c, right=True)  # arms [0, at_one) are at 1
        return free_end, at_one

    def f(c: torch.Tensor) -> torch.Tensor:
        free_end, at_one = pieces(c)
        return p_min * (total - cum_cost[free_end]) + cum_cost[at_one] + c * (cum_cw[free_end] - cum_cw[at_one])

    kinks = torch.cat([enter, cap]).sort().values
    k = int((f(kinks) < budget).sum())  # f(kinks[0]) = p_min total < budget <= f(kinks[-1]) = total: 1 <= k < 2n
    k = min(max(k, 1), 2 * n - 1)
    lo, hi = kinks[k - 1], kinks[k]
    free_end, at_one = int(pieces(lo)[0]), int(pieces(lo)[1])
    # summed afresh, not as differences of the cumulative sums: free arms' weights may be far below the others'
    free_cw = (cost_sorted * w_sorted)[at_one:free_end].sum()
    if free_cw > 0:  # on this piece f(c) = p_min * cost(suffix at p_min) + cost(prefix at 1) + c * free_cw
        c = (budget - p_min * cost_sorted[free_end:].sum() - cost_sorted[:at_one].sum()) / free_cw
        c = c.clamp(lo, hi)
    else:  # degenerate piece of zero width (tied kinks)
        c = hi
    return (c * w).clamp(p_min, 1.0)


def sample_active(p: torch.Tensor, generator: torch.Generator, mode: str) -> torch.Tensor:
    """Draw a boolean mask with P(mask[l]) = p[l].

    bernoulli: independent coins. exact: dependent rounding that picks exactly round(sum p) arms, by
    systematic sampling (one uniform offset stepping through the cumulative p) over a fresh random
    order, so that no fixed pair of arms is always drawn together.
    """
    p = p.detach().to(dtype=torch.float64, device="cpu")
    if mode == "bernoulli":
        return torch.rand(p.numel(), generator=generator, dtype=torch.float64) < p
    if mode != "exact":
        raise ValueError(f"sample_active: unknown mode {mode!r} (bernoulli | exact)")
    count = round(float(p.sum()))
    if abs(float(p.sum()) - count) > 1e-6:
        raise ValueError(f"sample_active: exact mode needs a whole-number sum of p, got {float(p.sum())}")
    order = torch.randperm(p.numel(), generator=generator)
    ends = (p[order] * (count / p.sum())).cumsum(0)
    ends[-1] = count  # no rounding drift at the end: exactly `count` points fall inside [0, count)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    # Arm l is picked when a point offset + k (k = 0, 1, ...) falls in [starts[l], ends[l]).
    picked = torch.ceil(ends - offset) - torch.ceil(starts - offset) > 0.5
    mask = torch.zeros(p.numel(), dtype=torch.bool)
    mask[order] = picked
    return mask


def build_arms(model: nn.Module, grouping: str) -> list[tuple[str, list[nn.Parameter]]]:
    """The bandit's arms, in model.parameters() order: one per trainable parameter tensor ('param'), one per
    trainable weight tensor of two or more dimensions ('weights'), or one per module that directly owns
    trainable parameters ('module')."""
    if grouping == "param":
        return [(name, [p]) for name, p in model.named_parameters() if p.requires_grad]
    if grouping == "weights":  # biases and norm parameters (1-d) stay dense: see JointSpar.__init__
        return [(name, [p]) for name, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    if grouping == "module":
        arms = []
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                arms.append((name or "<root>", params))
        return arms
    raise ValueError(f"build_arms: unknown grouping {grouping!r} (param | weights | module)")


def _grad_sq_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Squared L2 norm of an arm's gradient, in float64, on the parameters' device (no host sync)."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None:  # an active parameter that took no part in the loss has no gradient
            total += torch.linalg.vector_norm(p.grad).double() ** 2
    return total


class DenseTraining:
    """JointSpar's step interface for dense training: every parameter active every step, nothing rescaled. The
    training step calls one sampler either way."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def begin_step(self, epoch: int, step_in_epoch: int) -> list[nn.Parameter]:
        return self.params

    def end_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def epoch_stats(self) -> dict:
        return {"jointspar_active_arms": float(len(self.params)), "jointspar_active_fraction": 1.0,
                "jointspar_p_min": None, "jointspar_p_max": None, "jointspar_p_entropy": None}


class JointSpar:
    """Chooses the active arms each step, scales their gradients by 1/p and runs the bandit."""

    def __init__(self, cfg: JointSparConfig, model: nn.Module, *, seed: int) -> None:
        # Names and ranges are checked by trainer.config.validate; what needs the model (L) is checked here.
        every = cfg.sample_every
        self.cfg = cfg
        self.sample_every = 0 if every == "epoch" else int(every)  # 0: once per epoch
        self.arms = build_arms(model, cfg.arms)
        self.num_arms = len(self.arms)
        self.arm_names = [name for name, _ in self.arms]
        self.arm_numel = [sum(p.numel() for p in params) for _, params in self.arms]
        in_arms = {id(p) for _, params in self.arms for p in params}
        # Parameters outside every arm ('weights' grouping: biases and norm parameters, about 0.1% of the
        # bytes) are trained and synced every step, unscaled: LARS and LAMB give them plain (untrusted) steps,
        # on which a 1/p_min = 80x scale is noise enough to diverge.
        self.always = [p for p in model.parameters() if p.requires_grad and id(p) not in in_arms]
        self.always_numel = sum(p.numel() for p in self.always)
        L, s, p_min = self.num_arms, cfg.budget, cfg.p_min
        if L == 0:
            raise ConfigError(f"jointspar: the model has no trainable parameters to sample ({cfg.arms} grouping)")
        self.by_bytes = cfg.budget_unit == "bytes"
        self.total_numel = sum(self.arm_numel) + self.always_numel
        self.arm_cost = torch.tensor(self.arm_numel, dtype=torch.float64)  # bytes / 4: the bytes budget's costs
        if self.by_bytes:
            arms_numel = sum(self.arm_numel)
            lowest = (p_min * arms_numel + self.always_numel) / self.total_numel
            if s < lowest * (1 - 1e-9):
                raise ConfigError(f"jointspar.budget {s:g} of the bytes is below what p_min {p_min:g} and the always-"
                                  f"trained parameters send ({lowest:.4g}); raise the budget or lower p_min")
            # the arms' share of the budget (the always-trained parameters are sent every step), within what
            # p_min <= p <= 1 can spend: a budget a rounding error below the lowest is the lowest
            self.arm_budget = min(max(s * self.total_numel - self.always_numel, p_min * arms_numel), arms_numel)
            start = self.arm_budget / arms_numel
        else:
            self.arm_budget = s
            if L * p_min > s + 1e-9:
                raise ConfigError(f"jointspar: L * p_min = {L} * {p_min} = {L * p_min:g} exceeds the budget {s:g} "
                                  f"(lower jointspar.p_min to at most {s / L:g} or raise jointspar.budget)")
            if s > L + 1e-9:
                raise ConfigError(f"jointspar.budget {s:g} exceeds the number of arms L = {L} "
                                  f"({cfg.arms} grouping); use a budget <= {L}")
            if cfg.sampling == "exact" and abs(s - round(s)) > 1e-9:
                raise ConfigError(f"jointspar.budget {s:g} must be a whole number with jointspar.sampling=exact")
            start = s / L

        # Parameter order of the model, so active lists come out in model.parameters() order.
        position = {id(p): i for i, p in enumerate(model.parameters())}
        self._params_in_order = sorted([p for _, ps in self.arms for p in ps] + self.always,
                                       key=lambda p: position[id(p)])
        self.p = torch.full((L,), min(1.0, start), dtype=torch.float64)
        # budget_unit=bytes: running estimate of each arm's squared gradient norm; -1 until first observed
        self.sq_norm_estimate = torch.full((L,), -1.0, dtype=torch.float64)
        self.G = 0.0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "jointspar"))
        self.mask: torch.Tensor | None = None  # the current active set; None while dense
        self.mask_epoch = -1
        self.steps_since_sample = 0
        # Squared norms of the synced gradients summed over the current sampling round (one draw of the mask).
        self.round_sq_norm = torch.zeros(L, dtype=torch.float64)
        # Per sparse step since the last read: (active arms, their squared norms on the device). Read when the
        # bandit needs them, so no step waits for the device to hand them over.
        self._unread_sq_norms: list[tuple[list[int], torch.Tensor]] = []
        self.round_steps = 0
        self._sparse_step = False
        self._before_update: list[tuple[nn.Parameter, torch.Tensor, float]] = []  # scale=update, this step
        self.reset_epoch_stats()
        log.info("JointSpar: L = %d arms (%s grouping, %d parameters always trained), budget %g %s, p_min = %g, "
                 "eta = %g, sampling = %s, resample every %s", L, cfg.arms, self.always_numel, s,
                 "of the bytes" if self.by_bytes else "arms", p_min, cfg.eta, cfg.sampling, every)

    # ---- per step -------------------------------------------------------------------------------------

    def begin_step(self, epoch: int, step_in_epoch: int) -> list[nn.Parameter]:
        """Freeze the inactive arms for this step; return the parameters to train and sync.

        epoch is 1-based, as in metrics.jsonl: epochs 1 .. warmup_epochs are dense. Rounds of k steps are counted here rather than from step_in_epoch, so they run across epoch
        boundaries and through a resume unchanged.
        """
        self._stats_steps += 1
        if epoch <= self.cfg.warmup_epochs:
            self._sparse_step = False
            self._stats_active_arms += self.num_arms
            self._stats_active_numel += self.total_numel
            return list(self._params_in_order)

        if self.sample_every == 0:
            resample = self.mask is None or epoch != self.mask_epoch
        else:
            resample = self.mask is None or self.steps_since_sample >= self.sample_every
        if resample:
            self._update_bandit()
            self.mask = sample_active(self.p, self.generator, self.cfg.sampling)
            self.mask_epoch = epoch
            self.steps_since_sample = 0
        self.steps_since_sample += 1
        self._sparse_step = True

        active_ids = {id(p) for p in self.always}
        mask = self.mask.tolist()
        for (_, params), active in zip(self.arms, mask):
            for p in params:
                p.requires_grad_(active)
                if active:
                    active_ids.add(id(p))
        self._stats_sparse_steps += 1
        self._stats_active_arms += sum(mask)
        self._stats_active_numel += sum(n for n, a in zip(self.arm_numel, mask) if a) + self.always_numel
        return [p for p in self._params_in_order if id(p) in active_ids]

    @torch.no_grad()
    def end_step(self) -> None:
        """After the gradient sync: record the active arms' gradient norms for the bandit, scale the
        active gradients by 1/p (unbiased update) and unfreeze every arm."""
        if not self._sparse_step:
            return
        active = self.mask.nonzero().flatten().tolist()
        if active:  # norms of the synced gradients, taken before the 1/p scaling; read later (_read_sq_norms)
            self._unread_sq_norms.append((active, torch.stack([_grad_sq_norm(self.arms[l][1]) for l in active])))
        self.round_steps += 1
        for l in active:
            scale = 1.0 / float(self.p[l])
            for param in self.arms[l][1]:
                if param.grad is not None and scale != 1.0:
                    if self.cfg.scale == "update":  # after_optimizer_step scales what the optimizer did
                        self._before_update.append((param, param.detach().clone(), scale))
                    else:
                        param.grad.mul_(scale)
        for _, params in self.arms:
            for param in params:
                param.requires_grad_(True)
        self._sparse_step = False

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """scale=update: each active arm moves 1/p_l times as far as the optimizer took it."""
        for param, before, scale in self._before_update:
            param.sub_(before).mul_(scale).add_(before)
        self._before_update = []

    def _update_bandit(self) -> None:
        """One round over the mask drawn last (its gradients averaged over the steps it was held): with
        budget_unit=bytes, the active arms' norm estimates and then the variance-optimal p; else EXP3:

        Loss of arm l: -|g_l|^2 / p_l^2 + G^2, with G^2 a running bound on |g_l|^2 / p_l^2 that keeps it
        non-negative; divided by G^2 it lies in [0, 1]. EXP3 sets w_l = p_l exp(-eta * lhat_l) from an
        unbiased estimate lhat_l. Only the gradient term is unobserved for inactive arms, so only it is
        importance-weighted (divided by p_l when seen, 0 otherwise); the offset is known, equal for every
        arm, and cancels in project_kl (invariant to a common factor of w). The paper's estimate (offset
        G^2 / p_min^2 importance-weighted with the rest, 0 for an inactive arm) has the same mean, but its
        variance drowns the signal: in simulation its p gave the 1/p-scaled gradient a second moment
        1.2-3.4x that of uniform sampling, where this estimate lands within a few % of the optimum.
        """
        if self.mask is None or self.round_steps == 0:
            return
        self._read_sq_norms()
        active, p = self.mask, self.p
        scaled_sq = self.round_sq_norm / self.round_steps / p ** 2  # |g_l|^2 / p_l^2
        if not bool(torch.isfinite(scaled_sq).all()):
            log.warning("JointSpar: non-finite gradient norm; bandit update skipped for this round")
        elif self.by_bytes and bool(active.any()):
            seen = self.round_sq_norm / self.round_steps
            first = active & (self.sq_norm_estimate < 0)
            self.sq_norm_estimate[first] = seen[first]
            later = active & ~first
            self.sq_norm_estimate[later] += (1 - NORM_DECAY) * (seen[later] - self.sq_norm_estimate[later])
            # an arm not yet observed counts as the largest observed: optimism gets it sampled
            unseen = self.sq_norm_estimate < 0
            estimate = self.sq_norm_estimate.masked_fill(unseen, float(self.sq_norm_estimate.clamp(min=0).max()))
            self.p = variance_optimal_p(estimate.sqrt(), self.arm_cost, self.arm_budget, self.cfg.p_min)
        elif bool(active.any()):
            self.G = max(G_DECAY * self.G, math.sqrt(float(scaled_sq[active].max())))
            if self.G > 0:
                observed = torch.where(active, scaled_sq / self.G ** 2 / p, torch.zeros_like(p))
                log_w = self.cfg.eta * observed  # -eta * lhat_l, less the common -eta
                log_w = (log_w - log_w.max()).clamp(min=MIN_LOG_WEIGHT)  # cannot overflow or flush to 0
                self.p = project_kl(p * log_w.exp(), self.arm_budget, self.cfg.p_min)
        self.round_sq_norm.zero_()
        self.round_steps = 0

    def _read_sq_norms(self) -> None:
        """Add the norms the device still holds to round_sq_norm (one host transfer; by the time the next
        mask is drawn, the step they come from has long finished)."""
        if not self._unread_sq_norms:
            return
        values = torch.cat([norms for _, norms in self._unread_sq_norms]).cpu()
        at = 0
        for active, _ in self._unread_sq_norms:
            self.round_sq_norm[active] += values[at:at + len(active)]
            at += len(active)
        self._unread_sq_norms = []

    # ---- metrics and checkpoints ----------------------------------------------------------------------

    def reset_epoch_stats(self) -> None:
        self._stats_steps = 0
        self._stats_sparse_steps = 0
        self._stats_active_arms = 0
        self._stats_active_numel = 0

    def epoch_stats(self) -> dict:
        """Means over the steps since the last call (a dense step counts every arm); p statistics are
        None for an epoch without sparse steps."""
        steps = self._stats_steps
        out: dict = {
            "jointspar_active_arms": self._stats_active_arms / steps if steps else None,
            "jointspar_active_fraction": self._stats_active_numel / (steps * self.total_numel) if steps else None,
            "jointspar_p_min": None, "jointspar_p_max": None, "jointspar_p_entropy": None,
        }
        if self._stats_sparse_steps:
            q = self.p / self.p.sum()
            out["jointspar_p_min"] = float(self.p.min())
            out["jointspar_p_max"] = float(self.p.max())
            out["jointspar_p_entropy"] = float(-(q * q.log()).sum())  # nats; log(L) when uniform
        self.reset_epoch_stats()
        return out

    def state_dict(self) -> dict:
        self._read_sq_norms()
        return {
            "num_arms": self.num_arms,
            "arm_names": list(self.arm_names),
            "budget": float(self.cfg.budget),
            "budget_unit": self.cfg.budget_unit,
            "p_min": float(self.cfg.p_min),
            "p": self.p.clone(),
            "G": self.G,
            "generator": self.generator.get_state(),
            "mask": self.mask.clone() if self.mask is not None else torch.zeros(0, dtype=torch.bool),
            "mask_epoch": self.mask_epoch,
            "steps_since_sample": self.steps_since_sample,
            "round_sq_norm": self.round_sq_norm.clone(),
            "sq_norm_estimate": self.sq_norm_estimate.clone(),
            "round_steps": self.round_steps,
            "stats": [self._stats_steps, self._stats_sparse_steps, self._stats_active_arms, self._stats_active_numel],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("arm_names") != self.arm_names:
            raise ValueError(f"JointSpar checkpoint has {state.get('num_arms')} arms that do not match this model's "
                             f"{self.num_arms} ({self.cfg.arms} grouping)")
        unit = state.get("budget_unit", "arms")  # older checkpoints: arms
        if (abs(state["budget"] - self.cfg.budget) > 1e-9 or abs(state["p_min"] - self.cfg.p_min) > 1e-12
                or unit != self.cfg.budget_unit):
            raise ValueError(f"JointSpar checkpoint was made with budget {state['budget']:g} {unit}, p_min "
                             f"{state['p_min']:g}; the config says budget {self.cfg.budget:g} {self.cfg.budget_unit}, "
                             f"p_min {self.cfg.p_min:g}")
        self.p = state["p"].to(torch.float64).clone()
        self.G = float(state["G"])
        self.generator.set_state(state["generator"])
        self.mask = state["mask"].clone() if state["mask"].numel() else None
        self.mask_epoch = int(state["mask_epoch"])
        self.steps_since_sample = int(state["steps_since_sample"])
        self.round_sq_norm = state["round_sq_norm"].to(torch.float64).clone()
        self._unread_sq_norms = []
        if "sq_norm_estimate" in state:  # older checkpoints: budget_unit=arms, which does not use it
            self.sq_norm_estimate = state["sq_norm_estimate"].to(torch.float64).clone()
        self.round_steps = int(state["round_steps"])
        # the epoch's counts so far (a checkpoint within an epoch)
        self._stats_steps, self._stats_sparse_steps, self._stats_active_arms, self._stats_active_numel = state["stats"]


def model_problems(cfg: Config) -> list[str]:
    """The checks that need the model (JointSpar's arms against its budget), for `dat-train --check` and
    `datctl`: builds the model's shapes on the meta device, reads no data."""
    if not cfg.jointspar.enabled:
        return []
    try:
        with torch.device("meta"):  # shapes only: no memory, however wide the model
            model = build_model(cfg.model.name, 10, image_channels(cfg.data), cfg.model.width)
        JointSpar(cfg.jointspar, model, seed=cfg.run.seed)
    except ConfigError as exc:
        return [str(exc)]
    except (ValueError, KeyError):  # a model setting the config checks report themselves
        pass
    return []
