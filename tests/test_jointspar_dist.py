"""JointSpar in real two-rank torchrun (gloo) runs of the trainer."""
import json
import math

import pytest
import torch

from conftest import ROOT, SYNTHETIC, read_jsonl, torchrun

JOINTSPAR = ["--set", "jointspar.enabled=true", "--set", "jointspar.budget=6", "--set", "jointspar.p_min=0.05",
             "--set", "jointspar.warmup_epochs=1"]
SMALL_CNN_ARMS = 16  # 3 conv + 3 batch-norm + 2 linear layers, weight and bias each
# A conv bias followed by batch norm has an exactly zero gradient, so even an active one may not move.
BIAS_BEFORE_BN = {"0.bias", "3.bias", "7.bias"}


@pytest.mark.parametrize("optim_name, sampling, bucket_mb", [("lamb", "bernoulli", 0.02), ("lars", "exact", 25)])
def test_ranks_agree_frozen_arms_stay_put_and_only_active_bytes_are_sent(tmp_path, optim_name, sampling, bucket_mb):
    base = tmp_path / "js"
    torchrun([str(ROOT / "tests" / "workers" / "jointspar_steps.py"), str(base), optim_name, sampling, str(bucket_mb)])
    ranks = [json.loads((tmp_path / f"js.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["num_arms"] == SMALL_CNN_ARMS
    dense, sparse = [], []
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        # the same active set and the same p on both ranks, every step, without any extra collective
        assert step0["active"] == step1["active"] and step0["p"] == step1["p"]
        (dense if step0["epoch"] == 1 else sparse).append(step0)
        for step in (step0, step1):
            assert sum(step["bytes"]) == step["predicted_bytes"]  # counted at the all_reduce call
            assert len(step["bytes"]) == step["buckets"]
            assert step["requires_grad_after"]
            assert all(step["frozen_param_same"].values())
            assert all(step["frozen_state_same"].values())
            assert all(moved for name, moved in step["active_param_changed"].items() if name not in BIAS_BEFORE_BN)
    assert len(dense) == 2 and len(sparse) == 8
    for step in dense:
        assert step["predicted_bytes"] == step["dense_bytes"] and not step["frozen_during_step"]
    for step in sparse:
        assert 0 < len(step["active"]) < SMALL_CNN_ARMS
        assert sorted(step["frozen_param_same"]) == step["frozen_during_step"]
        assert all(size > 0 for size in step["frozen_state_size"].values())  # there was state to protect
        if sampling == "exact":
            assert len(step["active"]) == 6
    assert sum(s["predicted_bytes"] for s in sparse) < 0.9 * sum(s["dense_bytes"] for s in sparse)
    assert ranks[0]["final_p"] == ranks[1]["final_p"] != [6 / SMALL_CNN_ARMS] * SMALL_CNN_ARMS  # it learned
    assert ranks[0]["digest"] == ranks[1]["digest"]  # both ranks applied the same update


def _state(path):
    return torch.load(path, weights_only=True)


def test_trainer_metrics_and_resume_continue_the_bandit_exactly(tmp_path):
    args = ["-m", "trainer", *SYNTHETIC, *JOINTSPAR, "--set", "optim.schedule=constant"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun([*args, "--set", f"run.output_dir={straight}", "--set", "run.epochs=3"])
    torchrun([*args, "--set", f"run.output_dir={resumed}", "--set", "run.epochs=2"])
    proc = torchrun([*args, "--set", f"run.output_dir={resumed}", "--set", "run.epochs=3"])
    assert "resumed from" in proc.stdout

    records = read_jsonl(straight / "metrics.jsonl")
    warmup, *sparse = records
    assert warmup["comm_bytes"] == warmup["dense_comm_bytes"] > 0
    assert warmup["jointspar_active_arms"] == SMALL_CNN_ARMS and warmup["jointspar_active_fraction"] == 1.0
    assert warmup["jointspar_p_min"] is None and warmup["jointspar_p_entropy"] is None
    for r in sparse:
        assert 0 < r["comm_bytes"] < r["dense_comm_bytes"]
        # every gradient is float32, so the bytes ratio is exactly the active fraction by parameter count
        assert r["comm_bytes"] / r["dense_comm_bytes"] == pytest.approx(r["jointspar_active_fraction"], rel=1e-12)
        assert 0 < r["jointspar_active_arms"] < SMALL_CNN_ARMS
        assert 0.05 - 1e-12 <= r["jointspar_p_min"] <= 6 / SMALL_CNN_ARMS <= r["jointspar_p_max"] <= 1
        assert 0 < r["jointspar_p_entropy"] <= math.log(SMALL_CNN_ARMS) + 1e-12

    a, b = _state(straight / "checkpoint-latest.pt"), _state(resumed / "checkpoint-latest.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, value in a["jointspar"].items():
        other = b["jointspar"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    assert [(r["train_loss"], r["comm_bytes"], r["jointspar_p_entropy"]) for r in records] == \
        [(r["train_loss"], r["comm_bytes"], r["jointspar_p_entropy"]) for r in read_jsonl(resumed / "metrics.jsonl")]


def test_steps_with_no_active_arm_are_survived(tmp_path):
    # budget 0.5 of 16 arms: a Bernoulli draw is empty with probability ~60%, so many steps train nothing
    proc = torchrun(["-m", "trainer", *SYNTHETIC, "--set", "jointspar.enabled=true", "--set", "jointspar.budget=0.5",
                     "--set", "jointspar.p_min=0.01", "--set", "run.epochs=1", "--set", f"run.output_dir={tmp_path}"])
    assert "Traceback" not in proc.stderr
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["jointspar_active_arms"] < 1  # a mean below one arm per step: some steps had none
    assert record["comm_bytes"] < record["dense_comm_bytes"] and math.isfinite(record["train_loss"])


def test_a_byte_budget_holds_in_a_real_run(tmp_path):
    """budget_unit=bytes with the weights grouping (and 1/p on the update): biases and norms are sent every
    step, the conv and linear weights by the bandit, and the expected bytes are the budget exactly (the
    published arms budget climbs back to dense as the bandit learns)."""
    out = tmp_path / "bytes"
    torchrun(["-m", "trainer", *SYNTHETIC, "--set", "jointspar.enabled=true", "--set", "jointspar.budget_unit=bytes",
              "--set", "jointspar.budget=0.3", "--set", "jointspar.arms=weights", "--set", "jointspar.p_min=0.05",
              "--set", "jointspar.warmup_epochs=1", "--set", "jointspar.scale=update",
              "--set", f"run.output_dir={out}", "--set", "run.epochs=4"])
    warmup, *sparse = read_jsonl(out / "metrics.jsonl")
    assert warmup["comm_bytes"] == warmup["dense_comm_bytes"]
    sent = sum(r["comm_bytes"] for r in sparse) / sum(r["dense_comm_bytes"] for r in sparse)
    assert 0.1 < sent < 0.6, sent  # Bernoulli draws around the 0.3 budget
    for r in sparse:
        assert r["comm_bytes"] / r["dense_comm_bytes"] == pytest.approx(r["jointspar_active_fraction"], rel=1e-12)
    state = _state(out / "checkpoint-latest.pt")
    model = {k: v for k, v in state["model"].items() if "running" not in k and "num_batches" not in k}
    arms = [name for name in state["jointspar"]["arm_names"]]
    assert arms and all(model[name].ndim > 1 for name in arms)
    numel = torch.tensor([model[name].numel() for name in arms], dtype=torch.float64)
    always = sum(v.numel() for k, v in model.items() if k not in arms)
    expected = (float((state["jointspar"]["p"] * numel).sum()) + always) / (float(numel.sum()) + always)
    assert expected == pytest.approx(0.3, abs=1e-9)
    assert state["jointspar"]["p"].max() - state["jointspar"]["p"].min() > 0.01  # it learned
    assert all(math.isfinite(r["train_loss"]) for r in sparse)
