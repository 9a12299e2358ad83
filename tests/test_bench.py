"""The benchmark machinery: interleaved timing, the scaling model, and a tiny end-to-end `bench.cpu` run
(real Trainer steps, a real 2-rank gloo torchrun with the re-created published step and JointSpar)."""
import json
import math
import subprocess

import pytest

from bench import scaling
from bench.timing import interleaved, ratio, summary
from tests.conftest import PYTHON, ROOT, torch_env


def test_interleaved_rotates_the_order_and_times_every_call():
    calls, now = [], [0.0]

    def variant(name, cost):
        def run():
            calls.append(name)
            now[0] += cost
        return run

    times = interleaved({"a": variant("a", 1.0), "b": variant("b", 3.0)}, reps=4, warmup=1, clock=lambda: now[0])
    assert calls[:2] == ["a", "b"]  # warm-up round, untimed
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert times == {"a": [1.0] * 4, "b": [3.0] * 4}
    assert ratio(times["b"], times["a"]) == {"median": 3.0, "min": 3.0, "max": 3.0, "n": 4}


def test_ratio_pairs_rounds_and_refuses_mismatched_samples():
    assert ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 3}
    assert summary([5.0, 1.0, 3.0])["median"] == 3.0
    with pytest.raises(ValueError):
        ratio([1.0], [1.0, 2.0])


def test_ring_allreduce_cost():
    assert scaling.allreduce_seconds(1e9, 1, 10, 1e-3) == 0.0
    # 8 Gbit/s = 1e9 bytes/s: two nodes move 2 * 1/2 of the payload, plus 2 ring phases of latency per call
    assert scaling.allreduce_seconds(1e9, 2, 8, 1e-3, calls=3) == pytest.approx(1.0 + 3 * 2 * 1e-3)
    big = scaling.allreduce_seconds(1e9, 64, 8, 0.0)
    assert big == pytest.approx(2 * 63 / 64) and big < 2.0
    assert scaling.allreduce_seconds(1e9, 8, 100, 0) < scaling.allreduce_seconds(1e9, 8, 25, 0)


def scenario(**overrides) -> scaling.Scenario:
    kw = dict(name="s", source="test", images_per_node_step=100, compute_seconds={"dense": 1.0, "jointspar": 1.0},
              overlap_seconds={"dense": 0.0, "jointspar": 0.0}, bytes_per_step={"dense": 4e7, "jointspar": 2e7},
              allreduce_calls_per_step={"dense": 2, "jointspar": 2})
    kw.update(overrides)
    return scaling.Scenario(**kw)


def test_scaling_model_predictions():
    rows = scaling.predict(scenario(), epoch_images=10_000, latency_s=0)

    def get(mode, n, bw):
        return next(r for r in rows if (r["mode"], r["nodes"], r["bandwidth_gbit"]) == (mode, n, bw))

    one = get("dense", 1, 10)
    assert one["steps_per_epoch"] == 100 and one["epoch_seconds"] == pytest.approx(100.0) and one["comm_share"] == 0
    # 8 nodes at 10 Gbit/s: 2 * 7/8 * 4e7 B / 1.25e9 B/s = 0.056 s exposed per step, 13 steps (ceil(10000 / 800))
    eight = get("dense", 8, 10)
    assert eight["exposed_comm_seconds"] == pytest.approx(0.056)
    assert eight["epoch_seconds"] == pytest.approx(13 * 1.056)
    assert get("jointspar", 8, 10)["exposed_comm_seconds"] == pytest.approx(0.028)
    for r in rows:
        assert 0 <= r["comm_share"] < 1 and r["comm_share"] <= r["comm_share_no_overlap"] + 1e-12
        assert r["step_seconds"] <= get("dense", r["nodes"], r["bandwidth_gbit"])["step_seconds"] + 1e-12
    # a backward longer than the all-reduce hides it completely
    hidden = scaling.predict(scenario(overlap_seconds={"dense": 0.5, "jointspar": 0.5}), 10_000, latency_s=0)
    assert all(r["exposed_comm_seconds"] == 0 for r in hidden if r["bandwidth_gbit"] >= 10)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """`python -m bench.cpu` end to end on ResNet-18 with 8x8 images, PGD-2, 2 images per rank."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [PYTHON, "-m", "bench.cpu", "--quick", "--image-size", "8", "--batch", "4", "--per-rank-batch", "2",
           "--attack-steps", "2", "--reps", "2", "--dat-reps", "2", "--clean-reps", "2",
           "--gpu-json", str(out / "absent.json"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "cpu.json").read_text()), proc.stdout


def test_bench_figures_are_side_by_side_ratios(tiny_bench):
    _, r, stdout = tiny_bench
    f1 = r["step_cost"]
    for name in ("attack", "naive_attack", "train", "attack_bf16_cl", "train_bf16_cl"):
        assert f1["seconds"][name]["n"] == 2 and f1["seconds"][name]["median"] > 0
    assert f1["attack_over_train"]["min"] <= f1["attack_over_train"]["median"] <= f1["attack_over_train"]["max"]
    f2 = r["published_vs_ours"]
    assert f2["attack"] == "pgd-2" and f2["world_size"] == 2 and f2["per_rank_batch"] == 2
    assert f2["speedup"]["median"] > 0 and set(f2["seconds"]) == {"ours", "ours_bf16_cl", "published",
                                                                 "published_attack_allreduce"}
    assert "published / ours DAT step" in stdout and "scaling model" in stdout


def test_published_step_is_the_described_one(tiny_bench):
    f2 = tiny_bench[1]["published_vs_ours"]
    pub, ours = f2["published_comm"], f2["ours_comm"]
    assert pub["find_unused_parameters"] is True
    assert pub["params_with_grad_after_attack"] == pub["params"] == 62  # the attack computed every weight gradient
    assert pub["attack_allreduce_calls"] == 0
    assert pub["step_bytes"] == 2 * ours["bytes_per_step"]  # two full all-reduce passes vs our one
    assert ours["bytes_per_step"] == 4 * 11_173_962  # ResNet-18 (10 classes) fp32 gradients


def test_jointspar_bytes_follow_the_active_fraction(tiny_bench):
    js = tiny_bench[1]["jointspar"]
    for loss in ("clean", "dat"):
        r = js[loss]
        assert "skipped" not in r, r.get("skipped")
        assert r["arms"] == 21 and r["jointspar"]["budget"] == 0.5 and r["jointspar"]["budget_unit"] == "bytes"
        assert 0 < r["active_fraction"] < 1
        assert r["bytes_ratio"] == pytest.approx(r["active_fraction"], rel=1e-9)
    assert 0 < js["dat"]["attack_share_dense"] < 1 and js["clean"]["attack_share_dense"] is None


def test_scaling_outputs(tiny_bench):
    out, r, _ = tiny_bench
    sc = r["scaling"]
    assert sc["assumptions"] and [s["name"] for s in sc["scenarios"]] == ["CPU node (measured)", "H100 node"]
    assert len(sc["rows"]) == 2 * 2 * len(scaling.NODES) * len(scaling.BANDWIDTHS_GBIT)
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "scaling.md").read_text()
    assert table.count("\n| 64 |") == 2
    h100 = [row for row in sc["rows"] if row["scenario"] == "H100 node" and row["mode"] == "dense"]
    assert all(math.isclose(row["images_per_second"], 10_000 * row["nodes"]) for row in h100 if row["nodes"] == 1)


def test_published_step_variant_without_no_sync_all_reduces_every_attack_iteration(tiny_bench):
    f2 = tiny_bench[1]["published_vs_ours"]
    pub = f2["published_attack_allreduce_comm"]
    per_pass = (pub["step_allreduce_calls"] - pub["attack_allreduce_calls"]) / 2
    assert per_pass >= 1 and pub["attack_allreduce_calls"] == 2 * per_pass  # PGD-2
    assert pub["step_bytes"] == 4 * f2["ours_comm"]["bytes_per_step"]
    assert f2["speedup_vs_attack_allreduce"]["median"] > 0
