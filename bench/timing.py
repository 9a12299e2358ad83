"""Side-by-side timing: variants run interleaved (A, B, A, B, ...) so that machine noise hits all of
them alike; figures are medians over repetitions, ratios are taken within a repetition."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter,
                sync: Callable[[], None] = lambda: None,
                cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every variant, ``reps`` rounds of one call each, after ``warmup`` untimed rounds.

    The order inside a round rotates, so no variant always runs right after the same other one
    (caches, allocator and thermal state then favour none of them). ``sync`` runs before each clock
    read (a barrier across ranks, a device synchronisation). If ``cpu_times`` is given, it is filled with
    this process's CPU seconds per call too: on a machine shared with other jobs, time spent descheduled
    inflates wall time but not CPU time."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    if cpu_times is not None:
        cpu_times.update({name: [] for name in names})
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            c0, t0 = time.process_time(), clock()
            variants[name]()
            sync()
            times[name].append(clock() - t0)
            if cpu_times is not None:
                cpu_times[name].append(time.process_time() - c0)
    return times


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Per-repetition ratios a_i / b_i (the two were measured in the same round), summarised."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio: need two equally long, non-empty sample lists")
    return summary([a / b for a, b in zip(numerator, denominator)])
