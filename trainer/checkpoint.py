"""Atomic checkpoints (temporary file + rename) loaded with weights_only=True."""
from __future__ import annotations

import errno
import fcntl
import os
import pickle
import resource
import shutil
import socket
import stat
import zipfile
from typing import IO

import torch

LATEST = "checkpoint-latest.pt"
BEST = "checkpoint-best.pt"


LOCK = ".dat-train.lock"


class CheckpointError(ValueError):
    """An unreadable or incompatible checkpoint; printed as one line."""


def hold_folder(output_dir: str) -> IO | None:
    """An exclusive lock on OUTPUT_DIR/.dat-train.lock while the returned file stays open (the kernel drops it
    when the process ends, a kill included): a second run in the same folder, e.g. a replacement pod started
    while the old one still writes to a shared volume, is refused rather than mixing the two runs' checkpoints
    and logs. None where the filesystem keeps no locks."""
    path = os.path.join(output_dir, LOCK)
    try:  # never through a symbolic link: truncating it would overwrite whatever file it names
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the run's lock file ({exc.strerror}"
                              f"{': a symbolic link?' if exc.errno == errno.ELOOP else ''})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file; remove it")
    handle = os.fdopen(fd, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise CheckpointError(f"{output_dir}: another run is using this folder ({holder or 'a process'}); "
                                  "wait for it to end, or give this run its own run.output_dir") from None
        return None  # e.g. ENOLCK: no lock service on this volume
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def save_atomic(state: dict, path: str) -> None:
    """Write next to the target, fsync, then rename: a crash leaves the previous file intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with _create(tmp) as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_folder(path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError from its zip writer
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _why_unwritten(exc, path, state)
        kept = ("the previous one is kept" if os.path.exists(path) else "there is no earlier one"
                if os.path.isdir(os.path.dirname(path) or ".") else
                "its folder is gone (a volume unmounted, the folder moved or deleted)")
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _why_unwritten(exc: BaseException, path: str, state: dict) -> str:
    """torch's zip writer says only "unexpected pos": name the likely cause (a full disk, the file size limit)."""
    needed = _size_hint(state)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        return f"larger than the file size limit (ulimit -f) of {limit / 2**20:.1f} MiB"
    try:
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
    except OSError as gone:  # the folder itself went away
        return gone.strerror or type(gone).__name__
    if free < 2 * needed:
        return f"the disk is full, {free / 2**20:.0f} MiB free"
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__


def _create(path: str) -> IO[bytes]:
    """A new file for writing, never through a symbolic link planted at its name."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644), "wb")


def _fsync_folder(path: str) -> None:
    """Make a rename into path's folder durable (a power loss after it keeps the new name)."""
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and network volumes) refuse fsync on a folder: nothing to make durable
        pass
    finally:
        os.close(fd)


def _size_hint(state: object) -> int:
    """Bytes of the tensors in a checkpoint state (about its size on disk)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_size_hint(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_size_hint(v) for v in state)
    return 0


def load(path: str, map_location: str | torch.device = "cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a loadable checkpoint (not a torch.save zip archive)")
    try:  # torch.load does not check the archive's CRCs: damaged tensor bytes would load as garbage weights
        with zipfile.ZipFile(path) as archive:
            compressed = any(member.compress_type != zipfile.ZIP_STORED for member in archive.infolist())
            damaged = None if compressed else archive.testzip()  # a compressed one is refused undecompressed
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({exc})") from None
    if damaged:
        part = "a tensor's bytes fail" if "/data/" in damaged else f"{damaged.rsplit('/', 1)[-1]} fails"  # data/29
        raise CheckpointError(f"{path}: damaged checkpoint ({part} its CRC check); "
                              "resume from another checkpoint with --resume, or --no-resume to start fresh")
    if compressed:
        raise CheckpointError(f"{path}: not a checkpoint this trainer wrote (compressed members, which torch.save "
                              "never writes and which could expand far beyond the file's size in memory)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: never unpickle what may run code
        raise CheckpointError(f"{path}: not a loadable checkpoint (it holds objects other than tensors and plain "
                              "containers, which are never unpickled)") from None
    except Exception as exc:  # truncated or corrupt archive: whatever torch raises, one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {first[:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not a trainer checkpoint (missing model/epoch)")
    problem = _structure_problem(state)
    if problem:
        raise CheckpointError(f"{path}: not a valid trainer checkpoint ({problem})")
    return state


WITHIN_EPOCH_KEYS = ("totals", "world_size", "batch_size", "lr")


def _structure_problem(state: dict) -> str | None:
    """What is malformed in a loaded checkpoint (a hand-edited or foreign file; bytes are CRC-checked)."""
    def whole(key: str) -> bool:
        return isinstance(state.get(key), int) and not isinstance(state.get(key), bool) and state[key] >= 0

    if not whole("epoch"):
        return f"epoch {state.get('epoch')!r} is not a whole number >= 0"
    if "step" in state and not whole("step"):
        return f"step {state.get('step')!r} is not a whole number >= 0"
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "model is not a state dict of tensors"
    for key in ("optimizer", "schedule"):
        if key in state and not isinstance(state[key], dict):
            return f"{key} is not a state dict"
    for key in ("experiment", "optim", "jointspar", "within_epoch"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"{key} is not a mapping"
    if state.get("resumed_from") is not None and not isinstance(state["resumed_from"], str):
        return "resumed_from is not a path"
    if "best_ra" in state and (isinstance(state["best_ra"], bool) or not isinstance(state["best_ra"], (int, float))):
        return f"best_ra {state['best_ra']!r} is not a number"
    if state.get("step") and not (isinstance(state.get("within_epoch"), dict)
                                  and all(k in state["within_epoch"] for k in WITHIN_EPOCH_KEYS)):
        return "taken within an epoch, but without that epoch's state (within_epoch)"
    return None


def origin(resume: str) -> str:
    """How a run started from an explicit run.resume records where it started (in each of its checkpoints)."""
    return os.path.abspath(resume)


def find_resume(output_dir: str, resume: str) -> str | None:
    """The checkpoint to continue from: OUTPUT_DIR's latest when resume=auto, or when it continues the run an
    explicit run.resume started (a restarted pod, whose config still names that checkpoint, must not go back to
    it); else the explicit path (a run's folder means its latest checkpoint)."""
    path = os.path.join(output_dir, LATEST)
    if resume not in ("auto", "never"):
        if os.path.exists(path) and _saved(path, "resumed_from") == origin(resume):
            return path
        return os.path.join(resume, LATEST) if os.path.isdir(resume) else resume
    return path if resume == "auto" and os.path.exists(path) else None


def _saved(path: str, key: str) -> object:
    """One entry of a checkpoint file, read without loading its tensors; None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)
    except Exception:  # damaged or not a checkpoint: treated as stale, to be replaced
        return None


def _saved_epoch(path: str) -> int | None:
    """The epoch a checkpoint file was saved after; None if unreadable."""
    epoch = _saved(path, "epoch")
    return epoch if isinstance(epoch, int) else None


def restore_best(output_dir: str, state: dict) -> bool:
    """A run killed between writing LATEST and BEST of its best epoch has no (or an older) BEST: LATEST is that
    best epoch's checkpoint, so copy it (atomically). True when it did."""
    latest, best = os.path.join(output_dir, LATEST), os.path.join(output_dir, BEST)
    if state.get("best_epoch") != state.get("epoch") or state.get("step") or not os.path.isfile(latest):
        return False  # not the best epoch's end (or a checkpoint taken within the next epoch)
    if os.path.isfile(best) and _saved_epoch(best) == state.get("epoch"):
        return False  # already that epoch's (by content: timestamps on network volumes can tie or lag)
    tmp = f"{best}.tmp-{os.getpid()}"
    try:
        with open(latest, "rb") as source, _create(tmp) as target:
            shutil.copyfileobj(source, target)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, best)
        _fsync_folder(best)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True
