import pytest
import torch
import torch.nn.functional as F

import torch.nn as nn

from trainer.attacks import attack_mode, craft, default_alpha
from trainer.config import DataConfig
from trainer.data import load_dataset
from trainer.models import build_model


@pytest.fixture(scope="module")
def digits_model():
    """A small CNN trained normally (not robust) on the digits training split."""
    torch.manual_seed(0)
    ds = load_dataset(DataConfig(name="digits"))
    x, y = ds.train.images.float() / 255, ds.train.labels
    model = build_model("small_cnn", 10, 1, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, ds.test.images.float() / 255, ds.test.labels


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def robust_accuracy(model, x, y, eps, steps=10, name="pgd", restarts=1):
    torch.manual_seed(1)
    with attack_mode(model):
        x_adv = craft(name, model, x, y, eps=eps, alpha=0.0, steps=steps, restarts=restarts)
    return accuracy(model, x_adv, y), x_adv


def test_perturbation_stays_in_eps_ball_and_image_range(digits_model):
    model, x, y = digits_model
    for eps in (0.03, 0.2):
        _, x_adv = robust_accuracy(model, x, y, eps)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_robust_accuracy_falls_with_eps_and_reaches_zero(digits_model):
    model, x, y = digits_model
    clean = accuracy(model, x, y)
    assert clean > 0.9
    ras = [robust_accuracy(model, x, y, eps)[0] for eps in (0.0, 0.05, 0.1, 0.2, 0.5)]
    assert ras[0] == pytest.approx(clean, abs=1e-9)  # eps = 0 changes nothing
    assert all(b <= a + 0.01 for a, b in zip(ras, ras[1:])), ras
    assert ras[-1] < 0.02 and ras[2] < clean


def test_more_steps_never_raise_robust_accuracy(digits_model):
    model, x, y = digits_model
    ra5 = robust_accuracy(model, x, y, 0.08, steps=5)[0]
    ra20 = robust_accuracy(model, x, y, 0.08, steps=20)[0]
    assert ra20 <= ra5 + 0.02


def test_fgsm_is_weaker_than_pgd(digits_model):
    model, x, y = digits_model
    fgsm = robust_accuracy(model, x, y, 0.08, name="fgsm")[0]
    pgd = robust_accuracy(model, x, y, 0.08, steps=10)[0]
    assert fgsm >= pgd + 0.05  # one step of 1.25 eps against ten of 0.25 eps: clearly weaker here (0.70 vs 0.60)


def test_attack_touches_no_parameter_gradient(digits_model):
    model, x, y = digits_model
    model.train()
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    running = [b.clone() for b in model.buffers()]
    with attack_mode(model, bn_eval=True):
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        craft("pgd", model, x[:64], y[:64], eps=0.1, alpha=0.0, steps=3)
    assert model.training and all(p.requires_grad for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    # BatchNorm in eval mode during the attack: running statistics untouched
    assert all(torch.equal(a, b) for a, b in zip(running, model.buffers()))
    model.eval()


def test_restarts_keep_every_sample_already_fooled_and_fool_more(digits_model):
    """The first restart draws what a single run draws (same seed), so its fooled samples stay fooled."""
    model, x, y = digits_model
    _, once = robust_accuracy(model, x, y, 0.08, steps=20)
    _, five = robust_accuracy(model, x, y, 0.08, steps=20, restarts=5)
    with torch.no_grad():
        fooled_once, fooled_five = model(once).argmax(1) != y, model(five).argmax(1) != y
    assert not (fooled_once & ~fooled_five).any()
    assert fooled_five.sum() > fooled_once.sum()  # 5 more of 360 at this seed
    assert (five - x).abs().max() <= 0.08 + 1e-6


@pytest.mark.parametrize("name", ["pgd", "fgsm"])
def test_random_start_fills_the_ball_and_no_random_start_begins_at_the_image(name):
    """With zero weights the loss has no input gradient, so the result is the start point itself."""
    model = nn.Linear(64, 10)
    nn.init.zeros_(model.weight)
    x, y = torch.full((256, 64), 0.5), torch.zeros(256, dtype=torch.long)
    torch.manual_seed(0)
    with attack_mode(model):
        delta = craft(name, model, x, y, eps=0.1, alpha=0.0, steps=3) - x
        still = craft("pgd", model, x, y, eps=0.1, alpha=0.0, steps=3, random_start=False)
    assert delta.abs().max() <= 0.1 + 1e-6
    assert delta.abs().mean().item() == pytest.approx(0.05, abs=0.002)  # uniform in [-eps, eps]
    assert delta.mean().item() == pytest.approx(0.0, abs=0.002)
    assert torch.equal(still, x)


def test_default_step_sizes():
    assert default_alpha("pgd", 8 / 255, 10) == pytest.approx(2.5 * (8 / 255) / 10)
    assert default_alpha("pgd", 0.1, 4) == pytest.approx(0.0625)
    assert default_alpha("fgsm", 0.1, 10) == pytest.approx(0.125)  # one step of 1.25 eps, whatever `steps` says
