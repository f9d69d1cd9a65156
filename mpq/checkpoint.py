"""Checkpoints: atomic writes, ``weights_only`` loads, and rebuilding a supernet from its spec.

A supernet checkpoint is a dict of plain containers and tensors only (loadable with
``weights_only=True``)::

    {"format": "mpq-supernet", "version": 1,
     "spec":  {"model": {"name", "num_classes", "in_channels"},
               "quant": {"w_bits", "a_bits", "keep_8bit", "per_channel", "bn"},
               "input_size": [1, C, H, W]},
     "model": state_dict, "config": resolved config (dict), ... training state ...}
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import Any, Dict, Tuple

import torch
from torch import nn

from .errors import UserError

FORMAT = "mpq-supernet"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a crash in
    the middle leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one clear ``UserError`` for every way it fails."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: no such file {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise UserError(f"{what}: {path!r} was refused: it needs unpickling arbitrary objects, which "
                        f"weights_only loading does not allow ({first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{what}: {path!r} is truncated or corrupted and cannot be read "
                        f"({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}: {path!r} does not hold a dict (got {type(obj).__name__})")
    return obj


def build_supernet(spec: Dict[str, Any]) -> nn.Module:
    """Recreate the (untrained) supernet described by a checkpoint's ``spec``."""
    from .models import build_model
    from .supernet import quantize_model
    m, q = spec["model"], spec["quant"]
    net = build_model(m["name"], num_classes=m["num_classes"], in_channels=m["in_channels"])
    return quantize_model(net, w_bits=q["w_bits"], a_bits=q["a_bits"], keep_8bit=q["keep_8bit"],
                          per_channel=q["per_channel"], bn=q["bn"])


def load_supernet(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a supernet checkpoint: returns ``(model in eval mode, checkpoint dict)``."""
    ckpt = safe_load(path, "checkpoint")
    if ckpt.get("format") != FORMAT or "spec" not in ckpt or "model" not in ckpt:
        raise UserError(f"checkpoint: {path!r} is not an mpq supernet checkpoint (no 'format: {FORMAT}', "
                        f"'spec' and 'model' entries)")
    net = build_supernet(ckpt["spec"])
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint: {path!r} does not match its model spec: "
                        f"{str(e).splitlines()[0][:300]}") from None
    net.eval()
    return net, ckpt
