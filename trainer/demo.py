"""`make demo`: standard vs DAT training on the bundled digits data, 2 gloo ranks on the CPU.

Trains both models with torchrun, prints their per-epoch tables, compares clean (CA) and PGD-20 robust (RA, 5 random restarts)
accuracy, and plots accuracy and epoch time per epoch to runs/demo/demo.png.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"standard": "configs/digits-standard.yaml", "dat": "configs/digits-dat.yaml"}


def train(name: str, config: str, out: Path) -> list[dict]:
    print(f"\n=== {name}: torchrun --nproc_per_node=2 -m trainer --config {config}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
           "--config", config, "--set", f"run.output_dir={out}", "--no-resume"]
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f"demo: the {name} run failed")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, records), color in zip(results.items(), ("tab:blue", "tab:red")):
        evals = [r for r in records if r["test_clean_acc"] is not None]
        epochs = [r["epoch"] for r in evals]
        acc_ax.plot(epochs, [r["test_clean_acc"] for r in evals], "o-", color=color, label=f"{name} CA")
        acc_ax.plot(epochs, [r["test_robust_acc"] for r in evals], "s--", color=color, label=f"{name} RA (PGD-20 x5)")
        time_ax.plot([r["epoch"] for r in records], [r["epoch_seconds"] for r in records], color=color, label=name)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02), title="clean vs robust accuracy")
    time_ax.set(xlabel="epoch", ylabel="seconds", title="epoch time (2 gloo ranks)")
    acc_ax.legend(fontsize=8)
    time_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    start = time.time()
    base = ROOT / "runs" / "demo"
    results = {name: train(name, config, base / name) for name, config in RUNS.items()}
    plot(results, base / "demo.png")
    print("\n=== comparison on the digits test set (PGD-20 with 5 restarts, eps 0.2)")
    print(f"{'model':<10} {'CA':>6} {'RA':>6} {'train s/epoch':>14}")
    for name, records in results.items():
        last = records[-1]
        train_seconds = sum(r["epoch_seconds"] - r["eval_seconds"] for r in records) / len(records)
        print(f"{name:<10} {last['test_clean_acc']:>6.3f} {last['test_robust_acc']:>6.3f} {train_seconds:>14.2f}")
    print(f"\nruns under {base.relative_to(ROOT)}/ (metrics.jsonl, checkpoints), plot {base.relative_to(ROOT)}/demo.png;"
          f" {time.time() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
