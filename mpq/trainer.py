"""One-shot supernet training: sandwich sampling, in-place distillation, IDM, bit-width freezing,
optional QE loss / model EMA / R2 / Quant-Noise / AQT clip calibration, DDP, AMP, exact resume.

One training step (global batch ``B``, split across ``W`` ranks and ``K`` micro-batches)::

    configs = [max, random_1 .. random_N (, min)]  (train.order; the paper: max + 3 random, no min;
                                                  one generator, seeded alike on every rank, so every
                                                  rank draws the same configs)
    for each micro-batch:
        for each config c:                         (set_bits(net, c))
            logits = net(x)
            max:      loss = CE (+ lambda * R2)    -> teacher logits / features kept, detached
            other:    loss = (1 - w) * CE + w * KD(logits, teacher, T)
                             + idm_weight * IDM(features, teacher features) on the lowest-bit layers
                             (+ qe_weight(t) * QE(weights) on random subnets)
            (loss / K).backward()                  (gradients accumulate into the shared weights; only
                                                    the step sizes of the sampled bit-widths get one)
    all-reduce (average) the gradients over ranks; [clip by value / norm]; optimizer step(s): the
    main one (LR = warm-up + cosine) and, with train.step_optimizer=adam, the step sizes' Adam
    (cosine from train.step_lr to 0); [model EMA update]
    scheduler.step(global_step): at its update steps, one line of scheduler.jsonl

Evaluation (and search, through the checkpoint's ``model_ema``) uses the EMA model when
``train.ema`` is on. See :mod:`mpq.distributed` for why the model is not wrapped in
DistributedDataParallel, and :mod:`mpq.checkpoint` for the checkpoint format.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import checkpoint as ckpt_io
from .config import dump_config
from .data import build_datasets
from .distributed import (DistEnv, ResumableDistributedSampler, all_reduce_gradients, all_reduce_max,
                          all_reduce_sum, any_rank, average_buffers, barrier, broadcast_module, cleanup,
                          init_distributed, shard)
from .batchnorm import recalibrate_bn
from .errors import UserError
from .rundir import RunFolder
from .models import build_model
from .supernet import (calibrate_activations, get_bits, is_pinned, max_config, min_config, quant_layers,
                       quantize_model, random_config, set_bits, uniform_config)


SCHEDULER_LOG = "scheduler.jsonl"


class TrainingInterrupted(Exception):
    """Raised after SIGTERM/SIGINT once rank 0 has written a checkpoint."""

    def __init__(self, signum: int, path: Optional[str]) -> None:
        super().__init__(f"interrupted by signal {signum}; checkpoint: {path}")
        self.signum, self.path = signum, path


# ----------------------------------------------------------------------------- helpers
def previous_run_files(run_dir: str) -> List[str]:
    """The files an earlier training run left in ``run_dir`` (checkpoints, metrics, scheduler log,
    TensorBoard events): a fresh run must not mix with them, nor delete them unasked."""
    import glob
    found = sorted(ckpt_io.step_checkpoints(run_dir).values())
    for name in (ckpt_io.LATEST, "metrics.jsonl", SCHEDULER_LOG):
        if os.path.isfile(os.path.join(run_dir, name)):
            found.append(os.path.join(run_dir, name))
    found += sorted(glob.glob(os.path.join(glob.escape(run_dir), "tb", "events.out.tfevents.*")))
    return found


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def _rng_state(gens: Dict[str, torch.Generator], device: torch.device) -> Dict[str, Any]:
    """All RNG states. Every rank is seeded alike and consumes its RNGs in lockstep, so rank 0's
    states are every rank's states. Only this process's CUDA device is touched."""
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


def _set_rng_state(state: Dict[str, Any], gens: Dict[str, torch.Generator], device: torch.device) -> None:
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


def is_step_size(name: str) -> bool:
    """Whether a parameter name is an LSQ step size (of a weight or activation quantizer)."""
    return ".w_quant." in name or ".a_quant." in name


def _param_groups(net: nn.Module, extra: List[nn.Parameter], weight_decay: float,
                  decay_linear: bool = True, with_steps: bool = True):
    """Weight decay on conv (and, with ``decay_linear``, linear) weights only; none on step sizes,
    BatchNorm, biases, R2 params. ``with_steps=False`` leaves the step sizes out (their own
    optimizer)."""
    decay, no_decay = [], []
    min_dim = 2 if decay_linear else 4
    for name, p in net.named_parameters():
        if not p.requires_grad and not is_step_size(name):
            continue
        if is_step_size(name):
            if with_steps:
                no_decay.append(p)
        elif p.ndim >= min_dim:
            decay.append(p)
        else:
            no_decay.append(p)
    no_decay += list(extra)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def step_size_params(net: nn.Module) -> List[nn.Parameter]:
    """The LSQ step sizes (also the currently frozen ones, e.g. AQT-calibrated: an optimizer skips
    parameters without a gradient)."""
    return [p for n, p in net.named_parameters() if is_step_size(n)]


def spec_of(cfg: Dict[str, Any], num_classes: int, in_channels: int, input_size) -> Dict[str, Any]:
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


def needs_bn_recalibration(cfg: Dict[str, Any]) -> bool:
    """Shared BN always; switchable BN when ``eval.recalibrate_switchable`` (the paper)."""
    return cfg["quant"]["bn"] == "shared" or cfg["eval"]["recalibrate_switchable"]


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Trains a supernet from a validated config (see :mod:`mpq.config`).

    >>> trainer = Trainer(load_config(overrides=["train.epochs=1"]))
    >>> metrics = trainer.fit()          # writes runs/<name>/

    ``step_callback(trainer, global_step)`` is called after every optimizer step (tests use it to
    simulate a crash). The trainer reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment
    (``torchrun``) and runs as a single process without them.
    """

    def __init__(self, cfg: Dict[str, Any], step_callback: Optional[Callable[["Trainer", int], None]] = None,
                 env: Optional[DistEnv] = None, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.step_callback = step_callback
        t, o = cfg["train"], cfg["output"]
        self.env = env or init_distributed(t["device"], cfg["dist"]["backend"], cfg["dist"]["timeout_min"])
        self.device = self.env.device
        self.run_dir = os.path.join(o["dir"], o["name"])
        self.writer = None
        self._stop_signal: Optional[int] = None
        self.metrics: Dict[str, Any] = {}
        self.last_checkpoint: Optional[str] = None
        self._resume_ckpt: Optional[Dict[str, Any]] = None
        self.overwrite = overwrite
        # one job per run folder (rank 0 holds the lock for the whole job)
        self.folder = RunFolder(self.run_dir, "train.py", log_name="train.log", what="output.dir",
                                enabled=self.env.is_main)
        try:
            if t["resume"] not in (False, "auto"):  # refuse a bad checkpoint before loading any data
                self._resume_ckpt = ckpt_io.safe_load(t["resume"], "train.resume")
                ckpt_io.check_format(self._resume_ckpt, t["resume"])
            self._claim_run_dir()
            self._setup()
        except BaseException as e:
            self.folder.close(e)
            cleanup(self.env)
            raise

    def _claim_run_dir(self) -> None:
        """Before any data is loaded: the run folder is writable and not in use (lock), and a fresh
        run does not replace an earlier one unless ``overwrite`` (rank 0 decides, every rank follows)."""
        err: Optional[UserError] = None
        if self.env.is_main:
            try:
                self.folder.open()
                self.folder.start_log()
                earlier = previous_run_files(self.run_dir)
                if earlier and self.cfg["train"]["resume"] is False:
                    if not self.overwrite:
                        raise UserError(
                            f"{self.run_dir} holds an earlier run ({len(earlier)} checkpoint/log "
                            f"file(s)); pass --resume to continue it or --overwrite to replace it "
                            f"(or choose another output.name)")
                    for p in earlier + [os.path.join(self.run_dir, "train.log")]:
                        if os.path.isfile(p):
                            os.unlink(p)
                    print(f"note: --overwrite: removed {len(earlier)} checkpoint/log file(s) of the "
                          f"earlier run in {self.run_dir}", flush=True)
            except UserError as e:
                err = e
        if any_rank(err is not None, self.env):
            raise err or UserError(f"{self.run_dir}: rank 0 refused the run folder")

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        d, t, q = cfg["data"], cfg["train"], cfg["quant"]
        world = env.world_size
        if d["batch_size"] % (world * t["micro_batches"]):
            raise UserError(f"data.batch_size: the global batch size {d['batch_size']} must be divisible "
                            f"by world size x train.micro_batches = {world} x {t['micro_batches']}")
        self.rank_batch = d["batch_size"] // world
        self.info = build_datasets(d["name"], d["root"], d["train_subset"], d["val_subset"], d["seed"],
                                   d["image_size"])
        num_classes = cfg["model"]["num_classes"] or self.info.num_classes
        # identical model init (and global RNG stream) on every rank
        random.seed(t["seed"])
        np.random.seed(t["seed"] % 2 ** 32)
        torch.manual_seed(t["seed"])
        self.config_gen = torch.Generator().manual_seed(t["seed"] + 1)
        self.loader_gen = torch.Generator().manual_seed(t["seed"] + 2)

        # data
        self.sampler = ResumableDistributedSampler(self.info.train, num_replicas=world, rank=env.rank,
                                                   shuffle=True, seed=d["seed"])
        self.steps_per_epoch = self.sampler.full_length // self.rank_batch
        if self.steps_per_epoch < 1:
            raise UserError(f"data.batch_size: {d['batch_size']} is larger than the training set "
                            f"({len(self.info.train)} samples); lower it or enlarge data.train_subset")
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(self.info.train, batch_size=self.rank_batch, sampler=self.sampler,
                                       num_workers=d["workers"], drop_last=True, pin_memory=pin,
                                       generator=self.loader_gen, persistent_workers=False)
        total = t["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, t["max_steps"]) if t["max_steps"] else total
        self.warmup_steps = int(round(t["warmup_epochs"] * self.steps_per_epoch))
        # fixed batches for activation calibration and BN re-calibration (same on every rank)
        g = torch.Generator().manual_seed(d["seed"] + 7)
        perm = torch.randperm(len(self.info.train), generator=g).tolist()
        calib_n = min(len(perm), max(d["batch_size"], 32), 256)
        self.calib_batch = torch.stack([self.info.train[i][0] for i in perm[:calib_n]])
        nrecal = cfg["eval"]["bn_recalib_batches"] * self.rank_batch
        self.recal_loader = DataLoader(Subset(self.info.train, perm[:max(1, nrecal)]),
                                       batch_size=self.rank_batch, shuffle=False,
                                       num_workers=d["workers"], pin_memory=pin)
        self.val_loader = DataLoader(Subset(self.info.val, shard(len(self.info.val), env)),
                                     batch_size=d["eval_batch_size"], shuffle=False,
                                     num_workers=d["workers"], pin_memory=pin)

        # model
        from .models import LOCAL_MODELS, WIDTH_MODELS
        if cfg["model"]["name"] not in LOCAL_MODELS and self.info.in_channels != 3:
            raise UserError(f"model.name: {cfg['model']['name']!r} (a torchvision model) takes 3-channel "
                            f"images, but data.name {d['name']!r} has {self.info.in_channels} channel(s); "
                            f"use small_cnn, small_mobilenet or resnet20")
        float_model = build_model(cfg["model"]["name"], num_classes=num_classes,
                                  in_channels=self.info.in_channels, pretrained=cfg["model"]["pretrained"],
                                  width=cfg["model"]["width"])
        try:
            self.net = quantize_model(float_model, w_bits=q["w_bits"], a_bits=q["a_bits"],
                                      keep_8bit=q["keep_8bit"], per_channel=q["per_channel"], bn=q["bn"],
                                      w_init=q["w_init"], grad_scale=q["grad_scale"],
                                      depthwise_bits=q["depthwise_bits"],
                                      first_input_bits=q["first_input_bits"])
        except ValueError as e:
            raise UserError(f"quant.{e}") from None
        self.spec = spec_of(cfg, num_classes, self.info.in_channels, self.info.input_size)
        # Record the width actually built, so the checkpoint does not depend on a later default.
        if cfg["model"]["name"] in WIDTH_MODELS:
            self.spec["model"]["width"] = float_model.width
        # how evaluation and search treat BN (also in the EMA copy and the checkpoint's spec)
        self.net.mpq_spec["bn_recalibrate"] = needs_bn_recalibration(cfg)
        self.net.to(self.device)
        if t["channels_last"]:
            self.net.to(memory_format=torch.channels_last)
        calib = self._to_device(self.calib_batch)
        calibrate_activations(self.net, calib)
        broadcast_module(self.net, env)
        self.model = torch.compile(self.net) if t["compile"] else self.net
        # model EMA (before any training hook is attached: the copy would carry it)
        self.ema = None
        if t["ema"]:
            from .ema import ModelEma, ema_decay_for
            decay = t["ema_decay"] if t["ema_decay"] is not None else ema_decay_for(self.total_steps)
            self.ema = ModelEma(self.net, decay)

        # losses
        self.r2 = None
        if cfg["r2"]["enabled"]:
            from .losses import R2Loss
            r = cfg["r2"]
            self.r2 = R2Loss(self.net, r["kind"], eta=r["eta"], init_margin=r["init_margin"],
                             init_temperature=r["init_temperature"]).to(self.device)
        self.tap = None
        if cfg["idm"]["enabled"]:
            from .losses import FeatureTap
            self.tap = FeatureTap(self.net, copy=cfg["idm"]["features"] == "post_bn")

        # optimizer(s), AMP: the step sizes either join the main optimizer (no weight decay) or get
        # their own Adam (the paper: lr 1e-5, betas (0.9, 0.999), cosine to 0)
        separate_steps = t["step_optimizer"] == "adam"
        groups = _param_groups(self.net, list(self.r2.parameters()) if self.r2 is not None else [],
                               t["weight_decay"], decay_linear=t["decay_linear"],
                               with_steps=not separate_steps)
        if t["optimizer"] == "sgd":
            self.opt = torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"],
                                       nesterov=t["nesterov"] and t["momentum"] > 0)
        else:
            self.opt = torch.optim.AdamW(groups, lr=t["lr"], betas=(t["momentum"], 0.999))
        self.step_opt = None
        if separate_steps:
            self.step_opt = torch.optim.Adam(step_size_params(self.net), lr=t["step_lr"],
                                             betas=(0.9, 0.999), weight_decay=0.0)
        self.use_amp = t["amp"] and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if t["amp_dtype"] == "float16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

        # bit-width freezing scheduler, AQT
        self.bit_sched = None
        if cfg["scheduler"]["enabled"]:
            from .scheduler import BitWidthFreezingScheduler
            s = cfg["scheduler"]
            self.bit_sched = BitWidthFreezingScheduler(
                self.net, self.total_steps, schedule=s["schedule"], warmup=s["warmup"],
                period=s["period"], late_period=s["late_period"], late_start=s["late_start"],
                ratio_start=s["ratio_start"], ratio_end=s["ratio_end"], threshold=s["threshold"],
                ema=s["ema"], which=s["which"], round=s["round"], measure=s["measure"],
                cumulative=s["cumulative"], freeze_acts=s["freeze_acts"])
        self.aqt = None
        if cfg["aqt"]["enabled"]:
            from .aqt import ActivationClipCalibrator
            a = cfg["aqt"]
            warm = a["warmup_steps"] or max(1, int(round(a["warmup"] * self.total_steps)))
            self.aqt = ActivationClipCalibrator(self.net, warm, a["ema"], a["freeze"],
                                                float_warmup=a["float_warmup"],
                                                per_channel=a["per_channel"])

        # evaluation configs (fixed for the whole run), and how their accuracies are measured: the
        # search measures the same configs its own way (see search.py's config.json "measured")
        self.eval_configs = self._make_eval_configs()
        recal = needs_bn_recalibration(cfg) and cfg["eval"]["bn_recalib_batches"] > 0
        self.measured = {
            "model": "EMA supernet" if self.ema is not None else "supernet",
            "bn": (f"re-calibrated per config on {cfg['eval']['bn_recalib_batches']} batches of "
                   f"{self.rank_batch} training images (fixed, data.seed {d['seed']})" if recal
                   else "running statistics from training (switchable BN)"),
            "eval": f"{len(self.info.val)} held-out samples (val split)"}

        # counters
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.epoch_loader_state = self.loader_gen.get_state()
        self.history: List[Dict[str, Any]] = []
        self.epoch_loss_sums: Dict[str, float] = {}   # this epoch's summed step losses (this rank)
        self.epoch_loss_steps = 0.0

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cfg["train"]["channels_last"] and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _make_eval_configs(self) -> Dict[str, Dict[str, Tuple[int, int]]]:
        net, e = self.net, self.cfg["eval"]
        out = {"max": max_config(net), "min": min_config(net, respect_frozen=False)}
        layers = quant_layers(net)
        for b in e["uniform_bits"]:
            ok = all(is_pinned(m) or
                     (b in m.w_candidates and b in m.a_candidates) for m in layers.values())
            if ok:
                out[f"w{b}a{b}"] = uniform_config(net, b, b)
        g = torch.Generator().manual_seed(1234)
        for i in range(e["random_configs"]):
            out[f"random{i}"] = random_config(net, g, respect_frozen=False)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The full checkpoint (see :mod:`mpq.checkpoint` for the format)."""
        net = self.net
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "spec": self.spec,
            "model": net.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "config": self.cfg,
            "allowed": {n: [int(b) for b in m.w_allowed] for n, m in quant_layers(net).items()},
            "allowed_acts": {n: [int(b) for b in m.a_allowed] for n, m in quant_layers(net).items()},
            "metrics": self.metrics,
            "train_state": {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.env.world_size,
                "complete": self.global_step >= self.total_steps,
                "optimizer": self.opt.state_dict(),
                "step_optimizer": self.step_opt.state_dict() if self.step_opt is not None else None,
                "lr_schedule": {"kind": "warmup_cosine", "step": self.global_step,
                                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps},
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state({"config_gen": self.config_gen}, self.device),
                "loader_gen_epoch_start": self.epoch_loader_state,
                "sampler": {"epoch": self.epoch, "start": self.step_in_epoch * self.rank_batch,
                            "seed": self.cfg["data"]["seed"]},
                "bit_scheduler": self.bit_sched.state_dict() if self.bit_sched is not None else None,
                "r2": self.r2.state_dict() if self.r2 is not None else None,
                "aqt": self.aqt.state_dict() if self.aqt is not None else None,
                "history": self.history,
                "epoch_loss": getattr(self, "_epoch_loss_total", None),
            },
        }

    def load_state_dict(self, ckpt: Dict[str, Any], path: str) -> None:
        """Restore everything from a checkpoint (validated by :func:`mpq.checkpoint.check_compatible`)."""
        ckpt_io.check_compatible(ckpt, self.spec, path)
        ts = ckpt.get("train_state")
        if not isinstance(ts, dict):
            raise UserError(f"checkpoint: {path!r} holds no training state (an exported or stripped "
                            f"supernet?); it cannot be resumed")
        try:
            self.net.load_state_dict(ckpt["model"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["model_ema"] if ckpt.get("model_ema") is not None
                                         else ckpt["model"])
            self.opt.load_state_dict(ts["optimizer"])
            if self.step_opt is not None:
                if ts.get("step_optimizer") is None:
                    raise ValueError("the checkpoint has no step-size optimizer state "
                                     "(it was trained with train.step_optimizer=main)")
                self.step_opt.load_state_dict(ts["step_optimizer"])
            self.scaler.load_state_dict(ts["scaler"])
            if self.bit_sched is not None and ts.get("bit_scheduler"):
                self.bit_sched.load_state_dict(ts["bit_scheduler"])
            else:
                for n, m in quant_layers(self.net).items():
                    if n in ckpt.get("allowed", {}):
                        m.w_allowed = tuple(int(b) for b in ckpt["allowed"][n])
                    if n in ckpt.get("allowed_acts", {}):
                        m.a_allowed = tuple(int(b) for b in ckpt["allowed_acts"][n])
            if self.r2 is not None and ts.get("r2") is not None:
                self.r2.load_state_dict(ts["r2"])
            if self.aqt is not None and ts.get("aqt") is not None:
                self.aqt.load_state_dict(ts["aqt"])
            _set_rng_state(ts["rng"], {"config_gen": self.config_gen}, self.device)
            self.epoch_loader_state = ts["loader_gen_epoch_start"]
            self.epoch, self.step_in_epoch = int(ts["epoch"]), int(ts["step_in_epoch"])
            self.global_step = int(ts["global_step"])
            self.history = list(ts.get("history", []))
            loss_so_far = ts.get("epoch_loss") if self.env.is_main else None  # summed over ranks
            self.epoch_loss_sums = {str(k): float(v) for k, v in (loss_so_far or {}).get("sums", {}).items()}
            self.epoch_loss_steps = float((loss_so_far or {}).get("steps", 0.0))
            if self.step_in_epoch and loss_so_far is None and self.env.is_main:
                self._log("note: this checkpoint predates the saved epoch loss; the resumed epoch's "
                          "train_loss covers only the steps after the resume")
            self.metrics = dict(ckpt.get("metrics") or {})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint: {path!r} cannot be resumed with this config: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
        if int(ts.get("world_size", self.env.world_size)) != self.env.world_size or \
                int(ts.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            self._log(f"warning: resuming with a different world size or epoch length "
                      f"({ts.get('world_size')} -> {self.env.world_size} ranks); the data order differs "
                      f"from an uninterrupted run")
            self.step_in_epoch = min(self.step_in_epoch, self.steps_per_epoch)

    def maybe_resume(self) -> Optional[str]:
        """Resume per ``train.resume`` (false | auto | path); returns the checkpoint used."""
        mode = self.cfg["train"]["resume"]
        if mode is False:
            return None
        if mode == "auto":
            found = ckpt_io.find_latest(self.run_dir, log=self._log)
            if found is None:
                earlier = previous_run_files(self.run_dir)
                if earlier and not self.overwrite:
                    raise UserError(f"train.resume: no valid checkpoint in {self.run_dir}, which holds "
                                    f"{len(earlier)} file(s) of an earlier run; pass --overwrite to "
                                    f"start afresh and replace them")
                if earlier:  # --overwrite
                    for p in earlier:
                        os.unlink(p)
                    self._log(f"note: --overwrite: removed {len(earlier)} file(s) of the earlier run")
                self._log(f"resume: no valid checkpoint in {self.run_dir}; starting from scratch")
                return None
            path, ckpt = found
        else:
            path = mode
            ckpt = self._resume_ckpt or ckpt_io.safe_load(path, "train.resume")
            ckpt_io.check_format(ckpt, path)
            self._resume_ckpt = None
        self.load_state_dict(ckpt, path)
        self._log(f"resumed from {path} at step {self.global_step} (epoch {self.epoch + 1}, "
                  f"{self.step_in_epoch} steps into it)")
        return path

    # ------------------------------------------------------------------ output
    def _log(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def _open_outputs(self) -> None:
        if not self.env.is_main:
            return
        self.folder.keep_log()  # inputs are valid: from here on the job writes into its folder
        if self.global_step > 0:
            for name in (SCHEDULER_LOG, "metrics.jsonl"):
                self._trim_log(name)
        with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(dump_config(self.cfg))
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(self.run_dir, "tb"),
                                    purge_step=self.global_step if self.global_step else None)

    def _scalar(self, tag: str, value: float, step: Optional[int] = None) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, self.global_step if step is None else step)

    def save_checkpoint(self) -> Optional[str]:
        """Write the checkpoint (rank 0): ``ckpt-stepNNNNNNNN.pt``, then ``supernet.pt`` -> it;
        keeps the last ``output.keep_last`` step-numbered ones."""
        average_buffers(self.net, self.env)
        if self.ema is not None:
            average_buffers(self.ema.module, self.env)
        kinds = sorted(self.epoch_loss_sums)  # the epoch's loss so far, summed over ranks
        sums = all_reduce_sum([self.epoch_loss_sums[k] for k in kinds] + [self.epoch_loss_steps], self.env)
        self._epoch_loss_total = {"sums": dict(zip(kinds, sums[:-1])), "steps": sums[-1]}
        if not self.env.is_main:
            return None
        try:
            path = ckpt_io.save_rotating(self.state_dict(), self.run_dir, self.global_step,
                                         self.cfg["output"]["keep_last"])
        except OSError as e:  # a full disk, a quota, a vanished mount: the previous checkpoint is intact
            prev = self.last_checkpoint or "none yet"
            raise UserError(f"output.dir: writing the step-{self.global_step} checkpoint into "
                            f"{self.run_dir!r} failed ({e.strerror or e}); the previous "
                            f"checkpoint ({prev}) is intact: free space, then continue with --resume") from None
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ training step
    def _autocast(self):
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=self.amp_dtype)
        return nullcontext()

    def qe_weight(self) -> float:
        """The quantization-error loss weight of the current step (0 when off or too early)."""
        from .losses import qe_weight_at
        t = self.cfg["train"]
        return qe_weight_at(self.global_step / max(self.total_steps, 1), t["qe_weight"], t["qe_start"])

    def sample_configs(self) -> List[Tuple[str, Dict[str, Tuple[int, int]]]]:
        """The configs of one step, in ``train.order`` (random ones drawn from the shared generator)."""
        out = []
        for kind in self.cfg["train"]["order"]:
            if kind == "max":
                out.append(("max", max_config(self.net)))
            elif kind == "min":
                out.append(("min", min_config(self.net)))
            else:
                for _ in range(self.cfg["train"]["num_random"]):
                    out.append(("random", random_config(self.net, self.config_gen)))
        return out

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        cfg = self.cfg
        t, dcfg, icfg = cfg["train"], cfg["distill"], cfg["idm"]
        net, model = self.net, self.model
        net.train()
        configs = self.sample_configs()
        k = t["micro_batches"]
        self.opt.zero_grad(set_to_none=True)
        if self.step_opt is not None:
            self.step_opt.zero_grad(set_to_none=True)
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        distill = dcfg["enabled"] and dcfg["kd_weight"] > 0
        idm = self.tap is not None and icfg["weight"] > 0
        qe_w = self.qe_weight()
        if distill or idm or qe_w > 0:
            from .losses import idm_feature_loss, kd_loss, lowest_bit_layers, quantization_error_loss
        for m in range(k):
            xm, ym = (x, y) if k == 1 else (x[m::k], y[m::k])
            teacher, t_feats = None, None
            for i, (kind, c) in enumerate(configs):
                set_bits(net, c)
                if self.tap is not None:
                    self.tap.clear()
                    self.tap.enabled = idm
                with self._autocast():
                    logits = model(xm)
                    ce = F.cross_entropy(logits, ym, label_smoothing=t["label_smoothing"])
                    if kind == "max" or teacher is None:
                        loss = ce
                    else:
                        loss = ce
                        if distill:
                            w = dcfg["kd_weight"]
                            loss = (1 - w) * ce + w * kd_loss(logits, teacher, dcfg["temperature"])
                        if idm and t_feats is not None:
                            loss = loss + icfg["weight"] * idm_feature_loss(
                                self.tap.features, t_feats, lowest_bit_layers(net, c),
                                reduction=icfg["reduction"])
                    if kind == "random" and qe_w > 0:   # the paper: random subnets only
                        loss = loss + qe_w * quantization_error_loss(net)
                    if kind == "max":
                        teacher = logits.detach()
                        if idm:
                            t_feats = {n: f.detach() for n, f in self.tap.features.items()}
                        if self.r2 is not None:
                            loss = loss + cfg["r2"]["weight"] * self.r2(net)
                if self.tap is not None:
                    self.tap.enabled = False
                    self.tap.clear()
                self.scaler.scale(loss / k).backward()
                sums[kind] = sums.get(kind, 0.0) + loss.detach().float()
                counts[kind] = counts.get(kind, 0) + 1
            del teacher, t_feats
        params = [p for p in net.parameters()]
        if self.r2 is not None:
            params += list(self.r2.parameters())
        all_reduce_gradients(params, self.env)
        opts = [self.opt] + ([self.step_opt] if self.step_opt is not None else [])
        if t["grad_clip"] or t["grad_clip_value"]:
            for o in opts:
                self.scaler.unscale_(o)
            with_grad = [p for p in params if p.grad is not None]
            if t["grad_clip_value"]:   # the paper: every gradient element into [-1, 1]
                torch.nn.utils.clip_grad_value_(with_grad, t["grad_clip_value"])
            if t["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(with_grad, t["grad_clip"])
        for o in opts:
            self.scaler.step(o)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(net)
        return {kind: float(s) / counts[kind] for kind, s in sums.items()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _accuracy(self, model: nn.Module) -> Tuple[float, float]:
        model.eval()
        correct, total, loss_sum = 0.0, 0.0, 0.0
        for x, y in self.val_loader:
            x, y = self._to_device(x), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = model(x)
            loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            total += y.numel()
        correct, total, loss_sum = all_reduce_sum([correct, total, loss_sum], self.env)
        return 100.0 * correct / max(total, 1), loss_sum / max(total, 1)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Held-out accuracy (%) and loss of the evaluation configs, of the EMA model when
        ``train.ema`` is on. For shared BN (and switchable BN with ``eval.recalibrate_switchable``)
        each config's BN statistics are re-calibrated on fixed training batches first. The state
        (BN running statistics, active bits, Quant-Noise) is restored afterwards."""
        net = self.ema.module if self.ema is not None else self.net
        model = net if self.ema is not None else self.model
        average_buffers(net, self.env)
        saved_buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
        saved_bits = get_bits(net)
        saved_qn = {n: m.quant_noise_p for n, m in quant_layers(net).items()}
        for m in quant_layers(net).values():
            m.quant_noise_p = 1.0
        results: Dict[str, Dict[str, float]] = {}
        done: List[Tuple[Dict, Dict[str, float]]] = []
        nrecal = self.cfg["eval"]["bn_recalib_batches"]
        try:
            for name, c in self.eval_configs.items():
                prev = next((r for cc, r in done if cc == c), None)
                if prev is not None:
                    results[name] = dict(prev)
                    continue
                set_bits(net, c)
                if needs_bn_recalibration(self.cfg) and nrecal > 0:
                    recalibrate_bn(net, self.recal_loader, nrecal)
                acc, loss = self._accuracy(model)
                results[name] = {"acc": acc, "loss": loss}
                done.append((c, results[name]))
        finally:
            named = dict(net.named_buffers())
            for n, b in saved_buffers.items():
                named[n].copy_(b)
            set_bits(net, saved_bits)
            for n, m in quant_layers(net).items():
                m.quant_noise_p = saved_qn[n]
            net.train(net is self.net)
        return results

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self._stop_signal = signum
        if self.env.is_main:
            print(f"\nsignal {signum}: finishing the current step and writing a checkpoint...",
                  file=sys.stderr, flush=True)

    def _install_signals(self):
        old = {}
        import threading
        if threading.current_thread() is not threading.main_thread():
            return old
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, self._on_signal)
        return old

    def _set_quant_noise(self) -> None:
        qn = self.cfg["quant_noise"]
        for m in quant_layers(self.net).values():
            m.quant_noise_p = qn["p"] if qn["enabled"] else 1.0
            m.quant_noise_block = qn["block"]

    def fit(self) -> Dict[str, Any]:
        """Train to the end (or resume and finish); returns the last evaluation's metrics."""
        error: Optional[BaseException] = None
        try:
            return self._fit()
        except BaseException as e:
            error = e
            raise
        finally:
            self.folder.close(error)
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.tap is not None:
                self.tap.remove()
            cleanup(self.env)

    def _fit(self) -> Dict[str, Any]:
        cfg, env = self.cfg, self.env
        t, o = cfg["train"], cfg["output"]
        self.maybe_resume()
        if env.distributed:
            hi, neg_lo = all_reduce_max([float(self.global_step), -float(self.global_step)], env)
            if hi != -neg_lo:
                raise UserError(f"train.resume: the ranks resumed from different steps (this rank: "
                                f"{self.global_step}); every node must see the run folder "
                                f"{self.run_dir!r} (use a shared file system)")
        self._open_outputs()
        if self.global_step >= self.total_steps:
            self._log(f"run {self.run_dir} is already complete ({self.global_step} steps)")
            return self.metrics
        self._set_quant_noise()
        old_handlers = self._install_signals()
        t0 = time.time()
        self._log(f"training {cfg['model']['name']} supernet on {cfg['data']['name']} "
                  f"({len(self.info.train)} samples): {self.total_steps} steps, {self.steps_per_epoch} per "
                  f"epoch, global batch {cfg['data']['batch_size']}, {env.world_size} process(es) on "
                  f"{self.device.type} -> {self.run_dir}")
        try:
            while self.global_step < self.total_steps:
                self._run_epoch(t0)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            for m in quant_layers(self.net).values():
                m.quant_noise_p = 1.0
        barrier(env)
        return self.metrics

    def _run_epoch(self, t0: float) -> None:
        cfg, env = self.cfg, self.env
        t, o = cfg["train"], cfg["output"]
        epoch = self.epoch
        if self.step_in_epoch == 0:
            self.epoch_loader_state = self.loader_gen.get_state()
        else:
            self.loader_gen.set_state(self.epoch_loader_state)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(self.step_in_epoch * self.rank_batch)
        remaining = min(self.steps_per_epoch - self.step_in_epoch, self.total_steps - self.global_step)
        bar = None
        if env.is_main and o["progress"] and remaining > 0:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
                       desc=f"epoch {epoch + 1}/{t['epochs']}", dynamic_ncols=True, file=sys.stderr)
        if self.step_in_epoch == 0:
            self.epoch_loss_sums, self.epoch_loss_steps = {}, 0.0
        ep_sums = self.epoch_loss_sums  # kept in the checkpoint: a resumed epoch's loss covers all of it
        it = iter(self.train_loader) if remaining > 0 else iter(())
        try:
            for x, y in it:
                if self.step_in_epoch >= self.steps_per_epoch or self.global_step >= self.total_steps:
                    break
                lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, t["lr"], t["min_lr"])
                for gr in self.opt.param_groups:
                    gr["lr"] = lr
                if self.step_opt is not None:   # cosine from train.step_lr to 0, no warm-up
                    step_lr = lr_at(self.global_step, self.total_steps, 0, t["step_lr"], 0.0)
                    for gr in self.step_opt.param_groups:
                        gr["lr"] = step_lr
                losses = self.train_step(self._to_device(x), y.to(self.device, non_blocking=True))
                self.global_step += 1
                self.step_in_epoch += 1
                if self.aqt is not None and self.aqt.step(self.global_step):
                    self._log(f"aqt: activation clip bounds calibrated at step {self.global_step}")
                if self.bit_sched is not None:
                    if self.bit_sched.ema > 0 and self.global_step % cfg["scheduler"]["observe_every"] == 0:
                        self.bit_sched.observe()
                    if self.bit_sched.step(self.global_step):
                        self._record_scheduler_update()
                for k, v in losses.items():
                    ep_sums[k] = ep_sums.get(k, 0.0) + v
                self.epoch_loss_steps += 1
                if env.is_main and (self.global_step % o["log_every"] == 0 or self.global_step == 1):
                    for k, v in losses.items():
                        self._scalar(f"loss/{k}", v)
                    self._scalar("lr", lr)
                    if self.bit_sched is not None:
                        self._scalar("sched/frozen", self.bit_sched.num_frozen())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
                if o["checkpoint_every"] and self.global_step % o["checkpoint_every"] == 0:
                    self.save_checkpoint()
                if self.step_callback is not None:
                    self.step_callback(self, self.global_step)
                if any_rank(self._stop_signal is not None, env):
                    signum = self._stop_signal or signal.SIGTERM
                    path = self.save_checkpoint()
                    barrier(env)
                    raise TrainingInterrupted(int(signum), path)
        finally:
            if bar is not None:
                bar.close()
        # end of epoch (or of training)
        last = self.global_step >= self.total_steps
        if self.step_in_epoch < self.steps_per_epoch and not last:
            return  # the loader ran dry early (should not happen with drop_last)
        kinds = sorted(ep_sums)
        sums = all_reduce_sum([ep_sums[k] for k in kinds] + [self.epoch_loss_steps], env)  # mean over ranks
        train_loss = {k: v / max(sums[-1], 1) for k, v in zip(kinds, sums[:-1])}
        due = ((epoch + 1) % cfg["eval"]["every_epochs"] == 0) or last
        if due:
            results = self.evaluate()
            self._record(epoch, train_loss, results, time.time() - t0)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sums, self.epoch_loss_steps = {}, 0.0
        self.epoch_loader_state = self.loader_gen.get_state()
        self.save_checkpoint()

    def _record_scheduler_update(self) -> None:
        """One line of ``scheduler.jsonl`` per freezing update: the full frozen state after it."""
        if not self.env.is_main:
            return
        u = self.bit_sched.last_update or {}
        entry = {"step": self.global_step,
                 "epoch": round(self.global_step / max(self.steps_per_epoch, 1), 4),
                 "ratio": round(float(u.get("ratio", 0.0)), 6), "layers": u.get("layers"),
                 "frozen": self.bit_sched.frozen()}
        if self.bit_sched.freeze_acts:
            entry["frozen_acts"] = self.bit_sched.frozen_acts()
        with open(os.path.join(self.run_dir, SCHEDULER_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self._scalar("sched/frozen_layers", len(entry["frozen"]))
        self._scalar("sched/frozen", self.bit_sched.num_frozen())

    def _trim_log(self, name: str) -> None:
        """On resume, drop the lines of a step-stamped log written after the checkpoint (they will
        be written again): freezing updates, and an epoch recorded just before a crash or from a
        newer checkpoint that turned out damaged."""
        path = os.path.join(self.run_dir, name)
        if not self.env.is_main or not os.path.isfile(path):
            return
        keep = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if int(json.loads(line)["step"]) <= self.global_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)

    def _record(self, epoch: int, train_loss: Dict[str, float], results, elapsed: float) -> None:
        frozen = self.bit_sched.frozen() if self.bit_sched is not None else {}
        entry = {"epoch": epoch + 1, "step": self.global_step, "time_s": round(elapsed, 2),
                 "lr": self.opt.param_groups[0]["lr"],
                 "train_loss": {k: round(v, 5) for k, v in train_loss.items()},
                 "acc": {k: round(v["acc"], 3) for k, v in results.items()},
                 "val_loss": {k: round(v["loss"], 5) for k, v in results.items()},
                 "num_frozen": sum(len(v) for v in frozen.values()), "frozen": frozen,
                 "acc_measured": self.measured}
        self.metrics = entry
        self.history.append({"epoch": entry["epoch"], "step": entry["step"], "acc": entry["acc"]})
        if not self.env.is_main:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        for k, v in results.items():
            self._scalar(f"acc/{k}", v["acc"])
            self._scalar(f"val_loss/{k}", v["loss"])
        accs = " ".join(f"{k} {v['acc']:.2f}" for k, v in results.items())
        losses = " ".join(f"{k} {v:.3f}" for k, v in train_loss.items())
        self._log(f"epoch {epoch + 1}/{self.cfg['train']['epochs']} step {self.global_step} "
                  f"[{elapsed:.0f}s] loss: {losses} | acc%: {accs} | frozen {entry['num_frozen']}")
        if self.writer is not None:
            self.writer.flush()


def train(cfg: Dict[str, Any], step_callback=None) -> Dict[str, Any]:
    """Train a supernet from a validated config; returns the last metrics entry."""
    return Trainer(cfg, step_callback=step_callback).fit()
