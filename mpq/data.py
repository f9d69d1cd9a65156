"""Data sets: the embedded Fashion-MNIST (Debian's ``dataset-fashion-mnist``), CIFAR-10/100 and
ImageNet from local folders, and seeded synthetic images. Nothing is downloaded."""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import UserError

DATA_SETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")
SYNTHETIC_DEFAULTS = {"shape": (3, 32, 32), "classes": 10, "size": (50000, 10000)}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Per-channel mean/std of pixel values in [0, 1] that every loader normalises with.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530     # Fashion-MNIST training set
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SyntheticImages(Dataset):
    """Seeded random images and labels, for machines without data sets (speed and GPU checks).

    Sample ``i`` of a split is ``x = 0.5 * prototype[y_i] + N(0, 1)`` of shape ``(C, H, W)``, with
    ``y_i`` uniform over the classes and one fixed random prototype per class, so a model can learn
    something; everything follows from ``seed`` (and the split), and images are made on demand."""

    def __init__(self, size: int, shape: Sequence[int], classes: int, seed: int, split: str) -> None:
        self.size, self.shape, self.classes = int(size), tuple(int(v) for v in shape), int(classes)
        self.seed = int(seed) * 2 + (0 if split == "train" else 1)
        proto_gen = torch.Generator().manual_seed(int(seed))  # the same classes in both splits
        self.prototypes = torch.randn((self.classes, *self.shape), generator=proto_gen)
        self.targets = torch.randint(self.classes, (self.size,), generator=torch.Generator().manual_seed(self.seed))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        y = int(self.targets[i])
        return 0.5 * self.prototypes[y] + torch.randn(self.shape, generator=g), y


def preprocess_of(name: str, image_size: int = 224, synthetic_shape: Sequence[int] = (3, 32, 32)) -> dict:
    """What a deployed model expects of its input, torchvision's convention: pixels scaled to [0, 1],
    then ``(x - mean) / std`` per channel, NCHW float32 of ``input_size`` = [C, H, W] (ImageNet: the
    shorter side resized to ``resize``, then a ``center_crop``)."""
    if name == "fashion_mnist":
        return {"mean": [FASHION_MNIST_MEAN], "std": [FASHION_MNIST_STD], "input_size": [1, 28, 28]}
    if name in ("cifar10", "cifar100"):
        return {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "input_size": [3, 32, 32]}
    if name == "imagenet":
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "input_size": [3, image_size, image_size], "resize": int(image_size * 256 / 224),
                "center_crop": int(image_size)}
    if name == "synthetic":   # the images are already standardised
        c = int(synthetic_shape[0])
        return {"mean": [0.0] * c, "std": [1.0] * c, "input_size": [int(v) for v in synthetic_shape]}
    raise UserError(f"data.name: unknown data set {name!r}; allowed: {list(DATA_SETS)}")


@dataclass
class DataInfo:
    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    input_size: Tuple[int, int, int, int]  # (1, C, H, W) of one sample, for the cost model


def _read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file: magic (2 zero bytes, dtype code 0x08, ndim), big-endian dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, damaged, unreadable
        raise UserError(f"data.root: {path!r} cannot be read ({getattr(e, 'strerror', None) or e}); "
                        f"expected a gzipped Fashion-MNIST IDX file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"data.root: {path!r} is not an unsigned-byte IDX file (magic bytes {raw[:4]!r}, "
                        f"expected 00 00 08 <ndim>)")
    ndim = raw[3]
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise UserError(f"data.root: {path!r} has a truncated or invalid IDX header ({ndim} dimensions, "
                        f"{len(raw)} bytes)")
    dims = [int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)]
    want = 1
    for d in dims:
        want *= d  # Python ints: no overflow on a damaged header
    have = len(raw) - 4 - 4 * ndim
    if have != want:
        raise UserError(f"data.root: {path!r} is {'truncated' if have < want else 'damaged'}: its header "
                        f"says {tuple(dims)} = {want} values, it holds {have}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def fashion_mnist(root: str = FASHION_MNIST_DIR, split: str = "train") -> TensorDataset:
    """Fashion-MNIST as a normalised float TensorDataset ``(N, 1, 28, 28)``, labels ``(N,)``."""
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    if root != FASHION_MNIST_DIR:  # the default folder's absence gets the install hint below
        _check_root(root)
    paths = [os.path.join(root, img_name), os.path.join(root, lbl_name)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"data.root: Fashion-MNIST file {missing[0]!r} not found; install it with "
                        f"'apt-get install -y dataset-fashion-mnist' (files go to {FASHION_MNIST_DIR}) or "
                        f"set data.root to a folder holding {', '.join(sum(FASHION_MNIST_FILES.values(), ()))}")
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(255.0)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or labels.dim() != 1:
        raise UserError(f"data.root: {paths[0]!r} holds images of shape {tuple(images.shape)} and "
                        f"{paths[1]!r} labels of shape {tuple(labels.shape)}; Fashion-MNIST has "
                        f"(N, 28, 28) images and (N,) labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise UserError(f"data.root: {paths[1]!r} holds labels outside 0..9")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"data.root: {paths[0]!r} and {paths[1]!r} hold different numbers of samples")
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)
    return TensorDataset(images, labels)


def _check_root(root: str) -> None:
    if not os.path.exists(root):
        raise UserError(f"data.root: no such folder {root!r}")
    if not os.path.isdir(root):
        raise UserError(f"data.root: {root!r} is a file, not a folder; give the folder that holds the data set")


def _cifar(root: str, name: str, train: bool):
    import torchvision
    from torchvision import transforms as T
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if not os.path.isdir(os.path.join(root, folder)):
        raise UserError(f"data.root: {os.path.join(root, folder)!r} not found; expected torchvision's "
                        f"{name.upper()} layout: <root>/{folder}/ (the extracted python-version archive)")
    mean, std = CIFAR_MEAN, CIFAR_STD
    tf = (T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
          if train else T.Compose([T.ToTensor(), T.Normalize(mean, std)]))
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return cls(root, train=train, transform=tf, download=False)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise UserError(f"data.root: {os.path.join(root, folder)!r} holds no readable {name.upper()} "
                        f"({' '.join(str(e).split())[:160]}); expected torchvision's python-version "
                        f"archive extracted there") from None


def _imagenet(root: str, train: bool, image_size: int = 224):
    import torchvision
    from torchvision import transforms as T
    sub = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(sub):
        raise UserError(f"data.root: {sub!r} not found; expected an ImageFolder tree "
                        f"<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if train:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    else:
        tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                        T.Normalize(mean, std)])
    try:
        return torchvision.datasets.ImageFolder(sub, transform=tf)
    except (OSError, RuntimeError, ValueError) as e:  # no class folders, no images, unreadable
        raise UserError(f"data.root: {sub!r} is not a usable ImageFolder tree "
                        f"({' '.join(str(e).split())[:200]}); expected <root>/{os.path.basename(sub)}/<class>/*.JPEG") from None


def seeded_subset(ds: Dataset, size: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``size`` samples (all of ``ds`` when ``size`` is falsy or too big)."""
    if not size or size >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:size].tolist()
    return Subset(ds, idx)


def build_datasets(name: str, root: Optional[str] = None, train_subset: Optional[int] = None,
                   val_subset: Optional[int] = None, seed: int = 0, image_size: int = 224,
                   synthetic: Optional[Mapping[str, Any]] = None) -> DataInfo:
    """Train / held-out datasets by name (:data:`DATA_SETS`). ``synthetic``: ``{"shape", "classes",
    "size": [train, val]}`` of ``name="synthetic"`` (defaults: 3x32x32, 10, 50000/10000)."""
    if name == "synthetic":
        sy = dict(SYNTHETIC_DEFAULTS, **{k: v for k, v in (synthetic or {}).items() if v is not None})
        shape, classes = [int(v) for v in sy["shape"]], int(sy["classes"])
        train = SyntheticImages(sy["size"][0], shape, classes, seed, "train")
        val = SyntheticImages(sy["size"][1], shape, classes, seed, "val")
        info = (classes, shape[0], (1, *shape))
    elif name == "fashion_mnist":
        root = root or FASHION_MNIST_DIR
        train, val = fashion_mnist(root, "train"), fashion_mnist(root, "test")
        info = (10, 1, (1, 1, 28, 28))
    elif name in ("cifar10", "cifar100"):
        if not root:
            raise UserError(f"data.root: {name} needs a local folder (torchvision's format); nothing is downloaded")
        _check_root(root)
        train, val = _cifar(root, name, True), _cifar(root, name, False)
        info = (10 if name == "cifar10" else 100, 3, (1, 3, 32, 32))
    elif name == "imagenet":
        if not root:
            raise UserError("data.root: imagenet needs a local ImageFolder tree with train/ and val/")
        _check_root(root)
        train, val = _imagenet(root, True, image_size), _imagenet(root, False, image_size)
        if train.classes != val.classes:
            only = sorted(set(train.classes) ^ set(val.classes))
            raise UserError(f"data.root: {root!r}: train/ and val/ hold different class folders "
                            f"({len(train.classes)} vs {len(val.classes)}; e.g. {only[:3]}); both need the same classes")
        info = (len(train.classes), 3, (1, 3, image_size, image_size))
    else:
        raise UserError(f"data.name: unknown data set {name!r}; allowed: {list(DATA_SETS)}")
    for key, size, ds in (("train_subset", train_subset, train), ("val_subset", val_subset, val)):
        if size and size > len(ds):
            raise UserError(f"data.{key}: {size} is larger than the {name} "
                            f"{'training' if key == 'train_subset' else 'held-out'} set ({len(ds)} "
                            f"samples); use at most {len(ds)} or null for all of it")
    return DataInfo(seeded_subset(train, train_subset, seed), seeded_subset(val, val_subset, seed + 1), *info)


def synthetic_of(data_cfg: Mapping[str, Any]) -> dict:
    """The ``synthetic`` argument of :func:`build_datasets` from a config's ``data`` section (also an
    older checkpoint's, which has no such keys: the defaults)."""
    return {"shape": data_cfg.get("synthetic_shape"), "classes": data_cfg.get("synthetic_classes"),
            "size": data_cfg.get("synthetic_size")}
