"""Checkpoints: atomic writes, ``weights_only`` loads, and rebuilding a supernet from its spec.

A supernet checkpoint is a dict of plain containers and tensors only (loadable with
``weights_only=True``)::

    {"format": "mpq-supernet", "version": 1,
     "spec":  {"model": {"name", "num_classes", "in_channels"},
               "quant": {"w_bits", "a_bits", "keep_8bit", "per_channel", "bn"},
               "input_size": [1, C, H, W]},
     "model": state_dict, "config": resolved config (dict, config["data"] has name/root/seed...),
     "allowed": {layer: [weight bits still sampled by the bit-width freezing scheduler]},
     "metrics": the last evaluation's metrics entry (as in metrics.jsonl),
     "train_state": {"epoch", "step_in_epoch", "global_step", "total_steps", "steps_per_epoch",
                     "world_size", "complete", "optimizer", "lr_schedule", "scaler",
                     "rng": {"torch", "cuda", "numpy", "python", "config_gen"},
                     "loader_gen_epoch_start", "sampler": {"epoch", "start", "seed"},
                     "bit_scheduler", "r2", "aqt", "history"}}

A training run writes ``ckpt-stepNNNNNNNN.pt`` files (the last ``keep_last`` are kept) and makes
``supernet.pt`` the latest of them (a hard link, or a copy where links are not supported); every
file is written atomically, so a crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .errors import UserError

FORMAT = "mpq-supernet"
VERSION = 1
LATEST = "supernet.pt"
STEP_FILE = re.compile(r"^ckpt-step(\d+)\.pt$")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a crash in
    the middle leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
        text = " ".join(str(e).split())
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if m:
            raise UserError(f"{what}: {path!r} was refused: it needs unpickling arbitrary objects "
                            f"({m.group(1)}), which weights_only loading does not allow; a supernet "
                            f"checkpoint holds only tensors and plain containers") from None
        detail = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise UserError(f"{what}: {path!r} is truncated or corrupted and cannot be read "
                        f"({detail[:120] or 'unpickling failed'})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/EOF/key/runtime errors of a damaged file
        raise UserError(f"{what}: {path!r} is truncated or corrupted and cannot be read "
                        f"({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}: {path!r} does not hold a dict (got {type(obj).__name__})")
    return obj


def build_supernet(spec: Dict[str, Any]) -> nn.Module:
    """Recreate the (untrained) supernet described by a checkpoint's ``spec``."""
    from .models import build_model_from_spec
    from .supernet import quantize_model
    q = spec["quant"]
    net = build_model_from_spec(spec["model"])
    return quantize_model(net, w_bits=q["w_bits"], a_bits=q["a_bits"], keep_8bit=q["keep_8bit"],
                          per_channel=q["per_channel"], bn=q["bn"],
                          depthwise_bits=q.get("depthwise_bits"),
                          first_input_bits=int(q.get("first_input_bits", 8)))


def load_supernet(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a supernet checkpoint: returns ``(model in eval mode, checkpoint dict)``.

    The model gets the EMA weights when the run kept a model EMA (``train.ema``: what the paper
    evaluates and searches), else the training weights. ``net.mpq_spec["bn_recalibrate"]`` says
    whether BN must be re-estimated per configuration (shared BN; switchable BN when trained with
    ``eval.recalibrate_switchable``)."""
    ckpt = safe_load(path, "checkpoint")
    if ckpt.get("format") != FORMAT or "spec" not in ckpt or "model" not in ckpt:
        raise UserError(f"checkpoint: {path!r} is not an mpq supernet checkpoint (no 'format: {FORMAT}', "
                        f"'spec' and 'model' entries)")
    try:
        net = build_supernet(ckpt["spec"])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint: {path!r} has an invalid model spec ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    state = ckpt["model_ema"] if isinstance(ckpt.get("model_ema"), dict) else ckpt["model"]
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint: {path!r} does not match its model spec: "
                        f"{str(e).splitlines()[0][:300]}") from None
    spec = ckpt["spec"]
    net.mpq_spec["bn_recalibrate"] = bool(spec.get("bn_recalibrate", spec["quant"].get("bn") == "shared"))
    net.eval()
    return net, ckpt


# ----------------------------------------------------------------------------- training checkpoints
def check_format(ckpt: Dict[str, Any], path: str) -> None:
    """Refuse anything that is not an mpq supernet checkpoint."""
    if ckpt.get("format") != FORMAT or not isinstance(ckpt.get("spec"), dict) or "model" not in ckpt:
        raise UserError(f"checkpoint: {path!r} is not an mpq supernet checkpoint (no 'format: {FORMAT}', "
                        f"'spec' and 'model' entries)")


def _spec_diff(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> Optional[str]:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _spec_diff(va, vb, f"{prefix}{key}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{key}: checkpoint has {va!r}, this config has {vb!r}"
    return None


def check_compatible(ckpt: Dict[str, Any], spec: Dict[str, Any], path: str) -> None:
    """Refuse a checkpoint of another model, class count or candidate-bit set than ``spec``."""
    check_format(ckpt, path)
    want = {"model": spec["model"], "quant": spec["quant"]}
    have = {"model": ckpt["spec"].get("model"), "quant": ckpt["spec"].get("quant")}
    diff = _spec_diff(have, want)
    if diff:
        raise UserError(f"checkpoint: {path!r} belongs to a different supernet ({diff})")


def step_checkpoints(run_dir: str) -> Dict[int, str]:
    """``{global_step: path}`` of the step-numbered checkpoints in ``run_dir``."""
    out = {}
    for p in glob.glob(os.path.join(glob.escape(run_dir), "ckpt-step*.pt")):
        m = STEP_FILE.match(os.path.basename(p))
        if m:
            out[int(m.group(1))] = p
    return out


def _link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` the same content as ``src`` atomically (hard link, else copy) via a temp name."""
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_rotating(obj: Dict[str, Any], run_dir: str, global_step: int, keep_last: int) -> str:
    """Write ``ckpt-step{global_step}.pt`` atomically, point ``supernet.pt`` at it, and delete all but
    the newest ``keep_last`` step-numbered checkpoints. Returns the step file's path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, f"ckpt-step{int(global_step):08d}.pt")
    atomic_save(obj, path)
    _link_or_copy(path, os.path.join(run_dir, LATEST))
    steps = step_checkpoints(run_dir)
    for s in sorted(steps)[:-max(1, keep_last)]:
        try:
            os.unlink(steps[s])
        except OSError:
            pass
    return path


def find_latest(run_dir: str, log: Callable[[str], None] = print) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The newest checkpoint of ``run_dir`` that loads and is an mpq supernet checkpoint with training
    state: step-numbered files newest first, then ``supernet.pt``. Unreadable ones are skipped (with a
    message). Returns ``(path, checkpoint)`` or None."""
    if not os.path.isdir(run_dir):
        return None
    candidates = [p for _, p in sorted(step_checkpoints(run_dir).items(), reverse=True)]
    latest = os.path.join(run_dir, LATEST)
    if os.path.isfile(latest):
        candidates.append(latest)
    for p in candidates:
        try:
            ckpt = safe_load(p, "checkpoint")
            check_format(ckpt, p)
            if not isinstance(ckpt.get("train_state"), dict):
                raise UserError(f"checkpoint: {p!r} holds no training state")
        except UserError as e:
            log(f"resume: skipping {p}: {e}")
            continue
        return p, ckpt
    return None
