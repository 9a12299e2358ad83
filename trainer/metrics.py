"""Honest per-phase timing (CUDA events on the GPU, so timing adds no host sync inside the step),
the per-epoch metrics.jsonl log and the rank-0 table."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from typing import Iterator

import torch

log = logging.getLogger("trainer")

# The parts of an epoch, each timed as <name>_seconds in metrics.jsonl; together they make up epoch_seconds.
PHASES = ("data", "attack", "compute", "comm", "optimizer", "eval", "checkpoint")


class PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._host[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (synchronises the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                self._host[name] += sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
            self._events.clear()
        out = {name: self._host.get(name, 0.0) for name in PHASES}
        self._host.clear()
        return out


class MetricsLog:
    """Appends one JSON object per epoch to OUTPUT_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop records of epochs after the checkpoint (they will be trained again)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept, broken = [], 0
        with open(self.path, errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:  # e.g. a line cut short when the run was killed
                    record = None
                    broken += 1
                if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= epoch:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if broken:
            log.warning("%s: dropped %d unreadable line(s)", self.path, broken)
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                fh.writelines(kept)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):  # a full disk: the old file stays, nothing half-written beside it
                os.remove(tmp)

    def records(self) -> list[dict]:
        """The records written so far (rank 0; none elsewhere), lines that cannot be read left out."""
        if not self.enabled or not os.path.exists(self.path):
            return []
        found = []
        with open(self.path, errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                if isinstance(record, dict):
                    found.append(record)
        return found

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # a write or fsync error names no file: say which
            exc.filename = exc.filename or self.path
            raise


TABLE = [("epoch", "{:>5}", "{:>5d}"), ("loss", "{:>7}", "{:>7.4f}"), ("train_acc", "{:>9}", "{:>9.4f}"),
         ("CA", "{:>6}", "{:>6}"), ("RA", "{:>6}", "{:>6}"), ("lr", "{:>9}", "{:>9.2e}"),
         ("img/s", "{:>8}", "{:>8.0f}"), ("attack", "{:>7}", "{:>6.1f}s"), ("compute", "{:>7}", "{:>6.1f}s"),
         ("comm", "{:>6}", "{:>5.1f}s"), ("epoch", "{:>7}", "{:>6.1f}s")]


def table_header() -> str:
    return "  ".join(h.format(name) for name, h, _ in TABLE)


def table_row(r: dict) -> str:
    acc = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    values = [r["epoch"], r["train_loss"], r["train_adv_acc"] if r["train_adv_acc"] is not None
              else r["train_clean_acc"], acc(r["test_clean_acc"]), acc(r["test_robust_acc"]), r["lr"],
              r["images_per_second"], r["attack_seconds"], r["compute_seconds"], r["comm_seconds"],
              r["epoch_seconds"]]
    return "  ".join(fmt.format(v) for (_, _, fmt), v in zip(TABLE, values))
