"""Building a training run from a validated config: data and loaders, the supernet, the optional
training components (model EMA, R2, IDM feature tap, bit-width freezing scheduler, AQT), and the
facts written into the checkpoint's spec. :class:`mpq.trainer.Trainer` calls these; each one can be
used on its own (tests, benchmarks)."""
from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import checkpoint as ckpt_io
from .data import build_datasets, synthetic_of
from .distributed import DistEnv, ResumableDistributedSampler, any_rank, broadcast_module, shard
from .errors import UserError
from .models import LOCAL_MODELS, WIDTH_MODELS, build_model
from .rundir import RunFolder
from .runlog import METRICS_LOG, SCHEDULER_LOG
from .supernet import calibrate_activations, quantize_model


def previous_run_files(run_dir: str) -> List[str]:
    """The files an earlier training run left in ``run_dir`` (checkpoints, metrics, scheduler log,
    TensorBoard events): a fresh run must not mix with them, nor delete them unasked."""
    found = sorted(ckpt_io.step_checkpoints(run_dir).values())
    for name in (ckpt_io.LATEST, METRICS_LOG, SCHEDULER_LOG):
        if os.path.isfile(os.path.join(run_dir, name)):
            found.append(os.path.join(run_dir, name))
    found += sorted(glob.glob(os.path.join(glob.escape(run_dir), "tb", "events.out.tfevents.*")))
    return found


def _remove(paths: List[str]) -> None:
    for p in paths:
        if os.path.isfile(p):
            os.unlink(p)


def claim_run_dir(folder: RunFolder, run_dir: str, resume: Any, overwrite: bool, env: DistEnv) -> None:
    """Before any data is loaded: the run folder is writable and not in use (its lock), and a fresh
    run (``resume`` false) does not replace an earlier one unless ``overwrite``. Rank 0 decides,
    every rank follows."""
    err: Optional[UserError] = None
    if env.is_main:
        try:
            folder.open()
            folder.start_log()
            earlier = previous_run_files(run_dir)
            if earlier and resume is False:
                if not overwrite:
                    raise UserError(f"{run_dir} holds an earlier run ({len(earlier)} checkpoint/log "
                                    f"file(s)); pass --resume to continue it or --overwrite to replace "
                                    f"it (or choose another output.name)")
                _remove(earlier + [os.path.join(run_dir, "train.log")])
                print(f"note: --overwrite: removed {len(earlier)} checkpoint/log file(s) of the "
                      f"earlier run in {run_dir}", flush=True)
        except UserError as e:
            err = e
    if any_rank(err is not None, env):
        raise err or UserError(f"{run_dir}: rank 0 refused the run folder")


def start_afresh(run_dir: str, overwrite: bool, log: Callable[[str], None]) -> None:
    """``train.resume=auto`` found no valid checkpoint: start from scratch, but replace the files
    of an earlier run only with ``overwrite``."""
    earlier = previous_run_files(run_dir)
    if earlier and not overwrite:
        raise UserError(f"train.resume: no valid checkpoint in {run_dir}, which holds {len(earlier)} "
                        f"file(s) of an earlier run; pass --overwrite to start afresh and replace them")
    if earlier:
        _remove(earlier)
        log(f"note: --overwrite: removed {len(earlier)} file(s) of the earlier run")
    log(f"resume: no valid checkpoint in {run_dir}; starting from scratch")


def needs_bn_recalibration(cfg: Dict[str, Any]) -> bool:
    """Shared BN always; switchable BN when ``eval.recalibrate_switchable`` (the paper)."""
    return cfg["quant"]["bn"] == "shared" or cfg["eval"]["recalibrate_switchable"]


def spec_of(cfg: Dict[str, Any], num_classes: int, in_channels: int, input_size) -> Dict[str, Any]:
    """The checkpoint's spec: what :func:`mpq.checkpoint.build_supernet` needs to rebuild the net."""
    q = cfg["quant"]
    quant = {"w_bits": sorted(q["w_bits"]), "a_bits": sorted(q["a_bits"]),
             "keep_8bit": list(q["keep_8bit"]), "per_channel": bool(q["per_channel"]), "bn": q["bn"]}
    # structural options only when they differ from the default (older checkpoints stay compatible)
    if q["depthwise_bits"] is not None:
        quant["depthwise_bits"] = sorted(q["depthwise_bits"])
    if q["first_input_bits"] != 8:
        quant["first_input_bits"] = int(q["first_input_bits"])
    return {"model": {"name": cfg["model"]["name"], "num_classes": int(num_classes),
                      "in_channels": int(in_channels), "width": cfg["model"]["width"]},
            "quant": quant,
            "input_size": [int(v) for v in input_size],
            "bn_recalibrate": needs_bn_recalibration(cfg)}


def seed_everything(seed: int) -> None:
    """Identical model init and global RNG streams on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class TrainData:
    """The data of a run: the sets, this rank's loaders and the fixed calibration batches."""

    info: Any                     # mpq.data.DataInfo
    sampler: ResumableDistributedSampler
    train_loader: DataLoader
    rank_batch: int               # this rank's batch size
    steps_per_epoch: int
    calib_batch: torch.Tensor     # activation-calibration images (the same on every rank)
    recal_loader: DataLoader      # BN re-calibration batches (fixed training images)
    val_loader: DataLoader        # this rank's shard of the held-out split


def build_train_data(cfg: Dict[str, Any], env: DistEnv, loader_gen: torch.Generator,
                     device: torch.device) -> TrainData:
    d, t = cfg["data"], cfg["train"]
    world = env.world_size
    if d["batch_size"] % (world * t["micro_batches"]):
        raise UserError(f"data.batch_size: the global batch size {d['batch_size']} must be divisible "
                        f"by world size x train.micro_batches = {world} x {t['micro_batches']}")
    rank_batch = d["batch_size"] // world
    info = build_datasets(d["name"], d["root"], d["train_subset"], d["val_subset"], d["seed"],
                          d["image_size"], synthetic=synthetic_of(d))
    # seeded here, before anything below draws (a training transform of the calibration images, the
    # model init): the same init and RNG streams on every rank
    seed_everything(t["seed"])
    sampler = ResumableDistributedSampler(info.train, num_replicas=world, rank=env.rank, shuffle=True,
                                          seed=d["seed"])
    steps_per_epoch = sampler.full_length // rank_batch
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size: {d['batch_size']} is larger than the training set "
                        f"({len(info.train)} samples); lower it or enlarge data.train_subset")
    pin = device.type == "cuda"
    train_loader = DataLoader(info.train, batch_size=rank_batch, sampler=sampler,
                              num_workers=d["workers"], drop_last=True, pin_memory=pin,
                              generator=loader_gen, persistent_workers=False)
    # fixed batches for activation calibration and BN re-calibration (same on every rank)
    g = torch.Generator().manual_seed(d["seed"] + 7)
    perm = torch.randperm(len(info.train), generator=g).tolist()
    calib_n = min(len(perm), max(d["batch_size"], 32), 256)
    calib_batch = torch.stack([info.train[i][0] for i in perm[:calib_n]])
    nrecal = cfg["eval"]["bn_recalib_batches"] * rank_batch
    recal_loader = DataLoader(Subset(info.train, perm[:max(1, nrecal)]), batch_size=rank_batch,
                              shuffle=False, num_workers=d["workers"], pin_memory=pin)
    val_loader = DataLoader(Subset(info.val, shard(len(info.val), env.rank, env.world_size)),
                            batch_size=d["eval_batch_size"], shuffle=False, num_workers=d["workers"],
                            pin_memory=pin)
    return TrainData(info, sampler, train_loader, rank_batch, steps_per_epoch, calib_batch,
                     recal_loader, val_loader)


def build_training_supernet(cfg: Dict[str, Any], info, device: torch.device, env: DistEnv,
                            calib_batch: torch.Tensor):
    """``(net, spec)``: the float model quantized per ``quant``, on ``device``, activation step sizes
    calibrated on ``calib_batch``, and the same weights on every rank."""
    d, q, t = cfg["data"], cfg["quant"], cfg["train"]
    name = cfg["model"]["name"]
    if name not in LOCAL_MODELS and info.in_channels != 3:
        raise UserError(f"model.name: {name!r} (a torchvision model) takes 3-channel images, but "
                        f"data.name {d['name']!r} has {info.in_channels} channel(s); use small_cnn, "
                        f"small_mobilenet or resnet20")
    num_classes = cfg["model"]["num_classes"] or info.num_classes
    float_model = build_model(name, num_classes=num_classes, in_channels=info.in_channels,
                              pretrained=cfg["model"]["pretrained"], width=cfg["model"]["width"])
    try:
        net = quantize_model(float_model, w_bits=q["w_bits"], a_bits=q["a_bits"], keep_8bit=q["keep_8bit"],
                             per_channel=q["per_channel"], bn=q["bn"], w_init=q["w_init"],
                             grad_scale=q["grad_scale"], depthwise_bits=q["depthwise_bits"],
                             first_input_bits=q["first_input_bits"])
    except ValueError as e:
        raise UserError(f"quant.{e}") from None
    spec = spec_of(cfg, num_classes, info.in_channels, info.input_size)
    if name in WIDTH_MODELS:  # the width actually built: the checkpoint must not depend on a default
        spec["model"]["width"] = float_model.width
    # how evaluation and search treat BN (also in the EMA copy and the checkpoint's spec)
    net.mpq_spec["bn_recalibrate"] = needs_bn_recalibration(cfg)
    net.to(device)
    if t["channels_last"]:
        net.to(memory_format=torch.channels_last)
    calibrate_activations(net, to_device(calib_batch, device, t["channels_last"]))
    broadcast_module(net, env)
    return net, spec


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class Components:
    """The optional parts of training (each ``None`` when off in the config)."""

    ema: Optional[nn.Module] = None        # mpq.ema.ModelEma
    r2: Optional[nn.Module] = None         # mpq.losses.R2Loss
    tap: Optional[Any] = None              # mpq.losses.FeatureTap (IDM)
    bit_sched: Optional[Any] = None        # mpq.scheduler.BitWidthFreezingScheduler
    aqt: Optional[Any] = None              # mpq.aqt.ActivationClipCalibrator


def build_components(cfg: Dict[str, Any], net: nn.Module, total_steps: int,
                     device: torch.device) -> Components:
    t, parts = cfg["train"], Components()
    if t["ema"]:  # before any training hook is attached: the copy would carry it
        from .ema import ModelEma, ema_decay_for
        parts.ema = ModelEma(net, t["ema_decay"] if t["ema_decay"] is not None else ema_decay_for(total_steps))
    if cfg["r2"]["enabled"]:
        from .losses import R2Loss
        r = cfg["r2"]
        parts.r2 = R2Loss(net, r["kind"], eta=r["eta"], init_margin=r["init_margin"],
                          init_temperature=r["init_temperature"]).to(device)
    if cfg["idm"]["enabled"]:
        from .losses import FeatureTap
        parts.tap = FeatureTap(net, copy=cfg["idm"]["features"] == "post_bn")
    if cfg["scheduler"]["enabled"]:
        from .scheduler import BitWidthFreezingScheduler
        s = cfg["scheduler"]
        parts.bit_sched = BitWidthFreezingScheduler(
            net, total_steps, schedule=s["schedule"], warmup=s["warmup"], period=s["period"],
            late_period=s["late_period"], late_start=s["late_start"], ratio_start=s["ratio_start"],
            ratio_end=s["ratio_end"], threshold=s["threshold"], ema=s["ema"], which=s["which"],
            round=s["round"], measure=s["measure"], cumulative=s["cumulative"], freeze_acts=s["freeze_acts"])
    if cfg["aqt"]["enabled"]:
        from .aqt import ActivationClipCalibrator
        a = cfg["aqt"]
        warm = a["warmup_steps"] or max(1, int(round(a["warmup"] * total_steps)))
        parts.aqt = ActivationClipCalibrator(net, warm, a["ema"], a["freeze"], float_warmup=a["float_warmup"],
                                             per_channel=a["per_channel"])
    return parts


def measured_note(cfg: Dict[str, Any], with_ema: bool, rank_batch: int, n_val: int) -> Dict[str, str]:
    """How the training's accuracies are measured (``acc_measured`` in metrics.jsonl): the search
    measures the same configs its own way (search.py's config.json ``measured``)."""
    e, d = cfg["eval"], cfg["data"]
    recal = needs_bn_recalibration(cfg) and e["bn_recalib_batches"] > 0
    return {"model": "EMA supernet" if with_ema else "supernet",
            "bn": (f"re-calibrated per config on {e['bn_recalib_batches']} batches of {rank_batch} "
                   f"training images (fixed, data.seed {d['seed']})" if recal
                   else "running statistics from training (switchable BN)"),
            "eval": f"{n_val} held-out samples (val split)"}
