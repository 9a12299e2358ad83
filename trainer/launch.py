"""`dat-torchrun`: torchrun, exiting as its workers did.

torchrun itself exits 1 whenever a worker fails or it is signalled, so the exit statuses the trainer chooses
(trainer/exits.py: 2 a user's mistake, 128 + N stopped by signal N, 200 lost another rank) never reach
Kubernetes. With them, the training operator's restartPolicy ExitCode (and a Job's podFailurePolicy) can fail
a job on a mistake at once and restart it after a preemption. This wraps torch.distributed.run unchanged
(same arguments, same worker handling, same failure report) and only chooses the exit status:

- a worker failed: the first failure's status (torchrun's "Root Cause"), 128 + N for a worker ended by
  signal N (e.g. 137 for one the kernel's OOM killer took);
- torchrun was signalled (the pod deleted, preempted, drained): 128 + N, as the shell would report it;
- the rendezvous failed (a node's pod not scheduled in time, the master unreachable): 201, retryable, with
  one line instead of a page of C++ frames.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from trainer import exits

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def exit_status(exc: ChildFailedError | SignalException) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    if isinstance(exc, SignalException):
        return 128 + int(exc.sigval)
    _, failure = exc.get_first_failure()
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def main(argv: list[str] | None = None) -> int:
    try:
        return _launch(argv)
    except KeyboardInterrupt:  # Ctrl-C while torch imports, before torchrun handles signals: no traceback
        return 130


def _launch(argv: list[str] | None) -> int:
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    nproc = str(torchrun.parse_args(argv).nproc_per_node)  # argparse alone: exits 2 with usage on bad syntax
    if nproc.lstrip("-").isdigit() and int(nproc) < 1:  # torch asserts, with a traceback and no message
        print(f"dat-torchrun: --nproc-per-node {nproc}: must be >= 1 (or auto, cpu, gpu)", file=sys.stderr)
        return exits.USER_ERROR
    try:
        torchrun.main(argv)
    except (ValueError, AssertionError) as exc:  # torchrun's own checks of its settings, before any worker
        print(f"dat-torchrun: {exc or type(exc).__name__}; see dat-torchrun --help", file=sys.stderr)
        return exits.USER_ERROR
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr)  # torchrun's own report of its workers, without its traceback
        return exit_status(exc)
    except SignalException as exc:
        print(f"dat-torchrun: {exc}", file=sys.stderr)
        return exit_status(exc)
    except (RendezvousError, DistError) as exc:  # before any worker started
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"dat-torchrun: rendezvous failed ({first}); exit {exits.NO_RENDEZVOUS} so that the pod restarts "
              "and tries again", file=sys.stderr)
        return exits.NO_RENDEZVOUS
    return 0

if __name__ == "__main__":
    sys.exit(main())
