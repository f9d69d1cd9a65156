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
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
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


_ZIP_MAGIC = b"PK\x03\x04"
# what torch's weights-only unpickler accepts besides torch's own rebuild functions
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                         "builtins.bytearray", "builtins.complex", "_codecs.encode", "numpy.")


def _head(path: str, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _pickle_bytes(path: str) -> Optional[bytes]:
    """The pickle stream of a checkpoint file without unpickling it: ``*/data.pkl`` of torch's zip
    format, or the file itself (legacy format / a plain pickle); None when it cannot be found."""
    try:
        if _head(path, 4) == _ZIP_MAGIC:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                return z.read(names[0]) if names else None
        with open(path, "rb") as f:
            return f.read(64 << 20)  # the leading pickle of a legacy file sits at the start
    except (OSError, zipfile.BadZipFile, KeyError, EOFError, RuntimeError, ValueError, NotImplementedError):
        return None


def scan_pickle(data: bytes) -> Tuple[bool, list]:
    """Parse the first pickle of ``data`` opcode by opcode WITHOUT executing anything: returns
    ``(complete, globals)``, ``complete`` False when the stream is cut short or is not a pickle,
    ``globals`` the ``module.name`` of every class/function it would import and call."""
    import io
    import pickletools
    found: list = []
    recent: list = []   # string values pushed lately (STACK_GLOBAL takes module and name from them)
    memo: Dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", ".", 1))
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and all(isinstance(x, str) for x in recent[-2:]):
                    found.append(f"{recent[-2]}.{recent[-1]}")
                else:
                    found.append("<an object built by STACK_GLOBAL>")
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                          "BINSTRING", "STRING"):
                recent.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(arg))
            elif name == "STOP":
                return True, found
            else:
                recent.append(None)
            del recent[:-4]
    except Exception:  # noqa: BLE001 - a cut or garbage stream: genops raises ValueError & co.
        return False, found
    return False, found


def _unsafe_globals(globs: list) -> list:
    return [g for g in globs if not g.startswith(_SAFE_GLOBAL_PREFIXES)]


def _refused(what: str, path: str, needs: Optional[str], plain: bool = False) -> UserError:
    if plain:  # a complete pickle the weights-only unpickler will not take, no foreign class named
        detail = f"a pickle that torch.load(weights_only=True) does not take: {needs}" if needs else \
            "a pickle that torch.load(weights_only=True) does not take"
    else:
        detail = f"it needs unpickling arbitrary objects: {needs}" if needs else \
            "it needs unpickling arbitrary objects"
    return UserError(f"{what}: {path!r} refused: not a weights-only checkpoint ({detail}); mpq loads only "
                     f"files of tensors and plain containers (torch.load weights_only=True) and runs none "
                     f"of this file's code")


def _classify_load_error(e: BaseException, path: str, what: str) -> UserError:
    """One clear message for a file ``torch.load(weights_only=True)`` could not read: a pickle that
    would run code is *refused*; a cut or damaged file is *truncated or corrupted*; anything else is
    not a checkpoint at all."""
    text = " ".join(str(e).split())
    head = _head(path)
    is_zip = head[:4] == _ZIP_MAGIC
    data = _pickle_bytes(path)
    complete, globs = scan_pickle(data) if data else (False, [])
    unsafe = _unsafe_globals(globs)
    m = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", text)
    if m or unsafe:
        return _refused(what, path, m.group(1) if m else unsafe[0])
    if isinstance(e, pickle.UnpicklingError) and complete and "weights only" in text.lower():
        # a whole, well-formed pickle that the weights-only unpickler still would not take
        detail = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        return _refused(what, path, detail[:120] or None, plain=True)
    if is_zip or head[:1] == b"\x80":
        detail = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        detail = detail.split(". This is an internal")[0].strip()
        return UserError(f"{what}: {path!r} is truncated or corrupted and cannot be read "
                         f"({detail[:120] or type(e).__name__})")
    return UserError(f"{what}: {path!r} is truncated or corrupted, or not a PyTorch checkpoint at all: it "
                     f"starts with {head!r}, neither torch.save's zip format nor a pickle")


def safe_load(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one clear ``UserError`` for every way it fails:
    missing, a folder, empty, truncated or corrupted, not a checkpoint, or a pickle payload that
    would run code (``refused: not a weights-only checkpoint``; nothing of it is executed)."""
    if os.path.isdir(path):
        raise UserError(f"{what}: {path!r} is a folder; give a checkpoint file")
    if not os.path.exists(path):
        raise UserError(f"{what}: no such file {path!r}")
    if not os.path.isfile(path):
        raise UserError(f"{what}: {path!r} is not a regular file; give a checkpoint file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what}: {path!r} is empty (0 bytes); not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about legacy files; the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except PermissionError as e:
        raise UserError(f"{what}: cannot read {path!r} ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - unpickling/zip/EOF/key/runtime errors of a bad file
        raise _classify_load_error(e, path, what) from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}: {path!r} does not hold a dict (got {type(obj).__name__}); not a checkpoint")
    return obj


def describe_state_mismatch(model: nn.Module, state: Dict[str, Any]) -> str:
    """Why ``state`` does not load into ``model``: counts and first examples of missing and
    unexpected keys and of shape mismatches, in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)]
    not_tensors = [k for k in own if k in state and not isinstance(state[k], torch.Tensor)]
    parts = []
    for label, items in (("missing key", missing), ("unexpected key", unexpected),
                         ("shape mismatch", shapes), ("non-tensor value", not_tensors)):
        if items:
            plural = ("es" if label.endswith("ch") else "s") if len(items) > 1 else ""
            parts.append(f"{len(items)} {label}{plural} "
                         f"(e.g. {', '.join(map(str, items[:2]))})")
    return "; ".join(parts) or "no key or shape difference found"


def load_state_or_explain(model: nn.Module, state: Dict[str, Any], what: str, hint: str) -> None:
    """``model.load_state_dict(state)``; on a mismatch one ``UserError``: ``what (the missing /
    unexpected / mis-shaped keys); hint``."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        raise UserError(f"{what} ({describe_state_mismatch(model, state)}); {hint}") from None


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
    check_format(ckpt, path)
    try:
        net = build_supernet(ckpt["spec"])
    except UserError as e:  # e.g. an unknown model name in the spec: say which file it came from
        raise UserError(f"checkpoint: {path!r} has an invalid model spec ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"checkpoint: {path!r} has an invalid model spec ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    state = ckpt["model_ema"] if isinstance(ckpt.get("model_ema"), dict) else ckpt["model"]
    if not isinstance(state, dict):
        raise UserError(f"checkpoint: {path!r} has no state_dict under 'model' (got {type(state).__name__})")
    load_state_or_explain(net, state, f"checkpoint: {path!r} does not match its model spec",
                          "the file was altered or comes from another mpq version")
    spec = ckpt["spec"]
    net.mpq_spec["bn_recalibrate"] = bool(spec.get("bn_recalibrate", spec["quant"].get("bn") == "shared"))
    net.eval()
    return net, ckpt


# ----------------------------------------------------------------------------- training checkpoints
def check_format(ckpt: Dict[str, Any], path: str, what: str = "checkpoint") -> None:
    """Refuse anything that is not an mpq supernet checkpoint (``what`` names the input in the
    message, e.g. ``train.resume``)."""
    if ckpt.get("format") != FORMAT or not isinstance(ckpt.get("spec"), dict) or "model" not in ckpt:
        hint = ""
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = ("; it looks like a plain model state_dict (e.g. torchvision weights): train.py takes "
                    "one as model.pretrained, search.py needs train.py's supernet.pt")
        raise UserError(f"{what}: {path!r} is not an mpq supernet checkpoint (no 'format: {FORMAT}', "
                        f"'spec' and 'model' entries){hint}")


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


# ----------------------------------------------------------------------------- RNG state
def rng_state(gens: Dict[str, torch.Generator], device: torch.device) -> Dict[str, Any]:
    """All RNG states (torch, this process's CUDA device, NumPy, Python, and the named generators)
    as plain containers and tensors. Every rank is seeded alike and consumes its RNGs in lockstep,
    so rank 0's states are every rank's states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": [int(v) for v in py_state[1]],
                   "gauss": None if py_state[2] is None else float(py_state[2])},
    }
    for k, g in gens.items():
        out[k] = g.get_state()
    return out


def set_rng_state(state: Dict[str, Any], gens: Dict[str, torch.Generator], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if torch.is_tensor(state.get("cuda")) and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    for k, g in gens.items():
        if k in state:
            g.set_state(state[k])
