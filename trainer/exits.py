"""The trainer's exit statuses, shared by dat-train (which exits with them), dat-torchrun (which passes them on)
and datctl status (which explains them). Chosen for the training operator's restartPolicy ExitCode, which
restarts a pod that exited with 128 or more and fails the job on 1-127, and for Job podFailurePolicy rules:
a user's mistake fails at once, a stop or a lost peer restarts and resumes."""
from __future__ import annotations

import signal

USER_ERROR = 2  # config, data, checkpoint, divergence, out of memory, an unwritable run folder
PEER_LOST = 200  # a collective failed because another rank went away (128 + N: stopped or killed by signal N)
NO_RENDEZVOUS = 201  # dat-torchrun: the other nodes did not join in time, or the master could not be reached

_MEANING = {
    0: "finished",
    1: "crashed: its log has the traceback",
    USER_ERROR: "a mistake in the config, data or checkpoint, or diverged or out of memory: its log says which",
    PEER_LOST: "lost contact with another rank",
    NO_RENDEZVOUS: "the other nodes did not join in time, or the master was unreachable",
}


def describe(code: int, reason: str | None = None) -> str:
    """What exit status `code` of a trainer container means; reason: the kubelet's (OOMKilled, Error, ...)."""
    if reason == "OOMKilled":
        return "killed for exceeding its memory limit (OOMKilled)"
    if code in _MEANING:
        return _MEANING[code]
    if 128 < code < 128 + 65:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"stopped by {name} after a checkpoint" if name in ("SIGTERM", "SIGINT") else f"killed by {name}"
    return "an unknown exit status"
