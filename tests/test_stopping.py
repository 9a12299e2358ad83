"""trainer.stopping in one process: which signals ask for a stop, and when a repeat ends the process."""
import signal
import subprocess
import textwrap

from conftest import PYTHON, ROOT, torch_env
from trainer.stopping import StopRequests


def test_a_signal_asks_for_a_stop_and_uninstall_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    stops = StopRequests(world_size=1)
    stops.install()
    try:
        assert stops.poll() == 0
        signal.raise_signal(signal.SIGTERM)
        assert stops.poll() == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # torchrun passing on the terminal's Ctrl-C: the same request
        assert stops.poll() == signal.SIGTERM  # the first one is what is reported
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_repeated_later_ends_the_process_as_without_the_handler():
    script = textwrap.dedent("""
        import signal, time
        from trainer import stopping
        stops = stopping.StopRequests(world_size=1)
        stops.install()
        signal.raise_signal(signal.SIGTERM)
        print("first", stops.poll(), flush=True)
        stops.received_at -= stopping.REPEAT_EXITS_AFTER + 1  # as if it came a while ago
        signal.raise_signal(signal.SIGTERM)
        print("still running", flush=True)
    """)
    proc = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=torch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.splitlines() == [f"first {int(signal.SIGTERM)}"]
    assert proc.returncode == -signal.SIGTERM
