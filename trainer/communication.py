"""Gradient synchronisation: one bucketed all-reduce pass per optimizer step over the active parameters.

torch's DDP cannot serve JointSpar: its reducer all-reduces every bucket every step, frozen parameters
included as zero-filled slices (with find_unused_parameters), so sparsity saves no bytes. This module
reduces exactly the parameters that are active this step, packed into flat buckets that are launched
asynchronously from post-accumulate-grad hooks as soon as their gradients exist (overlapping backward).
Dense steps use the same path with every parameter active, so bytes and times are comparable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    pending: int
    work: object = None
    flat: torch.Tensor | None = None


@dataclass
class CommStats:
    bytes: int = 0  # bytes handed to all_reduce (one rank's payload)
    dense_bytes: int = 0  # what the same steps would have sent with every parameter active
    calls: int = 0  # all_reduce calls
    steps: int = 0


class GradientSync:
    def __init__(self, params: list[nn.Parameter], world_size: int, bucket_mb: float = 25.0,
                 overlap: bool = True) -> None:
        self.params = list(params)
        self.world_size = world_size
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.overlap = overlap
        self.dense_step_bytes = sum(p.numel() * p.element_size() for p in self.params) if world_size > 1 else 0
        self.stats = CommStats()
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._next = 0
        self._armed = False
        if world_size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def prepare(self, active: list[nn.Parameter]) -> None:
        """Plan this step's buckets: active parameters in reverse order (roughly the order backward
        produces them), cut at bucket_mb."""
        self._buckets, self._bucket_of, self._next = [], {}, 0
        if self.world_size == 1:
            return
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(active):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                self._add_bucket(current)
                current, size = [], 0
        if current:
            self._add_bucket(current)
        self._armed = True

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(params, pending=len(params))
        self._buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        bucket = self._bucket_of.get(id(p))
        if bucket is None:
            return
        bucket.pending -= 1
        if self.overlap:
            # Launch strictly in bucket order so every rank issues the collectives in the same sequence.
            while self._next < len(self._buckets) and self._buckets[self._next].pending == 0:
                self._launch(self._buckets[self._next])
                self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.flat = torch.cat([g.reshape(-1) for g in grads])
        bucket.work = dist.all_reduce(bucket.flat, async_op=True)
        self.stats.bytes += bucket.flat.numel() * bucket.flat.element_size()
        self.stats.calls += 1

    def wait(self) -> None:
        """Finish every bucket's all-reduce and write the rank-mean back into ``.grad``."""
        if self.world_size == 1:
            return
        self._armed = False
        for bucket in self._buckets[self._next:]:  # not launched during backward (overlap off, or unused params)
            self._launch(bucket)
        self._next = len(self._buckets)
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.flat.div_(self.world_size)
            offset = 0
            for p in bucket.params:
                n = p.numel()
                chunk = bucket.flat[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n
            bucket.flat, bucket.work = None, None
        self.stats.steps += 1
        self.stats.dense_bytes += self.dense_step_bytes

    def take_stats(self) -> CommStats:
        """Counters since the last call (per epoch)."""
        out, self.stats = self.stats, CommStats()
        return out
