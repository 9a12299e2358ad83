"""`make bench`: side-by-side CPU benchmarks, results JSON under bench/results/ and a printed table.

1. attack step / training step cost (the trainer's code paths, one process);
2. our DAT step vs the re-created published step (2 gloo ranks under torchrun);
3. dense vs JointSpar: bytes and step time, clean training and DAT (same torchrun);
4. the scaling model fed with those measurements (table + PNG).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from bench import scaling, step_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The GPU scaling scenario uses the latest local bench/gpu.sh run, else the committed H100 measurement at
# the published per-GPU batch (2048).
LOCAL_GPU_JSON = os.path.join(ROOT, "bench", "results", "gpu", "gpu.json")
MEASURED_GPU_JSON = os.path.join(ROOT, "bench", "measured", "h100-2026-11-27", "batch2048.json")
GPU_JSON = LOCAL_GPU_JSON if os.path.exists(LOCAL_GPU_JSON) else MEASURED_GPU_JSON
# PGD-K DAT per image: K attack iterations of ~2F (forward + input gradient) and a 3F training step on
# each of x_adv and x. Used only where no GPU measurement gives the attack/train split.
DAT_TRAIN_FLOP_SHARE = lambda k: 6 / (2 * k + 6)  # noqa: E731


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="PGD-3 and fewer repetitions (about 2 minutes)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="figure 1 batch")
    p.add_argument("--per-rank-batch", type=int, default=8, help="figures 2-3 batch per rank")
    p.add_argument("--attack-steps", type=int, default=None, help="PGD steps in figures 2-3 (default 10, quick 3)")
    p.add_argument("--reps", type=int, default=None, help="figure 1 repetitions (default 15, quick 5)")
    p.add_argument("--dat-reps", type=int, default=None, help="DAT step repetitions (default 7, quick 3)")
    p.add_argument("--clean-reps", type=int, default=None, help="clean step repetitions (default 15, quick 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--jointspar", default=None, help="figure 3: jointspar.* settings, KEY=VALUE,... (default: "
                                                     "half the bytes over the weight tensors)")
    p.add_argument("--epoch-images", type=int, default=550_000,
                   help="scaling model: images per epoch (default: CIFAR-10 + TI-500K, as in the paper)")
    p.add_argument("--latency-us", type=float, default=25.0, help="scaling model: link latency per ring hop")
    p.add_argument("--gpu-json", default=GPU_JSON, help="bench/gpu.sh results to feed the GPU scaling scenario")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--timeout", type=int, default=1500, help="seconds allowed for the 2-rank part")
    args = p.parse_args(argv)
    quick = args.quick
    args.attack_steps = args.attack_steps or (3 if quick else 10)
    args.reps = args.reps or (5 if quick else 15)
    args.dat_reps = args.dat_reps or (3 if quick else 7)
    args.clean_reps = args.clean_reps or (5 if quick else 15)
    return args


def run_distributed(args: argparse.Namespace, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bench.dist_worker", "--model", args.model, "--image-size", str(args.image_size),
           "--per-rank-batch", str(args.per_rank_batch), "--attack-steps", str(args.attack_steps),
           "--reps", str(args.dat_reps), "--clean-reps", str(args.clean_reps), "--warmup", str(args.warmup),
           *(["--jointspar", args.jointspar] if args.jointspar else []), "--out", out_json]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not os.path.exists(out_json):
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"bench: the 2-rank run failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    with open(out_json) as fh:
        return json.load(fh)


def cpu_scenario(dist: dict) -> scaling.Scenario:
    """Per-step compute, backward and bytes of the measured 2-rank DAT steps (per-rank batch)."""
    js = dist.get("jointspar", {}).get("dat", {})
    if "seconds" in js:
        modes, batch = ("dense", "jointspar"), js["per_rank_batch"]
        seconds = {m: js["seconds"][m]["median"] for m in modes}
        phases, nbytes, calls = js["phase_seconds"], js["bytes_per_step"], js["allreduce_calls_per_step"]
        what = f"LARS, {js['attack']}"
    else:  # JointSpar not available: the dense numbers of figure 2
        ours = dist["published_vs_ours"]
        modes, batch = ("dense",), ours["per_rank_batch"]
        seconds = {"dense": ours["seconds"]["ours"]["median"]}
        phases = {"dense": ours["ours_phase_seconds"]}
        nbytes = {"dense": ours["ours_comm"]["bytes_per_step"]}
        calls = {"dense": ours["ours_comm"]["allreduce_calls_per_step"]}
        what = f"LAMB, {ours['attack']}"
    return scaling.Scenario(
        name="CPU node (measured)",
        source=f"measured here: 1 core per node, {what}, gloo step time minus its exposed all-reduce",
        images_per_node_step=batch,
        compute_seconds={m: seconds[m] - phases[m]["comm"] for m in modes},
        overlap_seconds={m: 2 / 3 * phases[m]["compute"] for m in modes},
        bytes_per_step={m: nbytes[m] for m in modes},
        allreduce_calls_per_step={m: calls[m] for m in modes},
    )


def gpu_scenario(cpu: scaling.Scenario, gpu_json: str) -> scaling.Scenario:
    """One H100 per node running PGD-10 DAT: measured by bench/gpu.sh when its JSON is there, else the
    issue's target (10,000 images/s)."""
    ips, batch, train_share = 10_000.0, 512, DAT_TRAIN_FLOP_SHARE(10)
    source = "assumed: the 10,000 images/s PGD-10 target per H100, attack/train split by FLOPs; bytes measured here"
    if os.path.exists(gpu_json):
        with open(gpu_json) as fh:
            gpu = json.load(fh)
        best = gpu.get("best")
        if best and not gpu.get("smoke"):
            v = gpu["variants"][best]
            ips, batch = v["images_per_second"], gpu["batch"]
            train_share = v["train_seconds"] / (v["attack_seconds"] + v["train_seconds"])
            source = f"measured by bench/gpu.sh on {gpu.get('device', 'a GPU')} ({best}); bytes measured here"
    compute = batch / ips
    dense_bytes = cpu.bytes_per_step["dense"]
    fraction = cpu.bytes_per_step.get("jointspar", dense_bytes) / dense_bytes
    modes = cpu.modes
    return scaling.Scenario(
        name="H100 node", source=source + ("; JointSpar compute taken equal to dense" if len(modes) > 1 else ""),
        images_per_node_step=batch,
        compute_seconds={m: compute for m in modes},
        overlap_seconds={m: 2 / 3 * train_share * compute for m in modes},
        bytes_per_step={"dense": dense_bytes, **({"jointspar": dense_bytes * fraction} if len(modes) > 1 else {})},
        allreduce_calls_per_step=dict(cpu.allreduce_calls_per_step),
    )


def fmt_s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"


def report(results: dict) -> str:
    f1, f2 = results["step_cost"], results["published_vs_ours"]
    t1 = f1["attack_over_train"]["median"]
    t2 = f2["speedup"]["median"]
    rows = [
        ("1", f"attack iteration / train step ({f1['model']}, batch {f1['batch']})",
         fmt_s(f1["seconds"]["attack"]["median"]), fmt_s(f1["seconds"]["train"]["median"]),
         fmt_ratio(f1["attack_over_train"]), f"<= {f1['target']} {'PASS' if t1 <= f1['target'] else 'MISS'}"),
        ("1", "naive attack iteration / train step",
         fmt_s(f1["seconds"]["naive_attack"]["median"]), fmt_s(f1["seconds"]["train"]["median"]),
         fmt_ratio(f1["naive_attack_over_train"]), "(~1.0 expected)"),
        ("1", "attack iteration / train step, bf16 + channels_last",
         fmt_s(f1["seconds"]["attack_bf16_cl"]["median"]), fmt_s(f1["seconds"]["train_bf16_cl"]["median"]),
         fmt_ratio(f1["attack_over_train_bf16_cl"]), ""),
        ("2", f"published / ours DAT step ({f2['attack']}, {f2['world_size']}x{f2['per_rank_batch']}, fp32)",
         fmt_s(f2["seconds"]["published"]["median"]), fmt_s(f2["seconds"]["ours"]["median"]),
         fmt_ratio(f2["speedup"]), f">= {f2['target']} {'PASS' if t2 >= f2['target'] else 'MISS'}"),
        ("2", "published, attack all-reducing too / ours (fp32)",
         fmt_s(f2["seconds"]["published_attack_allreduce"]["median"]), fmt_s(f2["seconds"]["ours"]["median"]),
         fmt_ratio(f2["speedup_vs_attack_allreduce"]), ""),
        ("2", "published (fp32) / ours with bf16 + channels_last",
         fmt_s(f2["seconds"]["published"]["median"]), fmt_s(f2["seconds"]["ours_bf16_cl"]["median"]),
         fmt_ratio(f2["speedup_bf16_cl"]),
         f">= {f2['target']} {'PASS' if f2['speedup_bf16_cl']['median'] >= f2['target'] else 'MISS'}"),
    ]
    notes = []
    for loss, r in results["jointspar"].items():
        if "skipped" in r:
            notes.append(f"3 JointSpar {loss}: skipped: {r['skipped']}")
            continue
        b = r["bytes_per_step"]
        ok = abs(r["bytes_ratio"] - r["active_fraction"]) < 1e-6
        rows.append(("3", f"JointSpar / dense bytes per step, {loss}", f"{b['jointspar'] / 1e6:.1f} MB",
                     f"{b['dense'] / 1e6:.1f} MB", f"{r['bytes_ratio']:.3f}",
                     f"= active fraction {r['active_fraction']:.3f} {'OK' if ok else 'DIFFERS'}"))
        rows.append(("3", f"JointSpar / dense step time, {loss}", fmt_s(r["seconds"]["jointspar"]["median"]),
                     fmt_s(r["seconds"]["dense"]["median"]), fmt_ratio(r["time_ratio"]), ""))
        if r.get("attack_share_dense") is not None:
            notes.append(f"3 attack share of the dense DAT step: {100 * r['attack_share_dense']:.0f}% "
                         f"-> JointSpar can speed the DAT step up by at most {r['jointspar_speedup_bound']:.2f}x")
    head = ("fig", "what", "A", "B", "A/B median [min, max]", "target")
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] + notes
    c1, c2 = f1["cpu_time_ratios"], f2
    out.append(f"same ratios in process CPU time (insensitive to other jobs' load): 1 attack/train "
               f"{fmt_ratio(c1['attack_over_train'])}, naive {c1['naive_attack_over_train']['median']:.3f}, "
               f"bf16+cl {c1['attack_over_train_bf16_cl']['median']:.3f}; 2 published/ours "
               f"{fmt_ratio(c2['cpu_time_speedup'])}, bf16+cl {c2['cpu_time_speedup_bf16_cl']['median']:.3f}")
    pp, op = f2["published_phase_seconds"], f2["ours_phase_seconds"]
    out.append(f"2 attack / training part of a step: published {pp['attack']:.2f} s / {pp['train']:.2f} s, ours "
               f"{op['attack']:.2f} s / {op['compute'] + op['comm'] + op['optimizer']:.2f} s")
    pc, oc = f2["published_comm"], f2["ours_comm"]
    out.append(f"2 published step: {pc['step_allreduce_calls']} bucket all-reduces ({pc['step_bytes'] / 1e6:.1f} MB) "
               f"per step, {pc['params_with_grad_after_attack']}/{pc['params']} weight gradients computed by the "
               f"attack; ours: {oc['allreduce_calls_per_step']:.0f} ({oc['bytes_per_step'] / 1e6:.1f} MB)")
    sweep = results.get("bucket_sweep")
    if sweep:
        out.append("bucket size sweep (clean step, 2 ranks): " + "; ".join(
            f"{mb} MB: {v['seconds']['median']:.3f} s, exposed comm {v['phase_seconds']['comm'] * 1e3:.0f} ms, "
            f"{v['allreduce_calls_per_step']:.0f} calls" for mb, v in sweep["bucket_mb"].items()))
    out += ["", "4 scaling model (bench/results/scaling.md, scaling.png):", results["scaling_table"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the trainer does on the CPU: denormals would make some steps 10x slower
    os.makedirs(args.out, exist_ok=True)
    started, t0, load0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter(), os.getloadavg()
    print(f"bench: figure 1 ({args.model}, batch {args.batch}, {args.reps} interleaved repetitions)", flush=True)
    fig1 = step_cost.measure(args.model, args.batch, args.reps, max(1, args.warmup), args.image_size)
    print(f"bench: figures 2-3 (2 gloo ranks, PGD-{args.attack_steps}, per-rank batch {args.per_rank_batch})",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dist = run_distributed(args, os.path.join(tmp, "dist.json"))
    cpu = cpu_scenario(dist)
    sc = scaling.model([cpu, gpu_scenario(cpu, args.gpu_json)], args.epoch_images,
                       latency_s=args.latency_us * 1e-6)
    table = scaling.table(sc)
    png = os.path.join(args.out, "scaling.png")
    scaling.plot(sc, png)
    with open(os.path.join(args.out, "scaling.md"), "w") as fh:
        fh.write(table + "\n")
    results = {
        "command": "python -m bench.cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_seconds": None,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "threads_per_process": 1, "loadavg_start": load0},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "step_cost": fig1,
        "published_vs_ours": dist["published_vs_ours"],
        "jointspar": dist["jointspar"],
        "bucket_sweep": dist.get("bucket_sweep"),
        "scaling": sc,
        "scaling_table": table,
        "scaling_plot": os.path.relpath(png, ROOT),
    }
    results["wall_seconds"] = time.perf_counter() - t0
    results["environment"]["loadavg_end"] = os.getloadavg()
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"cpu-{stamp}.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    shutil.copyfile(path, os.path.join(args.out, "cpu.json"))
    print()
    print(report(results))
    print(f"\nresults: {os.path.relpath(path, ROOT)} (also cpu.json); {results['wall_seconds']:.0f} s; "
          f"load average {load0[0]:.1f} -> {results['environment']['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
