"""PGD-10 DAT step throughput on one GPU (bench/gpu.sh runs this), variant by variant.

Every variant times the trainer's own Trainer.train_step (attack under attack_mode, one forward on
cat([x_adv, x]), one backward, LAMB) on a fixed synthetic CIFAR-shaped batch; the attack/train split
comes from the trainer's PhaseTimer (CUDA events). A failing variant is recorded with its error and
the others still run. --smoke runs everything tiny on the CPU so the script is known to work before
a GPU is lent.

FLOP accounting (counted with torch.utils.flop_counter on the model, not assumed): F = forward FLOPs
per image (multiply-add = 2 FLOPs); an attack iteration = forward + input-gradient backward (~2F, no
weight gradients); a training step = forward + backward with weight gradients (~3F) on each of x_adv
and x. Model FLOPs per input image of a PGD-K DAT step = K * attack_iteration + 2 * train_step (~(2K + 6) F).
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.perf_counter()  # the budget counts from here: importing torch takes seconds too

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import faulthandler
import functools
import signal
import tempfile
import traceback
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.cuda_graphs import GraphedAttack, attack_replaced
from bench.harness import JOINTSPAR_SETTINGS, build_trainer, first_batch, local_dist_info, synthetic_overrides
from trainer.attacks import attack_mode, craft
from trainer.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_IMAGES_PER_SECOND = 10_000

# Seconds a variant may take, for the time budget: compilation dominates the compiled ones (a compile mode
# other than the default autotunes: MODE_COMPILE_ALLOWANCE_S). The end-to-end trainer run (torchrun, one rank,
# 2 epochs) keeps its own share of the budget.
COMPILE_ALLOWANCE_S, MODE_COMPILE_ALLOWANCE_S, EAGER_ALLOWANCE_S, E2E_ALLOWANCE_S = 150.0, 300.0, 40.0, 90.0
JOINTSPAR = ["optim.name=lars", "jointspar.enabled=true", *(f"jointspar.{kv}" for kv in JOINTSPAR_SETTINGS)]


class Variant(NamedTuple):
    amp: str  # perf.amp
    channels_last: str  # perf.channels_last
    compiled: str  # the compiled passes (perf.compile: off | attack | all)
    graphed: bool  # CUDA-graphed attack
    cudnn_bench: bool  # cudnn.benchmark
    extra: list[str]  # trainer overrides
    fused_step: bool = True  # with compiled passes: the attack's projected step compiled into one kernel


VARIANTS = {
    "fp32": Variant("off", "off", "off", False, False, []),
    "bf16": Variant("bf16", "off", "off", False, False, []),
    "bf16_cl": Variant("bf16", "on", "off", False, False, []),
    "bf16_cl_cudnnbench": Variant("bf16", "on", "off", False, True, []),
    "bf16_cl_jointspar": Variant("bf16", "on", "off", False, False, JOINTSPAR),
    "bf16_cl_graph": Variant("bf16", "on", "off", True, False, []),
    "bf16_cl_compile": Variant("bf16", "on", "all", False, False, []),
    # the same with the attack's projected step eager (eight elementwise passes per attack step): the fused
    # step's gain, side by side
    "bf16_cl_compile_unfused": Variant("bf16", "on", "all", False, False, [], fused_step=False),
    "bf16_cl_compile_graph": Variant("bf16", "on", "all", True, False, []),
    "bf16_cl_compile_attack": Variant("bf16", "on", "attack", False, False, []),  # the trainer's default, 2+ ranks
    # Madry's PGD-10 AT (train.loss=adv: CE(x_adv) only): the 2K + 3 F per image the estimate counts
    "bf16_cl_compile_adv": Variant("bf16", "on", "all", False, False, ["train.loss=adv"]),
    "bf16_cl_compile_jointspar": Variant("bf16", "on", "attack", False, False, JOINTSPAR),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(ROOT, "bench", "results", "gpu")
    p.add_argument("--batch", type=int, default=4096,
                   help="images per step (default 4096: 19 GiB on an H100, within 2%% of the 8192 throughput)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per variant, compilation happens here (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--model", default="resnet18", help="default resnet18 (CIFAR variant)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default | max-autotune-no-cudagraphs | ...)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--gemm-size", type=int, default=8192, help="n of the n x n x n bf16 matmul peak probe")
    p.add_argument("--budget-seconds", type=float, default=450.0,
                   help="skip a variant unless it can finish within this many seconds of the start, allowing "
                        f"{COMPILE_ALLOWANCE_S:.0f} s for the first compiled one and {EAGER_ALLOWANCE_S:.0f} s "
                        f"otherwise, and keeping {E2E_ALLOWANCE_S:.0f} s for the end-to-end trainer run (the whole "
                        "run must fit 8 minutes)")
    p.add_argument("--e2e-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer override for the end-to-end run (repeatable), e.g. perf.compile=off")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end trainer run")
    p.add_argument("--e2e-timeout", type=float, default=2 * E2E_ALLOWANCE_S,
                   help=f"seconds the end-to-end run may take (default {2 * E2E_ALLOWANCE_S:.0f})")
    p.add_argument("--device", default=None,
                   help="default cuda (smoke: cpu); --device cpu runs the full benchmark on the CPU on purpose")
    p.add_argument("--out", default=default_out, help=f"output directory (default {os.path.relpath(default_out)})")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run of every code path: batch 4, PGD-2, 1 timed step, 256^3 matmul")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.iters, args.warmup, args.gemm_size = 4, 2, 1, 1, 256
        args.device = args.device or "cpu"
        args.compile_backend = args.compile_backend or "aot_eager"  # inductor's C++ build takes minutes on a CPU
    args.device = args.device or "cuda"
    args.compile_backend = args.compile_backend or "inductor"
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(n: int, device: torch.device, iters: int = 20) -> dict:
    """Achieved bf16 matmul rate on an n x n x n product: the reference 'peak' for utilisation."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    iters = iters if device.type == "cuda" else 2
    for _ in range(3):
        torch.mm(a, b, out=c)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {"n": n, "dtype": "bfloat16", "iters": iters, "seconds": seconds,
            "tflops": 2 * n ** 3 * iters / seconds / 1e12}


def count_flops(model_name: str, steps: int, image_size: int = 32) -> dict:
    """FLOPs per image of the forward, one attack iteration, one training step and a DAT step."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, 3)
    x, y = torch.rand(2, 3, image_size, image_size), torch.tensor([0, 1])

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / len(x)

    with torch.no_grad():
        forward = flops(lambda: model(x))
    with attack_mode(model):
        attack = flops(lambda: craft("pgd", model, x, y, eps=8 / 255, alpha=2 / 255, steps=1))
    train = flops(lambda: F.cross_entropy(model(x), y).backward())
    dat = steps * attack + 2 * train
    return {
        "forward_per_image": forward, "attack_iteration_per_image": attack, "train_step_per_image": train,
        "dat_step_per_image": dat, "brief_2k_plus_3_F": (2 * steps + 3) * forward,
        "accounting": f"dat_step_per_image = {steps} * attack_iteration + 2 * train_step (the training step runs "
                      "on x_adv and x); FLOPs counted by torch.utils.flop_counter (matmul/conv, 2 per MAC; "
                      "BatchNorm, ReLU and the optimizer not counted). brief_2k_plus_3_F counts the training "
                      "step once, as the issue's estimate does.",
    }


def step_flops(flops: dict, steps: int, overrides: list[str]) -> float | None:
    """FLOPs per image of one training step of a variant: the training pass runs on x_adv and x for
    train.loss=dat, on x_adv alone for train.loss=adv."""
    if "attack_iteration_per_image" not in flops:
        return None
    passes = 1 if "train.loss=adv" in overrides else 2
    return steps * flops["attack_iteration_per_image"] + passes * flops["train_step_per_image"]


def sync_audit(trainer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Host-device synchronisations made by one Trainer.train_step and by fetching one training batch
    (the second of an epoch, after the per-epoch set-up), counted with torch's CUDA sync debug mode
    (each synchronising call warns)."""
    out = {}
    batches = iter(trainer.batches.epoch(2))
    next(batches)
    for what, fn in (("train_step", lambda: trainer.train_step(x, y, 1, 10**6)),
                     ("data_batch", lambda: next(batches))):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message) for w in caught  # not the mode's own "is a prototype feature" notice
                    if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
        out[what] = {"syncs": len(messages), "examples": sorted({m.splitlines()[0][:200] for m in messages})[:5]}
    trainer.timer.take()
    return out


def run_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    amp, channels_last, compiled, graphed, cudnn_bench, extra, fused_step = VARIANTS[name]
    if graphed and device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    overrides = synthetic_overrides(args.model, args.batch, 1) + [
        "train.loss=dat", f"attack.steps={args.steps}", "optim.name=lamb",
        f"perf.amp='{amp}'", f"perf.channels_last='{channels_last}'",  # quoted: YAML reads on/off as booleans
        "perf.compile='off'"] + extra  # compiled here instead, with --compile-mode / --compile-backend
    trainer = build_trainer(overrides, local_dist_info(str(device)))
    if compiled != "off":
        mode = None if args.compile_mode == "default" else args.compile_mode
        trainer.use_compiled(functools.partial(torch.compile, mode=mode, backend=args.compile_backend),
                             training_pass=compiled == "all", fused_step=fused_step)
    x, y = first_batch(trainer)
    previous_bench = torch.backends.cudnn.benchmark
    if cudnn_bench:
        torch.backends.cudnn.benchmark = True
    settings = {"amp": amp, "channels_last": channels_last, "compile": compiled, "fused_pgd_step": fused_step,
                "cuda_graph_attack": graphed,
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "overrides": extra}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    try:
        t0 = time.perf_counter()
        patch = contextlib.nullcontext()
        if graphed:
            with attack_mode(trainer.model, trainer.cfg.attack.bn_eval):  # compile before capture
                craft(trainer.cfg.attack.name, trainer.attack_forward, x, y, eps=trainer.cfg.attack.eps, alpha=0.0,
                      steps=1, autocast=trainer.autocast)
            patch = attack_replaced(trainer, GraphedAttack(trainer, x, y))
        with patch:
            for _ in range(args.warmup):
                trainer.train_step(x, y, 1, step)
                step += 1
            synchronize(device)
            setup_seconds = time.perf_counter() - t0
            trainer.timer.take()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                trainer.train_step(x, y, 1, step)
                step += 1
            synchronize(device)
            seconds = time.perf_counter() - t0
            phases = trainer.timer.take()
            syncs = {"skipped": "needs CUDA"}
            if device.type == "cuda":
                try:  # an audit failure must not cost the variant its throughput figures
                    syncs = sync_audit(trainer, x, y)
                except Exception as exc:
                    syncs = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        torch.backends.cudnn.benchmark = previous_bench
    images = args.batch * args.iters
    attack_s = phases["attack"]
    train_s = phases["compute"] + phases["comm"] + phases["optimizer"]
    loss = float(trainer.totals[0] / trainer.totals[3])
    out = {
        "settings": settings,
        "seconds": seconds, "setup_seconds": setup_seconds, "images": images,
        "images_per_second": images / seconds,
        "attack_seconds": attack_s, "train_seconds": train_s,
        "attack_images_per_second": images / attack_s if attack_s > 0 else None,
        "train_images_per_second": images / train_s if train_s > 0 else None,
        "attack_share": attack_s / (attack_s + train_s) if attack_s + train_s > 0 else None,
        "mean_train_loss": loss,
        "host_syncs": syncs,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["loss_finite"] = math.isfinite(loss)  # a diverging variant's speed is not worth much
    return out


def run_logged(cmd: list[str], log_path: str, timeout: float, env: dict) -> int:
    """Run cmd with its output in log_path (kept whatever happens: the epochs it printed survive a kill). On a
    timeout torchrun gets SIGTERM, which it passes on to its workers (they run in their own session, so killing
    torchrun outright would leave them on the GPU), then SIGKILL 20 s later; subprocess.TimeoutExpired follows."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def log_tail(path: str, chars: int = 2000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-chars:].strip()


def trainer_e2e(args: argparse.Namespace, device: torch.device, timeout: float) -> dict:
    """`torchrun -m trainer` as a user runs it, one rank on this device: device-resident data with on-device
    crop/flip, the auto fast path, CUDA-event phase timing, evaluation and checkpoints, end to end (one rank
    makes no process group: NCCL itself is not exercised). Its metrics.jsonl is the result (copied to
    OUT/trainer-e2e-metrics.jsonl, its output to OUT/trainer-e2e.log; the checkpoints stay in a temporary
    folder)."""
    out = tempfile.mkdtemp(prefix="dat-gpu-e2e-")
    size, batch = (64, 8) if args.smoke else (16384, 1024)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "trainer",
           *[x for kv in synthetic_overrides(args.model, batch, 1) for x in ("--set", kv)],
           "--set", f"data.synthetic_train_size={size}", "--set", f"attack.steps={args.steps}",
           "--set", "run.epochs=2", "--set", f"run.output_dir={out}", "--set", "eval.steps=2",
           "--set", f"eval.max_samples={4 * batch}", "--set", "metrics.port=0",
           "--set", f"dist.backend={'nccl' if device.type == 'cuda' else 'gloo'}",
           *[x for kv in args.e2e_set for x in ("--set", kv)]]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    log_path = os.path.join(args.out, "trainer-e2e.log")
    t0 = time.perf_counter()
    result = {"command": " ".join(cmd[2:]), "timeout_seconds": timeout, "log": "trainer-e2e.log"}
    try:
        returncode = run_logged(cmd, log_path, timeout, env)
    except subprocess.TimeoutExpired:
        result.update(seconds=time.perf_counter() - t0,
                      error=f"timed out after {timeout:.0f} s; last output: {log_tail(log_path, 1500)}")
        shutil.rmtree(out, ignore_errors=True)
        return result
    result.update(seconds=time.perf_counter() - t0, returncode=returncode)
    try:
        if returncode != 0:
            result["error"] = log_tail(log_path)
            return result
        shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(args.out, "trainer-e2e-metrics.jsonl"))
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            epochs = [json.loads(line) for line in fh if line.strip()]
        first, last = epochs[0], epochs[-1]
        train_seconds = max(1e-9, last["epoch_seconds"] - last["eval_seconds"])
        result.update({"epochs": last["epoch"],
                       "backend": "one rank, no process group" if device.type == "cuda" else "gloo, one rank",
                       "images_per_second": last["images_per_second"],
                       "attack_share": last["attack_seconds"] / train_seconds,
                       "test_clean_acc": last["test_clean_acc"], "test_robust_acc": last["test_robust_acc"],
                       "first_epoch_seconds": first["epoch_seconds"],  # includes torch.compile's compilation
                       "checkpoint": os.path.exists(os.path.join(out, "checkpoint-latest.pt")),
                       "phases": {k[:-8]: last[k] for k in last if k.endswith("_seconds")}})
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_json(path: str, result: dict) -> None:
    """Atomically: a kill while writing leaves the previous complete file."""
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def variant_line(name: str, v: dict) -> str:
    if "images_per_second" not in v:
        return f"{name:<24}{v.get('error') or v.get('skipped')}"[:110]
    tflops, fraction = v.get("model_tflops") or 0.0, v.get("fraction_of_gemm_peak") or 0.0
    return (f"{name:<24}{v['images_per_second']:>10.0f}{v['attack_images_per_second'] or 0:>14.0f}"
            f"{v['train_images_per_second'] or 0:>13.0f}{100 * (v['attack_share'] or 0):>9.0f}%"
            f"{tflops:>9.1f}{100 * fraction:>8.1f}%{'' if v['loss_finite'] else '  NON-FINITE LOSS'}")


def table(result: dict) -> str:
    peak = result["gemm"].get("tflops")
    lines = [f"PGD-{result['attack_steps']} DAT, {result['model']}, batch {result['batch']}, {result['device']}"
             f"{' (SMOKE: not a measurement)' if result['smoke'] else ''}; bf16 GEMM {peak:.1f} TFLOP/s"
             if peak else "bf16 GEMM failed",
             f"{'variant':<24}{'img/s':>10}{'attack img/s':>14}{'train img/s':>13}{'attack %':>10}"
             f"{'TFLOP/s':>9}{'of GEMM':>9}"]
    lines += [variant_line(name, v) for name, v in result["variants"].items()]
    e2e = result.get("trainer_e2e") or {}
    if "images_per_second" in e2e:
        lines.append(f"trainer end to end (torchrun, {e2e['backend']}, 2 epochs): {e2e['images_per_second']:.0f} "
                     f"images/s in epoch 2, attack {100 * e2e['attack_share']:.0f}% of training time")
    elif e2e:
        lines.append(f"trainer end to end: {e2e.get('skipped') or 'FAILED: ' + e2e.get('error', '')[-300:]}")
    if result.get("best"):
        syncs = result["variants"][result["best"]].get("host_syncs", {})
        if "train_step" in syncs:
            lines.append(f"host syncs ({result['best']}): {syncs['train_step']['syncs']} per train_step, "
                         f"{syncs['data_batch']['syncs']} per training batch fetched")
        best = result["variants"][result["best"]]["images_per_second"]
        lines.append(f"best: {result['best']} {best:.0f} images/s (target {TARGET_IMAGES_PER_SECOND}: "
                     f"{'MET' if best >= TARGET_IMAGES_PER_SECOND else 'not met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.sh: no CUDA device visible (--smoke checks every code path on the CPU; --device cpu "
              "runs the full benchmark there)", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("highest")
    os.makedirs(args.out, exist_ok=True)
    started = PROCESS_STARTED
    json_path = os.path.join(args.out, "gpu.json")
    result = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "bench/gpu.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": args.smoke, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model, "batch": args.batch, "attack_steps": args.steps, "iters": args.iters,
        "warmup": args.warmup, "compile_mode": args.compile_mode, "compile_backend": args.compile_backend,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "tf32": {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "target_images_per_second": TARGET_IMAGES_PER_SECOND,
        "variants": {},
    }
    for key, fn in (("gemm", lambda: gemm_peak(args.gemm_size, device)),
                    ("flops", lambda: count_flops(args.model, args.steps))):
        try:
            result[key] = fn()
        except Exception as exc:  # recorded, the variants still run
            result[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    write_json(json_path, result)  # partial results survive a kill from here on
    peak = result["gemm"].get("tflops")
    e2e_allowance = 0.0 if args.no_e2e else E2E_ALLOWANCE_S
    first_compile_allowance = COMPILE_ALLOWANCE_S if args.compile_mode == "default" else MODE_COMPILE_ALLOWANCE_S
    compiled_before = False  # after the first compiled variant inductor's caches make the next ones quick
    stacks = open(os.path.join(args.out, "stacks.txt"), "w")  # where a hung variant's Python stacks go
    for name in args.variants.split(","):
        per_image = step_flops(result["flops"], args.steps, VARIANTS[name][5])
        compiles = VARIANTS[name][2] != "off"
        allowance = first_compile_allowance if compiles and not compiled_before else EAGER_ALLOWANCE_S
        if time.perf_counter() - started + allowance + e2e_allowance > args.budget_seconds:
            result["variants"][name] = {"skipped": f"time budget of {args.budget_seconds:.0f} s: not enough left"}
            continue
        print(f"gpu bench: {name} ... ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        result["variants"][name] = {"running": True, "started_at_seconds": time.perf_counter() - started}
        write_json(json_path, result)  # a kill now says which variant was running
        stacks.write(f"--- {name}: stacks if still running {3 * allowance:.0f} s after its start\n")
        stacks.flush()
        faulthandler.dump_traceback_later(3 * allowance, file=stacks)
        try:
            v = run_variant(name, args, device)
        except Exception as exc:
            v = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500],
                 "traceback": traceback.format_exc()[-3000:]}
        finally:
            faulthandler.cancel_dump_traceback_later()
        compiled_before = compiled_before or (compiles and "images_per_second" in v)
        if "images_per_second" in v and per_image:
            v["model_tflops"] = v["images_per_second"] * per_image / 1e12
            v["fraction_of_gemm_peak"] = v["model_tflops"] / peak if peak else None
        result["variants"][name] = v
        print(f"gpu bench: {variant_line(name, v)}", file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(json_path, result)
    stacks.close()
    if args.no_e2e:
        print("gpu bench: end-to-end trainer run skipped (--no-e2e)", file=sys.stderr, flush=True)
    elif time.perf_counter() - started + e2e_allowance > args.budget_seconds:
        result["trainer_e2e"] = {"skipped": f"time budget of {args.budget_seconds:.0f} s: not enough left"}
    else:
        # at most the budget plus a minute from the start: a slow run must not outlast the device's limit
        timeout = max(30.0, min(args.e2e_timeout * (2 if args.smoke else 1),
                                args.budget_seconds + 60 - (time.perf_counter() - started)))
        print(f"gpu bench: trainer end to end ... ({time.perf_counter() - started:.0f} s, at most {timeout:.0f} s)",
              file=sys.stderr, flush=True)
        try:
            result["trainer_e2e"] = trainer_e2e(args, device, timeout)
        except Exception as exc:  # an unreadable metrics file: recorded, not fatal
            result["trainer_e2e"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    ok = {n: v for n, v in result["variants"].items() if "images_per_second" in v and v["loss_finite"]}
    dat = [n for n in ok if "train.loss=adv" not in VARIANTS[n][5]]  # the target is for DAT's loss
    result["best"] = max(dat, key=lambda n: ok[n]["images_per_second"]) if dat else None
    result["wall_seconds"] = time.perf_counter() - started
    write_json(json_path, result)
    print(table(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
