"""Figure 4: predicted epoch time and communication share on 1-64 nodes, dense and JointSpar.

A pencil-and-paper model fed with measured numbers (the paper's C(s) question for scales we cannot
run here). Assumptions, also written into the results JSON:
- weak scaling: every node keeps its per-step batch b, so an epoch of N images takes ceil(N / (n b)) steps;
- a step is compute(b) (attack + training step + optimizer, independent of n) plus the part of the
  gradient all-reduce that the training backward does not hide;
- ring all-reduce of S bytes over n nodes: 2 (n - 1) / n * S / bandwidth + calls * 2 (n - 1) * latency
  (each of the 2 (n - 1) ring phases of each bucket pays one link latency);
- the all-reduce overlaps the training step's backward only (the next attack needs the updated
  weights); the backward is taken as 2/3 of the training forward+backward time;
- one link per node, full bisection (no oversubscription), no stragglers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ASSUMPTIONS = [
    "weak scaling: per-node batch b fixed, steps per epoch = ceil(N / (n * b))",
    "step time = compute(b) + max(0, allreduce - overlap window); compute does not depend on n",
    "ring all-reduce: 2(n-1)/n * bytes / bandwidth + calls * 2(n-1) * latency",
    "overlap window = backward of the training step = 2/3 of its forward+backward time",
    "one link per node, full bisection bandwidth, no stragglers, no data-loading stalls",
]

NODES = (1, 2, 4, 8, 16, 32, 64)
BANDWIDTHS_GBIT = (10.0, 25.0, 100.0)


@dataclass
class Scenario:
    name: str
    source: str  # where the numbers come from (measured here, measured on a GPU, assumed)
    images_per_node_step: int
    compute_seconds: dict[str, float]  # per mode: one step without exposed communication
    overlap_seconds: dict[str, float]  # per mode: the training backward the all-reduce can hide in
    bytes_per_step: dict[str, float]  # per mode: one node's all-reduce payload
    allreduce_calls_per_step: dict[str, float] = field(default_factory=lambda: {"dense": 2.0, "jointspar": 2.0})

    @property
    def modes(self) -> list[str]:
        return list(self.compute_seconds)


def allreduce_seconds(nbytes: float, nodes: int, bandwidth_gbit: float, latency_s: float, calls: float = 1.0) -> float:
    """Ring all-reduce time of `nbytes` (one node's payload) split into `calls` buckets."""
    if nodes <= 1 or nbytes <= 0:
        return 0.0
    bandwidth = bandwidth_gbit * 1e9 / 8
    return 2 * (nodes - 1) / nodes * nbytes / bandwidth + calls * 2 * (nodes - 1) * latency_s


def predict(s: Scenario, epoch_images: int, nodes=NODES, bandwidths=BANDWIDTHS_GBIT,
            latency_s: float = 25e-6) -> list[dict]:
    rows = []
    for mode in s.modes:
        compute, overlap = s.compute_seconds[mode], s.overlap_seconds[mode]
        for bw in bandwidths:
            for n in nodes:
                comm = allreduce_seconds(s.bytes_per_step[mode], n, bw, latency_s, s.allreduce_calls_per_step[mode])
                exposed = max(0.0, comm - overlap)
                step = compute + exposed
                steps = math.ceil(epoch_images / (n * s.images_per_node_step))
                rows.append({
                    "scenario": s.name, "mode": mode, "nodes": n, "bandwidth_gbit": bw,
                    "allreduce_seconds": comm, "exposed_comm_seconds": exposed, "step_seconds": step,
                    "comm_share": exposed / step, "comm_share_no_overlap": comm / (compute + comm),
                    "steps_per_epoch": steps, "epoch_seconds": steps * step,
                    "images_per_second": n * s.images_per_node_step / step,
                })
    return rows


def model(scenarios: list[Scenario], epoch_images: int, latency_s: float = 25e-6) -> dict:
    return {
        "assumptions": ASSUMPTIONS, "epoch_images": epoch_images, "latency_s_per_ring_hop": latency_s,
        "nodes": list(NODES), "bandwidths_gbit": list(BANDWIDTHS_GBIT),
        "scenarios": [asdict(s) for s in scenarios],
        "rows": [row for s in scenarios for row in predict(s, epoch_images, latency_s=latency_s)],
    }


def _cell(rows: list[dict], scenario: str, mode: str, bw: float, n: int) -> str:
    r = next(r for r in rows if (r["scenario"], r["mode"], r["bandwidth_gbit"], r["nodes"]) == (scenario, mode, bw, n))
    t = r["epoch_seconds"]
    shown = f"{t:.1f}s" if t < 100 else f"{t:.0f}s" if t < 1e5 else f"{t / 3600:.0f}h"
    return f"{shown} {100 * r['comm_share']:.0f}%"


def table(result: dict) -> str:
    """Markdown: per scenario, epoch time and exposed-communication share for each node count."""
    lines = []
    for s in result["scenarios"]:
        modes = list(s["compute_seconds"])
        lines += [f"**{s['name']}** ({s['source']}; {s['images_per_node_step']} images per node and step, "
                  f"{result['epoch_images']} images per epoch). Cells: epoch time, share of the step spent in "
                  f"exposed communication.", ""]
        head = ["nodes"] + [f"{bw:g} Gbit/s {m}" for bw in result["bandwidths_gbit"] for m in modes]
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for n in result["nodes"]:
            cells = [_cell(result["rows"], s["name"], m, bw, n) for bw in result["bandwidths_gbit"] for m in modes]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["scenarios"]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(11, 4 * len(scenarios)), squeeze=False)
    colors = dict(zip(result["bandwidths_gbit"], ("tab:red", "tab:orange", "tab:blue", "tab:green")))
    for (ax_t, ax_c), s in zip(axes, scenarios):
        for mode in s["compute_seconds"]:
            for bw in result["bandwidths_gbit"]:
                rows = [r for r in result["rows"]
                        if (r["scenario"], r["mode"], r["bandwidth_gbit"]) == (s["name"], mode, bw)]
                style = "-" if mode == "dense" else "--"
                label = f"{bw:g} Gbit/s, {mode}"
                ax_t.plot([r["nodes"] for r in rows], [r["epoch_seconds"] for r in rows], style, color=colors[bw],
                          marker="o", ms=3, label=label)
                ax_c.plot([r["nodes"] for r in rows], [100 * r["comm_share"] for r in rows], style, color=colors[bw],
                          marker="o", ms=3, label=label)
        ax_t.set(xscale="log", yscale="log", xlabel="nodes", ylabel="predicted epoch time (s)",
                 title=f"{s['name']}: epoch of {result['epoch_images']} images")
        ax_c.set(xscale="log", ylim=(0, 100), xlabel="nodes", ylabel="exposed communication (% of step)",
                 title=f"{s['name']}: communication share")
        for ax in (ax_t, ax_c):
            ax.set_xticks(result["nodes"], [str(n) for n in result["nodes"]])
            ax.grid(True, which="both", alpha=0.3)
        ax_c.legend(fontsize=7)
    fig.suptitle("DAT (PGD) weak scaling, ring all-reduce model: solid dense, dashed JointSpar")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
