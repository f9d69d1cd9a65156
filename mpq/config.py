"""Training configuration: nested YAML sections, defaults, command-line overrides and validation.

A config is a dict of sections (``model``, ``data``, ``quant``, ``train``, ``distill``, ``idm``,
``scheduler``, ``r2``, ``quant_noise``, ``aqt``, ``eval``, ``output``, ``dist``) of plain values.
:func:`load_config` starts from the embedded default (:data:`DEFAULT_YAML`, read from the package's
``mpq/default.yaml``; ``configs/default.yaml`` is a link to that one file), merges a YAML file over it, then ``section.key=value`` overrides (values
parsed as YAML scalars/lists), then validates every key against :data:`SCHEMA`. An unknown key, a
wrong type or an impossible value raises :class:`mpq.UserError` naming the key, e.g.
``train.lr: must be > 0, got -0.1``, before anything is trained.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import yaml

from .data import DATA_SETS
from .errors import UserError
from .quantizer import SUPPORTED_BITS

DEFAULT_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.yaml")
with open(DEFAULT_CONFIG_FILE, encoding="utf-8") as _f:  # package data; configs/default.yaml links to it
    DEFAULT_YAML = _f.read()


# ----------------------------------------------------------------------------- schema
class Field:
    """One config key: its kind, whether ``null`` is allowed, and a value check.

    kinds: ``int``, ``float``, ``bool``, ``str``, ``bits`` (non-empty list of supported bit-widths),
    ``str_list``, ``int_list``, ``resume`` (false | "auto" | a path).
    """

    def __init__(self, kind: str, doc: str = "", nullable: bool = False,
                 check: Optional[Callable[[Any], Optional[str]]] = None,
                 choices: Optional[Sequence[str]] = None) -> None:
        self.kind, self.doc, self.nullable, self.check, self.choices = kind, doc, nullable, check, choices


# seeds are offset by small constants and fed to torch.Generator (int64) and numpy; 2^62 leaves room
MAX_SEED = 2 ** 62
MAX_WORKERS = 256   # DataLoader worker processes; far more than this hangs the machine, not the job
# classes of the data sets whose class count is fixed (imagenet: the class folders decide)
DATASET_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def _gt(lo):
    return lambda v: None if v > lo else f"must be > {lo}, got {v!r}"


def _ge(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def _in(lo, hi, hi_open=False):
    def check(v):
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"
    return check


def _nonempty(v):
    return None if len(v) else "must not be empty"


def _order(v):
    allowed = ("max", "random", "min")
    bad = [x for x in v if x not in allowed]
    if bad:
        return f"unknown entry {bad[0]!r}; allowed: {list(allowed)}"
    if len(set(v)) != len(v) or not v:
        return f"must name each of 'max', 'random' and optionally 'min' at most once, got {v!r}"
    if "max" not in v or "random" not in v:
        return f"must contain 'max' and 'random' ('min' is optional), got {v!r}"
    return None


def _positive_ints(n):
    def check(v):
        if len(v) != n or any(x <= 0 for x in v):
            return f"must be {n} positive integers, got {v!r}"
        return None
    return check


def _first_input_bits(v):
    return None if v in (8, 32) else f"must be 8 or 32, got {v!r}"


SCHEMA: Dict[str, Dict[str, Field]] = {
    "model": {
        "name": Field("str", "small_mobilenet | small_cnn | resnet20 | efficientnet_lite0 | any torchvision classifier name"),
        "pretrained": Field("str", "local float state_dict file", nullable=True),
        "num_classes": Field("int", "classes (null: from the data set)", nullable=True, check=_ge(2)),
        "width": Field("int", "base channels of small_mobilenet / small_cnn (null: 16 / 8)", nullable=True, check=_ge(1)),
    },
    "data": {
        "name": Field("str", "data set", choices=DATA_SETS),
        "root": Field("str", "local data folder", nullable=True),
        "train_subset": Field("int", "seeded training subset size (null: all)", nullable=True, check=_gt(0)),
        "val_subset": Field("int", "held-out subset size (null: all)", nullable=True, check=_gt(0)),
        "seed": Field("int", "data order and subsets seed", check=_in(0, MAX_SEED)),
        "batch_size": Field("int", "global batch size", check=_gt(0)),
        "eval_batch_size": Field("int", "evaluation batch size", check=_gt(0)),
        "workers": Field("int", "DataLoader workers per process", check=_in(0, MAX_WORKERS)),
        "image_size": Field("int", "ImageNet crop size", check=_gt(0)),
        "synthetic_shape": Field("int_list", "synthetic: C, H, W of the random images", check=_positive_ints(3)),
        "synthetic_classes": Field("int", "synthetic: number of classes", check=_ge(2)),
        "synthetic_size": Field("int_list", "synthetic: training and held-out samples", check=_positive_ints(2)),
    },
    "quant": {
        "w_bits": Field("bits", "candidate weight bit-widths"),
        "a_bits": Field("bits", "candidate activation bit-widths"),
        "keep_8bit": Field("str_list", "layers pinned to 8/8 bits: first, last, layer names"),
        "per_channel": Field("bool", "per-output-channel weight step sizes"),
        "bn": Field("str", "BatchNorm handling", choices=("shared", "switchable")),
        "w_init": Field("str", "weight step-size init", choices=("mean_abs", "three_sigma")),
        "grad_scale": Field("bool", "LSQ step-size gradient scale 1/sqrt(N Q_P)"),
        "depthwise_bits": Field("bits", "w/a candidates of depthwise convs (null: w_bits/a_bits)",
                                nullable=True),
        "first_input_bits": Field("int", "input bits of the first pinned layer (8 or 32)",
                                  check=_first_input_bits),
    },
    "train": {
        "epochs": Field("int", "training epochs", check=_gt(0)),
        "optimizer": Field("str", "optimizer", choices=("sgd", "adamw")),
        "lr": Field("float", "peak learning rate", check=_gt(0)),
        "min_lr": Field("float", "cosine floor", check=_ge(0)),
        "momentum": Field("float", "SGD momentum / AdamW beta1", check=_in(0, 1, hi_open=True)),
        "nesterov": Field("bool", "Nesterov momentum (SGD)"),
        "weight_decay": Field("float", "weight decay of conv/linear weights", check=_ge(0)),
        "warmup_epochs": Field("float", "linear LR warm-up in epochs", check=_ge(0)),
        "num_random": Field("int", "random configs per step besides max (and min)", check=_ge(0)),
        "order": Field("str_list", "sampled subnets of a step: max, random, optional min", check=_order),
        "micro_batches": Field("int", "gradient-accumulation micro-batches per batch", check=_gt(0)),
        "label_smoothing": Field("float", "cross-entropy label smoothing", check=_in(0, 1, hi_open=True)),
        "grad_clip": Field("float", "max gradient norm (null: off)", nullable=True, check=_gt(0)),
        "grad_clip_value": Field("float", "clip each gradient element to [-v, v] (null: off)",
                                 nullable=True, check=_gt(0)),
        "decay_linear": Field("bool", "weight decay on Linear weights too (else conv weights only)"),
        "step_optimizer": Field("str", "optimizer of the LSQ step sizes", choices=("main", "adam")),
        "step_lr": Field("float", "Adam learning rate of the step sizes (step_optimizer=adam)",
                         check=_gt(0)),
        "ema": Field("bool", "model EMA used for evaluation and search"),
        "ema_decay": Field("float", "EMA decay per step (null: from the run length)", nullable=True,
                           check=_in(0, 1, hi_open=True)),
        "qe_weight": Field("float", "final weight of the quantization-error loss (0: off)", check=_ge(0)),
        "qe_start": Field("float", "fraction of training where the QE loss starts", check=_in(0, 1, hi_open=True)),
        "seed": Field("int", "model init and config sampling seed", check=_in(0, MAX_SEED)),
        "max_steps": Field("int", "stop after this many steps (null: all epochs)", nullable=True, check=_gt(0)),
        "resume": Field("resume", "false | auto | checkpoint path"),
        "device": Field("str", "device", choices=("auto", "cpu", "cuda")),
        "amp": Field("bool", "autocast mixed precision (GPU: amp_dtype; CPU: bfloat16 only)"),
        "amp_dtype": Field("str", "autocast dtype", choices=("bfloat16", "float16")),
        "compile": Field("bool", "torch.compile the model"),
        "channels_last": Field("bool", "channels_last memory format"),
    },
    "distill": {
        "enabled": Field("bool", "in-place distillation from the max subnet"),
        "kd_weight": Field("float", "loss = (1-w)*CE + w*KD", check=_in(0, 1)),
        "temperature": Field("float", "KD temperature", check=_gt(0)),
    },
    "idm": {
        "enabled": Field("bool", "information-distortion mitigation"),
        "weight": Field("float", "weight of the IDM feature loss", check=_ge(0)),
        "reduction": Field("str", "reduction over the aligned layers", choices=("mean", "sum")),
        "features": Field("str", "aligned features", choices=("post_bn", "reference")),
    },
    "scheduler": {
        "enabled": Field("bool", "bit-width freezing scheduler"),
        "schedule": Field("str", "update times", choices=("reference", "periodic")),
        "warmup": Field("float", "periodic: fraction of training before the first update", check=_in(0, 1)),
        "period": Field("float", "fraction of training between updates", check=_in(1e-9, 1)),
        "late_period": Field("float", "period after late_start (null: period)", nullable=True,
                             check=_in(1e-9, 1)),
        "late_start": Field("float", "fraction of training where late_period starts", check=_in(0, 1)),
        "ratio_start": Field("float", "fraction of layers frozen at the start", check=_in(0, 1)),
        "ratio_end": Field("float", "fraction of layers frozen at the end", check=_in(0, 1)),
        "round": Field("str", "layers frozen = round(ratio * L)", choices=("floor", "ceil")),
        "threshold": Field("float", "rounding-boundary closeness, in steps", check=_in(0, 0.5)),
        "measure": Field("str", "bit-widths the turbulence averages over", choices=("allowed", "all")),
        "ema": Field("float", "turbulence EMA decay (0: snapshot)", check=_in(0, 1, hi_open=True)),
        "which": Field("str", "bit-width a chosen layer loses", choices=("lowest", "most_turbulent")),
        "cumulative": Field("bool", "a re-chosen layer loses one more bit-width"),
        "freeze_acts": Field("bool", "also drop the layer's lowest activation bit-width"),
        "observe_every": Field("int", "steps between turbulence measurements", check=_gt(0)),
    },
    "r2": {
        "enabled": Field("bool", "R2 range-restriction loss"),
        "kind": Field("str", "R2 variant", choices=("linf", "margin", "softminmax")),
        "weight": Field("float", "lambda in loss = CE + lambda * R2", check=_ge(0)),
        "eta": Field("float", "soft-min-max temperature penalty", check=_ge(0)),
        "init_margin": Field("float", "initial margin (null: max|W|)", nullable=True, check=_gt(0)),
        "init_temperature": Field("float", "initial soft-min-max temperature (null: 10 / std(W))",
                                  nullable=True, check=_gt(0)),
    },
    "quant_noise": {
        "enabled": Field("bool", "Quant-Noise"),
        "p": Field("float", "fraction of weight blocks quantized per training forward", check=_in(0, 1)),
        "block": Field("int", "block size (consecutive weights of one output channel)", check=_gt(0)),
    },
    "aqt": {
        "enabled": Field("bool", "AQT-style activation clip calibration"),
        "warmup": Field("float", "fraction of training before the calibration", check=_in(0, 1)),
        "warmup_steps": Field("int", "steps before the calibration (null: from warmup)", nullable=True,
                              check=_gt(0)),
        "ema": Field("float", "EMA decay", check=_in(0, 1, hi_open=True)),
        "freeze": Field("bool", "keep the calibrated activation step sizes fixed"),
        "float_warmup": Field("bool", "activations stay float until the calibration"),
        "per_channel": Field("bool", "per-channel activation statistics"),
    },
    "eval": {
        "every_epochs": Field("int", "epochs between evaluations (the last epoch always)", check=_gt(0)),
        "uniform_bits": Field("int_list", "uniform configs evaluated"),
        "random_configs": Field("int", "fixed random configs evaluated", check=_ge(0)),
        "bn_recalib_batches": Field("int", "batches of BN re-calibration per config", check=_ge(0)),
        "recalibrate_switchable": Field("bool", "re-estimate switchable BN too (evaluation and search)"),
    },
    "output": {
        "dir": Field("str", "parent folder of runs"),
        "name": Field("str", "run name: the run folder is <dir>/<name>"),
        "checkpoint_every": Field("int", "steps between checkpoints (0: epoch ends only)", check=_ge(0)),
        "keep_last": Field("int", "step-numbered checkpoints kept", check=_ge(1)),
        "log_every": Field("int", "steps between TensorBoard scalars", check=_gt(0)),
        "progress": Field("bool", "tqdm progress bar"),
    },
    "dist": {
        "backend": Field("str", "process-group backend", choices=("auto", "nccl", "gloo")),
        "timeout_min": Field("float", "collective timeout in minutes", check=_gt(0)),
    },
}


def default_config() -> Dict[str, Any]:
    """The embedded default config (a fresh copy)."""
    return yaml.safe_load(DEFAULT_YAML)


# ----------------------------------------------------------------------------- validation
def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _coerce(key: str, f: Field, v: Any) -> Any:
    """Check the kind of ``v``; returns the normalised value or raises UserError."""
    if v is None:
        if f.nullable:
            return None
        raise UserError(f"{key}: must not be null")
    k = f.kind
    if k == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{key}: expected an integer, got {v!r} ({_type_name(v)})")
        return int(v)
    if k == "float":
        if isinstance(v, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                v = float(v)
            except ValueError:
                raise UserError(f"{key}: expected a number, got {v!r} (str)") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{key}: expected a number, got {v!r} ({_type_name(v)})")
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise UserError(f"{key}: must be a finite number, got {v!r}")
        return v
    if k == "bool":
        if not isinstance(v, bool):
            raise UserError(f"{key}: expected true or false, got {v!r} ({_type_name(v)})")
        return v
    if k == "str":
        if not isinstance(v, str) or not v:
            raise UserError(f"{key}: expected a non-empty string, got {v!r} ({_type_name(v)})")
        if f.choices is not None and v not in f.choices:
            raise UserError(f"{key}: {v!r} is not allowed; allowed: {list(f.choices)}")
        return v
    if k in ("bits", "int_list", "str_list"):
        if isinstance(v, (int, str)) and not isinstance(v, bool) and k != "str_list":
            v = [v] if isinstance(v, int) else v
        if not isinstance(v, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {v!r} ({_type_name(v)})")
        v = list(v)
        want = str if k == "str_list" else int
        for x in v:
            if isinstance(x, bool) or not isinstance(x, want):
                raise UserError(f"{key}: expected a list of {'strings' if want is str else 'integers'}, "
                                f"got element {x!r} ({_type_name(x)})")
        if k == "bits":
            if not v:
                raise UserError(f"{key}: the candidate bit-width list must not be empty")
            for b in v:
                if b not in SUPPORTED_BITS:
                    raise UserError(f"{key}: bit-width {b} is not supported; allowed: {list(SUPPORTED_BITS)}")
            if len(set(v)) != len(v):
                raise UserError(f"{key}: duplicate bit-widths in {v}")
        return v
    if k == "resume":
        if v is False or (isinstance(v, str) and v):
            return v
        raise UserError(f"{key}: expected false, 'auto' or a checkpoint path, got {v!r}")
    raise AssertionError(k)


def validate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Validate a full config dict (all sections, all keys); returns a normalised deep copy."""
    if not isinstance(cfg, dict):
        raise UserError(f"config: expected a mapping of sections, got {_type_name(cfg)}")
    out: Dict[str, Any] = {}
    for section in cfg:
        if section not in SCHEMA:
            raise _unknown_section(section)
    for section, fields in SCHEMA.items():
        values = cfg.get(section)
        if not isinstance(values, dict):
            raise UserError(f"{section}: expected a mapping of keys, got {_type_name(values)}")
        for key in values:
            if key not in fields:
                raise _unknown_key(section, key)
        sec = {}
        for key, f in fields.items():
            name = f"{section}.{key}"
            if key not in values:
                raise UserError(f"{name}: missing")
            v = _coerce(name, f, values[key])
            if v is not None and f.check is not None:
                msg = f.check(v)
                if msg:
                    raise UserError(f"{name}: {msg}")
            sec[key] = v
        out[section] = sec
    _cross_checks(out)
    return out


def _cross_checks(c: Dict[str, Any]) -> None:
    t = c["train"]
    if t["min_lr"] > t["lr"]:
        raise UserError(f"train.min_lr: must be <= train.lr ({t['lr']}), got {t['min_lr']}")
    if (c["distill"]["enabled"] or c["idm"]["enabled"]) and t["order"][0] != "max":
        raise UserError(f"train.order: 'max' must come first when distill or idm is enabled (it is "
                        f"the teacher), got {t['order']}")
    s = c["scheduler"]
    if s["ratio_end"] > s["ratio_start"]:
        raise UserError(f"scheduler.ratio_end: must be <= scheduler.ratio_start ({s['ratio_start']}), "
                        f"got {s['ratio_end']}")
    for k in ("uniform_bits",):
        for b in c["eval"][k]:
            if b not in SUPPORTED_BITS:
                raise UserError(f"eval.{k}: bit-width {b} is not supported; allowed: {list(SUPPORTED_BITS)}")
    if c["data"]["batch_size"] % t["micro_batches"]:
        raise UserError(f"train.micro_batches: must divide data.batch_size ({c['data']['batch_size']}), "
                        f"got {t['micro_batches']}")
    for k in c["quant"]["keep_8bit"]:
        if not k:
            raise UserError("quant.keep_8bit: empty layer name")
    name = c["output"]["name"]
    if os.sep in name or name in (".", ".."):
        raise UserError(f"output.name: must be a plain folder name, got {name!r}")
    from .models import check_model_name  # an unknown model fails here, before any data is read
    check_model_name(c["model"]["name"])
    n, data_name = c["model"]["num_classes"], c["data"]["name"]
    if n is not None and data_name in DATASET_CLASSES and n < DATASET_CLASSES[data_name]:
        raise UserError(f"model.num_classes: {n} is fewer than the {DATASET_CLASSES[data_name]} classes of "
                        f"data.name {data_name!r}; use at least {DATASET_CLASSES[data_name]}, or null for "
                        f"the data set's count")


# ----------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (plain YAML keeps the
    last silently, so one of the two values would be ignored without a word)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _did_you_mean(word: Any, choices: Iterable[str]) -> str:
    import difflib
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _unknown_key(section: str, key: Any, where: str = "") -> UserError:
    return UserError(f"{section}.{key}: unknown config key{where}; "
                     f"{_did_you_mean(key, SCHEMA[section])}known keys of {section}: {list(SCHEMA[section])}")


def _unknown_section(section: str, where: str = "") -> UserError:
    return UserError(f"{section}: unknown config section{where}; "
                     f"{_did_you_mean(section, SCHEMA)}known sections: {list(SCHEMA)}")


def parse_value(text: str) -> Any:
    """A command-line value as a YAML scalar or list (``2``, ``0.1``, ``true``, ``null``, ``[2,4]``);
    text that is not valid YAML stays a string."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(cfg: Dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override in place (the key must exist)."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected section.key=value (e.g. train.epochs=2)")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{key}: expected section.key (e.g. train.lr=0.1)")
    section, name = parts
    if section not in SCHEMA:
        raise _unknown_section(section)
    if name not in SCHEMA[section]:
        raise _unknown_key(section, name)
    cfg.setdefault(section, {})[name] = parse_value(text)


def merge(base: Dict[str, Any], over: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Merge a (partial) config over ``base``: sections merge key by key."""
    out = copy.deepcopy(base)
    if over is None:
        return out
    if not isinstance(over, dict):
        raise UserError(f"{where}: expected a mapping of config sections, got {_type_name(over)}")
    for section, values in over.items():
        if section not in SCHEMA:
            raise _unknown_section(section, f" in {where}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{section}: expected a mapping of keys in {where}, got {_type_name(values)}")
        for key, v in values.items():
            if key not in SCHEMA[section]:
                raise _unknown_key(section, key, f" in {where}")
            out[section][key] = v
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    if os.path.isdir(path):
        raise UserError(f"--config: {path!r} is a folder; give a YAML file")
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path!r}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"--config: {path!r} is not valid YAML ({' '.join(first)[:200]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config: cannot read {path!r} ({e})") from None


def load_config(path: Union[str, Sequence[str], None] = None,
                overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Embedded default, then the YAML file(s) ``path`` (one path or a list, merged in order, e.g.
    ``configs/recipe_paper.yaml`` over a model config), then ``section.key=value`` overrides;
    validated. Raises :class:`UserError` naming the offending key."""
    cfg = default_config()
    paths = [] if path is None else [path] if isinstance(path, str) else list(path)
    for p in paths:
        cfg = merge(cfg, read_yaml(p), p)
    for item in overrides:
        apply_override(cfg, item)
    return validate(cfg)


# ----------------------------------------------------------------------------- command-line checks
def check_range(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
                integer: bool = False, lo_open: bool = False, hi_open: bool = False,
                hint: str = "") -> Any:
    """Check one command-line value and return it; raise :class:`UserError` naming the flag, the
    value and what is allowed otherwise. NaN and infinities are always refused; bools are not
    numbers. E.g. ``check_range("--seed", args.seed, 0, MAX_SEED, integer=True)`` raises
    ``--seed: must be an integer in [0, 4611686018427387904], got -1``."""
    import math
    kind = "an integer" if integer else "a number"
    fmt = str if integer else (lambda v: f"{v:g}")
    if lo is not None and hi is not None:
        allowed = f"{kind} in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed = f"{kind} {'>' if lo_open else '>='} {fmt(lo)}"
    elif hi is not None:
        allowed = f"{kind} {'<' if hi_open else '<='} {fmt(hi)}"
    else:
        allowed = f"a finite {'integer' if integer else 'number'}"
    extra = f"; {hint}" if hint else ""
    bad = UserError(f"{name}: must be {allowed}, got {value!r}{extra}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if integer and not isinstance(value, int):
        raise bad
    if not math.isfinite(value):
        raise bad
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise bad
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise bad
    return value


def check_device(name: str, text: Optional[str]):
    """``--device`` text -> ``torch.device`` (None stays None: the caller's default). Only ``cpu``,
    ``cuda`` and ``cuda:N`` with an existing N are allowed; anything else raises :class:`UserError`
    naming the flag, e.g. ``--device: 'meta' is not allowed; allowed: cpu, cuda, cuda:N``."""
    if text is None:
        return None
    import torch
    allowed = "cpu, cuda, cuda:N (N < the number of GPUs)"
    try:
        dev = torch.device(text) if text else None
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"{name}: {text!r} is not allowed; allowed: {allowed}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{name}: {text!r} was asked for but no CUDA device is available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{name}: {text!r} does not exist: this machine has "
                            f"{torch.cuda.device_count()} GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def dump_config(cfg: Dict[str, Any]) -> str:
    """The resolved config as YAML (sections in schema order)."""
    lines = []
    for section, fields in SCHEMA.items():
        lines.append(f"{section}:")
        for key in fields:
            text = yaml.safe_dump(cfg[section][key], default_flow_style=True).strip()
            if text.endswith("\n..."):
                text = text[:-4].strip()
            elif text.endswith("..."):
                text = text[:-3].strip()
            lines.append(f"  {key}: {text}")
    return "\n".join(lines) + "\n"


def describe_schema() -> str:
    """One line per key with its default and meaning (for ``--help``)."""
    d = default_config()
    lines: List[str] = []
    for section, fields in SCHEMA.items():
        for key, f in fields.items():
            kind = f.kind + (" or null" if f.nullable else "")
            if f.choices:
                kind = " | ".join(f.choices)
            default = yaml.safe_dump(d[section][key], default_flow_style=True).strip()
            default = default[:-3].strip() if default.endswith("...") else default
            lines.append(f"  {section}.{key} = {default}  [{kind}] {f.doc}")
    return "\n".join(lines)
