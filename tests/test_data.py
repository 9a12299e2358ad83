import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, train_cli
from trainer.config import DataConfig
from trainer.data import DataError, ImageSet, TrainBatches, augment_crop_flip, convert_ti500k, load_dataset, load_ti500k


def _write_cifar(root, n_train=20, n_test=10, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        batches[name] = batch
    return folder, batches


def _write_ti500k(path, n=12, seed=1):
    rng = np.random.default_rng(seed)
    obj = {"data": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
           "extrapolated_targets": rng.integers(0, 10, n)}
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)
    return obj


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dat-pwned",))


def test_cifar10_folder_matches_what_was_written(tmp_path):
    _, batches = _write_cifar(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.train.images.shape == (100, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(ds.train.images[0].numpy(), first)
    assert ds.test.labels.tolist() == batches["test_batch"][b"labels"]


def test_an_incomplete_cifar10_folder_says_it_is_read_instead_of_downloading(tmp_path):
    folder, _ = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()  # an interrupted copy
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert str(info.value) == (f"CIFAR-10 file missing: {folder / 'data_batch_3'} (the folder {folder} is there, so "
                               "it is read instead of downloading; remove it or complete it)")

def test_cifar10_tar_gz_archive(tmp_path):
    _write_cifar(tmp_path / "src")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "data")))
    assert len(ds.train) == 100 and len(ds.test) == 10


def test_cifar10_ext_appends_ti500k(tmp_path):
    _write_cifar(tmp_path)
    obj = _write_ti500k(tmp_path / "ti.pickle")
    ds = load_dataset(DataConfig(name="cifar10-ext", root=str(tmp_path), ti500k_path=str(tmp_path / "ti.pickle")))
    assert len(ds.train) == 112
    assert np.array_equal(ds.train.images[100].permute(1, 2, 0).numpy(), obj["data"][0])
    assert ds.train.labels[100:].tolist() == obj["extrapolated_targets"].tolist()


def test_ti500k_npz_conversion_round_trip(tmp_path):
    obj = _write_ti500k(tmp_path / "ti.pickle")
    convert_ti500k(str(tmp_path / "ti.pickle"), str(tmp_path / "ti.npz"))
    whole = load_ti500k(str(tmp_path / "ti.npz"))
    assert np.array_equal(whole.images.permute(0, 2, 3, 1).numpy(), obj["data"])
    assert whole.labels.tolist() == obj["extrapolated_targets"].tolist()


def test_unlabeled_max_takes_a_seeded_random_subset(tmp_path):
    obj = _write_ti500k(tmp_path / "ti.pickle", n=40)
    subsets = {seed: load_ti500k(str(tmp_path / "ti.pickle"), limit=8, seed=seed) for seed in (0, 1)}
    rows = {img.tobytes(): i for i, img in enumerate(obj["data"])}
    picked = {}
    for seed, s in subsets.items():
        picked[seed] = [rows[img.permute(1, 2, 0).numpy().tobytes()] for img in s.images]
        assert len(set(picked[seed])) == 8 and s.labels.tolist() == obj["extrapolated_targets"][picked[seed]].tolist()
    assert picked[0] != list(range(8)) and picked[0] != picked[1]  # not the file's first images; seeded
    again = load_ti500k(str(tmp_path / "ti.pickle"), limit=8, seed=0)
    assert torch.equal(again.images, subsets[0].images)


def test_ti500k_conversion_command_says_what_is_wrong(tmp_path):
    _write_ti500k(tmp_path / "ti.pickle")
    for src, dst, line in (("missing.pickle", "ti.npz", "missing.pickle: TI-500K file not found"),
                           ("ti.pickle", "ti_out", "ti_out: the destination must be a .npz file name"),
                           ("ti.pickle", ".", ".: the destination must be a .npz file name")):
        proc = subprocess.run([sys.executable, "-m", "trainer.data", src, dst], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2 and proc.stderr == f"trainer.data: {line}\n", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "trainer.data", "ti.pickle", "ti.npz"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout == "wrote ti.npz\n" and len(load_ti500k(str(tmp_path / "ti.npz"))) > 0


def test_ti500k_refuses_a_pickle_that_would_execute_code(tmp_path):
    path = tmp_path / "evil.pickle"
    with open(path, "wb") as fh:
        pickle.dump({"data": _Exploit(), "extrapolated_targets": [0]}, fh)
    if os.path.exists("/tmp/dat-pwned"):
        os.remove("/tmp/dat-pwned")
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        load_ti500k(str(path))
    assert not os.path.exists("/tmp/dat-pwned")


def _dotted_global_chain(marker: Path) -> bytes:
    """A protocol-4 pickle whose globals are dotted paths from the numpy module (allowed) to a code compiler
    and a function constructor, then calls what it built: code execution if names are merely prefix-checked."""
    def global_(name: str) -> bytes:
        m, n = b"numpy", name.encode()
        return (pickle.SHORT_BINUNICODE + bytes([len(m)]) + m + pickle.SHORT_BINUNICODE + bytes([len(n)]) + n
                + pickle.STACK_GLOBAL)

    def text(x: str) -> bytes:
        b = x.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b

    source = f"open({str(marker)!r}, 'w').write('code ran')"
    return (pickle.PROTO + b"\x04" + global_("dtypes._add_dtype_helper.__class__") + pickle.MARK
            + global_("dtypes.__loader__.source_to_code") + pickle.MARK + text(source) + text("<x>") + pickle.TUPLE
            + pickle.REDUCE + global_("dtypes._add_dtype_helper.__globals__") + pickle.TUPLE + pickle.REDUCE
            + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP)


def test_dotted_names_cannot_walk_from_numpy_to_code(tmp_path):
    path, marker = tmp_path / "ti.pickle", tmp_path / "ran"
    path.write_bytes(_dotted_global_chain(marker))
    with pytest.raises(DataError, match=r"refusing to load numpy.dtypes._add_dtype_helper.__class__"):
        load_ti500k(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_still_load(tmp_path, protocol):
    obj = {"data": np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3),
           "extrapolated_targets": np.array([3, 4], dtype=np.int64)}
    (tmp_path / "ti.pickle").write_bytes(pickle.dumps(obj, protocol=protocol))
    s = load_ti500k(str(tmp_path / "ti.pickle"))
    assert s.labels.tolist() == [3, 4] and s.images.permute(0, 2, 3, 1).numpy().tobytes() == obj["data"].tobytes()


def test_corrupt_data_is_one_line_error(tmp_path):
    folder, _ = _write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    proc = train_cli(["--set", "data.name=cifar10", "--set", f"data.root={tmp_path}",
                      "--set", f"run.output_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2 and "data_batch_3" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("data, labels, fragment", [
    (np.random.default_rng(0).random((4, 3072)), [1, 2, 3, 4], r"data must be uint8 \(N, 3072\), got float64"),
    (np.zeros((4, 32, 32, 3), np.uint8), [1, 2, 3, 4], r"data must be uint8 \(N, 3072\), got uint8 \(4, 32, 32, 3\)"),
    (np.zeros((8, 1536), np.uint8), list(range(8)), r"data must be uint8 \(N, 3072\)"),
    (np.zeros((4, 3072), np.uint8), [1, 2, 3.7, 4], r"labels must be N integers, got float64"),
    (np.zeros((4, 3072), np.uint8), [[1], [2], [3], [4]], r"labels must be N integers, got int64 \(4, 1\)"),
])
def test_malformed_cifar_batches_are_refused_not_misread(tmp_path, data, labels, fragment):
    """Float images, images in HWC order, half-size rows, fractional or 2-d labels: each would train on
    scrambled data if it were cast and reshaped; each is one line naming the file."""
    folder, _ = _write_cifar(tmp_path)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels}, fh, protocol=2)
    with pytest.raises(DataError, match="data_batch_2: CIFAR-10 " + fragment):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_a_truncated_ti500k_npz_is_one_line(tmp_path):
    _write_ti500k(tmp_path / "ti.pickle")
    convert_ti500k(str(tmp_path / "ti.pickle"), str(tmp_path / "ti.npz"))
    raw = (tmp_path / "ti.npz").read_bytes()
    (tmp_path / "ti.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a TI-500K .npz"):
        load_ti500k(str(tmp_path / "ti.npz"))


def test_ti500k_wrong_shape(tmp_path):
    with open(tmp_path / "ti.pickle", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 8, 8), np.uint8), "extrapolated_targets": np.zeros(2)}, fh)
    with pytest.raises(DataError, match=r"uint8 \(N, 32, 32, 3\)"):
        load_ti500k(str(tmp_path / "ti.pickle"))


@pytest.mark.parametrize("targets, fragment", [
    (np.array([0, 3, 12]), r"extrapolated_targets outside 0..9 \(found 0..12\)"),
    (np.array([0.5, 1.0, 2.0]), "extrapolated_targets must be N integer labels"),
])
def test_ti500k_labels_are_checked_before_training(tmp_path, targets, fragment):
    with open(tmp_path / "ti.pickle", "wb") as fh:
        pickle.dump({"data": np.zeros((3, 32, 32, 3), np.uint8), "extrapolated_targets": targets}, fh)
    with pytest.raises(DataError, match=fragment):
        load_ti500k(str(tmp_path / "ti.pickle"))


def test_the_sizes_config_checks_val_size_against_are_the_loaders():
    from trainer.config import LABELLED_TRAIN
    assert len(load_dataset(DataConfig(name="digits")).train) == LABELLED_TRAIN["digits"]


def test_digits_is_real_and_scaled():
    ds = load_dataset(DataConfig(name="digits"))
    assert ds.train.images.shape[1:] == (1, 8, 8) and len(ds.train) + len(ds.test) == 1797
    assert ds.train.images.max() == 255 and set(ds.test.labels.tolist()) == set(range(10))


def test_sharding_is_disjoint_and_reshuffled_each_epoch():
    ds = load_dataset(DataConfig(name="synthetic", synthetic_train_size=64, synthetic_image_size=8))
    ds.train.labels = torch.arange(64)  # label = index, to recover which samples each rank saw
    seen = []
    for rank in range(2):
        tb = TrainBatches(ds.train, 8, rank, 2, seed=0, device=torch.device("cpu"), augment=False, resident=True)
        e1 = torch.cat([y for _, y in tb.epoch(1)])
        e2 = torch.cat([y for _, y in tb.epoch(2)])
        assert not torch.equal(e1, e2)
        seen.append(set(e1.tolist()))
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 64


def test_crop_flip_keeps_content_and_shape():
    x = torch.rand(16, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = augment_crop_flip(x, g)
    assert out.shape == x.shape
    # every output is a shifted (maybe flipped) window: its non-padded pixels come from the input
    assert torch.isin(out[out > 0], x).all()


def _indexed(n: int) -> ImageSet:
    return ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))  # label = index


def test_cifar10_ext_batches_hold_the_configured_share_of_pseudo_labelled_images():
    """RST-style mixing: every batch of every rank is half CIFAR-10, half TI (not ~9% CIFAR-10 as in one
    shuffle of 50K + 500K); within a step the ranks' images are disjoint; the labelled set is cycled."""
    labelled, total, per_rank, world = 40, 440, 8, 2
    steps = total // world // per_rank
    seen = {rank: [] for rank in range(world)}
    for rank in range(world):
        tb = TrainBatches(_indexed(total), per_rank, rank, world, seed=3, device=torch.device("cpu"),
                          augment=False, resident=True, labelled=labelled, unlabeled_fraction=0.5)
        batches = [y for _, y in tb.epoch(1)]
        assert len(batches) == len(tb) == steps
        for y in batches:
            assert int((y < labelled).sum()) == 4 and len(set(y.tolist())) == per_rank
        assert any(bool((y[:4] >= labelled).any()) for y in batches)  # mixed inside the batch, not halves
        seen[rank] = batches
        again = [y for _, y in tb.epoch(1)]
        assert all(torch.equal(a, b) for a, b in zip(batches, again))  # a resumed epoch replays the same
        assert not all(torch.equal(a, b) for a, b in zip(batches, [y for _, y in tb.epoch(2)]))
    for step in range(steps):
        both = torch.cat([seen[0][step], seen[1][step]]).tolist()
        assert len(set(both)) == len(both)
    used = torch.cat([y for rank in seen for y in seen[rank]])
    counts = torch.bincount(used[used < labelled], minlength=labelled)
    assert counts.min() >= 2 and counts.max() - counts.min() <= 1  # 216 labelled draws over 40 images: cycled


def test_unlabeled_fraction_zero_is_one_shuffle_and_a_batch_too_small_to_mix_is_one_line():
    tb = TrainBatches(_indexed(440), 8, 0, 2, seed=3, device=torch.device("cpu"), augment=False, resident=True,
                      labelled=40, unlabeled_fraction=0.0)
    assert tb.split is None and len(list(tb.epoch(1))) == 27
    with pytest.raises(DataError, match="data.unlabeled_fraction 0.9 of 2 images per rank leaves no room"):
        TrainBatches(_indexed(440), 2, 0, 2, seed=3, device=torch.device("cpu"), augment=False, resident=True,
                     labelled=40, unlabeled_fraction=0.9)


def test_cifar10_ext_says_which_images_are_labelled(tmp_path):
    _write_cifar(tmp_path)
    _write_ti500k(tmp_path / "ti.pickle", n=30)
    ds = load_dataset(DataConfig(name="cifar10-ext", root=str(tmp_path), ti500k_path=str(tmp_path / "ti.pickle")))
    assert ds.labelled == 100 and len(ds.train) == 130


def test_an_empty_ti500k_file_is_refused(tmp_path):
    path = tmp_path / "ti.npz"
    np.savez(path, data=np.zeros((0, 32, 32, 3), np.uint8), extrapolated_targets=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="holds no images"):
        load_ti500k(str(path))


def test_an_empty_cifar_test_set_is_refused_before_training(tmp_path):
    """Found at load time: it would otherwise fail only in the first evaluation, after a whole epoch."""
    _write_cifar(tmp_path, n_test=0, protocol=4)  # (protocol 2 writes an empty array with builtins.bytes)
    with pytest.raises(DataError, match="CIFAR-10 test set holds no images"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_a_ti500k_pickle_of_ragged_images_is_one_line(tmp_path):
    path = tmp_path / "ti.pickle"
    with open(path, "wb") as fh:
        pickle.dump({"data": [np.zeros((32, 32, 3), np.uint8), np.zeros((31, 32, 3), np.uint8)],
                     "extrapolated_targets": [1, 2]}, fh)
    with pytest.raises(DataError, match=r"data must be a numpy array \(N, 32, 32, 3\), got list"):
        load_ti500k(str(path))


def test_val_size_holds_out_labelled_images_chosen_by_the_seed(tmp_path):
    """data.val_size: CIFAR-10 images leave the training set for the validation set (TI's pseudo-labelled
    images all stay in training), the same ones for the same seed, others for another."""
    _write_cifar(tmp_path)
    obj = _write_ti500k(tmp_path / "ti.pickle", n=30)
    settings = dict(name="cifar10-ext", root=str(tmp_path), ti500k_path=str(tmp_path / "ti.pickle"))
    whole = load_dataset(DataConfig(**settings))
    ds = load_dataset(DataConfig(**settings, val_size=25), seed=3)
    assert (len(ds.val), len(ds.train), ds.labelled) == (25, 105, 75)
    flat = lambda images: {bytes(img.flatten().tolist()) for img in images}  # noqa: E731
    cifar = flat(whole.train.images[:100])
    assert flat(ds.val.images) <= cifar and flat(ds.train.images[:75]) <= cifar
    assert not flat(ds.val.images) & flat(ds.train.images)  # never trained on
    assert np.array_equal(ds.train.images[75:].permute(0, 2, 3, 1).numpy(), obj["data"])  # TI: all, after
    again, other = load_dataset(DataConfig(**settings, val_size=25), seed=3), load_dataset(
        DataConfig(**settings, val_size=25), seed=4)
    assert torch.equal(again.val.images, ds.val.images) and not torch.equal(other.val.images, ds.val.images)
    with pytest.raises(DataError, match="data.val_size=100: the training set has 100 labelled images"):
        load_dataset(DataConfig(**settings, val_size=100))


def test_cifar10_ext_walks_never_repeat_an_image_within_a_step_and_run_on_across_epochs():
    """Set sizes that a step does not divide (44 labelled and 700 TI images, 8 of each per global step): no
    global batch holds an image twice, and the TI passes run on across epochs, so two epochs of 46 steps
    (368 TI images each) see every TI image of the first pass (700 less the 700 % 8 it leaves out), where two
    fresh walks would see about three quarters of them."""
    labelled, total, world = 44, 744, 2
    seen = []
    for epoch in (1, 2):
        ranks = [list(TrainBatches(_indexed(total), 8, rank, world, seed=5, device=torch.device("cpu"),
                                   augment=False, resident=True, labelled=labelled,
                                   unlabeled_fraction=0.5).epoch(epoch)) for rank in range(world)]
        assert len(ranks[0]) == 46
        for t in range(len(ranks[0])):
            step = torch.cat([ranks[r][t][1] for r in range(world)])
            assert len(set(step.tolist())) == len(step), (epoch, t)  # 16 different images in every global step
            seen += step.tolist()
    ti = [i for i in seen if i >= labelled]
    assert len(ti) == 2 * 46 * 8 and len(set(ti)) >= 696


class _Reduce:
    """Pickles as f(*args) [+ BUILD state]: how a crafted data pickle names numpy's reconstructors."""

    def __init__(self, f, args, state=None):
        self.f, self.args, self.state = f, args, state

    def __reduce__(self):
        return (self.f, self.args) if self.state is None else (self.f, self.args, self.state)


def _crafted_pickles() -> dict:
    from numpy._core.multiarray import _reconstruct
    overlap = _Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("a", "b"), {"a": (np.dtype("O"), 0),
                                                                                 "b": (np.dtype("<u8"), 0)}, 8, 1, 27))
    u1_objects = _Reduce(np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63))
    return {
        # an object field overlapping an integer: the integer is freed as a PyObject pointer (a segfault or worse)
        "overlapping-fields": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                       (1, (1,), overlap, False, [(None, 0x4141414141414141)])), "refusing numpy dtype"),
        "object-flags": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (4,), u1_objects, False, [1, 2, 3, 4])),
                         "refusing a numpy dtype state"),
        # ndarray(shape, dtype, buffer, offset, strides) with zero strides: 1 byte seen as 200,000 images
        "zero-strides": (_Reduce(np.ndarray, ((200_000, 32, 32, 3), np.dtype("u1"), b"\x00", 0, (0, 0, 0, 0))),
                         "not a readable pickle"),
        "short-bytes": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 32, 32, 3), np.dtype("u1"), False,
                                                                         b"\x00" * 10)), "holds 10 bytes, not 6144"),
    }


@pytest.mark.parametrize("case", sorted(_crafted_pickles()))
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_crafted_array_in_a_data_pickle_is_refused_not_built(tmp_path, case, protocol):
    """numpy's own __setstate__ trusts its input; the loader builds plain numeric arrays from exactly the bytes
    in the file instead, so these are one line each (run in a child: a regression would crash the process)."""
    data, fragment = _crafted_pickles()[case]
    path = tmp_path / "ti.pickle"
    path.write_bytes(pickle.dumps({"data": data, "extrapolated_targets": [1]}, protocol=protocol))
    code = ("import sys\nfrom trainer.data import DataError, load_ti500k\n"
            f"try:\n    load_ti500k({str(path)!r})\nexcept DataError as exc:\n    print(exc)\n    sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and fragment in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])
