"""trainer/exits.py: the exit statuses as the training operator's restartPolicy ExitCode sorts them, in words."""
from __future__ import annotations

import pytest

from trainer import exits


@pytest.mark.parametrize("code, reason, words", [
    (0, "Completed", "finished"),
    (1, "Error", "crashed: its log has the traceback"),
    (2, "Error", "a mistake in the config, data or checkpoint"),
    (200, "Error", "lost contact with another rank"),
    (201, "Error", "the other nodes did not join in time"),
    (143, "Error", "stopped by SIGTERM after a checkpoint"),
    (130, "Error", "stopped by SIGINT after a checkpoint"),
    (137, "Error", "killed by SIGKILL"),
    (137, "OOMKilled", "killed for exceeding its memory limit (OOMKilled)"),
    (134, None, "killed by SIGABRT"),  # e.g. NCCL's watchdog on a hung collective
    (3, None, "an unknown exit status"),
    (255, None, "an unknown exit status"),
])
def test_each_status_in_words(code: int, reason: str | None, words: str) -> None:
    assert exits.describe(code, reason).startswith(words)


def test_the_operator_retries_exactly_the_statuses_a_restart_can_cure() -> None:
    """restartPolicy ExitCode restarts on >= 128 (kubeflow/trainer pkg/util/train IsRetryableExitCode)."""
    assert exits.USER_ERROR < 128
    for retryable in (exits.PEER_LOST, exits.NO_RENDEZVOUS):
        assert 128 + 65 <= retryable <= 255  # retried, and not mistaken for a signal's 128 + N
