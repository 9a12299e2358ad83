"""`python -m trainer` and `dat-train`: trainer/cli.py, behind a guard for Ctrl-C while torch imports."""
import sys


def run() -> None:
    try:
        from trainer.cli import main

        sys.exit(main())
    except KeyboardInterrupt:  # before the run installs its own handler: exit as Ctrl-C does, no traceback
        sys.exit(130)


if __name__ == "__main__":
    run()
