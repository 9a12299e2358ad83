"""Real two-rank torchrun (gloo) runs of the trainer."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT, free_port, read_jsonl, torch_env, torchrun, train_cli
from trainer import checkpoint
from trainer.metrics import PHASES

KEYS = {"epoch", "epoch_seconds", "data_seconds", "attack_seconds", "compute_seconds", "comm_seconds",
        "optimizer_seconds", "eval_seconds", "comm_bytes", "dense_comm_bytes", "images_per_second",
        "train_loss", "test_clean_acc", "test_robust_acc", "lr"}


def test_two_rank_run_writes_metrics_checkpoints_and_config(tmp_path, synthetic_args):
    out = tmp_path / "run"
    proc = torchrun(["-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=2"])
    assert "epoch" in proc.stdout and proc.stdout.count("\n") >= 4  # header + one table row per epoch
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert KEYS <= r.keys()
        assert 0 <= r["test_clean_acc"] <= 1 and 0 <= r["test_robust_acc"] <= r["test_clean_acc"]
        phases = sum(r[f"{p}_seconds"] for p in PHASES)  # the untimed rest: the progress bar, the heartbeat
        assert phases == pytest.approx(r["epoch_seconds"], rel=0.10, abs=0.05)
        # dense: every step all-reduces each gradient exactly once (4 steps of 256 / 32 per epoch)
        param_bytes = r["dense_comm_bytes"] // 8
        assert r["comm_bytes"] == r["dense_comm_bytes"] == 8 * param_bytes > 0
        assert r["images"] == 256 and r["images_per_second"] > 0
    assert (out / "checkpoint-latest.pt").exists() and (out / "checkpoint-best.pt").exists()
    assert "attack:" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("loss, bucket_mb, overlap, micro", [
    ("dat", 25, "1", 1), ("adv", 25, "0", 1), ("clean", 25, "1", 1), ("dat", 0.02, "1", 1),
    ("dat", 0.02, "1", 4)])  # gradient accumulation over 4 micro-batches: still one pass, at the end
def test_exactly_one_gradient_all_reduce_pass_per_step(tmp_path, loss, bucket_mb, overlap, micro):
    base = tmp_path / "c"
    torchrun([str(ROOT / "tests" / "workers" / "count_collectives.py"), str(base), loss, str(bucket_mb), overlap,
              str(micro)])
    ranks = [json.loads((tmp_path / f"c.rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        for calls in rank["per_step"]:
            assert {c["op"] for c in calls} == {"all_reduce"}  # no other collective inside the step
            assert len(calls) == rank["buckets"]  # one call per bucket ...
            assert sum(c["bytes"] for c in calls) == rank["param_bytes"]  # ... each gradient reduced once
        if bucket_mb >= 1:
            assert rank["buckets"] == 1
        else:
            assert rank["buckets"] > 1
    assert ranks[0]["digest"] == ranks[1]["digest"]  # both ranks applied the same update


def test_gradient_sync_leaves_every_rank_the_mean_of_the_ranks_gradients(tmp_path):
    """LARS/LAMB are blind to a gradient's scale, so a sum instead of the mean would pass every training test."""
    torchrun([str(ROOT / "tests" / "workers" / "grad_sync_mean.py"), str(tmp_path / "g")])
    ranks = [json.loads((tmp_path / f"g.rank{r}.json").read_text()) for r in range(2)]
    for overlap in ("True", "False"):
        local0, local1 = ranks[0][overlap]["local"], ranks[1][overlap]["local"]
        assert ranks[0][overlap]["buckets"] > 1 and ranks[0][overlap]["calls"] == ranks[0][overlap]["buckets"]
        for rank in ranks:
            synced = rank[overlap]["synced"]
            assert synced.keys() == local0.keys() | {"unused.weight", "unused.bias"}
            for name, grad in synced.items():
                if name.startswith("unused"):
                    assert not torch.tensor(grad).any()
                    continue
                mean = (torch.tensor(local0[name]) + torch.tensor(local1[name])) / 2
                assert not torch.equal(torch.tensor(local0[name]), torch.tensor(local1[name]))
                torch.testing.assert_close(torch.tensor(grad), mean, msg=name)


def _params(path):
    state = torch.load(path, weights_only=True)
    return state["model"], state["optimizer"]


def _kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a node's loss or a pod's kill does: torchrun starts each worker
    in a session of its own, so killing its process group would leave them training."""
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.pid]
    for pid in [proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in children:  # gone before the test goes on (they are torchrun's children, not ours to wait for)
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            time.sleep(0.01)


def _parent(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _launched_until(args: list[str], out: Path, epochs: int, **popen) -> subprocess.Popen:
    """torchrun of `args` into `out`, running in the background, returned once `epochs` epochs are logged."""
    cmd = [PYTHON, "-m", "trainer.launch", "--standalone", "--nproc_per_node=2", *args,
           "--set", f"run.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=torch_env(), stdout=subprocess.DEVNULL, **popen)
    deadline, metrics = time.time() + 240, out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= epochs:
            break
        time.sleep(0.05)
    return proc


def test_a_killed_worker_and_the_rank_that_lost_it_exit_with_statuses_the_operator_retries(tmp_path,
                                                                                           synthetic_args):
    """Two single-rank "nodes" (two dat-torchrun processes, as two pods run them); node 1's worker is killed
    (SIGKILL, as the OOM killer does) mid-run. Its launcher exits 137; node 0's rank finds its collective
    broken, says so in one line and exits 200, which its launcher passes on. torchrun alone exits 1 on both,
    which restartPolicy ExitCode treats as permanent: one preempted node would end the job."""
    out, port = tmp_path / "run", free_port()
    args = ["-m", "trainer", *synthetic_args, "--set", "run.epochs=4", "--set", "data.synthetic_train_size=1024",
            "--set", f"run.output_dir={out}"]
    nodes = [subprocess.Popen([PYTHON, "-m", "trainer.launch", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *args],
                              cwd=ROOT, env=torch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    deadline, metrics = time.time() + 240, out / "metrics.jsonl"
    while time.time() < deadline and nodes[0].poll() is None and not metrics.exists():
        time.sleep(0.05)
    assert nodes[0].poll() is None, "the run ended before the kill; make it longer"
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == nodes[1].pid]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    (_, err0), (_, err1) = (node.communicate(timeout=120) for node in nodes)
    assert nodes[1].returncode == 137, err1[-3000:]
    assert nodes[0].returncode == 200, err0[-3000:]
    assert "dat-train: [rank 0] lost contact with another rank (" in err0, err0[-3000:]
    assert "Traceback" not in err0 + err1
    assert checkpoint.load(str(out / "checkpoint-latest.pt"))["epoch"] >= 1  # what the restart resumes from


@pytest.mark.parametrize("node_rank, words", [(0, "1/2 clients joined"), (1, "trying to connect to")])
def test_a_rendezvous_nobody_joins_exits_with_a_status_the_operator_retries(tmp_path, node_rank, words):
    """A node alone: the other's pod not scheduled in time (node 0 waits for it), or the master unreachable
    (node 1 cannot connect). One line and 201, not torchrun's page of C++ frames and 1."""
    proc = subprocess.run([PYTHON, "-m", "trainer.launch", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--rdzv_conf=timeout=3",
                           "-m", "trainer", "--set", f"run.output_dir={tmp_path}"],
                          cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 201, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dat-torchrun: rendezvous failed (") and words in last, last
    assert "Traceback" not in proc.stderr

@pytest.mark.parametrize("nproc, line", [
    ("0", "dat-torchrun: --nproc-per-node 0: must be >= 1 (or auto, cpu, gpu)"),
    ("abc", "dat-torchrun: Unsupported nproc_per_node value: abc; see dat-torchrun --help")])
def test_bad_launcher_settings_are_one_line(nproc, line):
    proc = subprocess.run([PYTHON, "-m", "trainer.launch", "--standalone", f"--nproc_per_node={nproc}", "-m",
                           "trainer", "--check"], cwd=ROOT, env=torch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr[-3000:]

def test_a_users_mistake_exits_2_through_the_launcher(tmp_path, synthetic_args):
    proc = torchrun(["-m", "trainer", *synthetic_args, "--set", f"run.output_dir={tmp_path}", "--set", "optim.lr=-1"],
                    check=False)
    assert proc.returncode == 2 and "dat-train: config error: optim.lr must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr

def test_killed_run_resumes_bit_identically(tmp_path, synthetic_args):
    args = ["-m", "trainer", *synthetic_args, "--set", "run.epochs=4", "--set", "data.synthetic_train_size=512"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun([*args, "--set", f"run.output_dir={straight}"])

    # start the same run, SIGKILL torchrun and its workers after epoch 2 is on disk, then start it again
    proc = _launched_until(args, killed, 2, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    _kill_with_workers(proc)
    done = len(read_jsonl(metrics))
    assert 2 <= done < 4, "the run was not interrupted mid-way; make epochs longer"
    before = torch.load(killed / "checkpoint-latest.pt", weights_only=True)["epoch"]
    assert before >= 2  # the last good checkpoint survived the kill

    resumed = torchrun([*args, "--set", f"run.output_dir={killed}"])
    assert f"resumed from {killed / 'checkpoint-latest.pt'}" in resumed.stdout
    model_a, opt_a = _params(straight / "checkpoint-latest.pt")
    model_b, opt_b = _params(killed / "checkpoint-latest.pt")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for pid, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][pid][name]))
    la = [(r["epoch"], r["train_loss"], r["test_robust_acc"]) for r in read_jsonl(straight / "metrics.jsonl")]
    lb = [(r["epoch"], r["train_loss"], r["test_robust_acc"]) for r in read_jsonl(killed / "metrics.jsonl")]
    assert la == lb


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path, synthetic_args):
    out = tmp_path / "run"
    torchrun(["-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=1"], nproc=1)
    ckpt = out / "checkpoint-latest.pt"
    before = ckpt.read_bytes()
    proc = subprocess.run([PYTHON, "-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}",
                           "--set", "model.name=resnet18", "--set", "run.epochs=2"],
                          cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint is for model 'small_cnn'" in proc.stderr
    assert "Traceback" not in proc.stderr and ckpt.read_bytes() == before


def test_corrupt_checkpoint_is_one_line_error(tmp_path, synthetic_args):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-latest.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([PYTHON, "-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}"],
                          cwd=ROOT, env=torch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a loadable checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint-latest.pt").read_bytes() == b"not a checkpoint"


def test_resume_on_a_different_world_size(tmp_path, synthetic_args):
    """Elastic restarts (or a job re-submitted on fewer nodes) resume from the checkpoint: same global batch and
    steps per epoch, the epochs continue from the checkpoint's, and training goes on."""
    out = tmp_path / "run"
    common = ["-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}"]
    torchrun([*common, "--set", "run.epochs=2"], nproc=2)
    saved = checkpoint.load(str(out / "checkpoint-latest.pt"))
    assert saved["world_size"] == 2
    proc = torchrun([*common, "--set", "run.epochs=3"], nproc=1)
    assert "resumed from" in proc.stdout and "world=1" in proc.stdout and "steps/epoch=8" in proc.stdout
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[2]["images"] == records[0]["images"] == 256
    resumed = checkpoint.load(str(out / "checkpoint-latest.pt"))
    assert resumed["epoch"] == 3 and resumed["world_size"] == 1
    assert any(not torch.equal(resumed["model"][k], v) for k, v in saved["model"].items())


def test_extending_a_finished_run_follows_the_longer_schedule(tmp_path, synthetic_args):
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=2"]).returncode == 0
    again = train_cli([*common, "--set", "run.epochs=2"])
    assert again.returncode == 0 and "nothing to do: the checkpoint is from epoch 2 and run.epochs is 2" in again.stdout
    longer = train_cli([*common, "--set", "run.epochs=4"])
    assert longer.returncode == 0 and "(saved after epoch 2)" in longer.stdout
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    # cosine over 4 epochs from epoch 3 on, not the 2-epoch schedule's final 0
    assert len(lrs) == 4 and lrs[0] > lrs[2] > lrs[3] > 0


def test_a_changed_model_says_what_differs(tmp_path, synthetic_args):
    out = tmp_path / "run"
    assert train_cli([*synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=1"]).returncode == 0
    proc = train_cli([*synthetic_args, "--set", f"run.output_dir={out}", "--set", "model.width=16"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the model differs from the checkpoint's (0.weight: shape (8, " in proc.stderr


def test_a_changed_optimizer_is_refused_before_anything_is_rewritten(tmp_path, synthetic_args):
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0  # LAMB, the default
    kept = {name: (out / name).read_bytes() for name in ("checkpoint-latest.pt", "config.yaml", "metrics.jsonl")}
    for optimizer in ("sgd", "lars"):
        proc = train_cli([*common, "--set", "run.epochs=2", "--set", f"optim.name={optimizer}"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"trained with 'lamb', the config says optim.name='{optimizer}'" in proc.stderr
        assert {name: (out / name).read_bytes() for name in kept} == kept


def test_a_resumed_run_uses_this_configs_optimizer_settings(tmp_path, synthetic_args):
    """config.yaml is what the run used: a changed optim.lr or weight decay applies from the resumed epoch."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "optim.schedule=constant"]
    assert train_cli([*common, "--set", "run.epochs=1", "--set", "optim.lr=0.01"]).returncode == 0
    proc = train_cli([*common, "--set", "run.epochs=2", "--set", "optim.lr=0.002", "--set", "optim.weight_decay=0"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "differ from the checkpoint's: optim.lr, optim.weight_decay" in proc.stderr
    first, second = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    assert second == pytest.approx(first / 5)
    groups = checkpoint.load(str(out / "checkpoint-latest.pt"))["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0}


def test_two_ranks_with_a_compiled_attack_and_jointspar(tmp_path, synthetic_args):
    """perf.compile=attack (inductor's CPU backend here) under torchrun with JointSpar: the attack compiled,
    the training pass eager, both ranks in step."""
    out = tmp_path / "run"
    proc = torchrun(["-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=2",
                     "--set", "perf.compile=attack", "--set", "optim.name=lars", "--set", "jointspar.enabled=true",
                     "--set", "jointspar.budget=4"], timeout=600)
    assert "compile=attack" in proc.stdout and "jointspar=on" in proc.stdout
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["train_loss"] == r["train_loss"] and r["comm_bytes"] < r["dense_comm_bytes"] for r in records)
    assert (out / "checkpoint-latest.pt").exists()


def test_resume_names_schedule_changes_and_survives_a_newer_optimizer_library(tmp_path, synthetic_args):
    """A newer timm may add settings to the optimizer's param groups: a checkpoint that names its optimizer
    still resumes. Changes to the schedule are named like any other optimizer setting. And a run with
    nothing left to do leaves config.yaml describing the checkpoint."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0
    ckpt = out / "checkpoint-latest.pt"
    state = checkpoint.load(str(ckpt))
    for group in state["optimizer"]["param_groups"]:  # as if saved by an older timm
        group.pop("caution", None), group.pop("corrected_weight_decay", None)
    checkpoint.save_atomic(state, str(ckpt))
    config_before = (out / "config.yaml").read_bytes()
    idle = train_cli([*common, "--set", "run.epochs=1"])
    assert idle.returncode == 0 and "nothing to do" in idle.stdout
    assert (out / "config.yaml").read_bytes() == config_before
    # a finished run met with other settings: a new run was meant, and it must not end as a success
    other = train_cli([*common, "--set", "run.epochs=1", "--set", "optim.lr=0.5"])
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert "this folder's run is finished (1 epochs) and this config differs from it (optim.lr" in other.stderr
    assert "resumed" not in other.stdout + other.stderr  # it was not: no line may say so before the refusal
    assert (out / "config.yaml").read_bytes() == config_before
    proc = train_cli([*common, "--set", "run.epochs=2", "--set", "optim.schedule=multistep"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "differ from the checkpoint's: optim.schedule" in proc.stderr


def test_a_run_killed_within_an_epoch_resumes_from_its_last_step_checkpoint(tmp_path):
    """run.checkpoint_every_steps: killed at step 7 of epoch 2 (16 steps per epoch on 2 ranks, a checkpoint
    every 3), the restarted run goes on from step 6, not from the epoch's start, and ends where an
    uninterrupted run without step checkpoints ends: same weights, same per-epoch loss, accuracy and bytes,
    same RNG streams (the PGD random starts and the augmentation), same per-rank BatchNorm statistics (the
    attack reads them in eval mode)."""
    worker = str(Path(__file__).parent / "workers" / "crash_mid_epoch.py")
    killed = torchrun([worker, str(tmp_path / "run"), "7", "{}"], nproc=2, check=False)
    assert killed.returncode != 0
    state = checkpoint.load(str(tmp_path / "run" / "checkpoint-latest.pt"))
    assert (state["epoch"], state["step"]) == (1, 6)
    resumed = torchrun([worker, str(tmp_path / "run"), "0", "{}"], nproc=2)
    assert "resumed from" in resumed.stdout and "(saved after step 6 of epoch 2)" in resumed.stdout
    torchrun([worker, str(tmp_path / "whole"), "0", '{"run": {"checkpoint_every_steps": 0}}'], nproc=2)
    got, want = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("run", "whole"))
    assert [r["epoch"] for r in got] == [1, 2, 3] and got[1]["resumed_at_step"] == 6
    assert [r["steps"] for r in got] == [16, 10, 16] and [r["steps"] for r in want] == [16, 16, 16]
    for a, b in zip(got, want):
        for key in ("train_loss", "train_clean_acc", "train_adv_acc"):  # each rank's running sums, restored as
            assert a[key] == b[key], (a["epoch"], key)                  # they were: summed in the same order
        for key in ("test_clean_acc", "test_robust_acc", "lr", "images", "comm_bytes", "dense_comm_bytes",
                    "comm_calls"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
    final = [checkpoint.load(str(tmp_path / name / "checkpoint-latest.pt"))["model"] for name in ("run", "whole")]
    for key in final[1]:
        assert torch.allclose(final[0][key].float(), final[1][key].float(), rtol=1e-4, atol=1e-6), key


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_after_a_checkpoint(tmp_path):
    """One node of a job preempted: rank 1 alone gets SIGTERM during step 7 of epoch 2 (no step checkpoints
    configured). Both ranks learn of it at the same step (the poll of step 8 carries it, step 9's returns it),
    save a step checkpoint together and exit 143; the restart ends where an uninterrupted run ends."""
    worker = str(Path(__file__).parent / "workers" / "crash_mid_epoch.py")
    settings = json.dumps({"run": {"checkpoint_every_steps": 0}})
    stopped = torchrun([worker, str(tmp_path / "run"), "sigterm:7", settings], nproc=2, check=False)
    assert stopped.returncode == 143  # the workers' status, which restartPolicy ExitCode retries
    assert "rank 0: stopped by SIGTERM after step 9 of epoch 2:" in stopped.stderr, stopped.stderr[-3000:]
    assert "rank 1: stopped by SIGTERM after step 9 of epoch 2\n" in stopped.stderr  # rank 0 says where it is kept
    assert "exitcode  : 143" in stopped.stderr  # torchrun's report of its workers
    assert "exitcode  : -15" not in stopped.stderr  # torchrun's SIGTERM to the other rank cut nothing short
    state = checkpoint.load(str(tmp_path / "run" / "checkpoint-latest.pt"))
    assert (state["epoch"], state["step"]) == (1, 9)
    resumed = torchrun([worker, str(tmp_path / "run"), "0", settings], nproc=2)
    assert "(saved after step 9 of epoch 2)" in resumed.stdout
    torchrun([worker, str(tmp_path / "whole"), "0", settings], nproc=2)
    final = [checkpoint.load(str(tmp_path / name / "checkpoint-latest.pt"))["model"] for name in ("run", "whole")]
    for key in final[1]:
        assert torch.allclose(final[0][key].float(), final[1][key].float(), rtol=1e-4, atol=1e-6), key


def test_sigterm_to_torchrun_checkpoints_and_the_restart_ends_as_an_uninterrupted_run(tmp_path, synthetic_args):
    """What Kubernetes does to a pod it deletes or preempts: SIGTERM to PID 1 (torchrun), which passes it on
    to its workers and kills them 30 s later. The run saves where it is and exits with one line; run again,
    it resumes from there and ends with the weights and per-epoch figures of a run that was never stopped."""
    args = ["-m", "trainer", *synthetic_args, "--set", "run.epochs=4", "--set", "data.synthetic_train_size=1024"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    torchrun([*args, "--set", f"run.output_dir={straight}"])
    proc = _launched_until(args, stopped, 1, stderr=subprocess.PIPE, text=True)
    assert proc.poll() is None, "the run ended before the signal; make it longer"
    proc.send_signal(signal.SIGTERM)  # to torchrun alone, as the kubelet signals a container's PID 1
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143  # as the shell reports SIGTERM: the operator's ExitCode policy restarts it
    assert "dat-train: stopped by SIGTERM after " in err, err[-3000:]
    assert "Traceback" not in err.split("dat-train: stopped by")[0]  # the workers' one line, no trace of theirs
    state = checkpoint.load(str(stopped / "checkpoint-latest.pt"))
    assert 1 <= state["epoch"] < 4
    resumed = torchrun([*args, "--set", f"run.output_dir={stopped}"])
    assert f"resumed from {stopped / 'checkpoint-latest.pt'}" in resumed.stdout
    model_a, _ = _params(straight / "checkpoint-latest.pt")
    model_b, _ = _params(stopped / "checkpoint-latest.pt")
    for key in model_a:
        assert torch.allclose(model_a[key].float(), model_b[key].float(), rtol=1e-4, atol=1e-6), key
    la = [(r["epoch"], r["test_robust_acc"], r["images"]) for r in read_jsonl(straight / "metrics.jsonl")]
    lb = [(r["epoch"], r["test_robust_acc"], r["images"]) for r in read_jsonl(stopped / "metrics.jsonl")]
    assert la == lb


def test_a_step_checkpoint_resumed_at_another_world_size_replays_its_epoch(tmp_path):
    """Killed within epoch 2 on 2 ranks, restarted on 1: the batch order differs, so epoch 2 starts over from
    the step checkpoint's weights, and its record counts the replayed epoch alone (images, JointSpar steps)."""
    worker = str(Path(__file__).parent / "workers" / "crash_mid_epoch.py")
    sparse = json.dumps({"optim": {"name": "lars"}, "jointspar": {"enabled": True, "budget": 4}})
    assert torchrun([worker, str(tmp_path / "run"), "7", sparse], nproc=2, check=False).returncode != 0
    # in this process: the JointSpar counts of the 6 steps done on 2 ranks are dropped with them
    from trainer.config import config_from_dict
    from trainer.distributed import DistInfo
    from trainer.train import Trainer
    latest = str(tmp_path / "run" / checkpoint.LATEST)
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path / "probe"), "resume": latest},  # named: on purpose
                            "data": {"name": "synthetic", "synthetic_train_size": 256, "synthetic_image_size": 16,
                                     "batch_size": 16}, "model": {"name": "small_cnn", "width": 8},
                            **json.loads(sparse)})
    probe = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                                  device=torch.device("cpu")))
    probe.resume(latest)
    assert (probe.start_epoch, probe.start_step) == (2, 0)
    assert probe.jointspar.epoch_stats()["jointspar_active_arms"] is None  # no step counted yet
    resumed = torchrun([worker, str(tmp_path / "run"), "0", sparse], nproc=1)
    assert "so epoch 2 starts over" in resumed.stderr
    second = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]
    assert second["epoch"] == 2 and "resumed_at_step" not in second and second["images"] == 256


def test_ranks_on_their_own_volumes_resume_together(tmp_path):
    """A multi-node job whose pods keep run.output_dir on their own volumes (emptyDir): only rank 0's holds
    checkpoints. A restart must resume every rank from rank 0's checkpoint (a rank starting fresh while the
    others resume would wait in a collective until the timeout, then again after every restart)."""
    worker = str(Path(__file__).parent / "workers" / "crash_mid_epoch.py")
    per_rank = str(tmp_path / "node{rank}")
    settings = {"dist": {"timeout_seconds": 60}}
    torchrun([worker, per_rank, "0", json.dumps({**settings, "run": {"epochs": 1}})], nproc=2)
    assert (tmp_path / "node0" / checkpoint.LATEST).exists()
    assert not (tmp_path / "node1" / checkpoint.LATEST).exists()
    resumed = torchrun([worker, per_rank, "0", json.dumps({**settings, "run": {"epochs": 2}})], nproc=2, timeout=240)
    assert "resumed from" in resumed.stdout and "(saved after epoch 1)" in resumed.stdout
    assert [r["epoch"] for r in read_jsonl(tmp_path / "node0" / "metrics.jsonl")] == [1, 2]
    assert checkpoint.load(str(tmp_path / "node0" / checkpoint.LATEST))["epoch"] == 2


def test_a_step_checkpoint_past_a_shorter_epoch_replays_it(tmp_path):
    """Resumed on purpose (--resume) with less data: the saved step 6 lies past the new 2-step epoch, so the
    epoch starts over instead of ending with no step trained."""
    worker = str(Path(__file__).parent / "workers" / "crash_mid_epoch.py")
    assert torchrun([worker, str(tmp_path / "run"), "7", "{}"], nproc=2, check=False).returncode != 0
    latest = str(tmp_path / "run" / checkpoint.LATEST)
    smaller = {"run": {"resume": latest}, "data": {"synthetic_train_size": 64}}
    resumed = torchrun([worker, str(tmp_path / "run"), "0", json.dumps(smaller)], nproc=2)
    assert "so epoch 2 starts over" in resumed.stderr
    second = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]
    assert second["epoch"] == 2 and second["images"] == 64 and second["images_per_second"] > 0
