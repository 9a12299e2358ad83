"""Distributed adversarial training: every rank attacks its own shard, one gradient all-reduce per step."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import glob
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from trainer import checkpoint
from trainer.attacks import attack_mode, craft, default_alpha, pgd_step
from trainer.communication import CommStats, GradientSync
from trainer.config import Config, ConfigError, lr_rule, save_resolved, scaled_lr
from trainer.data import DataError, ImageSet, TrainBatches, eval_batches, load_dataset
from trainer.distributed import (DistInfo, all_gather_objects, all_reduce_sum, average_buffers, barrier,
                                 broadcast_object, broadcast_parameters)
from trainer.jointspar import DenseTraining, JointSpar
from trainer.metrics import MetricsLog, PhaseTimer, table_header, table_row
from trainer.models import build_model
from trainer.observability import TrainingExporter
from trainer.optim import build_optimizer, build_schedule
from trainer.seeding import derive_seed
from trainer.stopping import StopRequests, signal_name

log = logging.getLogger("trainer")


class TrainingDiverged(ValueError):
    """The training loss became inf or NaN: stop before a checkpoint of the broken model is written."""


class TrainingStopped(Exception):
    """A rank got SIGTERM or SIGINT: every rank stopped at the same step, after the checkpoint that covers it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively on GPUs of compute capability 8.0+ (Ampere on) and on CPUs with AVX512-BF16 / AMX
    (elsewhere it would be emulated, slower than fp32). Measured on such a CPU (make bench): bf16 +
    channels_last made the 2-rank DAT step 2.0x faster."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_path_enabled(value: str, device: torch.device) -> bool:
    """perf.amp / perf.channels_last resolved: on as asked, and with auto where bf16 runs natively."""
    return value in ("on", "bf16") or (value == "auto" and native_bf16(device))


def c_compiler() -> str | None:
    """The host C compiler torch.compile needs (Triton builds its kernel launchers with it), looked up as
    Triton does: $CC, else cc, gcc or clang on PATH. Slim runtime images often have none."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for path in map(shutil.which, ("cc", "gcc", "clang")) if path), None)


def compiled_passes(setting: str, device: torch.device, have_compiler: bool = True, world_size: int = 1,
                    jointspar: bool = False) -> str:
    """perf.compile resolved to off | attack | all. auto compiles the attack on CUDA: bench/gpu.sh measured it
    2.1x faster on an H100 (the trainer 1.8x end to end), not on CPUs, where compiling takes minutes, nor
    without a C compiler. The training pass is compiled too (`all`, 1.2x faster on the H100 at batch 4096)
    only where nothing is lost: compiled, its gradients come out of one backward node at the end, so with
    several ranks the all-reduce hooks could no longer overlap the backward, and JointSpar's per-step
    requires_grad changes would recompile it. A missing compiler is a config error for an explicit setting,
    not a crash in the first step."""
    if setting in ("attack", "all") and not have_compiler:
        raise ConfigError(f"perf.compile={setting}: torch.compile needs a C compiler ($CC, cc, gcc or clang) and "
                          "none is on PATH; install gcc in the image or set perf.compile=off")
    if setting == "auto":  # Triton's code generator needs compute capability 7.0+
        if not (device.type == "cuda" and have_compiler and torch.cuda.get_device_capability(device) >= (7, 0)):
            return "off"
        return "all" if world_size == 1 and not jointspar else "attack"
    return setting


# What a checkpoint's run was trained on, beyond the model and optimizer (compared on resume). Left out: where
# files are, how batches are evaluated or placed (no effect on what is learnt); the batch size is named apart.
EXPERIMENT_SECTIONS = ("data", "train", "attack", "eval", "jointspar")
EXPERIMENT_IGNORED = {"data.root", "data.download", "data.device_resident", "data.eval_batch_size", "data.batch_size",
                      "data.ti500k_path", "train.micro_batches"}  # (micro-batches: the fix the out-of-memory line names)
# Settings added after checkpoints began to record these: what a checkpoint without them was trained with.
EXPERIMENT_BEFORE = {"data.unlabeled_fraction": 0.0, "data.val_size": 0}
# A run found in run.output_dir that differs in these sections' settings is another experiment, not this one's
# earlier attempt (a restarted pod never changes them). The optimizer's settings, run.epochs and evaluation may
# change on an automatic resume: lowering the LR or extending a run is how one continues it. (Of run.*, only
# run.seed is among the experiment's settings, and only where it draws images: see experiment_settings.)
EXPERIMENT_DEFINING = ("data", "train", "attack", "jointspar", "run")


def experiment_settings(cfg: Config) -> dict[str, object]:
    plain = cfg.to_dict()
    ignored = set(EXPERIMENT_IGNORED)  # and the settings that have no effect in this config:
    if cfg.data.name != "cifar10-ext":
        ignored |= {"data.unlabeled_max", "data.unlabeled_fraction"}
    if cfg.data.name != "synthetic":
        ignored |= {f"data.{key}" for key in plain["data"] if key.startswith("synthetic_")}
    if not cfg.jointspar.enabled:  # (jointspar.enabled itself is compared)
        ignored |= {f"jointspar.{key}" for key in plain["jointspar"] if key != "enabled"}
    if cfg.train.loss == "clean":  # (eval.eps -1 evaluates at attack.eps)
        ignored |= {f"attack.{key}" for key in plain["attack"] if key != "eps" or cfg.eval.eps >= 0}
    settings = {f"{section}.{key}": value for section in EXPERIMENT_SECTIONS for key, value in plain[section].items()
                if f"{section}.{key}" not in ignored}
    if cfg.data.val_size or (cfg.data.name == "cifar10-ext" and cfg.data.unlabeled_max):
        settings["run.seed"] = cfg.run.seed  # it draws the held-out images and the TI subset
    return settings


def _state_differences(saved: dict, current: dict, show: int = 3) -> str:
    """What keeps a saved model state from loading into this model: missing, unexpected or reshaped entries."""
    problems = [f"{k}: missing from the checkpoint" for k in current if k not in saved]
    problems += [f"{k}: not in this model" for k in saved if k not in current]
    problems += [f"{k}: shape {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} here"
                 for k, v in current.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    more = f" (+{len(problems) - show} more)" if len(problems) > show else ""
    return "; ".join(problems[:show]) + more


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist_info
        self.device = dist_info.device
        if self.device.type == "cpu":  # denormal floats make CPU kernels 10-40x slower in some epochs
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.run.seed)
        data = load_dataset(cfg.data, seed=cfg.run.seed)
        self.test_set, self.val_set = data.test, data.val
        augment = cfg.data.augment == "on" or (cfg.data.augment == "auto" and data.image_size == 32)
        resident = cfg.data.device_resident == "on" or (
            cfg.data.device_resident == "auto" and self.device.type == "cuda"
            and data.train.images.numel() < 8 * 2**30)
        self.batches = TrainBatches(data.train, cfg.data.batch_size // dist_info.world_size, dist_info.rank,
                                    dist_info.world_size, cfg.run.seed, self.device, augment, resident,
                                    labelled=data.labelled, unlabeled_fraction=cfg.data.unlabeled_fraction)

        model = build_model(cfg.model.name, data.num_classes, data.channels, cfg.model.width).to(self.device)
        self.channels_last = fast_path_enabled(cfg.perf.channels_last, self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        broadcast_parameters(model)
        self.model = model
        self.params = list(model.parameters())
        have_compiler = c_compiler() is not None
        self.compiled = compiled_passes(cfg.perf.compile, self.device, have_compiler, dist_info.world_size,
                                        cfg.jointspar.enabled)
        if dist_info.is_main and not have_compiler and cfg.perf.compile == "auto" and self.device.type == "cuda":
            log.warning("perf.compile=auto: no C compiler ($CC, cc, gcc or clang) on PATH, so the attack runs "
                        "eager (about 1.8x slower on a GPU); install gcc in the image to compile it")
        if dist_info.is_main and self.compiled == "all" and dist_info.world_size > 1:
            log.warning("perf.compile=all: a compiled training pass hands over its gradients only at the end of "
                        "its backward, so the gradient all-reduce no longer overlaps it")
        self.attack_forward = self.forward = model  # the model as the attack and the training pass call it
        self.pgd_step = pgd_step  # the attack's projected ascent step
        self.craft = craft  # the training attack (bench/gpu.sh swaps in a CUDA-graphed one)
        if self.compiled != "off":
            self.use_compiled(torch.compile, training_pass=self.compiled == "all")
        self.amp = fast_path_enabled(cfg.perf.amp, self.device)
        self.autocast = (functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
                         if self.amp else contextlib.nullcontext)

        self.optimizer = build_optimizer(cfg.optim, model, cfg.data.batch_size)
        self.schedule = build_schedule(cfg.optim, self.optimizer, len(self.batches), cfg.run.epochs)
        self.grad_sync = GradientSync(self.params, dist_info.world_size, cfg.comm.bucket_mb, cfg.comm.overlap)
        self.jointspar = JointSpar(cfg.jointspar, model, seed=cfg.run.seed) if cfg.jointspar.enabled else None
        self.sampler = self.jointspar or DenseTraining(self.params)  # which parameters each step trains
        self.timer = PhaseTimer(self.device)
        self.stops = StopRequests(dist_info.world_size, cfg.dist.timeout_seconds)
        self.exporter = TrainingExporter()  # the real one starts with fit(); progress() is a no-op until then
        self.log = MetricsLog(cfg.run.output_dir, dist_info.is_main)
        self.start_epoch, self.best_ra, self.best_epoch = 1, -1.0, 0
        self.start_step, self.within_epoch = 0, None  # a checkpoint taken within start_epoch: where, what it held
        self.config_changes: list[str] = []  # on resume: the settings this config changed from the checkpoint's
        self.resume_notes: list[tuple[int, str]] = []  # on resume: what to log about those changes (level, text)
        # One id per run, kept across resumes: the metrics' run_id label, so that the alerts never compare a run
        # with an earlier one of the same job name.
        self.run_id = broadcast_object(uuid.uuid4().hex[:12])
        self.resumed_from: str | None = None  # set by resume()
        # device-side running sums of (loss, clean correct, adv correct, images) over the epoch: no host sync per step
        self.totals = torch.zeros(4, device=self.device)

    def use_compiled(self, compiler: Callable[[Any], Any], training_pass: bool, fused_step: bool = True) -> None:
        """Run the attack through compiler(self.model) (torch.compile or a partial of it), the training pass too
        if asked, and the attack's projected step as one fused kernel (compiler(pgd_step)) unless told not to.
        The attack freezes every parameter, so its graphs stay the same step after step."""
        compiled = compiler(self.model)
        self.attack_forward = compiled
        self.forward = compiled if training_pass else self.model
        self.pgd_step = compiler(pgd_step) if fused_step else pgd_step

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, epoch: int, step: int = 0, within_epoch: dict | None = None) -> dict:
        """epoch: the last finished epoch; step > 0: that many steps of the next one are done too, and
        within_epoch holds that epoch's running totals and every rank's RNG state."""
        return {
            "epoch": epoch,
            "step": step,
            "within_epoch": within_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "jointspar": self.jointspar.state_dict() if self.jointspar else None,
            "best_ra": self.best_ra,
            "best_epoch": self.best_epoch,
            "run_id": self.run_id,
            "resumed_from": self.resumed_from,  # the explicit run.resume this run started from, if any
            "seed": self.cfg.run.seed,  # with the epoch, this fixes every RNG stream of the next epoch
            "model_name": self.cfg.model.name,
            "optimizer_name": self.cfg.optim.name,
            "optim": self.cfg.to_dict()["optim"],  # plain values: a resumed run names what its config changed
            "experiment": experiment_settings(self.cfg),
            "world_size": self.dist.world_size,
            "batch_size": self.cfg.data.batch_size,
            "micro_batches": self.cfg.train.micro_batches,
        }

    def read_checkpoint(self, path: str) -> dict:
        """A checkpoint of this config's model, as rank 0 reads it, on every rank: only rank 0 writes
        checkpoints, so the other pods of a multi-node job on their own volumes have none (a rank deciding
        alone would start fresh and wait forever for the resumed ones). A refusal reaches every rank, so all
        exit with the same line."""
        state, refused = None, None
        if self.dist.is_main:
            try:
                state = checkpoint.load(path)
            except checkpoint.CheckpointError as exc:
                refused = str(exc)
        state, refused = broadcast_object((state, refused))
        if refused:
            raise checkpoint.CheckpointError(refused)
        if state.get("model_name") is None:
            raise checkpoint.CheckpointError(f"{path}: not a dat-train checkpoint (it does not name its model)")
        if state.get("model_name") != self.cfg.model.name:
            raise checkpoint.CheckpointError(
                f"{path}: checkpoint is for model {state.get('model_name')!r}, config says {self.cfg.model.name!r}")
        differs = _state_differences(state["model"], self.model.state_dict())
        if differs:
            raise checkpoint.CheckpointError(f"{path}: the model differs from the checkpoint's ({differs})")
        return state

    def resume(self, path: str) -> None:
        state = self.read_checkpoint(path)
        missing = [key for key in ("optimizer", "schedule", "best_ra") if key not in state]
        if missing:
            raise checkpoint.CheckpointError(f"{path}: cannot resume from it (no {', '.join(missing)} in it: weights "
                                             "only?); --evaluate reads such a file")
        now = experiment_settings(self.cfg)
        saved = {**EXPERIMENT_BEFORE, **(state.get("experiment") or {})}
        moved = {k: (v, now.get(k)) for k, v in saved.items() if now.get(k, v) != v}
        defining = [k for k in moved if k.split(".")[0] in EXPERIMENT_DEFINING]
        if defining and self.cfg.run.resume == "auto":  # found in run.output_dir, not named by the user
            key, more = defining[0], defining[1:]
            also = f" (and {', '.join(more)})" if more else ""
            also += (" (with data.val_size or a TI subset the seed draws the held-out images)"
                     if key == "run.seed" else "")
            raise checkpoint.CheckpointError(
                f"{path}: this folder's run trained {key}={moved[key][0]!r}, the config says {moved[key][1]!r}{also}: "
                f"another experiment? Give it its own run.output_dir (on Kubernetes: a new job name), start fresh "
                f"here with --no-resume (the earlier run is set aside), or continue that run on purpose with "
                f"--resume {path}")
        if (state.get("jointspar") is None) != (self.jointspar is None):
            raise checkpoint.CheckpointError(f"{path}: jointspar.enabled differs from the checkpoint's run")
        saved_groups = state["optimizer"].get("param_groups", [])
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        saved_name = state.get("optimizer_name")  # older checkpoints: told apart by their settings' names
        other = (saved_name != self.cfg.optim.name) if saved_name else bool(
            saved_groups and set(configured[0]) - set(saved_groups[0]))
        if other:
            raise checkpoint.CheckpointError(
                f"{path}: the checkpoint was trained with {repr(saved_name) if saved_name else 'another optimizer'}, "
                f"the config says optim.name={self.cfg.optim.name!r}; its state cannot carry over (--no-resume "
                "starts fresh)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            if self.jointspar:
                self.jointspar.load_state_dict(state["jointspar"])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise checkpoint.CheckpointError(f"{path}: incompatible with this config ({first})") from None
        if "optim" in state and self._keep_lr_rule(state["optim"]):  # nothing can refuse the resume from here on
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        # The hyperparameters are this config's (config.yaml says so), not the checkpoint's: a resumed run may
        # lower the LR or change the weight decay. The LR of the next step comes from this run's schedule: the
        # same value when nothing changed, the extended schedule's when run.epochs grew.
        if "optim" in state:  # the optimizer config it was trained with: name what changed as config keys
            now_optim = self.cfg.to_dict()["optim"]
            saved_optim = {**state["optim"], "lr_scaling": lr_rule(state["optim"].get("name", now_optim["name"]),
                                                                   state["optim"].get("lr_scaling", "sqrt"))}
            now_optim["lr_scaling"] = lr_rule(now_optim["name"], now_optim["lr_scaling"])  # auto as resolved
            changed = [f"optim.{k}" for k, v in now_optim.items() if saved_optim.get(k, v) != v]
        else:  # older checkpoints: compare the optimizer's settings
            changed = sorted({"lr" if k == "initial_lr" else k  # initial_lr: the configured LR; lr: the schedule's
                              for saved, now in zip(saved_groups, configured) for k, v in now.items()
                              if k not in ("lr", "max_lr_snapshot") and saved.get(k) != v})  # + timm's copy of lr
        within = state.get("within_epoch") if state.get("step") else None
        same_epoch = within and (within["world_size"], within["batch_size"], within.get("steps", len(self.batches))) \
            == (self.dist.world_size, self.cfg.data.batch_size, len(self.batches)) and "ranks" in within
        if within and not same_epoch:
            if self.dist.is_main:
                log.warning("the checkpoint was taken after step %d of epoch %d (world size %d, batch %d, %s steps "
                            "per epoch): with another world size, batch or data set the epoch's order differs, so "
                            "epoch %d starts over", state["step"], int(state["epoch"]) + 1, within["world_size"],
                            within["batch_size"], within.get("steps", "?"), int(state["epoch"]) + 1)
            within = None
            if self.jointspar:
                self.jointspar.reset_epoch_stats()  # the epoch's counts so far belong to the steps now replayed
        self.start_step, self.within_epoch = (int(state["step"]), within) if within else (0, None)
        sched = self.schedule
        # by epochs done (the batch size may differ), plus the steps done within the next one
        sched.last_epoch = int(state["epoch"]) * len(self.batches) + self.start_step
        sched.base_lrs = [g["initial_lr"] for g in configured]
        for group, now, factor in zip(self.optimizer.param_groups, configured, sched.lr_lambdas):
            group.update(now)
            group["lr"] = now["initial_lr"] * factor(sched.last_epoch)
        saved_micro = state.get("micro_batches", (state.get("experiment") or {}).get("train.micro_batches"))
        for key, saved, now in (("data.batch_size", state.get("batch_size"), self.cfg.data.batch_size),
                                ("train.micro_batches", saved_micro, self.cfg.train.micro_batches),
                                ("run.seed", state.get("seed"), self.cfg.run.seed)):
            if saved is not None and saved != now and key not in moved:
                changed.append(f"{key} ({saved} -> {now})")
        changed += [f"{k} ({a!r} -> {b!r})" for k, (a, b) in moved.items()]
        self.config_changes = list(changed)  # what this config changed (the world size is the cluster's)
        if state.get("world_size") not in (None, self.dist.world_size):
            changed.append(f"world size ({state['world_size']} -> {self.dist.world_size})")
        # said by run() once the run goes on (not before a refusal of a finished run)
        if any(k.startswith("eval.") or k == "data.val_size" for k in moved):
            self.resume_notes.append((logging.WARNING,
                f"evaluation settings changed (the attack or, with data.val_size, the images): the robust accuracy "
                f"of checkpoint-best.pt ({float(state['best_ra']):.4f}) was measured under the checkpoint's, so a "
                "new best is only kept if it beats that value"))
        if changed:
            self.resume_notes.append((logging.INFO, f"resumed with this config's settings, which differ from the "
                                     f"checkpoint's: {', '.join(changed)} (the LR schedule continues from epoch "
                                     f"{int(state['epoch'])})"))
        self.start_epoch, self.best_ra = int(state["epoch"]) + 1, float(state["best_ra"])
        self.best_epoch = int(state.get("best_epoch") or 0)
        self.run_id = str(state.get("run_id") or self.run_id)  # older checkpoints: a new id
        explicit = self.cfg.run.resume not in ("auto", "never")
        self.resumed_from = checkpoint.origin(self.cfg.run.resume) if explicit else state.get("resumed_from")

    def _keep_lr_rule(self, saved_optim: dict) -> bool:
        """optim.lr_scaling auto meeting a checkpoint trained under another rule (a run from before auto, whose
        default was sqrt for every optimizer) keeps the checkpoint's: a default must not change a run's LR
        half-way (set the rule explicitly to change it). The config then names the rule, as config.yaml will.
        True when the optimizer's base LR changed."""
        name = self.cfg.optim.name
        saved = lr_rule(name, saved_optim.get("lr_scaling", "sqrt"))  # sqrt: the default before there was a choice
        if self.cfg.optim.lr_scaling != "auto" or saved_optim.get("name") != name or lr_rule(name, "auto") == saved:
            return False
        self.cfg.optim.lr_scaling = saved
        for group in self.optimizer.param_groups:  # the schedule's base: the LR of each step comes from it
            group["initial_lr"] = scaled_lr(self.cfg.optim, self.cfg.data.batch_size)
        self.resume_notes.append((logging.WARNING, f"optim.lr_scaling auto: keeping the checkpoint's rule ({saved}) "
                                  "for this run; set optim.lr_scaling to change it"))
        return True

    def save(self, epoch: int, robust_acc: float | None) -> None:
        if not self.dist.is_main:
            return
        out = self.cfg.run.output_dir
        better = robust_acc is not None and robust_acc > self.best_ra
        if better:
            self.best_ra, self.best_epoch = robust_acc, epoch
        state = self.state_dict(epoch)
        checkpoint.save_atomic(state, os.path.join(out, checkpoint.LATEST))  # first: what a restart resumes from
        if better:
            checkpoint.save_atomic(state, os.path.join(out, checkpoint.BEST))

    def save_within_epoch(self, epoch: int, step: int, lr: float) -> None:
        """checkpoint-latest.pt after `step` steps of `epoch` (run.checkpoint_every_steps), so that a killed run
        loses at most that many steps. Collective: every rank takes part. Every rank's running totals of the
        epoch (their sum is checked and counted), RNG state and BatchNorm statistics are kept as they are (the
        attack reads the latter in eval mode, so averaging them here would change the training), and the
        checkpoint's model holds their average, as at an epoch's end."""
        with self.timer.phase("comm"):
            own = self.totals.tolist()
            totals = all_reduce_sum(own, self.device)
            ranks = all_gather_objects({
                "totals": own,  # restored as they are: the epoch's sums come out bit for bit as uninterrupted
                "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "buffers": {name: b.detach().cpu() for name, b in self.model.named_buffers()}})
        if not self.dist.is_main:
            return
        finite = math.isfinite(totals[0]) and bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all())
        if not finite:  # diverging: keep the last good checkpoint (the epoch's end reports the divergence)
            return
        with self.timer.phase("checkpoint"):
            within = {"totals": totals, "comm": dataclasses.asdict(self.grad_sync.stats), "ranks": ranks,
                      "world_size": self.dist.world_size, "batch_size": self.cfg.data.batch_size,
                      "steps": len(self.batches), "lr": lr}
            state = self.state_dict(epoch - 1, step, within)
            for name, value in state["model"].items():
                if value.is_floating_point() and name in ranks[0]["buffers"]:
                    state["model"][name] = torch.stack([r["buffers"][name] for r in ranks]).mean(0)
            checkpoint.save_atomic(state, os.path.join(self.cfg.run.output_dir, checkpoint.LATEST))

    def _restore_within_epoch(self, within: dict) -> float:
        """This rank's running totals of the epoch, gradient bytes, RNG state and BatchNorm statistics as they
        were at the checkpoint; returns the images already counted (all ranks')."""
        mine = within["ranks"][self.dist.rank]
        if "totals" in mine:
            self.totals.copy_(torch.tensor(mine["totals"], dtype=self.totals.dtype))
        elif self.dist.is_main:  # checkpoints from before: the sum over ranks, on rank 0
            self.totals.copy_(torch.tensor(within["totals"], dtype=self.totals.dtype))
        self.grad_sync.stats = CommStats(**within["comm"])
        torch.set_rng_state(mine["cpu_rng"])
        if mine["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(mine["buffers"][name])
        return float(within["totals"][3])

    # ------------------------------------------------------------------ training

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> None:
        """One optimizer step on this rank's batch. With train.micro_batches > 1 the batch is attacked and
        back-propagated in sequential slices (gradient accumulation); the gradient all-reduce still runs
        once, during the last slice's backward."""
        cfg, model, t, micro = self.cfg, self.model, self.timer, self.cfg.train.micro_batches
        active = None
        for i, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            with t.phase("attack"):
                x_adv = None
                if cfg.train.loss != "clean":
                    with attack_mode(model, cfg.attack.bn_eval):
                        x_adv = self.craft(cfg.attack.name, self.attack_forward, xs, ys, eps=cfg.attack.eps,
                                           alpha=cfg.attack.alpha, steps=cfg.attack.steps,
                                           random_start=cfg.attack.random_start, autocast=self.autocast,
                                           step=self.pgd_step)
            with t.phase("compute"):
                if active is None:
                    active = self.sampler.begin_step(epoch, step)
                if i == micro - 1:
                    self.grad_sync.prepare(active)  # arms the all-reduce hooks for this last backward
                with self.autocast():
                    if cfg.train.loss == "dat":  # CE(x_adv) + CE(x): one forward of both halves, one backward
                        adv_logits, clean_logits = self.forward(torch.cat([x_adv, xs])).float().chunk(2)
                        loss = F.cross_entropy(adv_logits, ys) + F.cross_entropy(clean_logits, ys)
                    else:  # adv: CE(x_adv); clean: CE(x)
                        clean_logits = adv_logits = self.forward(xs if x_adv is None else x_adv).float()
                        loss = F.cross_entropy(adv_logits, ys)
                if loss.requires_grad:  # JointSpar may (rarely) draw an empty active set: nothing to train
                    (loss / micro).backward()
                with torch.no_grad():
                    zero = torch.zeros((), device=ys.device)
                    clean_ok = (clean_logits.argmax(1) == ys).sum() if cfg.train.loss != "adv" else zero
                    adv_ok = (adv_logits.argmax(1) == ys).sum() if cfg.train.loss != "clean" else zero
                    self.totals += torch.stack([loss.detach() * len(ys), clean_ok.float(), adv_ok.float(),
                                                zero + len(ys)])
        with t.phase("comm"):
            self.grad_sync.wait()
        with t.phase("optimizer"):
            self.sampler.end_step()  # JointSpar: the 1/p scale of the active gradients
            self.optimizer.step()
            self.sampler.after_optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        torch.manual_seed(derive_seed(self.cfg.run.seed, "training", epoch, self.dist.rank))  # PGD starts
        self.totals.zero_()
        first, images_before = 0, 0.0
        if epoch == self.start_epoch and self.within_epoch:  # resumed within this epoch
            first, images_before = self.start_step, self._restore_within_epoch(self.within_epoch)
        lr = self.within_epoch["lr"] if first else self.optimizer.param_groups[0]["lr"]  # the epoch's first step's
        wall0 = time.perf_counter()
        batches = iter(self.batches.epoch(epoch, first))
        every, steps = self.cfg.run.checkpoint_every_steps, len(self.batches)
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=None if (self.dist.is_main and self.cfg.run.progress) else True)
        saved = first  # the steps of this epoch that checkpoint-latest.pt holds
        for step in range(first, steps):
            signum = self.stops.poll()
            if signum:
                bar.close()
                self.stop(signum, epoch, step, saved, lr)
            with self.timer.phase("data"):
                x, y = next(batches)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            self.train_step(x, y, epoch, step)
            self.exporter.progress(step + 1, steps)
            if every and (step + 1) % every == 0 and step + 1 < steps:
                self.save_within_epoch(epoch, step + 1, lr)
                saved = step + 1
            bar.update(1)
        bar.close()
        with self.timer.phase("comm"):
            average_buffers(self.model, self.dist.world_size)

        evaluate = epoch == self.cfg.run.epochs or (self.cfg.eval.every and epoch % self.cfg.eval.every == 0)
        clean_acc = robust_acc = val_clean_acc = val_robust_acc = None
        if evaluate:
            with self.timer.phase("eval"):
                clean_acc, robust_acc = self.evaluate()
                if self.val_set is not None:
                    val_clean_acc, val_robust_acc = self.evaluate(self.val_set)
        phases = self.timer.take()
        epoch_seconds = time.perf_counter() - wall0
        loss_sum, clean_ok, adv_ok, n = all_reduce_sum(self.totals.tolist(), self.device)
        comm = self.grad_sync.take_stats()
        record = {
            "epoch": epoch,
            "epoch_seconds": epoch_seconds,
            **{f"{name}_seconds": seconds for name, seconds in phases.items()},
            "comm_bytes": comm.bytes,
            "dense_comm_bytes": comm.dense_bytes,
            "comm_calls": comm.calls,
            "images": int(n),
            "images_per_second": (n - images_before) / max(1e-9, epoch_seconds - phases["eval"]),
            "train_loss": loss_sum / n,
            "train_clean_acc": clean_ok / n if self.cfg.train.loss != "adv" else None,
            "train_adv_acc": adv_ok / n if self.cfg.train.loss != "clean" else None,
            "test_clean_acc": clean_acc,
            "test_robust_acc": robust_acc,
            "lr": lr,
        }
        if self.val_set is not None:  # data.val_size: what checkpoint-best.pt is chosen on
            record.update(val_clean_acc=val_clean_acc, val_robust_acc=val_robust_acc)
        record["steps"] = steps - first  # the training steps this record's timings cover
        if first:
            record["resumed_at_step"] = first  # the timings cover the steps from there on
        record.update(self.sampler.epoch_stats())
        return record

    def stop(self, signum: int, epoch: int, step: int, saved: int, lr: float) -> NoReturn:
        """Every rank, at the same step: save what the checkpoint lacks (steps of `epoch` done since it) and
        raise TrainingStopped, which ends the run; a restart resumes from here."""
        if step > saved:
            self.save_within_epoch(epoch, step, lr)
        where = f"after step {step} of epoch {epoch}" if step else f"after epoch {epoch - 1}"
        if not self.dist.is_main:  # rank 0 writes checkpoints and says where
            raise TrainingStopped(signum, f"stopped by {signal_name(signum)} {where}")
        kept = checkpoint.find_resume(self.cfg.run.output_dir, "auto")
        raise TrainingStopped(signum, f"stopped by {signal_name(signum)} {where}: " + (
            f"{kept} holds it, and a restart resumes from there" if kept else "nothing was trained yet"))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return int((self.model(x).argmax(1) == y).sum())

    def evaluate(self, images: ImageSet | None = None) -> tuple[float, float]:
        """Clean and PGD accuracy on the test set (or `images`), sharded over ranks, model in eval mode, fp32."""
        cfg, ev = self.cfg, self.cfg.eval
        eps = cfg.attack.eps if ev.eps < 0 else ev.eps
        self.model.eval()
        clean = robust = total = 0
        images = self.test_set if images is None else images
        for x, y in eval_batches(images, cfg.data.eval_batch_size, self.dist.rank, self.dist.world_size, self.device,
                                 ev.max_samples):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            clean += self.accuracy(x, y)
            with attack_mode(self.model, bn_eval=True):
                x_adv = craft("pgd", self.model, x, y, eps=eps, alpha=ev.alpha, steps=ev.steps, restarts=ev.restarts)
            robust += self.accuracy(x_adv, y)
            total += len(y)
            self.exporter.progress()
        self.model.train()
        clean, robust, total = all_reduce_sum([clean, robust, total], self.device)
        if not total:  # the loaders refuse empty test sets; this is the last line of defence
            raise DataError("no images to evaluate")
        return clean / total, robust / total

    def fit(self) -> dict | None:
        cfg = self.cfg
        if self.dist.is_main:
            backend = dist.get_backend() if dist.is_initialized() else "none"
            print(f"DAT: model={cfg.model.name} data={cfg.data.name} loss={cfg.train.loss} attack={attack_name(cfg)}"
                  f" eps={cfg.attack.eps:.4g} optim={cfg.optim.name} world={self.dist.world_size}"
                  f" batch={cfg.data.batch_size} steps/epoch={len(self.batches)}"
                  f" jointspar={'on' if self.jointspar else 'off'} params={sum(p.numel() for p in self.params)}"
                  f"\n     device={self.device} backend={backend} bf16={'on' if self.amp else 'off'}"
                  f" channels_last={'on' if self.channels_last else 'off'}"
                  f" compile={self.compiled}"
                  f" micro_batches={cfg.train.micro_batches}"
                  f" metrics_port={cfg.metrics.port or 'off'}", flush=True)
            print(table_header(), flush=True)
        exporter = self.exporter = TrainingExporter.start(
            cfg.metrics, rank=self.dist.rank, local_rank=self.dist.local_rank, node_rank=self.dist.node_rank,
            world_size=self.dist.world_size, local_world_size=self.dist.local_world_size,
            default_job_name=cfg.run.name, epochs_done=self.start_epoch - 1, run_id=self.run_id,
            history=self.log.records(),
            run_info={"model": cfg.model.name, "attack": attack_name(cfg),
                      "optimizer": cfg.optim.name, "loss": cfg.train.loss,
                      "jointspar": "on" if self.jointspar else "off", "world_size": str(self.dist.world_size)})
        record, outcome = None, "error"
        self.stops.install()
        try:
            for epoch in range(self.start_epoch, cfg.run.epochs + 1):
                record = self.train_epoch(epoch)
                finite_weights = bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all())
                if not (math.isfinite(record["train_loss"]) and finite_weights):
                    what = (f"the training loss is {record['train_loss']}" if finite_weights else
                            "the weights hold inf or NaN")
                    kept = checkpoint.find_resume(cfg.run.output_dir, "auto")
                    outcome = "diverged"
                    raise TrainingDiverged(
                        f"epoch {epoch}: {what} (diverged), so no checkpoint of it is written (latest checkpoint: "
                        f"{kept or 'none yet'}); lower optim.lr or lengthen optim.warmup_epochs"
                        + (", and add --no-resume if that checkpoint is already broken" if kept else ""))
                self.log.append(record)  # before the checkpoints: a resume drops what they do not cover
                self.save(epoch, record.get("val_robust_acc", record["test_robust_acc"]))
                exporter.observe_epoch(record)
                if self.dist.is_main:
                    print(table_row(record), flush=True)
                signum = self.stops.poll_now() if epoch < cfg.run.epochs else 0  # one that came during eval
                if signum:
                    self.stop(signum, epoch + 1, 0, 0, 0.0)
            self.stops.close()
            barrier()
            outcome = "completed"
        except TrainingStopped:
            self.stops.close()
            outcome = "stopped"
            raise
        finally:  # after a failure the poll in flight is left alone: a dead peer would never answer it
            leaving = bool(self.stops.received) or outcome == "stopped"  # the pod is going
            if leaving:  # no signal may cut the way out short (torchrun SIGTERMs the other workers once one exits)
                self.stops.ignore_further()
            else:
                self.stops.uninstall()
            exporter.finish(outcome, linger=not leaving)
        return record


def evaluate_checkpoint(cfg: Config, dist_info: DistInfo, path: str) -> dict:
    """Clean and robust test accuracy of a checkpoint's model under this config's eval settings (e.g. more
    restarts or steps than training used), sharded over the ranks; writes nothing."""
    if os.path.isdir(path):  # a run's folder: its latest checkpoint, as with --resume
        path = os.path.join(path, checkpoint.LATEST)
    trainer = Trainer(cfg, dist_info)
    state = trainer.read_checkpoint(path)
    if not all(bool(v.isfinite().all()) for v in state["model"].values() if v.is_floating_point()):
        raise checkpoint.CheckpointError(f"{path}: the weights hold inf or NaN (a diverged run's?); nothing to evaluate")
    trainer.model.load_state_dict(state["model"])
    clean_acc, robust_acc = trainer.evaluate()
    ev = cfg.eval
    eps = cfg.attack.eps if ev.eps < 0 else ev.eps
    return {"checkpoint": path, "epoch": int(state["epoch"]), "step": int(state.get("step") or 0),
            "test_clean_acc": clean_acc, "test_robust_acc": robust_acc, "attack": f"pgd-{ev.steps}", "eps": eps,
            "alpha": ev.alpha or default_alpha("pgd", eps, ev.steps), "restarts": ev.restarts,
            "max_samples": ev.max_samples}


def attack_name(cfg: Config) -> str:
    """The training attack as people name it: pgd-10, fgsm (one step whatever attack.steps says)."""
    return "fgsm" if cfg.attack.name == "fgsm" else f"{cfg.attack.name}-{cfg.attack.steps}"


def set_aside_earlier_run(output_dir: str, why: str = "starting fresh") -> str | None:
    """A fresh start (or a resume from another folder's checkpoint) in a folder that holds an earlier run moves
    that run's checkpoints and logs into OUTPUT_DIR/previous-<UTC time>/ (nothing is deleted), so that a
    restart cannot resume the earlier run and its files are not overwritten."""
    names = [n for n in (checkpoint.LATEST, checkpoint.BEST, "metrics.jsonl", "config.yaml")
             if os.path.isfile(os.path.join(output_dir, n)) and os.path.getsize(os.path.join(output_dir, n))]
    if not any(n != "config.yaml" for n in names):
        return None
    stem = os.path.join(output_dir, time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime()))
    folder, n = stem, 1
    while True:  # a new folder each time: two fresh starts in one second must not mix or overwrite
        try:
            os.makedirs(folder)
            break
        except FileExistsError:
            n += 1
            folder = f"{stem}-{n}"
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(folder, name))
    log.warning("%s: moved the earlier run's %s to %s", why, ", ".join(names), folder)
    return folder


def carried_over(resume_from: str) -> list[str]:
    """The files of the resumed checkpoint's folder that continue in run.output_dir: its log of the epochs so
    far, and its best checkpoint when resuming its latest (saved at or after it) or that best itself."""
    names = ["metrics.jsonl"]
    if os.path.basename(resume_from) in (checkpoint.LATEST, checkpoint.BEST):
        names.append(checkpoint.BEST)
    return names


def run(cfg: Config, dist_info: DistInfo) -> dict | None:
    """Train as configured; resume from OUTPUT_DIR (or run.resume) when a checkpoint is there."""
    out = cfg.run.output_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        why = "exists and is not a folder" if exc.errno == errno.EEXIST else exc.strerror or exc
        raise ConfigError(f"run.output_dir: cannot create {out} ({why})") from None
    try:
        tempfile.TemporaryFile(dir=out).close()  # writable, before any work is done
    except OSError as exc:
        raise ConfigError(f"run.output_dir: cannot write to {out} ({exc.strerror or exc})") from None
    lock, refused = None, None
    if dist_info.is_main:  # rank 0 alone writes here
        try:
            lock = checkpoint.hold_folder(out)
        except checkpoint.CheckpointError as exc:
            refused = str(exc)
    refused = broadcast_object(refused)  # every rank stops, none waits in a collective
    if refused:
        raise checkpoint.CheckpointError(refused)
    trainer = Trainer(cfg, dist_info)
    resume_from = broadcast_object(checkpoint.find_resume(out, cfg.run.resume))  # rank 0's volume decides
    if resume_from:
        trainer.resume(resume_from)  # checks and loads; writes nothing, so a refused checkpoint changes nothing
    if trainer.start_epoch > cfg.run.epochs:  # config.yaml keeps describing the checkpoint's run
        if trainer.config_changes and cfg.run.resume == "auto":  # a new run was meant: do not report success
            raise checkpoint.CheckpointError(
                f"{resume_from}: this folder's run is finished ({trainer.start_epoch - 1} epochs) and this config "
                f"differs from it ({', '.join(trainer.config_changes)}): a new run needs its own run.output_dir (on "
                "Kubernetes: a new job name) or --no-resume (the finished run is set aside); raise run.epochs to "
                "train the finished run on")
        if dist_info.is_main:
            print(f"nothing to do: the checkpoint is from epoch {trainer.start_epoch - 1} and run.epochs is "
                  f"{cfg.run.epochs} (raise run.epochs to train on)")
        return None
    if resume_from:
        if dist_info.is_main:
            for level, note in trainer.resume_notes:
                log.log(level, note)
            where = (f"step {trainer.start_step} of epoch {trainer.start_epoch}" if trainer.start_step else
                     f"epoch {trainer.start_epoch - 1}")
            named = cfg.run.resume
            named = os.path.join(named, checkpoint.LATEST) if os.path.isdir(named) else named
            if named not in ("auto", "never") and not (os.path.exists(named) and os.path.samefile(named, resume_from)):
                print(f"run.resume {cfg.run.resume}: this folder's run already started from it, so it goes on from "
                      f"its own latest checkpoint (a new run.output_dir starts over from {cfg.run.resume})", flush=True)
            print(f"resumed from {resume_from} (saved after {where})", flush=True)
        barrier()  # every rank has read the checkpoint before rank 0 may move it aside
    if dist_info.is_main:
        for stale in glob.glob(os.path.join(out, "checkpoint-*.pt.tmp-[0-9]*")):  # a run killed while saving
            os.remove(stale)
        latest = os.path.join(out, checkpoint.LATEST)
        if not (resume_from and os.path.exists(latest) and os.path.samefile(resume_from, latest)):
            # a fresh start, or a checkpoint other than this folder's latest (another folder's, or an older one
            # here): this folder's run would be overwritten, so it is kept, aside
            aside = set_aside_earlier_run(out, f"resuming {resume_from}" if resume_from else "starting fresh")
            if resume_from:
                source = os.path.dirname(os.path.realpath(resume_from))
                source = aside if aside and source == os.path.realpath(out) else source
                for name in carried_over(resume_from):
                    if os.path.isfile(os.path.join(source, name)):
                        shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
        elif checkpoint.restore_best(out, {"epoch": trainer.start_epoch - 1, "step": trainer.start_step,
                                           "best_epoch": trainer.best_epoch}):
            print(f"restored {checkpoint.BEST} from {checkpoint.LATEST}: the last run stopped between saving "
                  "the two after its best epoch", flush=True)
    trainer.log.truncate_after(trainer.start_epoch - 1)  # epochs after the checkpoint are trained again
    if dist_info.is_main:
        save_resolved(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
    try:
        return trainer.fit()
    finally:
        if lock is not None:
            lock.close()

