"""bench/gpu.sh --smoke: every code path of the GPU benchmark, tiny and on the CPU."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.gpu import run_logged
from tests.conftest import ROOT, torch_env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--out", str(out)], cwd=ROOT, env=torch_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "gpu.json").read_text()), proc.stdout, out


def test_smoke_runs_every_variant_or_says_why_not(smoke):
    r, stdout, _ = smoke
    assert r["smoke"] is True and r["device"] == "cpu" and r["attack_steps"] == 2 and r["batch"] == 4
    assert set(r["variants"]) == {"fp32", "bf16", "bf16_cl", "bf16_cl_cudnnbench", "bf16_cl_jointspar",
                                  "bf16_cl_graph", "bf16_cl_compile", "bf16_cl_compile_unfused", "bf16_cl_compile_graph",
                                  "bf16_cl_compile_adv", "bf16_cl_compile_attack", "bf16_cl_compile_jointspar"}
    for name, v in r["variants"].items():
        if "graph" in name:
            assert "CUDA" in v["skipped"]
            continue
        assert "error" not in v, (name, v.get("traceback"))
        assert v["images_per_second"] > 0 and v["attack_seconds"] > 0 and v["train_seconds"] > 0
        assert v["images"] == 4 and 0 < v["attack_share"] < 1 and v["model_tflops"] > 0 and v["loss_finite"]
    assert r["variants"]["bf16_cl_compile"]["settings"]["compile"] == "all"
    assert r["variants"]["bf16_cl_compile_attack"]["settings"]["compile"] == "attack"
    fused = {name: v["settings"]["fused_pgd_step"] for name, v in r["variants"].items()
             if "compile" in name and "settings" in v}  # the CUDA-graphed ones are skipped here
    assert fused.pop("bf16_cl_compile_unfused") is False and all(fused.values())
    assert r["variants"]["fp32"]["settings"] == {"amp": "off", "channels_last": "off", "compile": "off",
                                                 "fused_pgd_step": True, "cuda_graph_attack": False,
                                                 "cudnn_benchmark": False, "overrides": []}
    assert "jointspar.enabled=true" in r["variants"]["bf16_cl_jointspar"]["settings"]["overrides"]
    f, adv, dat = r["flops"], r["variants"]["bf16_cl_compile_adv"], r["variants"]["bf16_cl_compile"]
    assert adv["settings"]["overrides"] == ["train.loss=adv"]  # Madry: one training pass, on x_adv
    assert adv["model_tflops"] * 1e12 == pytest.approx(
        adv["images_per_second"] * (2 * f["attack_iteration_per_image"] + f["train_step_per_image"]))
    assert dat["model_tflops"] * 1e12 == pytest.approx(dat["images_per_second"] * f["dat_step_per_image"])
    assert r["best"] in r["variants"] and stdout.strip().splitlines()[-1].startswith("best: ")


def test_smoke_runs_the_trainer_end_to_end(smoke):
    """The one GPU run also exercises the trainer's CUDA paths as a user runs it (torchrun, one rank)."""
    r, stdout, out = smoke
    e2e = r["trainer_e2e"]
    assert e2e["returncode"] == 0, e2e.get("error")
    assert e2e["backend"] == "gloo, one rank" and e2e["epochs"] == 2 and e2e["checkpoint"] is True
    assert e2e["images_per_second"] > 0 and 0 < e2e["attack_share"] < 1
    assert 0 <= e2e["test_robust_acc"] <= e2e["test_clean_acc"] <= 1
    assert "trainer end to end (torchrun, gloo, one rank, 2 epochs)" in stdout
    assert "epoch" in (out / "trainer-e2e.log").read_text()  # its output is kept


def test_smoke_flop_accounting_and_gemm_probe(smoke):
    r, _, _ = smoke
    f = r["flops"]
    assert 1.0e9 < f["forward_per_image"] < 1.2e9  # CIFAR ResNet-18: 0.56 GMAC
    assert f["attack_iteration_per_image"] == pytest.approx(2 * f["forward_per_image"], rel=0.02)
    assert f["train_step_per_image"] == pytest.approx(3 * f["forward_per_image"], rel=0.02)
    assert f["dat_step_per_image"] == pytest.approx(2 * f["attack_iteration_per_image"] + 2 * f["train_step_per_image"])
    assert r["gemm"]["n"] == 256 and r["gemm"]["tflops"] > 0


def test_time_budget_skips_variants_instead_of_overrunning(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--variants", "fp32,bf16_cl_compile",
                           "--budget-seconds", "150", "--out", str(tmp_path)],
                          cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["variants"]["fp32"]["images_per_second"] > 0
    assert "time budget" in r["variants"]["bf16_cl_compile"]["skipped"]  # 150 s + the 90 s kept for the e2e run
    assert r["trainer_e2e"]["returncode"] == 0


def test_unknown_variant_is_a_one_line_error(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--variants", "fp32,turbo", "--out", str(tmp_path)],
                          cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variant(s) turbo" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_instead_of_benchmarking_the_cpu(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--out", str(tmp_path)], cwd=ROOT, env=torch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("bench/gpu.sh: no CUDA device visible")
    assert not (tmp_path / "gpu.json").exists()


def test_e2e_overrides_reach_the_trainer_and_no_e2e_skips_it(tmp_path):
    run = lambda *extra: subprocess.run(  # noqa: E731
        ["bash", "bench/gpu.sh", "--smoke", "--variants", "fp32", *extra, "--out", str(tmp_path)],
        cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=300)
    proc = run("--e2e-set", "run.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    e2e = json.loads((tmp_path / "gpu.json").read_text())["trainer_e2e"]
    assert e2e["epochs"] == 1 and e2e["command"].endswith("--set run.epochs=1")
    proc = run("--no-e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainer_e2e" not in json.loads((tmp_path / "gpu.json").read_text())


def test_a_timed_out_torchrun_leaves_no_worker_behind(tmp_path):
    """On a timeout the end-to-end run's torchrun is stopped with its worker (which runs in a session of its
    own: killing torchrun alone would leave it on the GPU), and its output is kept."""
    script = tmp_path / "hang.py"
    pid_file = tmp_path / "worker.pid"
    script.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      "print('worker up', flush=True)\ntime.sleep(600)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]
    log = tmp_path / "run.log"
    with pytest.raises(subprocess.TimeoutExpired):
        run_logged(cmd, str(log), timeout=20, env=torch_env())
    worker = int(pid_file.read_text())
    for _ in range(50):  # the worker is gone (or a zombie about to be reaped by init)
        try:
            os.kill(worker, 0)
            state = open(f"/proc/{worker}/stat").read().split(")")[-1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            break
        if state == "Z":
            break
        time.sleep(0.2)
    else:
        os.kill(worker, 9)
        pytest.fail("the torchrun worker outlived the timeout")
    assert "worker up" in log.read_text()
