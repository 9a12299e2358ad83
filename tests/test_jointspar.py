"""JointSpar: projection, sampling, unbiasedness, bandit learning, frozen arms under timm LARS/LAMB, checkpoints."""
import copy
import io
import logging
import math

import numpy as np
import pytest
import scipy.optimize
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import trainer.jointspar as jointspar_module
from trainer.config import ConfigError, JointSparConfig
from trainer.jointspar import JointSpar, build_arms, project_kl, sample_active
from trainer.models import small_cnn


def kl(q: np.ndarray, w: np.ndarray) -> float:
    """Generalised KL(q || w) for unnormalised vectors (the -q + w terms are constant when sum q is fixed)."""
    return float(np.sum(q * np.log(q / w) - q + w))


def random_problem(rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    n = int(rng.integers(2, 40))
    w = np.exp(rng.normal(0.0, 1.5, n))
    p_min = float(rng.uniform(0.001, 0.9 / n + 0.1)) if rng.random() < 0.5 else float(rng.uniform(0.001, 0.05))
    p_min = min(p_min, 0.99)
    budget = float(rng.uniform(n * p_min, n))
    return w, budget, p_min


class ArmModel(nn.Module):
    """One parameter vector per arm; loss = sum_l scale_l <param_l, x_l>, so the gradient of arm l is scale_l x_l."""

    def __init__(self, num_arms: int, dim: int = 16) -> None:
        super().__init__()
        self.arms = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(num_arms)])

    def loss(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        terms = [(scale[l] * self.arms[l] * x[l]).sum() for l in range(len(self.arms)) if self.arms[l].requires_grad]
        return sum(terms) if terms else None


def run_steps(model: ArmModel, js: JointSpar, steps: range, scale: torch.Tensor, steps_per_epoch: int = 10 ** 9):
    """Drive begin_step / backward / end_step; gradients depend only on the global step index t."""
    record = []
    for t in steps:
        active = js.begin_step(1 + t // steps_per_epoch, t % steps_per_epoch)  # epochs are 1-based
        x = torch.randn(len(model.arms), model.arms[0].numel(), generator=torch.Generator().manual_seed(1000 + t))
        loss = model.loss(x, scale)
        if loss is not None:
            loss.backward()
        js.end_step()
        record.append(([id(p) for p in active], js.p.clone()))
        for param in model.parameters():
            param.grad = None
    return record


def cfg(**kw) -> JointSparConfig:
    return JointSparConfig(enabled=True, **kw)


# ---- projection -------------------------------------------------------------------------------------------


def test_project_kl_satisfies_constraints_and_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(30):
        w, budget, p_min = random_problem(rng)
        q = project_kl(torch.from_numpy(w), budget, p_min)
        assert q.dtype == torch.float64
        q = q.numpy()
        assert abs(q.sum() - budget) <= 1e-9
        assert q.min() >= p_min - 1e-9 and q.max() <= 1 + 1e-9
        # KKT structure: one common ratio q/w for the arms strictly inside the box
        free = (q > p_min + 1e-9) & (q < 1 - 1e-9)
        if free.sum() >= 2:
            ratio = q[free] / w[free]
            assert np.ptp(ratio) <= 1e-9 * ratio.mean()

        n = len(w)
        res = scipy.optimize.minimize(
            kl, np.clip(np.full(n, budget / n), p_min, 1), args=(w,), jac=lambda x, w: np.log(x / w),
            method="SLSQP", bounds=[(p_min, 1.0)] * n,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - budget, "jac": lambda x: np.ones_like(x)}],
            options={"ftol": 1e-12, "maxiter": 1000})
        assert res.success, res.message
        assert abs(res.x.sum() - budget) < 1e-6
        assert kl(q, w) <= kl(np.clip(res.x, p_min, 1), w) + 1e-7 * max(1.0, abs(res.fun))


def test_project_kl_edge_cases():
    w = torch.tensor([3.0, 1.0, 0.5, 0.01])
    assert torch.equal(project_kl(w, 4.0, 0.1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(project_kl(w, 0.4, 0.1), torch.full((4,), 0.1, dtype=torch.float64))
    # invariant to the scale of w (the bandit relies on this to normalise its weights)
    assert torch.allclose(project_kl(w * 1e6, 2.0, 0.1), project_kl(w, 2.0, 0.1), rtol=0, atol=1e-12)
    q = project_kl(torch.tensor([100.0, 1.0, 1.0, 1.0]), 2.0, 0.1)  # the large arm is capped at 1
    assert q[0] == 1.0 and torch.allclose(q[1:], torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="budget"):
        project_kl(w, 4.5, 0.1)
    with pytest.raises(ValueError, match="budget"):
        project_kl(w, 0.3, 0.1)
    with pytest.raises(ValueError, match="positive"):
        project_kl(torch.tensor([1.0, 0.0, 2.0]), 1.5, 0.1)


# ---- sampling and unbiasedness ----------------------------------------------------------------------------


def skewed_p(num_arms: int = 12, budget: float = 5.0, p_min: float = 0.05) -> torch.Tensor:
    w = torch.exp(torch.randn(num_arms, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5)
    p = project_kl(w, budget, p_min)
    assert (p == 1).any() and (p == p_min).any()  # exercise both bounds
    return p


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_sampling_marginals(mode):
    p, n = skewed_p(), 20000
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([sample_active(p, gen, mode) for _ in range(n)])
    assert masks.dtype == torch.bool
    freq = masks.double().mean(0)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    counts = masks.sum(1)
    if mode == "exact":
        assert (counts == 5).all()
    else:
        assert counts.min() < 5 < counts.max()  # independent coins: the count varies


def test_exact_sampling_rejects_fractional_budget_and_unknown_mode():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="whole-number"):
        sample_active(torch.tensor([0.5, 0.7, 0.3], dtype=torch.float64), gen, "exact")
    with pytest.raises(ValueError, match="unknown mode"):
        sample_active(torch.tensor([0.5, 0.5]), gen, "poisson")


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_scaled_sparse_gradient_is_unbiased(mode):
    p, n = skewed_p(), 20000
    g = torch.randn(len(p), 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros_like(g)
    for _ in range(n):
        mask = sample_active(p, gen, mode)
        total += torch.where(mask[:, None], g / p[:, None], torch.zeros_like(g))
    mean = total / n
    sigma = g.abs() * ((1 - p) / (p * n)).sqrt()[:, None]
    assert ((mean - g).abs() <= 5 * sigma + 1e-12).all()


def test_end_step_scaling_is_unbiased_while_the_bandit_moves_p():
    """Through the real begin_step / end_step: the average applied gradient equals the dense one."""
    num_arms, steps = 8, 3000
    model = ArmModel(num_arms, dim=4)
    g = torch.randn(num_arms, 4, generator=torch.Generator().manual_seed(2))
    g[:2] *= 5
    js = JointSpar(cfg(budget=3.0, p_min=0.05), model, seed=0)
    total, var = torch.zeros(num_arms, 4, dtype=torch.float64), torch.zeros(num_arms, dtype=torch.float64)
    for t in range(steps):
        for param in js.begin_step(1, t):
            param.grad = g[[id(q) for q in model.arms].index(id(param))].clone()  # what backward would leave
        p = js.p.clone()
        js.end_step()
        var += (1 - p) / p
        for l, param in enumerate(model.arms):
            if param.grad is not None:
                total[l] += param.grad.double()
                param.grad = None
    mean = total / steps
    sigma = g.double().abs() * (var.sqrt() / steps)[:, None]
    assert ((mean - g.double()).abs() <= 5 * sigma + 1e-6).all()
    assert js.p[:2].min() > 3.0 / num_arms  # and p did move towards the large arms meanwhile


def test_end_step_leaves_the_gradient_norms_on_the_device():
    """The bandit's gradient norms stay where the gradients are until it next needs them (the next draw of the
    mask, which comes after the next attack has been queued; or a checkpoint), so on a GPU no step waits for
    its own backward to hand them to the host. Read later, they add up as if read at once."""
    num_arms = 6
    model = ArmModel(num_arms, dim=4)
    js = JointSpar(cfg(budget=3.0, sample_every="3"), model, seed=0)
    expected = torch.zeros(num_arms, dtype=torch.float64)
    for t in range(2):  # within one sampling round: no new draw, so nothing is read
        for param in js.begin_step(1, t):
            param.grad = torch.full((4,), float(t + 1))
        mask = js.mask.clone()
        js.end_step()
        expected[mask] += 4.0 * (t + 1) ** 2
        for param in model.arms:
            param.grad = None
    assert js.round_sq_norm.eq(0).all()  # not read in end_step
    assert torch.equal(js.state_dict()["round_sq_norm"], expected)  # a checkpoint reads them
    js.begin_step(1, 2)  # the round's last step: still no draw, nothing new
    js.end_step()
    js.begin_step(1, 3)  # a new draw: the bandit read the round and started the next
    assert js.round_sq_norm.eq(0).all() and js.round_steps == 0 and js._unread_sq_norms == []


# ---- bandit -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_bandit_raises_p_of_the_arms_that_carry_the_gradient(mode):
    num_arms, heavy, budget = 20, 4, 6.0
    model = ArmModel(num_arms)
    scale = torch.ones(num_arms)
    scale[:heavy] = 10.0  # these arms carry ~96% of the squared gradient norm
    js = JointSpar(cfg(budget=budget, p_min=0.0125, eta=0.1, sampling=mode), model, seed=0)
    run_steps(model, js, range(300), scale)
    uniform = budget / num_arms
    # the published version stayed within +-15% of uniform
    assert js.p[:heavy].mean() > 2 * uniform
    assert js.p[heavy:].mean() < 0.8 * uniform
    assert abs(float(js.p.sum()) - budget) < 1e-9 and js.p.min() >= 0.0125 - 1e-12 and js.p.max() <= 1
    # the point of it all: the variance of the 1/p-scaled gradient, through its second moment sum E|g_l|^2 / p_l,
    # falls from uniform sampling's towards the optimum's (p proportional to |g_l|, projected)
    second_moment = lambda p: float((scale.double() ** 2 / p).sum())
    optimal = project_kl(scale.double(), budget, 0.0125)
    assert second_moment(js.p) < 0.6 * second_moment(torch.full((num_arms,), uniform, dtype=torch.float64))
    assert second_moment(js.p) < 1.5 * second_moment(optimal)


@pytest.mark.parametrize("seed", [0, 1])
def test_bandit_settles_p_in_proportion_to_the_gradient_norm_not_its_square(seed):
    """The variance-optimal p grows with |g_l| (before projection). The importance weight 1/p_l of the
    observed term is what gets it there: without it, arms that are drawn more often are rewarded more often,
    and p settles near |g_l|^2 (a ratio of ~4 here instead of ~2)."""
    num_arms = 20
    scale = torch.ones(num_arms)
    scale[10:] = 2.0  # twice the gradient norm
    model = ArmModel(num_arms)
    js = JointSpar(cfg(budget=6.0, p_min=0.0125, eta=0.1, sampling="bernoulli"), model, seed=seed)
    record = run_steps(model, js, range(600), scale)
    mean_p = torch.stack([p for _, p in record[300:]]).mean(0)
    ratio = float(mean_p[10:].mean() / mean_p[:10].mean())
    assert 1.4 < ratio < 2.5, ratio  # measured 1.72 and 1.74

def test_bandit_weight_normalisation_survives_extreme_gradients(caplog):
    model = ArmModel(6)
    js = JointSpar(cfg(budget=3.0, p_min=0.01, eta=5.0), model, seed=0)
    scale = torch.tensor([1e15, 1e-15, 1.0, 1.0, 1e8, 1e-8])  # squared norms spread over 60 decades
    run_steps(model, js, range(50), scale)
    assert torch.isfinite(js.p).all() and abs(float(js.p.sum()) - 3.0) < 1e-9
    assert js.p[0] == 1.0  # the arm with nearly all the gradient is always trained

    # a non-finite gradient (diverged run, fp overflow) skips the bandit round instead of crashing
    run_steps(model, js, range(50, 51), torch.tensor([float("inf")] * 6))
    p_before = js.p.clone()
    with caplog.at_level(logging.WARNING, logger="trainer.jointspar"):
        run_steps(model, js, range(51, 52), scale)  # its begin_step runs the bandit on the inf round
    assert torch.equal(js.p, p_before) and "non-finite" in caplog.text


# ---- configuration, arms, logging -------------------------------------------------------------------------


def cifar_resnet18() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def test_resnet18_arms_and_logged_arm_count(caplog):
    model = cifar_resnet18()
    arms = build_arms(model, "param")
    assert len(arms) == 62
    assert [p for _, ps in arms for p in ps] == list(model.parameters())
    modules = build_arms(model, "module")
    assert len(modules) == 41  # stem conv + bn, 8 blocks x (2 conv + 2 bn), 3 downsample (conv + bn), fc
    assert sum(len(ps) for _, ps in modules) == 62
    with caplog.at_level(logging.INFO, logger="trainer.jointspar"):
        js = JointSpar(cfg(budget=40.0), model, seed=0)
    assert js.num_arms == 62 and js.arm_names[0] == "conv1.weight"
    assert sum(js.arm_numel) == sum(p.numel() for p in model.parameters())
    assert any("L = 62 arms" in r.getMessage() for r in caplog.records if r.name == "trainer.jointspar")


def test_config_rejected_with_one_line_messages():
    model = ArmModel(10)
    with pytest.raises(ConfigError, match=r"L \* p_min = 10 \* 0.5 = 5 exceeds the budget 4") as err:
        JointSpar(cfg(budget=4.0, p_min=0.5), model, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"jointspar.budget 11 exceeds the number of arms L = 10") as err:
        JointSpar(cfg(budget=11.0), model, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="whole number"):
        JointSpar(cfg(budget=4.5, sampling="exact"), model, seed=0)
    JointSpar(cfg(budget=10.0, p_min=1.0), model, seed=0)  # the boundary L * p_min = s = L is valid


# ---- frozen arms under the real optimizers ----------------------------------------------------------------


def timm_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """Two groups as trainer/optim.py builds them: decay + adapt, and no decay / no adapt for biases and norms."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "lars":
        return timm.optim.Lars(groups, lr=0.5, momentum=0.9, trust_coeff=0.001)
    return timm.optim.Lamb(groups, lr=0.01, betas=(0.9, 0.999))


def state_snapshot(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[dict]:
    return [{k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
            for p in params]


def same_state(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
                                            for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("opt_name", ["lars", "lamb"])
def test_frozen_arms_get_no_gradient_no_update_and_no_state_change(opt_name):
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, in_channels=3, width=8)
    opt = timm_optimizer(opt_name, model)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 10, (16,))

    def train_step() -> None:
        F.cross_entropy(model(x), y).backward()

    for _ in range(2):  # dense steps first, so every parameter has momentum / moment state to protect
        train_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = list(model.parameters())
    assert all(opt.state[p] for p in params)

    js = JointSpar(cfg(budget=3.0, sampling="exact"), model, seed=0)
    active = js.begin_step(1, 0)
    active_ids = {id(p) for p in active}
    frozen = [p for p in params if id(p) not in active_ids]
    assert len(active) == 3 and [id(p) for p in active] == [id(p) for p in params if id(p) in active_ids]
    assert all(p.requires_grad for p in active) and not any(p.requires_grad for p in frozen)

    train_step()
    assert all(p.grad is None for p in frozen) and all(p.grad is not None for p in active)
    unscaled = [p.grad.clone() for p in active]
    arm_of = {id(ps[0]): l for l, (_, ps) in enumerate(js.arms)}  # 'param' grouping: one tensor per arm
    p_active = [float(js.p[arm_of[id(p)]]) for p in active]
    js.end_step()
    assert all(p.requires_grad for p in params)
    for p, g, prob in zip(active, unscaled, p_active):
        assert torch.allclose(p.grad, g / prob)

    frozen_before = [p.detach().clone() for p in frozen]
    frozen_state = state_snapshot(opt, frozen)
    active_before = [p.detach().clone() for p in active]
    active_state = state_snapshot(opt, active)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, p) for a, p in zip(frozen_before, frozen))
    assert same_state(frozen_state, state_snapshot(opt, frozen))
    # and the test can fail: the active arms did move and their state did change
    assert all(not torch.equal(a, p) for a, p in zip(active_before, active))
    assert not same_state(active_state, state_snapshot(opt, active))


# ---- schedule, warm-up, metrics ---------------------------------------------------------------------------


def test_dense_warmup_then_sparse_with_epoch_stats():
    model = ArmModel(10)
    js = JointSpar(cfg(budget=4.0, warmup_epochs=1), model, seed=0)
    p0 = js.p.clone()
    for t in range(5):
        active = js.begin_step(1, t)  # epoch 1 of 1 warm-up epoch
        assert [id(p) for p in active] == [id(p) for p in model.parameters()]
        assert all(p.requires_grad for p in model.parameters())
        model.loss(torch.ones(10, 16), torch.ones(10)).backward()
        js.end_step()
        assert all(torch.equal(p.grad, torch.ones(16)) for p in model.parameters())  # dense: no 1/p scaling
        model.zero_grad(set_to_none=True)
    assert torch.equal(js.p, p0)
    dense = js.epoch_stats()
    assert dense == {"jointspar_active_arms": 10.0, "jointspar_active_fraction": 1.0, "jointspar_p_min": None,
                     "jointspar_p_max": None, "jointspar_p_entropy": None}

    counts = []
    for t in range(200):
        counts.append(len(js.begin_step(2, t)))
        loss = model.loss(torch.ones(10, 16), torch.linspace(0.1, 3, 10))
        if loss is not None:  # an independent draw may (rarely) leave every arm out
            loss.backward()
        js.end_step()
        model.zero_grad(set_to_none=True)
    sparse = js.epoch_stats()
    assert sparse["jointspar_active_arms"] == pytest.approx(np.mean(counts))
    assert sparse["jointspar_active_fraction"] == pytest.approx(np.mean(counts) / 10)  # equal-size arms
    assert sparse["jointspar_active_arms"] == pytest.approx(4.0, abs=0.5)
    assert sparse["jointspar_p_min"] == pytest.approx(float(js.p.min()))
    assert sparse["jointspar_p_max"] == pytest.approx(float(js.p.max()))
    q = js.p / js.p.sum()
    assert sparse["jointspar_p_entropy"] == pytest.approx(float(-(q * q.log()).sum()))
    assert sparse["jointspar_p_entropy"] < math.log(10)  # p moved away from uniform
    assert js.epoch_stats()["jointspar_active_arms"] is None  # accumulators were reset


@pytest.mark.parametrize("every, steps_per_epoch, expected_draws", [("1", 6, 12), ("3", 6, 4), ("4", 6, 3),
                                                                    ("epoch", 6, 2)])
def test_resampling_schedule(monkeypatch, every, steps_per_epoch, expected_draws):
    draws = []

    def counting_sample_active(p, generator, mode):
        draws.append(1)
        return sample_active(p, generator, mode)

    monkeypatch.setattr(jointspar_module, "sample_active", counting_sample_active)
    model = ArmModel(10)
    js = JointSpar(cfg(budget=4.0, sample_every=every), model, seed=0)
    masks = []
    for t in range(12):
        js.begin_step(1 + t // steps_per_epoch, t % steps_per_epoch)
        masks.append(js.mask.clone())
        js.end_step()
    assert len(draws) == expected_draws
    block = steps_per_epoch if every == "epoch" else int(every)
    for t in range(12):
        if t % block:
            assert torch.equal(masks[t], masks[t - 1])


# ---- checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every, mode, unit", [("1", "bernoulli", "arms"), ("3", "exact", "arms"),
                                              ("epoch", "bernoulli", "arms"), ("1", "bernoulli", "bytes")])
def test_state_dict_round_trip_continues_the_bandit_exactly(every, mode, unit):
    scale = torch.linspace(0.2, 5.0, 12)
    budget = 4.0 if unit == "arms" else 4 / 12  # the same p to start with
    config = cfg(budget=budget, budget_unit=unit, sample_every=every, sampling=mode, warmup_epochs=1)
    total, cut, per_epoch = 50, 26, 10  # the cut falls inside a 3-step round and inside an epoch

    ref_model = ArmModel(12)
    ref = JointSpar(config, ref_model, seed=7)
    expected = run_steps(ref_model, ref, range(total), scale, per_epoch)

    model_a = ArmModel(12)
    first = JointSpar(config, model_a, seed=7)
    got = run_steps(model_a, first, range(cut), scale, per_epoch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    model_b = ArmModel(12)
    resumed = JointSpar(config, model_b, seed=12345)  # the generator state must come from the checkpoint
    resumed.load_state_dict(state)
    got += run_steps(model_b, resumed, range(cut, total), scale, per_epoch)

    position = lambda model: {id(p): i for i, p in enumerate(model.parameters())}
    ref_pos, pos_a, pos_b = position(ref_model), position(model_a), position(model_b)
    for t, ((ids, p), (ids_got, p_got)) in enumerate(zip(expected, got)):
        here = pos_a if t < cut else pos_b
        assert [ref_pos[i] for i in ids] == [here[i] for i in ids_got], f"step {t}"
        assert torch.equal(p, p_got), f"step {t}"
    assert not torch.equal(expected[-1][1], torch.full((12,), 4 / 12, dtype=torch.float64))  # it did learn
    assert resumed.G == ref.G and torch.equal(resumed.sq_norm_estimate, ref.sq_norm_estimate)


def test_load_state_dict_rejects_a_different_model_or_budget():
    state = JointSpar(cfg(budget=4.0), ArmModel(12), seed=0).state_dict()
    with pytest.raises(ValueError, match="arms"):
        JointSpar(cfg(budget=4.0), ArmModel(11), seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="budget"):
        JointSpar(cfg(budget=5.0), ArmModel(12), seed=0).load_state_dict(state)


# ---- a budget in bytes ------------------------------------------------------------------------------------


def test_variance_optimal_p_meets_the_budget_and_beats_every_other_feasible_p():
    rng = np.random.default_rng(3)
    for _ in range(100):
        w, _, p_min = random_problem(rng)
        norms, cost = np.sqrt(w), np.exp(rng.normal(0.0, 2.0, len(w)))  # bytes spread over orders of magnitude
        budget = float(rng.uniform(p_min * cost.sum(), cost.sum()))
        p = jointspar_module.variance_optimal_p(torch.tensor(norms), torch.tensor(cost), budget, p_min).numpy()
        assert abs(float((cost * p).sum()) - budget) < 1e-9 * cost.sum()
        assert p.min() >= p_min - 1e-12 and p.max() <= 1 + 1e-12
        # KKT: p = t |g| / sqrt(cost) where free, and t |g| / sqrt(cost) beyond the bound where at one
        ratio = norms / np.sqrt(cost)
        free = (p > p_min * (1 + 1e-9)) & (p < 1 - 1e-9)
        t = float(np.median(p[free] / ratio[free])) if free.any() else None
        if t is not None:
            assert np.allclose(p[free], t * ratio[free], rtol=1e-6)
            assert (t * ratio[p >= 1 - 1e-9] >= 1 - 1e-6).all()
            assert (t * ratio[p <= p_min * (1 + 1e-9)] <= p_min * (1 + 1e-6)).all()
        # so scipy's general-purpose solver finds nothing better (to its tolerance on the budget)
        found = scipy.optimize.minimize(lambda q: float((w / q).sum()), np.full(len(w), budget / cost.sum()),
                                        bounds=[(p_min, 1.0)] * len(w), method="SLSQP",
                                        constraints=[{"type": "eq", "fun": lambda q: float((cost * q).sum()) - budget}])
        assert float((w / p).sum()) <= float((w / found.x).sum()) * (1 + 1e-4)


class SizedArmModel(nn.Module):
    """Arms of different sizes; the gradient of arm l is scale_l x_l (|g_l| grows with the arm's size, as in
    a ResNet, where the large late-stage tensors carry the largest gradient norms)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.arms = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes])

    def loss(self, xs: list[torch.Tensor]) -> torch.Tensor | None:
        terms = [(arm * x).sum() for arm, x in zip(self.arms, xs) if arm.requires_grad]
        return sum(terms) if terms else None


def bytes_fraction(js: JointSpar) -> float:
    numel = torch.tensor(js.arm_numel, dtype=torch.float64)
    return float((js.p * numel).sum() / numel.sum())


@pytest.mark.parametrize("unit, budget, boost", [("arms", 6.0, 1.0), ("bytes", 0.4, 1.0), ("bytes", 0.4, 4.0)])
def test_a_budget_in_bytes_keeps_the_bytes_there_while_the_bandit_learns(unit, budget, boost):
    """Counted in arms, the bandit raises every large arm towards p = 1 and the bytes sent climb towards dense;
    counted in bytes, they stay at the budget and p reaches the variance-optimal allocation."""
    sizes = [4, 4, 4, 4, 16, 16, 64, 64, 256, 256, 1024, 1024]
    scale = torch.tensor([boost if i % 2 else 1.0 for i in range(len(sizes))])  # every other arm boost x larger
    model = SizedArmModel(sizes)
    js = JointSpar(cfg(budget=budget, budget_unit=unit, p_min=0.0125, eta=0.1), model, seed=0)
    start = bytes_fraction(js)
    gen = torch.Generator().manual_seed(0)
    for t in range(400):
        js.begin_step(1, t)
        loss = model.loss([s * torch.randn(n, generator=gen) for s, n in zip(scale, sizes)])  # |g_l|^2 ~ s^2 n
        if loss is not None:
            loss.backward()
        js.end_step()
        for param in model.parameters():
            param.grad = None
    if unit == "arms":
        assert start < 0.6 and bytes_fraction(js) > 0.9  # what the published budget does to the bytes
        return
    assert start == pytest.approx(0.4) and bytes_fraction(js) == pytest.approx(0.4, abs=1e-9)
    expected_sq = scale.double() ** 2 * torch.tensor(sizes, dtype=torch.float64)
    numel = torch.tensor(sizes, dtype=torch.float64)
    optimal = jointspar_module.variance_optimal_p(expected_sq.sqrt(), numel, 0.4 * float(numel.sum()), 0.0125)
    second_moment = lambda p: float((expected_sq / p).sum())
    assert second_moment(js.p) < 1.1 * second_moment(optimal)
    boosted = scale > 1
    if boost > 1:  # optimum: boost x the p of the others, whatever the arm's size
        assert float(js.p[boosted].mean() / js.p[~boosted].mean()) == pytest.approx(boost, rel=0.2)
    else:
        assert float(js.p.max() - js.p.min()) < 0.15  # optimum: uniform


def test_weights_grouping_keeps_biases_and_norms_dense_and_unscaled():
    model = cifar_resnet18()
    js = JointSpar(cfg(budget=0.5, budget_unit="bytes", arms="weights", p_min=0.05), model, seed=0)
    assert js.num_arms == 21 and all(p.ndim > 1 for _, ps in js.arms for p in ps)
    one_d = [p for p in model.parameters() if p.ndim == 1]
    assert {id(p) for p in js.always} == {id(p) for p in one_d}
    active = js.begin_step(1, 0)
    assert {id(p) for p in one_d} <= {id(p) for p in active}
    assert all(p.requires_grad for p in one_d)
    for p in active:
        p.grad = torch.ones_like(p)
    js.end_step()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in one_d)  # no 1/p on what is always trained
    stats = js.epoch_stats()
    total = sum(p.numel() for p in model.parameters())
    expected = (sum(n for n, a in zip(js.arm_numel, js.mask.tolist()) if a) + js.always_numel) / total
    assert stats["jointspar_active_fraction"] == pytest.approx(expected)


def test_byte_budget_settings_refused_in_one_line():
    model = small_cnn(1, 8)
    for kw, words in [({"budget": 0.001, "budget_unit": "bytes", "p_min": 0.5}, "below what p_min"),
                      ({"budget": 40.0, "arms": "weights"}, "exceeds the number of arms L = ")]:
        with pytest.raises(ConfigError, match=words):
            JointSpar(cfg(**kw), model, seed=0)
    js = JointSpar(cfg(budget=0.5, budget_unit="bytes"), model, seed=0)
    state = js.state_dict()
    other = JointSpar(cfg(budget=0.5, budget_unit="arms", p_min=0.0125), model, seed=0)
    with pytest.raises(ValueError, match="budget 0.5 bytes"):
        other.load_state_dict(state)


def test_variance_optimal_p_spends_the_budget_on_arms_without_gradient_last():
    norms = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    cost = torch.ones(6, dtype=torch.float64)
    p = jointspar_module.variance_optimal_p(norms, cost, 0.95 * 6, 0.05)
    assert float(p.sum()) == pytest.approx(0.95 * 6) and (p[:3] == 1).all() and (p[3:] < 1).all()
    uniform = jointspar_module.variance_optimal_p(torch.zeros(6, dtype=torch.float64), cost, 3.0, 0.05)
    assert torch.allclose(uniform, torch.full((6,), 0.5, dtype=torch.float64))


def test_a_byte_budget_at_its_lowest_runs_instead_of_failing_later():
    """The check at start-up and the bandit's own agree on what the lowest budget is: one a rounding error
    below it trains at p_min instead of failing at the first bandit update."""
    model = SizedArmModel([4, 16, 64, 256])
    lowest = 0.05
    js = JointSpar(cfg(budget=lowest * (1 - 1e-10), budget_unit="bytes", p_min=0.05), model, seed=0)
    gen = torch.Generator().manual_seed(0)
    for t in range(20):
        js.begin_step(1, t)
        loss = model.loss([torch.randn(n, generator=gen) for n in (4, 16, 64, 256)])
        if loss is not None:
            loss.backward()
        js.end_step()
        for param in model.parameters():
            param.grad = None
    assert torch.allclose(js.p, torch.full((4,), 0.05, dtype=torch.float64))
    with pytest.raises(ConfigError, match="below what p_min"):
        JointSpar(cfg(budget=lowest * 0.99, budget_unit="bytes", p_min=0.05), model, seed=0)



# ---- 1/p on the gradient or on the update -----------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["lars", "lamb", "sgd"])
def test_scale_update_makes_the_expected_update_the_dense_one(optimizer):
    """LARS's and LAMB's trust ratio divides a 1/p gradient scale out again: the expected update of a weight is
    p times the dense one. Scaling the update instead makes it the dense one (SGD: both do)."""
    from trainer.config import OptimConfig
    from trainer.optim import build_optimizer
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    grads = [torch.randn_like(p) for p in base.parameters()]

    def update(scale: str | None, seed: int) -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        opt = build_optimizer(OptimConfig(name=optimizer, lr=0.01, lr_scaling="none", weight_decay=5e-4), model, 256)
        before = [p.detach().clone() for p in model.parameters()]
        js = None
        if scale:  # 4 arms at p = 0.5 (eta ~ 0: the bandit stays put)
            js = JointSpar(cfg(budget=2, p_min=0.01, eta=1e-12, scale=scale), model, seed=seed)
            active = {id(p) for p in js.begin_step(1, 0)}
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone() if js is None or id(p) in active else None
        if js:
            js.end_step()
        opt.step()
        if js:
            js.after_optimizer_step()
        return [p.detach() - b for p, b in zip(model.parameters(), before)]

    dense = update(None, 0)
    for scale, weights_ratio in (("gradient", 0.5 if optimizer != "sgd" else 1.0), ("update", 1.0)):
        draws = 1000
        mean = [torch.zeros_like(d) for d in dense]
        for seed in range(draws):
            for acc, u in zip(mean, update(scale, seed)):
                acc += u / draws
        weights = [float((m * d).sum() / (d * d).sum()) for m, d, p in zip(mean, dense, base.parameters())
                   if p.ndim > 1]
        assert weights == pytest.approx([weights_ratio] * len(weights), abs=0.1), (scale, weights)
