"""A graceful stop on SIGTERM or SIGINT: what Kubernetes sends a pod it deletes, evicts or preempts (torchrun
passes it on to its workers and kills them 30 s later), and what Ctrl-C sends. Every rank learns of a stop
asked of any rank at the same step, so the trainer can save a step checkpoint there, together, and exit."""
from __future__ import annotations

import datetime
import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGINT)
REPEAT_EXITS_AFTER = 2.0  # seconds: a signal repeated later than this ends the process at once


class StopRequests:
    """Catches HANDLED signals while installed and tells every rank, at the same step, whether any rank got one.

    `poll()` is called by every rank at every step boundary. Each call starts a 4-byte all-reduce (max) of this
    rank's signal over a gloo group of its own, on the host, and returns the result of the previous call's, which
    has long arrived: the step never waits for it, and the GPU stream is not touched. A signal is therefore
    acted on at the second boundary after it arrives, on every rank at the same one."""

    def __init__(self, world_size: int, timeout_seconds: float = 1800) -> None:
        self.received: int = 0  # the first signal this process got (0: none)
        self.received_at = 0.0
        self._world_size, self._timeout_seconds = world_size, timeout_seconds
        self._group: dist.ProcessGroup | None = None  # made by install(): an evaluation needs none
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch the signals from now on. Collective the first time (every rank creates the poll's group)."""
        if self._group is None and self._world_size > 1 and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self._timeout_seconds))
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_further(self) -> None:
        """After a stop: the rest of the process (the one-line message, the process group's teardown) must not
        be cut short by the SIGTERM torchrun sends the other workers once one of them exits."""
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received, self.received_at = signum, time.monotonic()
            return
        # torchrun passes a Ctrl-C on to workers that got it from the terminal too: a repeat soon after is the
        # same request. A later one means "now": end the process as the signal would without this handler.
        if time.monotonic() - self.received_at > REPEAT_EXITS_AFTER:
            self.uninstall()
            signal.raise_signal(signum)

    def poll(self) -> int:
        """The signal (number) some rank got, the same on every rank, else 0. Collective: every rank calls it
        as often as the others."""
        if self._group is None:
            return self.received
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([self.received], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def poll_now(self) -> int:
        """poll(), waiting for this call's all-reduce too (at an epoch's end, where a wait costs nothing)."""
        agreed = self.poll()
        return agreed or self.poll()

    def close(self) -> None:
        """Wait for the all-reduce in flight (every rank started it), so none is left behind at exit."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
