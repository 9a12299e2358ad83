"""Trainer configuration: one YAML file plus ``--set section.key=value`` overrides.

Every field has a default, so an empty file is a valid config (digits + small CNN).
``load_config`` parses, applies overrides and validates; problems raise ``ConfigError``
with one line that names the offending key.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from trainer.yamlfile import describe_yaml_error, load_yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; printed as one line, exit code 2."""


@dataclass
class RunConfig:
    name: str = "dat"
    output_dir: str = "runs/dat"
    seed: int = 0
    epochs: int = 10
    resume: str = "auto"  # auto: resume when output_dir holds a checkpoint; never; or a checkpoint path
    progress: bool = True  # rank-0 progress bar within the epoch
    checkpoint_every_steps: int = 0  # also checkpoint every N training steps within an epoch (0: epoch ends only)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl when CUDA is available, gloo otherwise
    timeout_seconds: int = 1800


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar10-ext | synthetic
    root: str = "data"  # cifar10: folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz
    download: bool = False  # cifar10: fetch the archive into root (clusters with internet only)
    ti500k_path: str = ""  # cifar10-ext: the TI-500K pseudo-labelled pickle (or a converted .npz)
    unlabeled_max: int = 0  # cifar10-ext: use at most this many TI images (0 = all)
    unlabeled_fraction: float = 0.5  # cifar10-ext: share of every batch drawn from the TI images (0: one shuffle)
    val_size: int = 0  # labelled training images held out to pick checkpoint-best.pt on (0: picked on the test set)
    batch_size: int = 128  # global batch, split evenly over ranks
    eval_batch_size: int = 256  # per rank
    augment: str = "auto"  # auto: crop(pad 4)+flip for 32x32 data; on; off
    synthetic_train_size: int = 512
    synthetic_test_size: int = 128
    synthetic_image_size: int = 32
    synthetic_channels: int = 3
    device_resident: str = "auto"  # auto: keep the uint8 data set on the GPU when it fits; on; off


@dataclass
class ModelConfig:
    name: str = "small_cnn"  # small_cnn | resnet18 | preact_resnet18
    width: int = 32  # small_cnn only: channels of the first conv


@dataclass
class AttackConfig:
    name: str = "pgd"  # pgd | fgsm (FGSM with random start, alpha = 1.25 eps; one step, whatever `steps` says)
    eps: float = 8 / 255
    alpha: float = 0.0  # 0: 2.5 * eps / steps for PGD, 1.25 * eps for FGSM
    steps: int = 10
    random_start: bool = True
    bn_eval: bool = True  # BatchNorm in eval mode while crafting examples


@dataclass
class TrainConfig:
    loss: str = "dat"  # dat: CE(x_adv) + CE(x); adv: CE(x_adv) (Madry); clean: CE(x)
    micro_batches: int = 1  # attack + backward each rank's batch in this many slices (gradient accumulation)


@dataclass
class OptimConfig:
    name: str = "lamb"  # lamb | lars | sgd
    lr: float = 0.01  # learning rate at base_batch_size; scaled to the global batch by lr_scaling
    base_batch_size: int = 256
    lr_scaling: str = "auto"  # sqrt: lr * sqrt(B / base); linear: lr * B / base; none; auto: sqrt for lamb, else linear
    momentum: float = 0.9  # lars / sgd
    betas: tuple[float, float] = (0.9, 0.999)  # lamb
    weight_decay: float = 5e-4  # not applied to biases and norm parameters
    trust_coeff: float = 0.001  # lars
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # cosine | multistep | constant (after warm-up)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep: fractions of the run
    gamma: float = 0.1


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (and always after the last one); 0 = only at the end
    eps: float = -1.0  # -1: same as attack.eps
    alpha: float = 0.0  # 0: 2.5 * eps / steps
    steps: int = 20
    restarts: int = 1
    max_samples: int = 0  # 0: the whole test set


@dataclass
class JointSparConfig:
    enabled: bool = False
    budget: float = 40.0  # s: expected active arms per step (sum of p), or the fraction of the gradient bytes
    budget_unit: str = "arms"  # arms: budget counts arms (as published); bytes: a fraction of the dense bytes
    p_min: float = 0.0125
    eta: float = 0.1  # bandit step size (independent of the model's learning rate)
    sample_every: str = "1"  # resample every k iterations ("1", "10", ...) or "epoch"
    sampling: str = "bernoulli"  # bernoulli: independent coins; exact: exactly round(budget) arms
    arms: str = "param"  # param: one arm per parameter tensor; module: per module; weights: per >= 2-d tensor
    warmup_epochs: int = 0  # dense epochs before sparsification starts
    scale: str = "gradient"  # 1/p on the gradient (as published) or on the optimizer's update (unbiased under LARS/LAMB)


@dataclass
class CommConfig:
    bucket_mb: float = 25.0
    overlap: bool = True  # launch each bucket's all-reduce as soon as its gradients are ready


@dataclass
class PerfConfig:
    amp: str = "auto"  # auto: bf16 on GPUs of compute capability 8.0+ and on CPUs with native bf16; bf16; off
    channels_last: str = "auto"  # auto: as perf.amp; on; off
    compile: str = "auto"  # torch.compile: attack | all (+ the training pass) | off; auto: attack with CUDA


@dataclass
class MetricsConfig:
    port: int = 0  # Prometheus exporter port per pod (0 = off)
    grace_seconds: float = 0.0  # keep serving this long after the last epoch
    job_name: str = ""  # default: the PyTorchJob name from the pod env, else run.name
    pushgateway: str = ""  # host:port of a Pushgateway to push to at every epoch end


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    jointspar: JointSparConfig = field(default_factory=JointSparConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a YAML / --set value to the field's declared type, or raise ConfigError."""
    key = f"{section}.{f.name}"
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            return _finite(key, value)
        if kind == "str":
            if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
                return "on" if value else "off"
            if value is None or isinstance(value, (dict, list)):  # `key:` with nothing after it is null
                raise ValueError
            return str(value)
        if kind.startswith(("tuple", "list")):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            numbers = [_finite(key, v) for v in value]
            return tuple(numbers) if kind.startswith("tuple") else numbers
    except ConfigError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, yaml.YAMLError):
        raise ConfigError(f"{key}: expected {kind}, got {value!r}") from None
    return value


FLOAT32_MAX = 3.4028234663852886e38


def _finite(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str) and "/" in value:  # eps as it is written in papers: 8/255
        numerator, denominator = value.split("/")
        number = float(numerator) / float(denominator)
    else:
        number = float(value)
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:  # tensors hold these as float32
        raise ConfigError(f"{key}: must be a finite number (at most {FLOAT32_MAX:.3g} in size), got {value!r}")
    return number


def _apply(cfg: Config, raw: dict[str, Any], origin: str, errors: list[str]) -> None:
    """Set every valid key of `raw` on cfg; one message in `errors` for each unknown or mistyped one."""
    if not isinstance(raw, dict):
        errors.append(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
        return
    sections = {f.name: f for f in fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            errors.append(f"{origin}: unknown section {section!r} (known: {', '.join(sections)})")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            errors.append(f"{origin}: section {section!r} must be a mapping")
            continue
        target = getattr(cfg, section)
        known = {f.name: f for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                errors.append(f"{origin}: unknown key {section}.{key} (known: {', '.join(known)})")
                continue
            try:
                setattr(target, key, _coerce(section, known[key], value))
            except ConfigError as exc:
                errors.append(str(exc))


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` -> ``{section: {key: value}}`` (value parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, value = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return {section: {key: parsed}}


def config_from_dict(raw: dict[str, Any] | None, overrides: list[str] = (), errors: list[str] | None = None) -> Config:
    """The config `raw` and the overrides describe. Unknown keys and wrong types are collected in `errors`
    when given (the keys that are fine still apply), else raised together as one ConfigError."""
    found: list[str] = []
    cfg = Config()
    _apply(cfg, raw or {}, "config", found)
    for item in overrides:
        try:
            _apply(cfg, parse_override(item), f"--set {item}", found)
        except ConfigError as exc:
            found.append(str(exc))
    if errors is not None:
        errors += found
    elif found:
        raise ConfigError("; ".join(found))
    return cfg


# Top-level keys of a datctl job spec (the chart's values) that no trainer config has.
JOB_SPEC_KEYS = frozenset({"trainerConfigFile", "nodes", "gpusPerNode", "nprocPerNode", "image", "nodePool",
                           "resources", "restartPolicy", "runPolicy"})


def load_config(path: str | None, overrides: list[str] = (), world_size: int = 1,
                check_paths: bool = True, errors: list[str] | None = None) -> Config:
    """Read, override and validate a config. Raises ConfigError naming every user mistake, or, given
    `errors`, appends them there (for callers that add checks of their own) and returns the config."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path) as fh:
                raw = load_yaml(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:  # a directory, no permission, ...
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: {describe_yaml_error(exc)}") from None
    spec_keys = sorted(JOB_SPEC_KEYS & set(raw)) if isinstance(raw, dict) else []
    if spec_keys:  # the Kubernetes job spec, given to the trainer: say so, not a dozen unknown sections
        raise ConfigError(f"{path}: a datctl job spec ({', '.join(spec_keys[:3])}, ...), not a trainer config: submit "
                          "it with `datctl submit`; its trainer config is its `trainer:` section or trainerConfigFile")
    found: list[str] = []
    cfg = config_from_dict(raw, overrides, found)
    found += problems(cfg, world_size=world_size, check_paths=check_paths)  # all of them in one go
    if errors is not None:
        errors += found
    elif found:
        raise ConfigError("; ".join(found))
    return cfg


CHOICES: dict[str, tuple[str, ...]] = {  # the allowed values of every choice key (the chart's schema uses it)
    "dist.backend": ("auto", "nccl", "gloo"),
    "data.name": ("digits", "cifar10", "cifar10-ext", "synthetic"),
    "data.augment": ("auto", "on", "off"),
    "data.device_resident": ("auto", "on", "off"),
    "model.name": ("small_cnn", "resnet18", "preact_resnet18"),
    "attack.name": ("pgd", "fgsm"),
    "train.loss": ("dat", "adv", "clean"),
    "optim.name": ("lamb", "lars", "sgd"),
    "optim.lr_scaling": ("auto", "sqrt", "linear", "none"),
    "optim.schedule": ("cosine", "multistep", "constant"),
    "jointspar.sampling": ("bernoulli", "exact"),
    "jointspar.arms": ("param", "module", "weights"),
    "jointspar.budget_unit": ("arms", "bytes"),
    "jointspar.scale": ("gradient", "update"),
    "perf.amp": ("auto", "bf16", "off"),
    "perf.channels_last": ("auto", "on", "off"),
    "perf.compile": ("auto", "attack", "all", "off"),
}


# Labelled training images of the data sets whose size is known before loading them (data.val_size's bound;
# tests/test_data.py checks these against the loaders).
LABELLED_TRAIN = {"digits": 1437, "cifar10": 50_000, "cifar10-ext": 50_000}


def _val_size_problems(data: DataConfig) -> list[str]:
    """data.val_size against the labelled training images of the data sets whose size is known unloaded."""
    labelled = LABELLED_TRAIN.get(data.name)
    if labelled is None:
        return []
    if not data.val_size:
        return ([f"data.batch_size {data.batch_size}: {data.name} has {labelled} training images, fewer than one "
                 "global batch"] if data.name != "cifar10-ext" and labelled < data.batch_size else [])
    if data.val_size >= labelled:
        return [f"data.val_size {data.val_size}: {data.name} has {labelled} labelled training images; hold out fewer"]
    if data.name != "cifar10-ext" and labelled - data.val_size < data.batch_size:  # the rest trains
        return [f"data.val_size {data.val_size} leaves {labelled - data.val_size} of {data.name}'s {labelled} training "
                f"images, fewer than one global batch (data.batch_size {data.batch_size})"]
    return []


def validate(cfg: Config, world_size: int = 1, check_paths: bool = True) -> None:
    """Reject inconsistent settings before anything starts: one ConfigError naming every problem."""
    found = problems(cfg, world_size, check_paths)
    if found:
        raise ConfigError("; ".join(found))


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The documented rule: ``lr`` is tuned at ``base_batch_size``; linear scaling multiplies by
    B / base (SGD, LARS), sqrt scaling by sqrt(B / base) (LAMB, You et al. 2020); auto picks by optimizer."""
    ratio = global_batch / max(1, cfg.base_batch_size)
    return cfg.lr * {"linear": ratio, "sqrt": ratio ** 0.5}.get(lr_rule(cfg.name, cfg.lr_scaling), 1.0)


def lr_rule(optimizer: str, lr_scaling: str) -> str:
    """optim.lr_scaling resolved: auto is sqrt for lamb, linear for lars and sgd."""
    return ("sqrt" if optimizer == "lamb" else "linear") if lr_scaling == "auto" else lr_scaling


def problems(cfg: Config, world_size: int = 1, check_paths: bool = True) -> list[str]:
    """Every inconsistent setting, one message each (datctl prints them one per line)."""
    found = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            read_as = " (true/yes read as 'on', false/no as 'off')" if value in ("on", "off") else ""
            found.append(f"{key}: {value!r}{read_as} is not one of {', '.join(allowed)}")
    resume = cfg.run.resume
    if resume not in ("auto", "never") and check_paths and not (
            os.path.isfile(resume) or os.path.isfile(os.path.join(resume, "checkpoint-latest.pt"))):
        found.append(f"run.resume: checkpoint not found: {resume}"
                     + (" (the folder has no checkpoint-latest.pt)" if os.path.isdir(resume) else ""))
    checks = [
        (cfg.run.epochs >= 1, "run.epochs must be >= 1"),
        (cfg.run.output_dir.strip() != "", "run.output_dir must not be empty"),
        (cfg.data.name != "synthetic" or cfg.data.synthetic_train_size - cfg.data.val_size >= cfg.data.batch_size,
         f"data.synthetic_train_size {cfg.data.synthetic_train_size}" + (
             f" less data.val_size {cfg.data.val_size}" if cfg.data.val_size else "") +
         f" is smaller than one global batch (data.batch_size {cfg.data.batch_size})"),
        (cfg.data.val_size >= 0, "data.val_size must be >= 0"),
        (0 < cfg.dist.timeout_seconds <= 31_536_000, "dist.timeout_seconds must be in (0, 31536000] (a year)"),
        (0 <= cfg.run.seed < 2**63, "run.seed must be in [0, 2^63)"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
        (cfg.train.micro_batches >= 1, "train.micro_batches must be >= 1"),
        (cfg.data.unlabeled_max >= 0, "data.unlabeled_max must be >= 0"),
        (cfg.run.checkpoint_every_steps >= 0, "run.checkpoint_every_steps must be >= 0"),
        (0 <= cfg.data.unlabeled_fraction < 1, "data.unlabeled_fraction must be in [0, 1)"),
        (cfg.data.synthetic_train_size >= 1 and cfg.data.synthetic_test_size >= 1,
         "data.synthetic_train_size and data.synthetic_test_size must be >= 1"),
        (cfg.data.synthetic_channels in (1, 3), "data.synthetic_channels must be 1 or 3"),
        (cfg.data.synthetic_image_size >= 8, "data.synthetic_image_size must be >= 8"),
        (cfg.model.width >= 1, "model.width must be >= 1"),
        (0 <= cfg.attack.eps <= 1, f"attack.eps must be in [0, 1] (images are scaled to [0, 1]), got {cfg.attack.eps}"),
        (cfg.eval.eps <= 1, f"eval.eps must be in [0, 1], or -1 for attack.eps, got {cfg.eval.eps}"),
        (cfg.attack.alpha >= 0, "attack.alpha must be >= 0"),
        (cfg.attack.steps >= 1, f"attack.steps must be >= 1, got {cfg.attack.steps}"),
        (cfg.attack.name != "fgsm" or cfg.attack.random_start,
         "attack.random_start=false with attack.name=fgsm: FGSM-RS always starts at random (Wong et al.); plain "
         "FGSM is attack.name=pgd, attack.steps=1, attack.random_start=false, attack.alpha=attack.eps"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (scaled_lr(cfg.optim, cfg.data.batch_size) < 3.4e38, f"optim.lr scaled to the global batch "
         f"({cfg.optim.lr_scaling}) is {scaled_lr(cfg.optim, cfg.data.batch_size):.3g}, beyond float32"),
        (cfg.optim.base_batch_size >= 1, "optim.base_batch_size must be >= 1"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.trust_coeff > 0, "optim.trust_coeff must be > 0"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         "optim.betas must be two numbers in [0, 1)"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (all(0 < m < 1 for m in cfg.optim.milestones), "optim.milestones must be fractions in (0, 1)"),
        (list(cfg.optim.milestones) == sorted(cfg.optim.milestones),
         f"optim.milestones must be in increasing order, got {list(cfg.optim.milestones)}"),
        (0 < cfg.optim.gamma <= 1, "optim.gamma must be in (0, 1]"),
        (cfg.eval.every >= 0, "eval.every must be >= 0"),
        (cfg.eval.eps == -1.0 or cfg.eval.eps >= 0, "eval.eps must be >= 0 (or -1 for attack.eps)"),
        (cfg.eval.alpha >= 0, "eval.alpha must be >= 0 (0: 2.5 * eps / steps); a negative step descends the loss"),
        (cfg.eval.steps >= 1, "eval.steps must be >= 1"),
        (cfg.eval.restarts >= 1, "eval.restarts must be >= 1"),
        (cfg.eval.max_samples >= 0, "eval.max_samples must be >= 0"),
        (cfg.jointspar.eta > 0, "jointspar.eta must be > 0"),
        (0 < cfg.jointspar.p_min <= 1, "jointspar.p_min must be in (0, 1]"),
        (cfg.jointspar.budget > 0, "jointspar.budget must be > 0"),
        (cfg.jointspar.budget_unit != "bytes" or cfg.jointspar.budget <= 1,
         f"jointspar.budget {cfg.jointspar.budget:g} with budget_unit=bytes: it is a fraction of the dense gradient "
         "bytes, in (0, 1]"),
        (cfg.jointspar.budget_unit != "bytes" or cfg.jointspar.sampling != "exact",
         "jointspar.sampling=exact draws a whole number of arms: it needs budget_unit=arms"),
        (cfg.jointspar.warmup_epochs >= 0, "jointspar.warmup_epochs must be >= 0"),
        (not (cfg.perf.compile == "all" and cfg.jointspar.enabled),
         "perf.compile=all with jointspar.enabled: JointSpar's per-step requires_grad changes would recompile the "
         "training pass every step; use perf.compile=attack (the default on GPUs)"),
        (cfg.comm.bucket_mb > 0, "comm.bucket_mb must be > 0"),
        (0 <= cfg.metrics.port <= 65535, "metrics.port must be in [0, 65535]"),
        (cfg.metrics.grace_seconds >= 0, "metrics.grace_seconds must be >= 0"),
    ]
    found += [message for ok, message in checks if not ok]
    found += _val_size_problems(cfg.data)
    found += world_size_problems(cfg, world_size)
    every = cfg.jointspar.sample_every
    if every != "epoch" and not (every.isdigit() and int(every) >= 1):
        found.append(f"jointspar.sample_every: expected a positive integer or 'epoch', got {every!r}")
    if check_paths:
        found += _data_path_problems(cfg.data)
    return found


def ineffective_settings(cfg: Config) -> list[str]:
    """Settings that are valid but change nothing in this config (not errors: a note each, so that a user who
    set them is not left believing they took effect)."""
    data, default_data = cfg.data, DataConfig()
    notes = []
    if cfg.model.name != "small_cnn" and cfg.model.width != ModelConfig().width:
        notes.append(f"model.width {cfg.model.width} has no effect on {cfg.model.name} (small_cnn only)")
    if data.name != "cifar10-ext":
        notes += [f"data.{key} has no effect with data.name={data.name} (cifar10-ext only)"
                  for key in ("ti500k_path", "unlabeled_max", "unlabeled_fraction")
                  if getattr(data, key) != getattr(default_data, key)]
    if cfg.optim.warmup_epochs >= cfg.run.epochs > 0:
        notes.append(f"optim.warmup_epochs {cfg.optim.warmup_epochs:g} >= run.epochs {cfg.run.epochs}: the learning "
                     f"rate never reaches optim.lr")
    if cfg.jointspar.enabled and cfg.jointspar.scale == "gradient" and cfg.optim.name in ("lamb", "lars"):
        notes.append(f"jointspar.scale=gradient with optim.name={cfg.optim.name}: its trust ratio divides the 1/p "
                     "scale out again, so each arm's expected update is p times the dense one (as published); "
                     "jointspar.scale=update keeps it unbiased")
    if cfg.jointspar.enabled and cfg.jointspar.scale == "update" and cfg.jointspar.arms == "param":
        notes.append(f"jointspar.scale=update with jointspar.arms=param: biases and norm parameters, which "
                     f"LARS/LAMB step without a trust ratio, move up to 1/p_min = {1 / cfg.jointspar.p_min:.0f} times "
                     "as far when drawn; jointspar.arms=weights trains them every step, unscaled")
    optim, default_optim = cfg.optim, OptimConfig()
    unused = {"lamb": ("momentum", "trust_coeff"), "lars": ("betas",), "sgd": ("betas", "trust_coeff")}[optim.name]
    notes += [f"optim.{key} has no effect with optim.name={optim.name}" for key in unused
              if getattr(optim, key) != getattr(default_optim, key)]
    relative_step = scaled_lr(optim, cfg.data.batch_size) * optim.trust_coeff
    if optim.name == "lars" and relative_step < 1e-4:
        notes.append(f"optim.name=lars with optim.lr {optim.lr:g} ({scaled_lr(optim, cfg.data.batch_size):.3g} at batch "
                     f"{cfg.data.batch_size}): LARS moves each layer by lr x trust_coeff = {relative_step:.2g} of its "
                     "weight norm per step, too little to learn; LARS learning rates are O(1) (LAMB's O(0.001))")
    if cfg.attack.name == "fgsm" and cfg.attack.steps != AttackConfig().steps:
        notes.append(f"attack.steps {cfg.attack.steps} has no effect with attack.name=fgsm (one step)")
    if cfg.jointspar.enabled and cfg.jointspar.budget_unit == "bytes" and cfg.jointspar.eta != JointSparConfig().eta:
        notes.append("jointspar.eta has no effect with jointspar.budget_unit=bytes (p follows the gradient norms, "
                     "not EXP3)")
    if cfg.jointspar.enabled and cfg.jointspar.warmup_epochs >= cfg.run.epochs > 0:
        notes.append(f"jointspar.warmup_epochs {cfg.jointspar.warmup_epochs} >= run.epochs {cfg.run.epochs}: "
                     "every epoch is dense, JointSpar never samples")
    return notes


def world_size_problems(cfg: Config, world_size: int) -> list[str]:
    """The rules that depend on the world size (datctl checks them at every size an elastic job can run at)."""
    batch, micro = cfg.data.batch_size, max(1, cfg.train.micro_batches)
    if batch % world_size:
        return [f"data.batch_size {batch} is not divisible by the world size {world_size}"]
    fraction = cfg.data.unlabeled_fraction
    if cfg.data.name == "cifar10-ext" and 0 < fraction < 1 and not 0 < round(batch // world_size * fraction) < (
            batch // world_size):
        return [f"data.unlabeled_fraction {fraction:g} of {batch // world_size} images per rank at world size "
                f"{world_size} leaves no room for both CIFAR-10 and TI images: raise data.batch_size or set "
                "data.unlabeled_fraction=0"]
    if batch % (world_size * micro):
        return [f"data.batch_size {batch} does not split into {world_size} rank(s) x {micro} micro-batches"]
    # BatchNorm in training mode needs more than one value per channel: a ResNet's last stage is 1x1 for
    # inputs of 8 px or less, so one image there fails (dat trains on cat([x_adv, x]): two images).
    size = {"digits": 8, "synthetic": cfg.data.synthetic_image_size}.get(cfg.data.name, 32)
    if (batch == world_size * micro and cfg.train.loss != "dat" and size <= 8
            and cfg.model.name in ("resnet18", "preact_resnet18")):
        return [f"data.batch_size {batch} leaves 1 image per rank and micro-batch at world size {world_size}, and "
                f"{cfg.model.name}'s last stage is 1x1 for {size}px images: its BatchNorm needs at least 2 values "
                "(raise data.batch_size or lower train.micro_batches)"]
    return []


def _data_path_problems(data: DataConfig) -> list[str]:
    found = []
    if data.name in ("cifar10", "cifar10-ext") and not data.download:
        folder = os.path.join(data.root, "cifar-10-batches-py")
        archive = os.path.join(data.root, "cifar-10-python.tar.gz")
        if not (os.path.isdir(folder) or os.path.isfile(archive)):
            found.append(f"data.root: no CIFAR-10 in {data.root!r} (expected cifar-10-batches-py/ or "
                         "cifar-10-python.tar.gz; set data.download=true on a cluster with internet)")
    if data.name == "cifar10-ext":
        if not data.ti500k_path:
            found.append("data.ti500k_path: cifar10-ext needs the TI-500K pickle (or .npz) path")
        elif not os.path.isfile(data.ti500k_path):
            found.append(f"data.ti500k_path: file not found: {data.ti500k_path}")
    return found


def save_resolved(cfg: Config, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
