import re
import subprocess

import pytest
import yaml

from conftest import PYTHON, ROOT, torch_env, train_cli
from trainer import config
from trainer.config import ConfigError, config_from_dict, ineffective_settings, load_config, validate


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.data.name == "digits" and cfg.attack.steps == 10


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack: {eps: 0.1, steps: 5}\noptim: {name: lars}\n")
    cfg = load_config(str(path), ["attack.steps=7", "optim.betas=[0.8, 0.9]", "jointspar.enabled=true"])
    assert cfg.attack.eps == 0.1 and cfg.attack.steps == 7 and cfg.optim.name == "lars"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.jointspar.enabled is True


@pytest.mark.parametrize("raw, fragment", [
    ({"atack": {}}, "unknown section 'atack'"),
    ({"attack": {"epsilon": 1}}, "unknown key attack.epsilon"),
    ({"attack": {"eps": -0.1}}, "attack.eps must be in [0, 1]"),
    ({"attack": {"eps": 8}}, "attack.eps must be in [0, 1] (images are scaled to [0, 1]), got 8"),
    ({"attack": {"eps": "8/0"}}, "attack.eps: expected float, got '8/0'"),
    ({"eval": {"eps": 2}}, "eval.eps must be in [0, 1], or -1 for attack.eps"),
    ({"optim": {"milestones": [0.8, 0.5]}}, "optim.milestones must be in increasing order"),
    ({"train": {"micro_batches": 0}}, "train.micro_batches must be >= 1"),
    ({"train": {"micro_batches": 3}}, "data.batch_size 128 does not split into 1 rank(s) x 3 micro-batches"),
    ({"attack": {"steps": 0}}, "attack.steps must be >= 1"),
    ({"optim": {"name": "sgd", "lr": 3e38, "lr_scaling": "linear"}, "data": {"batch_size": 1000}},
     "optim.lr scaled to the global batch (linear) is 1.17e+39, beyond float32"),
    ({"attack": {"steps": "ten"}}, "attack.steps: expected int"),
    ({"attack": {"name": "cw"}}, "attack.name: 'cw' is not one of pgd, fgsm"),
    ({"optim": {"lr": 0}}, "optim.lr must be > 0"),
    ({"train": {"loss": "trades"}}, "train.loss"),
    ({"jointspar": {"sample_every": "0"}}, "jointspar.sample_every"),
    ({"data": {"name": "cifar10", "root": "/nonexistent"}}, "no CIFAR-10 in '/nonexistent'"),
    ({"data": {"name": "cifar10-ext", "download": True}}, "data.ti500k_path"),
    ({"run": {"resume": "/nonexistent.pt"}}, "checkpoint not found"),
    ({"optim": {"lr": float("inf")}}, "optim.lr: must be a finite number (at most 3.4e+38 in size), got inf"),
    ({"optim": {"warmup_epochs": "inf"}}, "optim.warmup_epochs: must be a finite number (at most 3.4e+38 in size), got 'inf'"),
    ({"metrics": {"grace_seconds": "-inf"}}, "metrics.grace_seconds: must be a finite number"),
    ({"optim": {"lr": 1e39}}, "optim.lr: must be a finite number (at most 3.4e+38 in size), got 1e+39"),
    ({"optim": {"betas": [0.9, float("inf")]}}, "optim.betas: must be a finite number (at most 3.4e+38 in size), got inf"),
    ({"optim": {"betas": {0.9: 1, 0.99: 2}}}, "optim.betas: expected tuple[float, float], got {0.9: 1, 0.99: 2}"),
    ({"train": {"micro_batches": float("inf")}}, "train.micro_batches: expected int, got inf"),
    ({"run": {"output_dir": None}}, "run.output_dir: expected str, got None"),  # `output_dir:` left empty
    ({"run": {"seed": 2**64}}, "run.seed must be in [0, 2^63)"),
    ({"dist": {"timeout_seconds": 10**14}}, "dist.timeout_seconds must be in (0, 31536000]"),
    ({"optim": {"trust_coeff": -1}}, "optim.trust_coeff must be > 0"),
    ({"attack": {"name": "fgsm", "random_start": False}}, "FGSM-RS always starts at random"),
    ({"jointspar": {"budget_unit": "bytes", "budget": 40}}, "jointspar.budget 40 with budget_unit=bytes"),
    ({"jointspar": {"budget_unit": "bytes", "budget": 0.5, "sampling": "exact"}}, "it needs budget_unit=arms"),
    ({"data": {"batch_size": 1, "name": "digits"}, "model": {"name": "resnet18"}, "train": {"loss": "adv"}},
     "leaves 1 image per rank and micro-batch"),
])
def test_config_errors_are_one_clear_line(raw, fragment):
    with pytest.raises(ConfigError) as info:
        validate(config_from_dict(raw))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_every_problem_is_named_on_one_line():
    with pytest.raises(ConfigError) as info:
        validate(config_from_dict({"attack": {"steps": 0}, "optim": {"lr": 0, "name": "adam"}}))
    assert str(info.value) == ("optim.name: 'adam' is not one of lamb, lars, sgd; attack.steps must be >= 1, got 0; "
                               "optim.lr must be > 0")


def test_unknown_keys_wrong_types_and_bad_values_are_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {epochs: 0}\noptim: {nmae: x, lr: -1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["attack.steps=ten", "data.name=cifar10-ext", "data.root=/nonexistent"])
    message = str(info.value)
    for part in ("unknown key optim.nmae", "attack.steps: expected int, got 'ten'", "run.epochs must be >= 1",
                 "optim.lr must be > 0", "no CIFAR-10 in '/nonexistent'", "data.ti500k_path: cifar10-ext needs"):
        assert part in message, (part, message)
    assert "\n" not in message


@pytest.mark.parametrize("overrides, fragment", [
    (["run.output_dir="], "run.output_dir must not be empty"),
    (["data.name=synthetic", "data.synthetic_train_size=64", "data.batch_size=128"],
     "data.synthetic_train_size 64 is smaller than one global batch (data.batch_size 128)"),
    (["data.name=digits", "data.val_size=1400"],
     "data.val_size 1400 leaves 37 of digits's 1437 training images, fewer than one global batch"),
    (["data.name=cifar10-ext", "data.val_size=50000"], "data.val_size 50000: cifar10-ext has 50000 labelled"),
    (["data.name=synthetic", "data.synthetic_train_size=512", "data.val_size=448"],
     "data.synthetic_train_size 512 less data.val_size 448 is smaller than one global batch"),
    (["data.name=digits", "data.batch_size=1438"], "data.batch_size 1438: digits has 1437 training images"),
    # PGD would descend the loss: every robust accuracy (and the best checkpoint) silently wrong
    (["eval.alpha=-0.02"], "eval.alpha must be >= 0"),
])
def test_mistakes_the_run_would_only_find_later(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, overrides)


@pytest.mark.parametrize("low, high, out_low, out_high", [
    ("attack.eps=0", "attack.eps=1", "attack.eps=-0.01", "attack.eps=1.01"),
    ("metrics.port=0", "metrics.port=65535", "metrics.port=-1", "metrics.port=65536"),
    ("jointspar.p_min=1e-9", "jointspar.p_min=1", "jointspar.p_min=0", "jointspar.p_min=1.5"),
    ("optim.gamma=1e-9", "optim.gamma=1", "optim.gamma=0", "optim.gamma=1.01"),
])
def test_range_limits_are_inclusive_where_documented(low, high, out_low, out_high):
    base = ["jointspar.budget=4"]  # JointSpar's own checks would otherwise depend on the model's arm count
    for inside in (low, high):
        load_config(None, [*base, inside])
    for outside in (out_low, out_high):
        key = outside.split("=")[0]
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [*base, outside])


def test_eps_as_written_in_papers():
    cfg = load_config(None, ["attack.eps=8/255", "eval.eps= 4 / 255"])
    assert cfg.attack.eps == 8 / 255 and cfg.eval.eps == 4 / 255


def test_one_image_per_rank_is_refused_only_where_batchnorm_would_see_one():
    tiny = {"name": "synthetic", "synthetic_image_size": 8, "batch_size": 4}
    assert "1 image per rank" in "; ".join(config.world_size_problems(config_from_dict(
        {"data": tiny, "model": {"name": "preact_resnet18"}, "train": {"loss": "clean", "micro_batches": 2}}), 2))
    # dat trains on cat([x_adv, x]): two images; 32 px leaves 4x4 at the last stage; small_cnn keeps 2x2
    for changes in ({"train": {"loss": "dat", "micro_batches": 2}}, {"data": {**tiny, "synthetic_image_size": 32}},
                    {"model": {"name": "small_cnn"}}):
        raw = {"data": tiny, "model": {"name": "resnet18"}, "train": {"loss": "clean", "micro_batches": 2}} | changes
        assert config.world_size_problems(config_from_dict(raw), 2) == [], changes


def test_batch_must_divide_world_size():
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        validate(config_from_dict({"data": {"batch_size": 128}}), world_size=3)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["steps=3"])


@pytest.mark.parametrize("args, fragment", [
    (["--set", "attack.eps=-1"], "attack.eps must be in [0, 1]"),
    (["--resume", "x.pt", "--no-resume"], "--resume and --no-resume contradict each other"),
    (["--check", "--print-config"], "--check and --print-config are separate actions; give one"),
    (["--evaluate", "x.pt", "--check"], "--evaluate and --check are separate actions; give one"),
    # a bare --resume means "continue": where there is nothing to continue (a mistyped folder), say so
    (["--set", "run.output_dir=/tmp/dat-no-such-run", "--resume"],
     "--resume: no checkpoint in run.output_dir /tmp/dat-no-such-run to continue from"),
    (["--set", "run.output_dir=/proc/dat-nope", "--set", "data.batch_size=64"], "run.output_dir: cannot create"),
    (["--set", "run.output_dir=/dev/null"], "run.output_dir: cannot create /dev/null (exists and is not a folder)"),
    (["--set", "dist.backend=nccl"], "dist.backend: nccl needs CUDA GPUs"),
    (["--check", "--set", "model.name=resnet18", "--set", "jointspar.enabled=true", "--set", "jointspar.budget=1000"],
     "jointspar.budget 1000 exceeds the number of arms L = 62"),  # --check builds the model for this
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--check", "--config", "manifests/specs/dat-smoke.yaml"],
     "manifests/specs/dat-smoke.yaml: a datctl job spec (gpusPerNode, nodes, resources, ...), not a trainer config"),
    (["--check", "--config", "/tmp"], "/tmp: cannot read the config file (Is a directory)"),
    (["--set", "data.name=cifar10", "--set", "data.root=/nonexistent"], "no CIFAR-10"),
    (["--set", "model.name=small_cnn", "--set", "model.width=100000", "--set", "run.output_dir=/tmp/dat-oom-test"],
     "out of memory ("),  # a 720 GB model: refused by the allocator
])
def test_cli_user_errors_exit_nonzero_without_traceback(args, fragment):
    proc = train_cli(args)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_invalid_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attack: {eps: [\n")
    proc = train_cli(["--config", str(bad)])
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_a_key_given_twice_is_an_error_not_last_wins(tmp_path):
    merged = tmp_path / "merged.yaml"  # YAML merge keys still work: a key may override a merged one
    merged.write_text("attack: &threat {eps: 0.1, steps: 3}\neval:\n  <<: *threat\n  steps: 5\n  every: 1\n")
    proc = train_cli(["--config", str(merged), "--print-config"])
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["eval"]["steps"] == 5, proc.stderr
    twice = tmp_path / "twice.yaml"
    twice.write_text("run:\n  epochs: 1\n  epochs: 2\n")
    proc = train_cli(["--config", str(twice), "--check"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{twice}: not valid YAML (line 3, column 3): key 'epochs' is given twice in one mapping" in proc.stderr


def test_yaml_on_off_reach_string_options_as_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("perf: {channels_last: on, amp: off}\n")
    cfg = load_config(str(path), ["perf.channels_last=off"])
    assert cfg.perf.channels_last == "off" and cfg.perf.amp == "off"


def test_print_config_needs_no_data_on_this_machine():
    proc = train_cli(["--print-config", "--config", "configs/cifar10-ext-resnet18.yaml"])
    assert proc.returncode == 0, proc.stderr
    assert "cifar10-ext" in proc.stdout and "ti500k_path" in proc.stdout


def test_check_reports_config_model_and_machine_problems_together(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "trainer", "--check", "--set", "perf.compile=attack", "--set", "optim.lr=0",
                           "--set", "jointspar.enabled=true", "--set", "model.width=30000"], cwd=ROOT,
                          env=dict(torch_env(), CC=str(tmp_path / "no-cc")), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for part in ("optim.lr must be > 0", "jointspar.budget 40 exceeds the number of arms L = 16",
                 "perf.compile=attack: torch.compile needs a C compiler"):  # a 30000-wide model: shapes only
        assert part in proc.stderr, (part, proc.stderr)


def test_print_config_is_a_config_file_of_the_same_run(tmp_path):
    proc = train_cli(["--print-config", "--set", "attack.eps=8/255", "--set", "optim.name=lars"])
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "resolved.yaml").write_text(proc.stdout)
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == load_config(None, ["attack.eps=8/255", "optim.name=lars"])


@pytest.mark.parametrize("overrides, note", [
    (["model.name=resnet18", "model.width=64"], "model.width 64 has no effect on resnet18 (small_cnn only)"),
    (["data.name=digits", "data.ti500k_path=/data/ti.pickle"], "data.ti500k_path has no effect with data.name=digits"),
    (["data.name=cifar10", "data.unlabeled_max=1000"], "data.unlabeled_max has no effect with data.name=cifar10"),
    (["run.epochs=10", "optim.warmup_epochs=10"], "the learning rate never reaches optim.lr"),
    (["run.epochs=10", "jointspar.enabled=true", "jointspar.warmup_epochs=12"], "JointSpar never samples"),
    (["jointspar.enabled=true", "optim.name=lars"], "jointspar.scale=gradient with optim.name=lars: its trust ratio"),
    (["jointspar.enabled=true", "jointspar.scale=update"], "move up to 1/p_min = 80 times as far"),
    (["optim.name=lars", "optim.lr=0.02", "data.batch_size=128"],
     "LARS moves each layer by lr x trust_coeff = 1e-05 of its weight norm per step, too little to learn"),
    (["optim.name=lamb", "optim.momentum=0.5"], "optim.momentum has no effect with optim.name=lamb"),
    (["optim.name=sgd", "optim.betas=[0.8, 0.99]"], "optim.betas has no effect with optim.name=sgd"),
    (["attack.name=fgsm", "attack.steps=7"], "attack.steps 7 has no effect with attack.name=fgsm"),
    (["jointspar.enabled=true", "jointspar.budget_unit=bytes", "jointspar.budget=0.5", "jointspar.eta=0.5"],
     "jointspar.eta has no effect with jointspar.budget_unit=bytes"),
])
def test_settings_without_effect_are_noted(overrides, note):
    cfg = load_config(None, overrides, check_paths=False)
    assert [n for n in ineffective_settings(cfg) if note in n], ineffective_settings(cfg)
    assert ineffective_settings(load_config(None, [], check_paths=False)) == []  # the defaults: nothing to say


def test_the_cli_prints_the_notes_before_training():
    proc = train_cli(["--check", "--set", "data.name=digits", "--set", "model.name=small_cnn",
                      "--set", "data.unlabeled_max=5"])
    assert proc.returncode == 0 and "dat-train: note: data.unlabeled_max has no effect" in proc.stderr, proc.stderr


def test_a_batch_too_small_to_mix_both_sets_is_refused_at_its_world_size():
    cfg = load_config(None, ["data.name=cifar10-ext", "data.batch_size=128"], check_paths=False)
    assert config.world_size_problems(cfg, 64) == []  # 2 images per rank: one of each
    (problem,) = config.world_size_problems(cfg, 128)
    assert "data.unlabeled_fraction 0.5 of 1 images per rank at world size 128 leaves no room" in problem


@pytest.mark.parametrize("name, rule, factor", [("lamb", "auto", 4.0), ("lars", "auto", 16.0), ("sgd", "auto", 16.0),
                                                ("lars", "sqrt", 4.0), ("lamb", "linear", 16.0), ("lamb", "none", 1.0)])
def test_lr_scaling_auto_follows_the_optimizer(name, rule, factor):
    """auto: sqrt for LAMB (You et al.), linear for LARS and SGD (Goyal et al.); an explicit rule wins."""
    from trainer.config import OptimConfig, scaled_lr
    assert scaled_lr(OptimConfig(name=name, lr=0.1, base_batch_size=256, lr_scaling=rule), 4096) == pytest.approx(
        0.1 * factor)


def test_yaml_aliases_load_within_bounds(tmp_path):
    """An anchor used twice is fine; one whose aliases expand beyond any config's size ("billion laughs") is a
    one-line error, not minutes of CPU and a MemoryError traceback."""
    ok = tmp_path / "ok.yaml"
    ok.write_text("attack: &strong {steps: 7}\neval: {steps: 7}\nrun: {epochs: 2}\n")
    assert load_config(str(ok)).attack.steps == 7
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("run: {name: &a [x, x, x, x, x, x, x, x, x]}\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdef", "bcdefg")))
    with pytest.raises(ConfigError, match="its aliases expand to more than 100,000 values"):
        load_config(str(laughs))


def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(monkeypatch):
    """python -m trainer / dat-train: a KeyboardInterrupt before the run's handler exists (torch takes seconds to
    import) ends the process as Ctrl-C does, not with a traceback from every rank."""
    import sys
    import types

    import trainer.__main__ as entry

    interrupted = types.ModuleType("trainer.cli")
    interrupted.main = lambda: (_ for _ in ()).throw(KeyboardInterrupt)
    monkeypatch.setitem(sys.modules, "trainer.cli", interrupted)
    with pytest.raises(SystemExit) as info:
        entry.run()
    assert info.value.code == 130


def test_ctrl_c_while_the_launcher_imports_torch_exits_130(monkeypatch):
    import trainer.launch as launch

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "_launch", interrupted)
    assert launch.main([]) == 130
