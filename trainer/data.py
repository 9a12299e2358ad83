"""Data sets held in memory as uint8 (N, C, H, W) tensors, sharded per rank, augmented in batch.

Loading everything once and indexing batches (on the GPU when it fits) keeps per-sample PIL work and
DataLoader workers out of the hot loop; sharding and per-epoch reshuffling come from DistributedSampler, or,
when labelled and unlabelled images are mixed in each batch (CIFAR10-Ext), from a seeded walk of each set.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from trainer.config import DataConfig
from trainer.seeding import derive_seed

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


class DataError(ValueError):
    """Missing or corrupt data; printed as one line."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: ImageSet
    test: ImageSet
    num_classes: int
    channels: int
    image_size: int
    labelled: int = -1  # the first `labelled` training images carry true labels, the rest pseudo-labels (-1: all)
    val: ImageSet | None = None  # labelled training images held out to choose the best checkpoint on


# ---------------------------------------------------------------- safe pickle reading

# The CIFAR-10 batches and the TI-500K file are pickles: a plain pickle.load would run whatever code a tampered
# file names (torchvision's CIFAR10 class uses plain pickle, so we read the files ourselves). Allowing numpy's own
# reconstructors is not enough either: ndarray.__setstate__ and dtype.__setstate__ trust their input (a crafted
# dtype state overlaps an object field with an integer: memory corruption; ndarray(...) with zero strides: a
# 300-byte file becomes gigabytes). So the numpy names a data pickle uses map to the stand-ins below, which build
# plain numeric arrays with np.frombuffer from exactly the bytes the file holds, and nothing else.

_NUMERIC_DTYPES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value if isinstance(value, str) else ""


class _Dtype:
    """numpy.dtype(spec, align, copy) followed by its pickled state: a plain numeric type and its byte order."""

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        name = _text(spec)
        if name not in _NUMERIC_DTYPES:
            raise DataError(f"refusing numpy dtype {spec!r} in a data pickle (plain numeric types only)")
        self.dtype = np.dtype(name)

    def __setstate__(self, state: object) -> None:
        plain = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                 and _text(state[1]) in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                 and state[5:8] == (-1, -1, 0) and state[8:] in ((), (None,)))
        if not plain:
            raise DataError("refusing a numpy dtype state in a data pickle (fields, subarrays or flags)")
        order = _text(state[1])
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _array(raw: object, dtype: object, shape: object, order: object = "C") -> np.ndarray:
    """An array of exactly the bytes given (no strides, no views of something smaller)."""
    if isinstance(raw, pickle.PickleBuffer):
        raw = raw.raw()
    if not isinstance(raw, (bytes, bytearray, memoryview)) or not isinstance(dtype, _Dtype):
        raise DataError("refusing an array of other than plain numeric bytes in a data pickle")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise DataError(f"refusing array shape {shape!r} in a data pickle")
    count = math.prod(shape)
    if len(raw) != count * dtype.dtype.itemsize:
        raise DataError(f"an array of shape {shape} holds {len(raw)} bytes, not {count * dtype.dtype.itemsize}")
    array = np.frombuffer(raw, dtype=dtype.dtype).copy()  # its own, writable memory
    return array.reshape(shape, order="F" if _text(order) == "F" else "C")


class _Reconstructed:
    """numpy's _reconstruct(ndarray, (0,), b'b') followed by the array's state (protocols 0-4); replaced by the
    array once the whole pickle is read (_materialise)."""

    def __init__(self, cls: object, *_: object) -> None:
        if cls is not _NDARRAY:
            raise DataError("refusing numpy _reconstruct of anything but an ndarray in a data pickle")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise DataError("refusing an ndarray state in a data pickle")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array(raw, dtype, shape, "F" if fortran else "C")


_NDARRAY = object()  # numpy.ndarray as a data pickle names it: only what _reconstruct is told to build


def _scalar(dtype: object, raw: object) -> np.generic:
    return _array(raw, dtype, (1,))[0]


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    """_codecs.encode as protocol 2 pickles use it: Python 2 byte strings, stored as latin-1 text."""
    if not (isinstance(text, str) and _text(encoding) in ("latin1", "latin-1")):
        raise DataError("refusing _codecs.encode other than latin-1 text in a data pickle")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    if args:
        raise DataError("refusing bytes(...) with arguments in a data pickle")
    return b""


_DATA_PICKLE_NAMES = {
    **{(module, name): stand_in for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, stand_in in (("_reconstruct", _Reconstructed), ("scalar", _scalar))},
    ("numpy.core.numeric", "_frombuffer"): _array, ("numpy._core.numeric", "_frombuffer"): _array,
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Dtype, ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes,  # an empty array, protocol 2
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and plain numeric numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _DATA_PICKLE_NAMES[(module, name)]
        except KeyError:
            raise DataError(f"refusing to load {module}.{name} from a data pickle (only numpy arrays allowed)") from None


def _materialise(obj: object, depth: int = 0) -> object:
    """The unpickled containers with each _Reconstructed replaced by its array."""
    if depth > 8:
        raise DataError("a data pickle nested deeper than a data set is")
    if isinstance(obj, _Reconstructed):
        if obj.array is None:
            raise DataError("an ndarray without its state in a data pickle")
        return obj.array
    if isinstance(obj, _Dtype):
        raise DataError("a bare numpy dtype in a data pickle")
    if isinstance(obj, dict):
        return {k: _materialise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (_Reconstructed, _Dtype, dict, list, tuple)) for v in obj):
        return type(obj)(_materialise(v, depth + 1) for v in obj)
    return obj


def safe_unpickle(fh, what: str) -> object:
    try:
        return _materialise(_NumpyOnlyUnpickler(fh, encoding="bytes").load())
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise DataError(f"{what}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def _key(d: dict, name: str):
    if not isinstance(d, dict):
        raise KeyError(name)
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


# ---------------------------------------------------------------- the data sets

def _hwc_to_tensor(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))


def _read_cifar_batches(root: str, download: bool) -> tuple[ImageSet, ImageSet]:
    folder = os.path.join(root, "cifar-10-batches-py")
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    if not os.path.isdir(folder):
        if not os.path.isfile(archive) and download:
            from torchvision.datasets.utils import download_url
            try:
                download_url(CIFAR10_URL, root, md5=CIFAR10_MD5)
            except (OSError, RuntimeError) as exc:  # no network, a proxy, a failed checksum, a full disk
                reason = str(getattr(exc, "reason", "") or exc).strip().splitlines()
                raise DataError(f"data.download: cannot fetch {CIFAR10_URL} into {root!r} "
                                f"({reason[0][:160] if reason else type(exc).__name__}); put "
                                "cifar-10-python.tar.gz there yourself") from None
        if not os.path.isfile(archive):
            raise DataError(f"no CIFAR-10 in {root!r}: expected cifar-10-batches-py/ or cifar-10-python.tar.gz")
        return _read_cifar_archive(archive)

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"CIFAR-10 file missing: {path} (the folder {folder} is there, so it is read instead of "
                            "downloading; remove it or complete it)")
        with open(path, "rb") as fh:
            return _cifar_arrays(safe_unpickle(fh, path), path)

    return _cifar_sets([read(f"data_batch_{i}") for i in range(1, 6)], read("test_batch"))


def _read_cifar_archive(archive: str) -> tuple[ImageSet, ImageSet]:
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = os.path.basename(member.name)
                if member.isfile() and (name.startswith("data_batch_") or name == "test_batch"):
                    raw = tar.extractfile(member).read()
                    parts[name] = _cifar_arrays(safe_unpickle(io.BytesIO(raw), f"{archive}:{name}"), archive)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: not a readable tar.gz ({exc})") from None
    missing = [n for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if n not in parts]
    if missing:
        raise DataError(f"{archive}: missing {', '.join(missing)}")
    return _cifar_sets([parts[f"data_batch_{i}"] for i in range(1, 6)], parts["test_batch"])


def _cifar_arrays(batch: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The published format: `data` uint8 (N, 3072), rows of R, G, B planes; `labels` N integers."""
    try:
        data, labels = _key(batch, "data"), np.asarray(_key(batch, "labels"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a CIFAR-10 batch ({exc})") from None
    if not isinstance(data, np.ndarray):  # (a list of memo references to one array would multiply it)
        raise DataError(f"{where}: CIFAR-10 data must be a numpy array, got {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: CIFAR-10 data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):  # [] reads as float
        raise DataError(f"{where}: CIFAR-10 labels must be N integers, got {labels.dtype} {labels.shape}")
    data, labels = data.reshape(-1, 3, 32, 32), labels.astype(np.int64)
    if len(data) != len(labels):
        raise DataError(f"{where}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _cifar_sets(train_parts, test_part) -> tuple[ImageSet, ImageSet]:
    x = np.concatenate([p[0] for p in train_parts])
    y = np.concatenate([p[1] for p in train_parts])
    train = ImageSet(torch.from_numpy(x), torch.from_numpy(y))
    test = ImageSet(torch.from_numpy(test_part[0]), torch.from_numpy(test_part[1]))
    for s, name in ((train, "train"), (test, "test")):
        if not len(s):  # found now, not after a whole epoch of training
            raise DataError(f"CIFAR-10 {name} set holds no images")
        if s.labels.min() < 0 or s.labels.max() > 9:
            raise DataError(f"CIFAR-10 {name} labels outside 0..9")
    return train, test


def load_ti500k(path: str, limit: int = 0, seed: int = 0) -> ImageSet:
    """The TI-500K pseudo-labelled set: a pickle (or .npz) with `data` (N,32,32,3 uint8) and `extrapolated_targets`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: TI-500K file not found")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                data, targets = z["data"], z["extrapolated_targets"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: not a TI-500K .npz ({exc})") from None
    else:
        with open(path, "rb") as fh:
            obj = safe_unpickle(fh, path)
        try:
            data, targets = _key(obj, "data"), _key(obj, "extrapolated_targets")
        except (KeyError, TypeError):
            raise DataError(f"{path}: expected keys 'data' and 'extrapolated_targets'") from None
    if not isinstance(data, np.ndarray):  # (a list of memo references to one array would multiply it)
        raise DataError(f"{path}: data must be a numpy array (N, 32, 32, 3), got {type(data).__name__}")
    try:
        targets = np.asarray(targets)
    except ValueError as exc:  # e.g. lists of different lengths
        raise DataError(f"{path}: extrapolated_targets must be N integer labels ({exc})") from None
    if targets.ndim != 1:
        raise DataError(f"{path}: extrapolated_targets must be N integer labels, got {targets.dtype} {targets.shape}")
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.dtype != np.uint8:
        raise DataError(f"{path}: data must be uint8 (N, 32, 32, 3), got {data.dtype} {data.shape}")
    if len(targets) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(targets)} targets")
    if not len(data):
        raise DataError(f"{path}: holds no images (cifar10-ext would silently train on CIFAR-10 alone)")
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise DataError(f"{path}: extrapolated_targets must be N integer labels, got {targets.dtype} {targets.shape}")
    if len(targets) and (targets.min() < 0 or targets.max() > 9):
        raise DataError(f"{path}: extrapolated_targets outside 0..9 (found {targets.min()}..{targets.max()})")
    if 0 < limit < len(data):  # a random subset (the file is in no random order), the same for every rank
        keep = np.sort(np.random.default_rng(derive_seed(seed, "unlabeled-subset")).choice(len(data), limit,
                                                                                       replace=False))
        data, targets = data[keep], targets[keep]
    return ImageSet(_hwc_to_tensor(data), torch.from_numpy(targets.astype(np.int64)))


def convert_ti500k(src: str, dst: str) -> None:
    """One-time conversion of the TI-500K pickle to .npz (loads without any unpickling afterwards).
    Also a command: python -m trainer.data SRC DST."""
    if not dst.endswith(".npz") or os.path.isdir(dst):
        raise DataError(f"{dst}: the destination must be a .npz file name")
    s = load_ti500k(src)
    try:
        np.savez(dst, data=s.images.permute(0, 2, 3, 1).numpy(), extrapolated_targets=s.labels.numpy())
    except OSError as exc:
        raise DataError(f"{dst}: cannot write ({exc.strerror or exc})") from None


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 0..16 -> 0..255
    xtr, xte, ytr, yte = train_test_split(images, bunch.target, test_size=0.2, random_state=0,
                                          stratify=bunch.target)
    as_set = lambda x, y: ImageSet(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))  # noqa: E731
    return Dataset(as_set(xtr, ytr), as_set(xte, yte), num_classes=10, channels=1, image_size=8)


def _synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Learnable random data: each class has its own mean image; samples are that plus noise."""
    g = torch.Generator().manual_seed(derive_seed(seed, "synthetic-data"))
    c, s, k = cfg.synthetic_channels, cfg.synthetic_image_size, 10
    prototypes = torch.rand(k, c, s, s, generator=g) * 160 + 48

    def make(n: int) -> ImageSet:
        labels = torch.randint(0, k, (n,), generator=g)
        noise = torch.randn(n, c, s, s, generator=g) * 40
        return ImageSet((prototypes[labels] + noise).clamp(0, 255).to(torch.uint8), labels)

    return Dataset(make(cfg.synthetic_train_size), make(cfg.synthetic_test_size), k, c, s)


def image_channels(cfg: DataConfig) -> int:
    """The channels of the configured data's images, known without loading it."""
    return {"digits": 1, "synthetic": cfg.synthetic_channels}.get(cfg.name, 3)


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """The configured data set; with data.val_size, that many labelled training images moved to `val`."""
    if cfg.name in ("digits", "synthetic"):
        data = _digits() if cfg.name == "digits" else _synthetic(cfg, seed)
        if not cfg.val_size:
            return data
        train, val = hold_out_validation(data.train, cfg.val_size, seed)
        return dataclasses.replace(data, train=train, val=val)
    train, test = _read_cifar_batches(cfg.root, cfg.download)
    train, val = hold_out_validation(train, cfg.val_size, seed) if cfg.val_size else (train, None)
    labelled = len(train)
    if cfg.name == "cifar10-ext":  # held out before the TI images join: no copy of the 500K for it
        extra = load_ti500k(cfg.ti500k_path, cfg.unlabeled_max, seed=seed)
        train = ImageSet(torch.cat([train.images, extra.images]), torch.cat([train.labels, extra.labels]))
    return Dataset(train, test, num_classes=10, channels=3, image_size=32, labelled=labelled, val=val)


def hold_out_validation(labelled: ImageSet, size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(training, validation) sets: `size` images of the labelled set, chosen at random by the seed (the same on
    every rank and resume), held out of training."""
    if size >= len(labelled):
        raise DataError(f"data.val_size={size}: the training set has {len(labelled)} labelled images; hold out fewer")
    order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(derive_seed(seed, "validation")))
    held, kept = order[:size].sort().values, order[size:].sort().values
    return (ImageSet(labelled.images[kept], labelled.labels[kept]),
            ImageSet(labelled.images[held], labelled.labels[held]))


# ---------------------------------------------------------------- batching

def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, per sample, for a whole batch at once."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device  # the generator lives on the same device: no host round trip per batch
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows, cols]


def _walk(size: int, per_step: int, first_step: int, steps: int, seed: int, name: str) -> torch.Tensor:
    """(steps, per_step) indices into a set of `size` images, for the global steps from `first_step` on: passes
    over the set in random orders (pass k's order fixed by seed and k), each step taking the next `per_step`
    images of one pass, so no step holds an image twice and every pass sees each image once but for the
    size % per_step it leaves out; passes run on across epochs. A set smaller than a step fills it with
    several orders (repeats are then unavoidable)."""
    per_pass = size // per_step
    orders: dict[tuple[int, int], torch.Tensor] = {}

    def order(k: int, i: int = 0) -> torch.Tensor:
        if (k, i) not in orders:
            generator = torch.Generator().manual_seed(derive_seed(seed, f"walk-{name}", k, i))
            orders[(k, i)] = torch.randperm(size, generator=generator)
        return orders[(k, i)]

    rows = []
    for t in range(first_step, first_step + steps):
        if per_pass:
            k, j = divmod(t, per_pass)
            rows.append(order(k)[j * per_step:(j + 1) * per_step])
        else:
            rows.append(torch.cat([order(t, i) for i in range(-(-per_step // size))])[:per_step])
    return torch.stack(rows)


class TrainBatches:
    """This rank's shard of the training set, reshuffled every epoch, as float batches in [0, 1].

    An epoch is len(data) // global batch steps. With `labelled` < len(data) (CIFAR10-Ext: CIFAR-10 first, then
    the pseudo-labelled TI images) and 0 < unlabeled_fraction < 1, every batch draws that share from the TI
    images and the rest from CIFAR-10, as in Carmon et al.'s robust self-training (0.5): each set is walked in
    passes of fresh random orders that run on across epochs (_walk: the smaller set is cycled, the larger one
    covered over several epochs), the same on every rank, each rank taking its own slice of every step.
    Otherwise one shuffle of all images is split over the ranks (DistributedSampler)."""

    def __init__(self, data: ImageSet, batch_per_rank: int, rank: int, world_size: int, seed: int,
                 device: torch.device, augment: bool, resident: bool, labelled: int = -1,
                 unlabeled_fraction: float = 0.0) -> None:
        if len(data) < batch_per_rank * world_size:
            raise DataError(f"training set has {len(data)} images, fewer than one global batch "
                            f"({batch_per_rank * world_size})")
        self.sampler = DistributedSampler(range(len(data)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.data, self.batch, self.device, self.augment = data, batch_per_rank, device, augment
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.labelled = len(data) if labelled < 0 else labelled
        self.split = None  # (labelled, unlabelled) images per rank and step, when batches mix the two sets
        if 0 < unlabeled_fraction < 1 and 0 < self.labelled < len(data):
            unlabelled = round(batch_per_rank * unlabeled_fraction)
            if not 0 < unlabelled < batch_per_rank:
                raise DataError(f"data.unlabeled_fraction {unlabeled_fraction:g} of {batch_per_rank} images per "
                                "rank leaves no room for both labelled and pseudo-labelled images: raise "
                                "data.batch_size or set data.unlabeled_fraction=0")
            self.split = (batch_per_rank - unlabelled, unlabelled)
        self.images = data.images.to(device) if resident else data.images
        self.labels = data.labels.to(device) if resident else data.labels
        if not resident and device.type == "cuda":
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def _order(self, epoch: int) -> torch.Tensor:
        """(steps, batch) indices of this rank's images for the epoch."""
        if self.split is None:
            self.sampler.set_epoch(epoch)
            return torch.tensor(list(iter(self.sampler)), dtype=torch.long)[:len(self) * self.batch].view(
                len(self), self.batch)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batch-order", epoch))  # the same on every rank
        steps, parts = len(self), []
        for name, (first, size), per_rank in zip(("labelled", "pseudo-labelled"), (
                (0, self.labelled), (self.labelled, len(self.data) - self.labelled)), self.split):
            walk = _walk(size, self.world_size * per_rank, (epoch - 1) * steps, steps, self.seed, name)
            parts.append(walk.view(steps, self.world_size, per_rank)[:, self.rank] + first)
        order = torch.cat(parts, dim=1)
        # mixed within each batch, so that micro-batches (and the batch's first images) hold both sets
        return order.gather(1, torch.rand(order.shape, generator=g).argsort(dim=1))

    def epoch(self, epoch: int, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from step `first` on (a run resumed within an epoch): each step's images and
        augmentation depend on (seed, epoch, rank, step) only."""
        order = self._order(epoch)[first:].to(self.images.device)
        g = torch.Generator(device=self.device)
        for step, idx in enumerate(order, start=first):
            x = self.images[idx].to(self.device, non_blocking=True).float().div_(255)
            y = self.labels[idx].to(self.device, non_blocking=True)
            if self.augment:
                g.manual_seed(derive_seed(self.seed, "augmentation", epoch, self.rank, step))
                x = augment_crop_flip(x, g)
            yield x, y


def eval_batches(data: ImageSet, batch: int, rank: int, world_size: int, device: torch.device,
                 max_samples: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided shard of the test set (no padding, so counts summed over ranks are exact)."""
    n = min(len(data), max_samples) if max_samples else len(data)
    idx = torch.arange(rank, n, world_size)
    for i in range(0, len(idx), batch):
        sel = idx[i:i + batch]
        yield data.images[sel].to(device).float().div_(255), data.labels[sel].to(device)


if __name__ == "__main__":
    import sys

    usage = "usage: python -m trainer.data TI500K.pickle OUT.npz  (converts the TI-500K pickle once)"
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(usage)
        sys.exit(0)
    if len(sys.argv) != 3:
        print(usage, file=sys.stderr)
        sys.exit(2)
    try:
        convert_ti500k(sys.argv[1], sys.argv[2])
    except DataError as exc:
        print(f"trainer.data: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {sys.argv[2]}")
