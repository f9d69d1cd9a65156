"""The search's data: which data set a checkpoint was trained on, and the three disjoint uses of it.

* calibration samples score configurations during the search (never trained on);
* evaluation samples (held-out split) give the final accuracy, disjoint from calibration;
* BN re-calibration batches come from the training data the supernet saw.

Every choice is a seeded permutation: the same seed gives the same samples, on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from mpq.errors import UserError

CALIB_SPLITS = ("auto", "train", "val")


def heldout_split(n: int, calib_size: int, eval_size: int, seed: int) -> Tuple[List[int], List[int]]:
    """``(calib_indices, eval_indices)``: disjoint, sorted index lists of an ``n``-sample split, drawn
    from a permutation seeded by ``seed``; ``eval_size`` 0 takes all the samples not in calibration."""
    import torch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1000)).tolist()
    rest = perm[calib_size:]
    return sorted(perm[:calib_size]), sorted(rest[:eval_size] if eval_size else rest)


def bn_indices(n_train: int, count: int, seed: int) -> List[int]:
    """Sorted indices of the training samples used for BN re-calibration."""
    import torch
    idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 2000))[:min(n_train, count)]
    return sorted(idx.tolist())


@dataclass
class DataSplit:
    """Where each part of the search's data comes from (see :func:`split_data`)."""

    calib: Any
    eval: Any
    bn: Any
    calib_split: str
    calib_indices: List[int]
    eval_indices: List[int]


def split_data(info, calib_size: int, eval_size: int, bn_samples: int, seed: int,
               calib_split: str = "auto") -> DataSplit:
    """Calibration (search scoring), evaluation (final accuracy) and BN re-calibration data.

    * ``calib_split="train"``: calibration samples are training images the supernet was *not*
      trained on (``data.train_subset`` left them out); the final evaluation uses the held-out
      (validation/test) split: all of it, or ``eval_size`` samples of it.
    * ``"val"``: calibration and evaluation are disjoint parts of the held-out split.
    * ``"auto"``: ``"train"`` when enough unused training images exist and the training split has
      no random transforms (augmentation), else ``"val"``.

    BN re-calibration batches are ``bn_samples`` images of the training data the supernet saw.
    Every choice is a seeded permutation: the same ``seed`` gives the same samples.
    """
    import torch
    from torch.utils.data import Subset
    train = info.train
    if isinstance(train, Subset):
        full, used = train.dataset, set(int(i) for i in train.indices)
        unused = [i for i in range(len(full)) if i not in used]
    else:
        full, unused = train, []
    if calib_split not in CALIB_SPLITS:
        raise UserError(f"--calib-split: {calib_split!r} is not allowed; allowed: {', '.join(CALIB_SPLITS)}")
    if calib_split == "auto":
        # training images only when they come without random training transforms (augmentation)
        plain = getattr(full, "transform", None) is None
        calib_split = "train" if plain and len(unused) >= calib_size else "val"
    n_val = len(info.val)
    room = n_val if calib_split == "train" else n_val - calib_size
    if eval_size and eval_size > room > 0:
        raise UserError(f"--eval-size: {eval_size} is more than the {room} held-out samples available "
                        f"({n_val} in the val split" + ("" if calib_split == "train" else
                                                          f", {calib_size} of them for calibration")
                        + "); use at most {room}, or 0 for all of them".format(room=room))
    if calib_split == "train":
        if len(unused) < calib_size:
            raise UserError(f"--calib-split train: only {len(unused)} training images were left out of "
                            f"training (data.train_subset), fewer than --calib-size {calib_size}")
        perm = torch.randperm(len(unused), generator=torch.Generator().manual_seed(seed + 1000)).tolist()
        calib_idx = sorted(unused[i] for i in perm[:calib_size])
        calib = Subset(full, calib_idx)
        if eval_size and eval_size < n_val:
            eval_idx = sorted(torch.randperm(n_val, generator=torch.Generator().manual_seed(seed + 3000))
                              [:eval_size].tolist())
        else:
            eval_idx = list(range(n_val))
    else:
        if calib_size >= n_val:
            raise UserError(f"--calib-size {calib_size} leaves no held-out samples for the final "
                            f"evaluation: the held-out split has {n_val}")
        calib_idx, eval_idx = heldout_split(n_val, calib_size, eval_size, seed)
        calib = Subset(info.val, calib_idx)
    bn = Subset(train, bn_indices(len(train), bn_samples, seed))
    return DataSplit(calib, Subset(info.val, eval_idx), bn, calib_split, calib_idx, eval_idx)


def resolve_data(ckpt: Dict[str, Any], checkpoint: str, data_name: Optional[str] = None,
                 data_root: Optional[str] = None, seed: Optional[int] = None) -> Dict[str, Any]:
    """The checkpoint's ``config.data`` with the command line's overrides. ``seed`` is the search's
    own sample seed; ``train_seed`` keeps the checkpoint's data seed, which rebuilds the training
    subset exactly as training drew it."""
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = dict(cfg.get("data") or {}) if isinstance(cfg.get("data", {}), dict) else {}
    if data_name:
        data["name"] = data_name
    if data_root:
        data["root"] = data_root
    if "name" not in data:
        raise UserError(f"checkpoint: {checkpoint!r} names no data set (config.data.name); "
                        f"pass --data-name and --data-root")
    data.setdefault("seed", 0)
    data["train_seed"] = data["seed"]
    if seed is not None:
        data["seed"] = seed
    data.setdefault("root", None)
    return data


def load_data(data: Dict[str, Any], spec: Dict[str, Any], image_size: int, root_flag: bool):
    """The data sets of ``data`` (see :func:`resolve_data`), checked against the model ``spec``
    (channels, classes). ``root_flag``: the root came from ``--data-root``, so an error about it
    names that flag rather than the checkpoint's ``data.root``."""
    from mpq.data import build_datasets
    try:
        info = build_datasets(data["name"], data.get("root"), train_subset=data.get("train_subset"),
                              seed=int(data["train_seed"]), image_size=image_size)
    except UserError as e:  # name the flag the user typed
        if root_flag and str(e).startswith("data.root:"):
            raise UserError("--data-root" + str(e)[len("data.root"):]) from None
        raise
    except TypeError as e:
        raise UserError(f"checkpoint: malformed data config {data!r} ({e})") from None
    m_spec = spec.get("model", {})
    if (m_spec.get("in_channels") not in (None, info.in_channels)
            or m_spec.get("num_classes") not in (None, info.num_classes)):
        raise UserError(f"checkpoint: model {m_spec.get('name', '?')!r} takes {m_spec.get('in_channels')} "
                        f"channels and {m_spec.get('num_classes')} classes, data set {data['name']!r} has "
                        f"{info.in_channels} and {info.num_classes}")
    return info
