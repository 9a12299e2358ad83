import os
import pickle
import resource
import shutil
import stat

import pytest
import torch

from trainer import checkpoint
from trainer.config import config_from_dict
from trainer.distributed import DistInfo
from trainer.train import Trainer


def test_round_trip(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(5.0)}, "best_ra": 0.5}
    path = tmp_path / "c.pt"
    checkpoint.save_atomic(state, str(path))
    loaded = checkpoint.load(str(path))
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "(No space left on device)"),
    # what torch's zip writer raises when the disk fills up
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 254208 vs 254096"),
     "(the disk is full, "),
])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, error, reason):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"epoch": 1, "model": {}}, str(path))
    good = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save_atomic({"epoch": 2, "model": {"w": torch.zeros(4)}}, str(path))
    assert str(info.value).startswith(f"cannot write checkpoint {path} {reason}"), info.value
    assert str(info.value).endswith("; the previous one is kept")
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_larger_than_the_file_size_limit_says_so(tmp_path):
    """torch's zip writer only says "unexpected pos" when a write fails (here EFBIG: Python ignores SIGXFSZ)."""
    path = tmp_path / "c.pt"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.save_atomic({"epoch": 1, "model": {"w": torch.zeros(200_000)}}, str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "larger than the file size limit (ulimit -f) of 0.2 MiB" in str(info.value)
    assert str(info.value).endswith("there is no earlier one") and list(tmp_path.iterdir()) == []


def test_a_checkpoint_whose_folder_went_away_says_so(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    checkpoint.save_atomic({"epoch": 1, "model": {}}, str(folder / "c.pt"))
    folder.rename(tmp_path / "moved")  # a volume unmounted, the folder moved
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save_atomic({"epoch": 2, "model": {}}, str(folder / "c.pt"))
    assert str(info.value) == (f"cannot write checkpoint {folder / 'c.pt'} (No such file or directory); its folder "
                               "is gone (a volume unmounted, the folder moved or deleted)")


@pytest.mark.parametrize("content, fragment", [
    (b"hi\n", "not a loadable checkpoint (not a torch.save zip archive)"),
    (b"", "not a loadable checkpoint (not a torch.save zip archive)"),
])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(str(path))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_truncated_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(checkpoint.CheckpointError, match="not a loadable checkpoint") as info:
        checkpoint.load(str(path))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_resume_from_a_run_folder_means_its_latest(tmp_path):
    assert checkpoint.find_resume("/elsewhere", str(tmp_path)) == str(tmp_path / checkpoint.LATEST)
    assert checkpoint.find_resume(str(tmp_path), "never") is None


def test_pickled_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "model": {}, "x": Exploit()}, path, pickle_module=pickle)
    with pytest.raises(checkpoint.CheckpointError, match="not a loadable checkpoint"):
        checkpoint.load(str(path))


def test_damaged_tensor_bytes_are_refused_not_loaded(tmp_path):
    """torch.load does not check CRCs: a flipped byte inside a tensor would load as a wrong weight."""
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"epoch": 1, "model": {"w": torch.arange(4096.0)}}, str(path))
    raw = bytearray(path.read_bytes())
    at = raw.index(torch.arange(4096.0)[1000:1001].numpy().tobytes())  # inside the tensor's bytes
    raw[at:at + 4] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(raw))
    damaged = "damaged checkpoint \\(a tensor's bytes fail its CRC check\\)"  # not "(29 fails ...)"
    with pytest.raises(checkpoint.CheckpointError, match=damaged):
        checkpoint.load(str(path))


def test_best_is_restored_when_a_kill_fell_between_the_two_saves(tmp_path):
    latest, best = tmp_path / checkpoint.LATEST, tmp_path / checkpoint.BEST
    checkpoint.save_atomic({"epoch": 2, "model": {}, "best_epoch": 1}, str(best))
    checkpoint.save_atomic({"epoch": 3, "model": {}, "best_epoch": 3}, str(latest))  # then killed
    os.utime(best, (latest.stat().st_mtime + 5,) * 2)  # a network volume's clock: the stale best looks newer
    assert checkpoint.restore_best(str(tmp_path), {"epoch": 3, "best_epoch": 3})
    assert best.read_bytes() == latest.read_bytes()
    assert not checkpoint.restore_best(str(tmp_path), {"epoch": 3, "best_epoch": 3})  # already current
    assert not checkpoint.restore_best(str(tmp_path), {"epoch": 4, "best_epoch": 3})  # latest is not the best
    best.unlink()
    # a checkpoint taken within epoch 4 (step 5) records epoch 3 as done, but it is not epoch 3's checkpoint
    assert not checkpoint.restore_best(str(tmp_path), {"epoch": 3, "best_epoch": 3, "step": 5})
    assert not best.exists()
    assert checkpoint.restore_best(str(tmp_path), {"epoch": 3, "best_epoch": 3}) and best.exists()


def test_save_makes_the_file_durable_before_its_name_then_the_name(tmp_path, monkeypatch):
    """fsync(temporary file) -> rename -> fsync(folder): otherwise a power loss can leave an empty checkpoint
    under the final name, or the old name back."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    checkpoint.save_atomic({"epoch": 1}, str(tmp_path / "c.pt"))
    assert events == ["fsync file", "replace", "fsync folder"]


def test_trainer_saves_latest_first_and_best_only_when_strictly_better(tmp_path, monkeypatch):
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path), "progress": False},
                            "data": {"name": "synthetic", "synthetic_train_size": 32, "synthetic_image_size": 8,
                                     "batch_size": 16}, "model": {"name": "small_cnn", "width": 4}})
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                                    device=torch.device("cpu")))
    saved = []
    monkeypatch.setattr(checkpoint, "save_atomic",
                        lambda state, path: saved.append((os.path.basename(path), state["epoch"], state["best_ra"])))
    for epoch, robust_acc in enumerate([0.3, 0.3, 0.5, None, 0.4], start=1):
        trainer.save(epoch, robust_acc)
    assert saved == [(checkpoint.LATEST, 1, 0.3), (checkpoint.BEST, 1, 0.3),  # LATEST first: a kill between
                     (checkpoint.LATEST, 2, 0.3),  # a tie is not better
                     (checkpoint.LATEST, 3, 0.5), (checkpoint.BEST, 3, 0.5),
                     (checkpoint.LATEST, 4, 0.5),  # not evaluated this epoch
                     (checkpoint.LATEST, 5, 0.5)]
    assert trainer.best_epoch == 3


GOOD = {"epoch": 2, "step": 0, "model": {"w": torch.zeros(2)}, "optimizer": {}, "schedule": {}, "best_ra": 0.5,
        "experiment": {}, "optim": {}, "jointspar": None, "within_epoch": None}


@pytest.mark.parametrize("change, problem", [
    ({"epoch": -5}, "epoch -5 is not a whole number >= 0"),
    ({"epoch": "x"}, "epoch 'x' is not a whole number >= 0"),
    ({"step": 1.5}, "step 1.5 is not a whole number >= 0"),
    ({"best_ra": None}, "best_ra None is not a number"),
    ({"experiment": "str"}, "experiment is not a mapping"),
    ({"optim": "str"}, "optim is not a mapping"),
    ({"optimizer": [1]}, "optimizer is not a state dict"),
    ({"model": {"w": 1}}, "model is not a state dict of tensors"),
    ({"step": 3}, "taken within an epoch, but without that epoch's state"),
    ({"step": 3, "within_epoch": {"totals": [0, 0, 0, 0]}}, "taken within an epoch, but without that epoch's state"),
])
def test_a_malformed_checkpoint_is_refused_in_one_line(tmp_path, change, problem):
    """Hand-edited or foreign files whose bytes pass the CRC check: refused when loaded, never a TypeError or
    KeyError halfway through a resume."""
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({**GOOD, **change}, str(path))
    with pytest.raises(checkpoint.CheckpointError, match="not a valid trainer checkpoint") as info:
        checkpoint.load(str(path))
    assert problem in str(info.value)
    checkpoint.save_atomic(GOOD, str(path))
    assert checkpoint.load(str(path))["epoch"] == 2  # and the good one loads


def test_a_compressed_checkpoint_is_refused_before_anything_expands(tmp_path):
    """torch.save writes stored (uncompressed) members; a DEFLATE member of a hand-made .pt could hold a
    gigabyte of zeros in a megabyte (its CRC is right, so only this check stops it)."""
    import zipfile
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"epoch": 1, "model": {"w": torch.zeros(1 << 16)}}, str(path))
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member.filename))
    assert bomb.stat().st_size < path.stat().st_size / 10  # the zeros compress
    with pytest.raises(checkpoint.CheckpointError, match="compressed members, which torch.save never writes"):
        checkpoint.load(str(bomb))
    assert checkpoint.load(str(path))["epoch"] == 1


def test_files_planted_as_symbolic_links_are_never_written_through(tmp_path):
    """A symlink at the lock file's name (or at a checkpoint's temporary name) in a shared output folder would
    make the trainer truncate or overwrite the file it names."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpoint.LOCK).symlink_to(victim)
    with pytest.raises(checkpoint.CheckpointError, match="cannot open the run's lock file .*symbolic link"):
        checkpoint.hold_folder(str(out))
    target = out / checkpoint.LATEST
    (out / f"{checkpoint.LATEST}.tmp-{os.getpid()}").symlink_to(victim)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint"):
        checkpoint.save_atomic({"epoch": 1, "model": {}}, str(target))
    assert victim.read_text() == "precious\n" and not target.exists()
