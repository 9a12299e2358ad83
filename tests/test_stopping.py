"""trainer.stopping in one process: which signals ask for a stop, and when a repeat ends the process."""
import signal
import subprocess
import textwrap
import time

from conftest import PYTHON, ROOT, torch_env
from trainer import checkpoint
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


def test_ctrl_c_stops_a_single_process_run_with_a_checkpoint_and_exit_130(tmp_path, synthetic_args):
    """`dat-train` without torchrun: SIGINT (Ctrl-C) after the first epoch stops the run within a step, with a
    checkpoint of where it got to, one line on stderr and exit 130 (what a shell reports for SIGINT); run
    again, it resumes from there."""
    out = tmp_path / "run"
    common = [PYTHON, "-m", "trainer", *synthetic_args, "--set", f"run.output_dir={out}",
              "--set", "data.synthetic_train_size=2048"]
    proc = subprocess.Popen([*common, "--set", "run.epochs=6"], cwd=ROOT, env=torch_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal; make it longer"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("dat-train:")]
    assert len(lines) == 1 and lines[0].startswith("dat-train: stopped by SIGINT after ") and "Traceback" not in err
    state = checkpoint.load(str(out / checkpoint.LATEST))
    assert state["epoch"] >= 1 and lines[0].endswith("holds it, and a restart resumes from there")
    resumed = subprocess.run([*common, "--set", f"run.epochs={state['epoch'] + 1}"], cwd=ROOT, env=torch_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
