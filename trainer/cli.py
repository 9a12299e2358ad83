"""`dat-train` / `python -m trainer`: one YAML config plus --set overrides, single process or under torchrun."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import textwrap

import yaml

from trainer import exits
from trainer.checkpoint import CheckpointError, find_resume
from trainer.config import ConfigError, ineffective_settings, load_config
from trainer.data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                errno.EFBIG, errno.EIO)
LOST_ERRNOS = (errno.ENOENT, errno.ESTALE)  # the run's folder went away: a volume unmounted, the folder moved


def _first_line(text: str, width: int = 300) -> str:
    """An error's first line, cut at a word if long (gloo's run to 300 characters)."""
    return textwrap.shorten(text.strip().splitlines()[0] if text.strip() else "", width, placeholder=" ...")


def _say(line: str) -> None:
    """One line on stderr in one write: the ranks of a pod share its stderr, unbuffered in the image
    (PYTHONUNBUFFERED), where print's separate write of the newline lets another rank's line cut in."""
    sys.stderr.write(line + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dat-train",
        description="Distributed adversarial training (DAT). Launch with `torchrun --nproc_per_node=N -m trainer "
                    "--config FILE` or run as a single process.")
    parser.add_argument("--config", help="YAML config file (every key has a default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or from OUTPUT_DIR's latest checkpoint (the default "
                             "whenever one exists; a bare --resume where there is none is an error)")
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if OUTPUT_DIR has a checkpoint")
    parser.add_argument("--evaluate", metavar="CHECKPOINT",
                        help="print (as JSON) the clean and PGD accuracy of CHECKPOINT's model on the test set under "
                             "this config's eval settings, e.g. --set eval.restarts=10; trains and writes nothing")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, file and --set merged) as YAML and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.distributed import env_world_size, lost_peer, setup, teardown

    if args.evaluate and (args.resume or args.no_resume):
        _say("dat-train: --evaluate reads the checkpoint it names; --resume / --no-resume do not apply")
        return exits.USER_ERROR
    if args.resume and args.no_resume:
        _say("dat-train: --resume and --no-resume contradict each other; give one")
        return exits.USER_ERROR
    actions = [flag for flag, given in (("--evaluate", args.evaluate), ("--check", args.check),
                                        ("--print-config", args.print_config)) if given]
    if len(actions) > 1:
        _say(f"dat-train: {' and '.join(actions)} are separate actions; give one")
        return exits.USER_ERROR
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    if args.no_resume:
        overrides.append("run.resume=never")
    try:
        world_size = env_world_size()
    except ConfigError as exc:
        _say(f"dat-train: {exc}")
        return exits.USER_ERROR
    errors: list[str] = []
    cfg = None
    try:
        cfg = load_config(args.config, overrides, world_size=world_size, check_paths=not args.print_config,
                          errors=errors)
    except ConfigError as exc:  # the file itself: unreadable, not YAML
        errors.append(str(exc))
    if args.check and cfg is not None:
        errors += _model_and_machine_problems(cfg)  # what --check adds: the model's arms, a C compiler here
    if errors:
        if os.environ.get("RANK", "0") == "0":  # every rank reads the same config: one message is enough
            _say(f"dat-train: config error: {'; '.join(errors)}")
        return exits.USER_ERROR
    if os.environ.get("RANK", "0") == "0":
        for note in ineffective_settings(cfg):
            _say(f"dat-train: note: {note}")
    from trainer.train import TrainingDiverged, TrainingStopped, evaluate_checkpoint, run

    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.check:
        print("config OK")
        return 0
    if args.resume == "auto" and find_resume(cfg.run.output_dir, "auto") is None:  # a bare --resume
        _say(f"dat-train: --resume: no checkpoint in run.output_dir {cfg.run.output_dir} to continue from; "
             "leave --resume out to start a new run there")
        return exits.USER_ERROR

    try:
        info = setup(cfg.dist.backend, cfg.dist.timeout_seconds)
    except ConfigError as exc:  # the launch environment or dist.backend
        _say(f"dat-train: {exc}")
        return exits.USER_ERROR
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    prefix = f"[rank {info.rank}] " if info.world_size > 1 else ""
    try:
        if args.evaluate:
            result = evaluate_checkpoint(cfg, info, args.evaluate)
            if info.is_main:
                print(json.dumps(result), flush=True)
        else:
            run(cfg, info)
    except TrainingStopped as exc:  # every rank stopped at the same step; one line says where
        if info.is_main:
            _say(f"dat-train: {exc}")
        return 128 + exc.signum  # what the shell reports for a process the signal ended
    except USER_ERRORS + (TrainingDiverged,) as exc:
        _say(f"dat-train: {prefix}{exc}")
        return exits.USER_ERROR
    except OSError as exc:  # a full disk, a volume turned read-only or gone: what the run was writing
        out = cfg.run.output_dir
        if exc.errno in LOST_ERRNOS and not os.path.isdir(out):
            _say(f"dat-train: {prefix}run.output_dir {out} is gone (a volume unmounted, the folder moved or "
                 f"deleted): {exc.filename or out}: {exc.strerror}")
            return exits.USER_ERROR
        if exc.errno not in WRITE_ERRNOS:
            raise
        _say(f"dat-train: {prefix}cannot write {exc.filename or out}: {exc.strerror}")
        return exits.USER_ERROR
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError too
        text = str(exc)
        if lost_peer(exc):
            _say(f"dat-train: {prefix}lost contact with another rank ({_first_line(text)}); "
                 f"exit {exits.PEER_LOST} so that the job restarts and resumes from its last checkpoint")
            return exits.PEER_LOST
        if not isinstance(exc, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        _say(f"dat-train: {prefix}out of memory ({_first_line(text, 160) or 'MemoryError'}); "
             "lower data.batch_size or model.width, or split the batch with train.micro_batches")
        return exits.USER_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        teardown()
    return 0


def _model_and_machine_problems(cfg) -> list[str]:
    import torch

    from trainer.jointspar import model_problems
    from trainer.train import c_compiler, compiled_passes

    found = model_problems(cfg)
    try:
        compiled_passes(cfg.perf.compile, torch.device("cpu"), c_compiler() is not None)  # on this machine
    except ConfigError as exc:
        found.append(str(exc))
    return found


if __name__ == "__main__":
    sys.exit(main())
