"""What a run leaves in run.output_dir when it starts over, diverges, is killed while saving or resumes
with another batch size: no earlier run is lost or wrongly resumed, no broken model is saved."""
import json
import os
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, free_port, read_jsonl, torch_env, train_cli
from trainer import checkpoint, train
from trainer.metrics import MetricsLog


def test_a_fresh_start_sets_the_earlier_run_aside(tmp_path, synthetic_args):
    """--no-resume in a folder with a finished run: the earlier run's files move to previous-*/ before
    anything else happens, so a restart of the new run (killed before its first save) cannot resume the
    earlier one. Partial files of a killed save are removed."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=1"]
    assert train_cli([*common, "--set", "run.seed=0"]).returncode == 0
    earlier = {name: (out / name).read_bytes() for name in ("checkpoint-latest.pt", "metrics.jsonl", "config.yaml")}
    (out / "checkpoint-latest.pt.tmp-4242").write_bytes(b"half a checkpoint")
    proc = train_cli([*common, "--set", "run.seed=7", "--no-resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (previous,) = out.glob("previous-*")
    assert "starting fresh: moved the earlier run's checkpoint-latest.pt" in proc.stderr
    assert {name: (previous / name).read_bytes() for name in earlier} == earlier
    assert not list(out.glob("*.tmp-*"))
    assert checkpoint.load(str(out / "checkpoint-latest.pt"))["seed"] == 7
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_resuming_the_earlier_run_sets_the_current_one_aside(tmp_path, synthetic_args):
    """The way back from an accidental fresh start: --resume previous-*/ moves the current run aside too."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=1"]
    assert train_cli([*common, "--set", "run.seed=1"]).returncode == 0
    assert train_cli([*common, "--set", "run.seed=2", "--no-resume"]).returncode == 0
    (first,) = out.glob("previous-*")
    second = (out / "checkpoint-latest.pt").read_bytes()
    refused = train_cli([*common, "--resume", str(first), "--set", "model.width=16", "--set", "run.epochs=2"])
    assert refused.returncode == 2 and "the model differs from the checkpoint's" in refused.stderr
    assert list(out.glob("previous-*")) == [first] and (out / "checkpoint-latest.pt").read_bytes() == second
    proc = train_cli([*common, "--set", "run.seed=1", "--resume", str(first), "--set", "run.epochs=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = [p for p in out.glob("previous-*") if p != first]
    assert len(aside) == 1 and (aside[0] / "checkpoint-latest.pt").read_bytes() == second
    assert checkpoint.load(str(out / "checkpoint-latest.pt"))["epoch"] == 2
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(out / "metrics.jsonl")[0] == read_jsonl(first / "metrics.jsonl")[0]  # run 1's epoch 1
    assert f"resuming {first}/checkpoint-latest.pt: moved the earlier run's" in proc.stderr
    assert (out / "checkpoint-best.pt").read_bytes() == (first / "checkpoint-best.pt").read_bytes()


def test_resuming_an_older_checkpoint_of_this_folder_keeps_the_later_epochs(tmp_path, synthetic_args):
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "eval.every=1"]
    assert train_cli([*common, "--set", "run.epochs=2", "--set", "eval.steps=1"]).returncode == 0
    later = (out / "checkpoint-latest.pt").read_bytes()
    older = out / "checkpoint-older.pt"
    state = checkpoint.load(str(out / "checkpoint-latest.pt"))
    state["epoch"] = 1
    checkpoint.save_atomic(state, str(older))
    proc = train_cli([*common, "--set", "run.epochs=3", "--resume", str(older)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (aside,) = out.glob("previous-*")
    assert (aside / "checkpoint-latest.pt").read_bytes() == later
    assert [r["epoch"] for r in read_jsonl(aside / "metrics.jsonl")] == [1, 2]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_fresh_starts_in_the_same_second_get_folders_of_their_own(tmp_path):
    from trainer.train import set_aside_earlier_run

    folders = []
    for run in ("run1", "run2", "run3"):
        (tmp_path / "metrics.jsonl").write_text(run)
        folders.append(set_aside_earlier_run(str(tmp_path)))
    assert len(set(folders)) == 3
    assert [open(f"{folder}/metrics.jsonl").read() for folder in folders] == ["run1", "run2", "run3"]


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_args):
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "optim.name=sgd",
              "--set", "optim.schedule=constant", "--set", "optim.warmup_epochs=0"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0
    good = (out / "checkpoint-latest.pt").read_bytes()
    proc = train_cli([*common, "--set", "run.epochs=2", "--set", "optim.lr=1e30", "--set",
                      f"metrics.port={free_port()}", "--set", "run.checkpoint_every_steps=2"],
                     DAT_METRICS_DIR=str(tmp_path / "metrics"))  # no checkpoint within the diverging epoch either
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # what the pod served last (the file its endpoint reads): the run ended, and how
    served = (tmp_path / "metrics" / "local-rank-0.prom").read_text()
    outcome = [line for line in served.splitlines() if line.startswith("dat_training_outcome{")]
    assert len(outcome) == 1 and 'outcome="diverged"' in outcome[0] and outcome[0].endswith(" 1.0"), outcome
    # the run's id is the one its checkpoints carry (so a resumed run keeps its alerts' history)
    assert f'run_id="{checkpoint.load(str(out / "checkpoint-latest.pt"))["run_id"]}"' in outcome[0]
    assert "epoch 2: the " in proc.stderr and "(diverged)" in proc.stderr
    assert "add --no-resume if that checkpoint is already broken" in proc.stderr
    assert (out / "checkpoint-latest.pt").read_bytes() == good
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_resume_with_another_batch_size_continues_the_schedule_by_epochs(tmp_path, synthetic_args):
    """Warm-up over 4 epochs, 2 done at batch 32 (8 steps/epoch); resumed at batch 16 (16 steps/epoch) the
    schedule stands at step 2 x 16, not at the checkpoint's step count 16."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "optim.schedule=constant",
              "--set", "optim.warmup_epochs=4", "--set", "optim.lr_scaling=none", "--set", "optim.lr=0.01"]
    assert train_cli([*common, "--set", "run.epochs=2"]).returncode == 0
    proc = train_cli([*common, "--set", "run.epochs=3", "--set", "data.batch_size=16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data.batch_size (32 -> 16)" in proc.stderr and "the LR schedule continues from epoch 2" in proc.stderr
    third = read_jsonl(out / "metrics.jsonl")[2]
    assert third["epoch"] == 3 and third["lr"] == pytest.approx(0.01 * (2 * 16 + 1) / (4 * 16))


def test_a_restart_of_a_run_started_from_a_named_checkpoint_goes_on_from_its_own(tmp_path, synthetic_args):
    """run.resume names a checkpoint (in a job's ConfigMap, so every restarted pod names it again): the first
    start continues from it, every later one from the folder's own latest, never back to the named one. A
    train.micro_batches change (what the out-of-memory line suggests) is no other experiment."""
    first, out = tmp_path / "first", tmp_path / "run"
    assert train_cli([*synthetic_args, "--set", f"run.output_dir={first}", "--set", "run.epochs=1"]).returncode == 0
    named = str(first / "checkpoint-latest.pt")
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", f"run.resume={named}"]
    started = train_cli([*common, "--set", "run.epochs=2"])
    assert started.returncode == 0, started.stderr[-2000:]
    assert f"resumed from {named}" in started.stdout
    assert checkpoint.load(str(out / "checkpoint-latest.pt"))["resumed_from"] == named
    again = train_cli([*common, "--set", "run.epochs=2"])  # the pod restarted after the run finished
    assert again.returncode == 0 and "nothing to do: the checkpoint is from epoch 2" in again.stdout, again.stderr
    on = train_cli([*common, "--set", "run.epochs=3", "--set", "train.micro_batches=2"])
    assert on.returncode == 0, on.stderr[-2000:]
    assert f"run.resume {named}: this folder's run already started from it" in on.stdout
    assert f"resumed from {out / 'checkpoint-latest.pt'} (saved after epoch 2)" in on.stdout
    assert "train.micro_batches (1 -> 2)" in on.stderr
    assert not list(out.glob("previous-*"))  # nothing set aside: the same run went on
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_settings_of_data_a_run_does_not_use_are_no_part_of_its_experiment():
    from trainer.config import Config
    digits = train.experiment_settings(Config())
    assert not [k for k in digits if k.startswith("data.synthetic_")] and "train.micro_batches" not in digits
    synthetic = Config()
    synthetic.data.name = "synthetic"
    assert train.experiment_settings(synthetic)["data.synthetic_train_size"] == synthetic.data.synthetic_train_size


def test_a_failed_metrics_append_names_the_file(tmp_path, monkeypatch):
    """A full disk fails the write or the fsync, whose error names no file (dat-train's line would name the
    folder)."""
    log = MetricsLog(str(tmp_path), enabled=True)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        log.append({"epoch": 1})
    assert info.value.filename == str(tmp_path / "metrics.jsonl") and info.value.errno == 28


def test_a_cut_off_metrics_line_is_dropped_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path), enabled=True)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch})
    with open(log.path, "a") as fh:
        fh.write('{"epoch": 4, "train_lo')  # the run was killed while writing
    log.truncate_after(2)
    assert [json.loads(line)["epoch"] for line in open(log.path)] == [1, 2]
    log.append({"epoch": 3})
    assert [r["epoch"] for r in read_jsonl(log.path)] == [1, 2, 3]


def test_another_experiment_in_the_same_folder_is_not_resumed_silently(tmp_path, synthetic_args):
    """A run found in run.output_dir that trained other data or another loss is not this run's earlier
    attempt: refused (one line, nothing touched); named with --resume it continues, and the log says what
    changed."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=1", "--set", "train.loss=dat"]).returncode == 0
    before = (out / "checkpoint-latest.pt").read_bytes()
    refused = train_cli([*common, "--set", "run.epochs=2", "--set", "train.loss=adv"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "this folder's run trained train.loss='dat', the config says 'adv': another experiment?" in refused.stderr
    assert (out / "checkpoint-latest.pt").read_bytes() == before
    attack = train_cli([*common, "--set", "run.epochs=2", "--set", "attack.steps=2"])  # what is learnt: refused too
    assert attack.returncode == 2 and "trained attack.steps=3, the config says 2: another experiment?" in attack.stderr
    on_purpose = train_cli([*common, "--set", "run.epochs=2", "--set", "train.loss=adv", "--set", "attack.steps=2",
                            "--resume", str(out)])
    assert on_purpose.returncode == 0, on_purpose.stderr[-2000:]
    assert "train.loss ('dat' -> 'adv')" in on_purpose.stderr and "attack.steps (3 -> 2)" in on_purpose.stderr
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_a_setting_without_effect_does_not_block_a_resume_and_the_seed_of_a_split_does(tmp_path, synthetic_args):
    """JointSpar's settings with JointSpar off (or the attack's with train.loss=clean) change nothing, so an
    automatic resume goes on; with data.val_size the seed draws the held-out images, so another seed is
    another experiment."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "data.val_size=32"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0
    proc = train_cli([*common, "--set", "run.epochs=2", "--set", "jointspar.budget=3"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = (out / "checkpoint-latest.pt").read_bytes()
    refused = train_cli([*common, "--set", "run.epochs=3", "--set", "run.seed=7"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "this folder's run trained run.seed=0, the config says 7" in refused.stderr
    assert "the seed draws the held-out images" in refused.stderr
    assert (out / "checkpoint-latest.pt").read_bytes() == before
    # train.loss=clean: the attack trains nothing, but attack.eps is what eval.eps -1 evaluates at
    clean = [*synthetic_args, "--set", f"run.output_dir={tmp_path / 'clean'}", "--set", "train.loss=clean"]
    assert train_cli([*clean, "--set", "run.epochs=1"]).returncode == 0
    assert train_cli([*clean, "--set", "run.epochs=2", "--set", "attack.steps=2"]).returncode == 0
    refused = train_cli([*clean, "--set", "run.epochs=3", "--set", "attack.eps=0.2"])
    assert refused.returncode == 2 and "trained attack.eps=0.1, the config says 0.2" in refused.stderr


def test_resuming_a_best_checkpoint_keeps_it_as_the_best():
    """--resume OUT/checkpoint-best.pt sets OUT's run aside and goes on from its best epoch: that file comes back
    as OUT's best (its best_ra carries over, so without it OUT could end with no best checkpoint at all)."""
    assert train.carried_over("/runs/a/checkpoint-best.pt") == ["metrics.jsonl", checkpoint.BEST]
    assert train.carried_over("/runs/a/checkpoint-latest.pt") == ["metrics.jsonl", checkpoint.BEST]
    assert train.carried_over("/runs/a/epoch-3.pt") == ["metrics.jsonl"]  # an older one: the best may be later


def test_evaluate_a_checkpoint_under_a_stronger_attack(tmp_path, synthetic_args):
    """dat-train --evaluate: a trained checkpoint under other eval settings (here 3 restarts), as JSON; the run's
    folder is left as it was, and a checkpoint of another model is one line."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    ckpt = str(out / "checkpoint-latest.pt")
    proc = train_cli([*common, "--set", "eval.restarts=3", "--set", "eval.steps=4", "--evaluate", ckpt])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == ckpt and result["epoch"] == 1
    assert (result["attack"], result["restarts"]) == ("pgd-4", 3) and result["alpha"] > 0
    assert 0 <= result["test_robust_acc"] <= result["test_clean_acc"] <= 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    other = train_cli([*common, "--set", "model.width=16", "--evaluate", ckpt])
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "the model differs from the checkpoint's" in other.stderr and len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "environment: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set"),
    ({"WORLD_SIZE": "abc"}, "environment: WORLD_SIZE='abc' is not a whole number >= 1"),
    ({"WORLD_SIZE": "0"}, "environment: WORLD_SIZE='0' is not a whole number >= 1"),
    ({"LOCAL_RANK": "x"}, "environment: LOCAL_RANK='x' is not a whole number >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "environment: RANK=2 with WORLD_SIZE=2"),
])
def test_a_broken_launch_environment_is_one_line(tmp_path, synthetic_args, env, message):
    """dat-train run by hand in a shell (or pod) with torchrun's variables half set: one line, never a wait
    in the rendezvous or a traceback."""
    proc = train_cli([*synthetic_args, "--set", f"run.output_dir={tmp_path}"], timeout=120, **env)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_second_run_in_a_busy_folder_is_refused(tmp_path, synthetic_args):
    """Two runs writing one run.output_dir (a replacement pod while the old one still writes to a shared
    volume) would interleave their logs and overwrite each other's checkpoints: the second is refused while
    the first holds the folder, and a killed holder releases it."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    first = subprocess.Popen([PYTHON, "-m", "trainer", *common, "--set", "run.epochs=200"], cwd=ROOT,
                             env=torch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:  # holding it, training
            time.sleep(0.2)
        second = train_cli([*common, "--set", "run.epochs=200", "--set", "optim.lr=0.05"])
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"another run is using this folder (pid {first.pid} on " in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    later = train_cli([*common, "--set", "run.epochs=1", "--no-resume"])
    assert later.returncode == 0, later.stderr[-2000:]


def test_weights_only_checkpoint_cannot_be_resumed_but_evaluated(tmp_path, synthetic_args):
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0
    state = checkpoint.load(str(out / checkpoint.LATEST))
    weights = tmp_path / "weights.pt"
    checkpoint.save_atomic({k: state[k] for k in ("epoch", "model", "model_name")}, str(weights))
    refused = train_cli([*common, "--set", f"run.output_dir={tmp_path / 'again'}", "--resume", str(weights)])
    assert refused.returncode == 2 and "cannot resume from it (no optimizer, schedule, best_ra in it" in refused.stderr
    assert train_cli([*common, "--evaluate", str(weights)]).returncode == 0


def test_evaluate_takes_a_run_folder_and_refuses_nan_weights(tmp_path, synthetic_args):
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}"]
    assert train_cli([*common, "--set", "run.epochs=1"]).returncode == 0
    folder = train_cli([*common, "--evaluate", str(out)])
    assert folder.returncode == 0 and json.loads(folder.stdout.strip().splitlines()[-1])["epoch"] == 1
    state = checkpoint.load(str(out / checkpoint.LATEST))
    next(v for v in state["model"].values() if v.is_floating_point()).fill_(float("nan"))
    checkpoint.save_atomic(state, str(tmp_path / "nan.pt"))
    nan = train_cli([*common, "--evaluate", str(tmp_path / "nan.pt")])
    assert nan.returncode == 2 and "the weights hold inf or NaN" in nan.stderr


def test_a_folder_where_a_file_belongs_is_one_line(tmp_path, synthetic_args):
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    proc = train_cli([*synthetic_args, "--set", f"run.output_dir={out}", "--set", "run.epochs=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "metrics.jsonl" in proc.stderr and "Is a directory" in proc.stderr


def test_with_val_size_the_best_checkpoint_is_chosen_on_held_out_images(tmp_path, monkeypatch):
    """data.val_size: every evaluated epoch reports val and test accuracy, and checkpoint-best.pt is the epoch
    with the best validation RA; the test set's RA takes no part in the choice (scripted here so that the two
    disagree: the test set's best epoch is 1, the validation set's 2)."""
    import torch

    from trainer.config import config_from_dict
    from trainer.distributed import DistInfo
    from trainer.train import Trainer, run
    robust = {"test": [0.6, 0.1, 0.4], "val": [0.2, 0.5, 0.3]}
    seen = []

    def scripted_evaluate(self, images=None):
        which = "test" if images is None else "val"
        assert which == "test" or len(images) == 64
        seen.append(which)
        return 0.9, robust[which][seen.count(which) - 1]

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    out = tmp_path / "run"
    cfg = config_from_dict({"run": {"output_dir": str(out), "epochs": 3, "progress": False},
                            "data": {"name": "synthetic", "synthetic_train_size": 320, "synthetic_image_size": 16,
                                     "batch_size": 32, "val_size": 64},
                            "model": {"name": "small_cnn", "width": 8}, "attack": {"steps": 1},
                            "eval": {"every": 1}})
    run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, device=torch.device("cpu")))
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["val_robust_acc"], r["test_robust_acc"]) for r in records] == list(zip(robust["val"], robust["test"]))
    assert all(r["images"] == 256 for r in records)  # 320 less the 64 held out
    best = checkpoint.load(str(out / checkpoint.BEST))
    assert (best["epoch"], best["best_ra"]) == (2, 0.5)


def test_lr_scaling_auto_keeps_the_rule_a_checkpoint_was_trained_under(tmp_path, synthetic_args):
    """A run begun under an explicit rule (sqrt: the default before `auto`) and resumed with the default auto:
    a LARS run keeps sqrt (auto would mean linear, an 8x jump here), says so, and config.yaml records it; a
    finished LAMB run met again is 'nothing to do' (auto means sqrt for LAMB: nothing changed)."""
    out = tmp_path / "run"
    common = [*synthetic_args, "--set", f"run.output_dir={out}", "--set", "optim.schedule=constant",
              "--set", "optim.warmup_epochs=0", "--set", "optim.name=lars", "--set", "optim.base_batch_size=4"]
    assert train_cli([*common, "--set", "run.epochs=1", "--set", "optim.lr_scaling=sqrt"]).returncode == 0
    proc = train_cli([*common, "--set", "run.epochs=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "optim.lr_scaling auto: keeping the checkpoint's rule (sqrt)" in proc.stderr
    first, second = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    assert second == pytest.approx(first)  # not 8x (32/4 = 8: sqrt gives 2.83x the base LR, linear 8x)
    assert "lr_scaling: sqrt" in (out / "config.yaml").read_text()
    lamb = tmp_path / "lamb"
    args = [*synthetic_args, "--set", f"run.output_dir={lamb}", "--set", "run.epochs=1"]
    assert train_cli([*args, "--set", "optim.lr_scaling=sqrt"]).returncode == 0
    again = train_cli(args)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
