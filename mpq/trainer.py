"""One-shot supernet training: the loop of the paper's algorithm.

One training step (global batch ``B``, split across ``W`` ranks and ``K`` micro-batches)::

    configs = sample_configs(...)                  [max, random_1 .. random_N (, min)] (mpq.sandwich)
    for each micro-batch:
        for each config c:                         set_bits(net, c)
            logits = net(x)
            loss = SubnetLoss(c)                   max: CE (+ R2); others: CE/KD mix (+ IDM, QE);
                                                   the max subnet's logits/features are the teacher
            (loss / K).backward()                  gradients accumulate into the shared weights; only
                                                   the step sizes of the sampled bit-widths get one
    gradients averaged over ranks by DDP during the last backward; [clip]; optimizer step(s) (mpq.optim);
    [model EMA update]; bit-width freezing scheduler step (mpq.scheduler); [AQT calibration]

The parts live in their own modules: set-up (:mod:`mpq.train_setup`), sampling and losses
(:mod:`mpq.sandwich`, :mod:`mpq.losses`), optimizers and LR schedule (:mod:`mpq.optim`),
evaluation (:mod:`mpq.evaluation`), the run's records (:mod:`mpq.runlog`), the checkpointed state
(:mod:`mpq.train_state`, :mod:`mpq.checkpoint`). Evaluation (and search, through the checkpoint's
``model_ema``) uses the EMA model when ``train.ema`` is on. See :mod:`mpq.distributed` for why the
model is wrapped in DistributedDataParallel (one all-reduce per step, in the last backward).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt_io
from .config import dump_config
from .distributed import (DistEnv, all_reduce_gradients, all_reduce_max, all_reduce_sum, any_rank,
                          average_buffers, barrier, cleanup, init_distributed, wrap_ddp)
from .errors import UserError
from .evaluation import evaluate_configs
from .optim import build_optimizers, set_learning_rates
from .rundir import RunFolder
from .runlog import RunLog, epoch_summary, metrics_entry
from .sandwich import SubnetLoss, evaluation_configs, sample_configs
from .supernet import BitConfig, drop_unused_step_grads, quant_layers, set_bits, use_tensor_bits
from .train_setup import (build_components, build_train_data, build_training_supernet, claim_run_dir,
                          measured_note, needs_bn_recalibration, start_afresh, to_device)
from .train_state import restore_training_state, training_state


class TrainingInterrupted(Exception):
    """Raised after SIGTERM/SIGINT once rank 0 has written a checkpoint."""

    def __init__(self, signum: int, path: Optional[str]) -> None:
        super().__init__(f"interrupted by signal {signum}; checkpoint: {path}")
        self.signum, self.path = signum, path


class Trainer:
    """Trains a supernet from a validated config (see :mod:`mpq.config`).

    >>> trainer = Trainer(load_config(overrides=["train.epochs=1"]))
    >>> metrics = trainer.fit()          # writes runs/<name>/

    ``step_callback(trainer, global_step)`` is called after every optimizer step (tests use it to
    simulate a crash). The trainer reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment
    (``torchrun``) and runs as a single process without them. ``overwrite``: a fresh run may replace
    an earlier run in its folder (otherwise it refuses).
    """

    def __init__(self, cfg: Dict[str, Any], step_callback: Optional[Callable[["Trainer", int], None]] = None,
                 env: Optional[DistEnv] = None, overwrite: bool = False) -> None:
        self.cfg, self.step_callback, self.overwrite = cfg, step_callback, overwrite
        t, o = cfg["train"], cfg["output"]
        self.env = env or init_distributed(t["device"], cfg["dist"]["backend"], cfg["dist"]["timeout_min"])
        self.device = self.env.device
        self.run_dir = os.path.join(o["dir"], o["name"])
        self.log = RunLog(self.run_dir, enabled=self.env.is_main)
        self._stop_signal: Optional[int] = None
        self.metrics: Dict[str, Any] = {}
        self.last_checkpoint: Optional[str] = None
        self._resume_ckpt: Optional[Dict[str, Any]] = None
        self.tap = None
        # one job per run folder (rank 0 holds the lock for the whole job)
        self.folder = RunFolder(self.run_dir, "train.py", log_name="train.log", what="output.dir",
                                enabled=self.env.is_main)
        try:
            if t["resume"] not in (False, "auto"):  # refuse a bad checkpoint before loading any data
                self._resume_ckpt = ckpt_io.safe_load(t["resume"], "train.resume")
                ckpt_io.check_format(self._resume_ckpt, t["resume"])
            claim_run_dir(self.folder, self.run_dir, self.cfg["train"]["resume"], overwrite, self.env)
            self._setup()
        except BaseException as e:
            self.folder.close(e)
            cleanup(self.env)
            raise

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg["train"]
        self.config_gen = torch.Generator().manual_seed(t["seed"] + 1)
        self.loader_gen = torch.Generator().manual_seed(t["seed"] + 2)
        data = build_train_data(cfg, self.env, self.loader_gen, self.device)
        self.info, self.sampler, self.train_loader = data.info, data.sampler, data.train_loader
        self.rank_batch, self.steps_per_epoch = data.rank_batch, data.steps_per_epoch
        self.recal_loader, self.val_loader = data.recal_loader, data.val_loader
        total = t["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, t["max_steps"]) if t["max_steps"] else total
        self.warmup_steps = int(round(t["warmup_epochs"] * self.steps_per_epoch))
        self.net, self.spec = build_training_supernet(cfg, self.info, self.device, self.env, data.calib_batch)
        if t["compile"]:   # one traced graph for every bit configuration (no recompile per subnet)
            use_tensor_bits(self.net)
        self.model = torch.compile(self.net) if t["compile"] else self.net   # evaluation
        self.ddp = wrap_ddp(self.net, self.env)   # gradient all-reduce overlapped with the last backward
        self.train_model = self.model if self.ddp is None else (
            torch.compile(self.ddp) if t["compile"] else self.ddp)
        parts = build_components(cfg, self.net, self.total_steps, self.device)
        self.ema, self.r2, self.tap, self.bit_sched, self.aqt = (parts.ema, parts.r2, parts.tap,
                                                                 parts.bit_sched, parts.aqt)
        self.opt, self.step_opt = build_optimizers(
            self.net, list(self.r2.parameters()) if self.r2 is not None else [], t)
        self.amp_dtype = torch.float16 if t["amp_dtype"] == "float16" else torch.bfloat16
        # CUDA: bf16 or fp16 (with GradScaler); CPU autocast: bf16 only (fp16 there stays fp32)
        self.use_amp = t["amp"] and (self.device.type == "cuda" or self.amp_dtype == torch.bfloat16)
        if t["amp"] and not self.use_amp:
            self.log.print(f"note: train.amp with amp_dtype float16 needs CUDA; training in float32 "
                           f"on {self.device.type} (amp_dtype bfloat16 runs there)")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        d, i = cfg["distill"], cfg["idm"]
        self.subnet_loss = SubnetLoss(
            label_smoothing=t["label_smoothing"], kd_weight=d["kd_weight"] if d["enabled"] else 0.0,
            temperature=d["temperature"], idm_weight=i["weight"] if self.tap is not None else 0.0,
            idm_reduction=i["reduction"], r2=self.r2, r2_weight=cfg["r2"]["weight"])
        self.eval_configs = evaluation_configs(self.net, cfg["eval"]["uniform_bits"], cfg["eval"]["random_configs"])
        self.measured = measured_note(cfg, self.ema is not None, self.rank_batch, len(self.info.val))
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.epoch_loader_state = self.loader_gen.get_state()
        self.history: List[Dict[str, Any]] = []
        self.epoch_loss_sums: Dict[str, float] = {}   # this epoch's summed step losses (this rank)
        self.epoch_loss_steps = 0.0
        self.epoch_loss_total: Optional[Dict[str, Any]] = None   # ... over all ranks, at the last save

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return training_state(self)

    def load_state_dict(self, ckpt: Dict[str, Any], path: str) -> None:
        restore_training_state(self, ckpt, path)

    def maybe_resume(self) -> Optional[str]:
        """Resume per ``train.resume`` (false | auto | path); returns the checkpoint used."""
        mode = self.cfg["train"]["resume"]
        if mode is False:
            return None
        if mode == "auto":
            found = ckpt_io.find_latest(self.run_dir, log=self.log.print)
            if found is None:
                start_afresh(self.run_dir, self.overwrite, self.log.print)
                return None
            path, ckpt = found
        else:
            path = mode
            ckpt = self._resume_ckpt or ckpt_io.safe_load(path, "train.resume")
            ckpt_io.check_format(ckpt, path)
            self._resume_ckpt = None
        self.load_state_dict(ckpt, path)
        self.log.print(f"resumed from {path} at step {self.global_step} (epoch {self.epoch + 1}, "
                       f"{self.step_in_epoch} steps into it)")
        return path

    def save_checkpoint(self) -> Optional[str]:
        """Write the checkpoint (rank 0): ``ckpt-stepNNNNNNNN.pt``, then ``supernet.pt`` -> it;
        keeps the last ``output.keep_last`` step-numbered ones."""
        average_buffers(self.net, self.env)
        if self.ema is not None:
            average_buffers(self.ema.module, self.env)
        kinds = sorted(self.epoch_loss_sums)  # the epoch's loss so far, summed over ranks
        sums = all_reduce_sum([self.epoch_loss_sums[k] for k in kinds] + [self.epoch_loss_steps], self.env)
        self.epoch_loss_total = {"sums": dict(zip(kinds, sums[:-1])), "steps": sums[-1]}
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

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.use_amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    def _no_sync(self, skip: bool):
        """DDP's ``no_sync()`` (gradients accumulate locally) for every pass but a step's last."""
        return self.ddp.no_sync() if skip and self.ddp is not None else nullcontext()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device, self.cfg["train"]["channels_last"])

    def qe_weight(self) -> float:
        """The quantization-error loss weight of the current step (0 when off or too early)."""
        from .losses import qe_weight_at
        t = self.cfg["train"]
        return qe_weight_at(self.global_step / max(self.total_steps, 1), t["qe_weight"], t["qe_start"])

    def sample_configs(self) -> List[Tuple[str, BitConfig]]:
        """The configs of one step, in ``train.order`` (random ones drawn from the shared generator)."""
        t = self.cfg["train"]
        return sample_configs(self.net, t["order"], t["num_random"], self.config_gen)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """One optimizer step over the sampled subnets; returns the mean loss of each kind."""
        t, net, k = self.cfg["train"], self.net, self.cfg["train"]["micro_batches"]
        net.train()
        configs = self.sample_configs()
        opts = [self.opt] + ([self.step_opt] if self.step_opt is not None else [])
        for o in opts:
            o.zero_grad(set_to_none=True)
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        idm = self.subnet_loss.idm_weight > 0
        qe_w = self.qe_weight()
        passes = k * len(configs)
        for m in range(k):
            xm, ym = (x, y) if k == 1 else (x[m::k], y[m::k])
            teacher, t_feats = None, None
            for i, (kind, c) in enumerate(configs):
                set_bits(net, c)
                if self.tap is not None:
                    self.tap.clear()
                    self.tap.enabled = idm
                last_pass = m * len(configs) + i == passes - 1   # DDP all-reduces in this backward
                with self._no_sync(not last_pass):
                    with self._autocast():
                        logits = self.train_model(xm)
                        features = self.tap.features if idm else None
                        loss = self.subnet_loss(kind, logits, ym, net, c, teacher, features, t_feats, qe_w)
                        if kind == "max":   # the teacher of the other subnets of this micro-batch
                            teacher = logits.detach()
                            if idm:
                                t_feats = {n: f.detach() for n, f in features.items()}
                    if self.tap is not None:
                        self.tap.enabled = False
                        self.tap.clear()
                    self.scaler.scale(loss / k).backward()
                sums[kind] = sums.get(kind, 0.0) + loss.detach().float()
                counts[kind] = counts.get(kind, 0) + 1
            del teacher, t_feats
        if t["compile"]:   # tensor bits gave every step size a gradient: zeros where no subnet ran it
            drop_unused_step_grads(net, [c for _, c in configs])
        r2_params = list(self.r2.parameters()) if self.r2 is not None else []
        all_reduce_gradients(r2_params, self.env)   # outside the DDP module
        params = list(net.parameters()) + r2_params
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

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Held-out accuracy (%) and loss of the evaluation configs (:mod:`mpq.evaluation`), of the
        EMA model when ``train.ema`` is on."""
        net = self.ema.module if self.ema is not None else self.net
        nrecal = self.cfg["eval"]["bn_recalib_batches"] if needs_bn_recalibration(self.cfg) else 0
        return evaluate_configs(net, net if self.ema is not None else self.model, self.eval_configs,
                                self.val_loader, self.recal_loader, nrecal, self.device, self.env,
                                self._to_device, self._autocast, train_after=net is self.net)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self._stop_signal = signum
        if self.env.is_main:
            print(f"\nsignal {signum}: finishing the current step and writing a checkpoint...",
                  file=sys.stderr, flush=True)

    def _install_signals(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _set_quant_noise(self, on: bool) -> None:
        qn = self.cfg["quant_noise"]
        for m in quant_layers(self.net).values():
            m.quant_noise_p = qn["p"] if on and qn["enabled"] else 1.0
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
            self.log.close()
            if self.tap is not None:
                self.tap.remove()
            cleanup(self.env)

    def _fit(self) -> Dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.maybe_resume()
        if env.distributed:
            hi, neg_lo = all_reduce_max([float(self.global_step), -float(self.global_step)], env)
            if hi != -neg_lo:
                raise UserError(f"train.resume: the ranks resumed from different steps (this rank: "
                                f"{self.global_step}); every node must see the run folder "
                                f"{self.run_dir!r} (use a shared file system)")
        if env.is_main:
            self.folder.keep_log()  # inputs are valid: from here on the job writes into its folder
        self.log.open(dump_config(cfg), self.global_step)
        if self.global_step >= self.total_steps:
            self.log.print(f"run {self.run_dir} is already complete ({self.global_step} steps)")
            return self.metrics
        self._set_quant_noise(True)
        old_handlers = self._install_signals()
        t0 = time.time()
        self.log.print(f"training {cfg['model']['name']} supernet on {cfg['data']['name']} "
                       f"({len(self.info.train)} samples): {self.total_steps} steps, {self.steps_per_epoch} "
                       f"per epoch, global batch {cfg['data']['batch_size']}, {env.world_size} process(es) "
                       f"on {self.device.type} -> {self.run_dir}")
        try:
            while self.global_step < self.total_steps:
                self._run_epoch(t0)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self._set_quant_noise(False)
        barrier(env)
        return self.metrics

    def _progress_bar(self, remaining: int):
        if not (self.env.is_main and self.cfg["output"]["progress"] and remaining > 0):
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
                    desc=f"epoch {self.epoch + 1}/{self.cfg['train']['epochs']}", dynamic_ncols=True,
                    file=sys.stderr)

    def _run_epoch(self, t0: float) -> None:
        env, t, o = self.env, self.cfg["train"], self.cfg["output"]
        if self.step_in_epoch == 0:
            self.epoch_loader_state = self.loader_gen.get_state()
            self.epoch_loss_sums, self.epoch_loss_steps = {}, 0.0
        else:  # resumed mid-epoch: the same order, from the next batch; the loss sums came with it
            self.loader_gen.set_state(self.epoch_loader_state)
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.step_in_epoch * self.rank_batch)
        remaining = min(self.steps_per_epoch - self.step_in_epoch, self.total_steps - self.global_step)
        bar = self._progress_bar(remaining)
        it = iter(self.train_loader) if remaining > 0 else iter(())
        try:
            for x, y in it:
                if self.step_in_epoch >= self.steps_per_epoch or self.global_step >= self.total_steps:
                    break
                lr = set_learning_rates(self.opt, self.step_opt, self.global_step, self.total_steps,
                                        self.warmup_steps, t)
                losses = self.train_step(self._to_device(x), y.to(self.device, non_blocking=True))
                self.global_step += 1
                self.step_in_epoch += 1
                self._after_step(losses, lr, bar)
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
        last = self.global_step >= self.total_steps
        if self.step_in_epoch < self.steps_per_epoch and not last:
            return  # the loader ran dry early (should not happen with drop_last)
        self._end_epoch(t0, last)

    def _after_step(self, losses: Dict[str, float], lr: float, bar) -> None:
        """Per-step bookkeeping: AQT calibration, the freezing scheduler, loss sums, scalars."""
        if self.aqt is not None and self.aqt.step(self.global_step):
            self.log.print(f"aqt: activation clip bounds calibrated at step {self.global_step}")
        if self.bit_sched is not None:
            if self.bit_sched.ema > 0 and self.global_step % self.cfg["scheduler"]["observe_every"] == 0:
                self.bit_sched.observe()
            if self.bit_sched.step(self.global_step):
                self._record_scheduler_update()
        for k, v in losses.items():
            self.epoch_loss_sums[k] = self.epoch_loss_sums.get(k, 0.0) + v
        self.epoch_loss_steps += 1
        if self.global_step % self.cfg["output"]["log_every"] == 0 or self.global_step == 1:
            for k, v in losses.items():
                self.log.scalar(f"loss/{k}", v, self.global_step)
            self.log.scalar("lr", lr, self.global_step)
            if self.bit_sched is not None:
                self.log.scalar("sched/frozen", self.bit_sched.num_frozen(), self.global_step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)

    def _end_epoch(self, t0: float, last: bool) -> None:
        """The epoch's mean loss over ranks, evaluation when due, checkpoint."""
        kinds = sorted(self.epoch_loss_sums)
        sums = all_reduce_sum([self.epoch_loss_sums[k] for k in kinds] + [self.epoch_loss_steps], self.env)
        train_loss = {k: v / max(sums[-1], 1) for k, v in zip(kinds, sums[:-1])}
        if ((self.epoch + 1) % self.cfg["eval"]["every_epochs"] == 0) or last:
            self._record(self.epoch, train_loss, self.evaluate(), time.time() - t0)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sums, self.epoch_loss_steps = {}, 0.0
        self.epoch_loader_state = self.loader_gen.get_state()
        self.save_checkpoint()

    def _record_scheduler_update(self) -> None:
        self.log.scheduler_update(self.global_step, self.steps_per_epoch, self.bit_sched)

    def _record(self, epoch: int, train_loss: Dict[str, float], results, elapsed: float) -> None:
        frozen = self.bit_sched.frozen() if self.bit_sched is not None else {}
        entry = metrics_entry(epoch, self.global_step, elapsed, self.opt.param_groups[0]["lr"], train_loss,
                              results, frozen, self.measured)
        self.metrics = entry
        self.history.append({"epoch": entry["epoch"], "step": entry["step"], "acc": entry["acc"]})
        self.log.epoch(entry, results, epoch_summary(epoch, self.cfg["train"]["epochs"], self.global_step,
                                                     elapsed, train_loss, results, entry["num_frozen"]))


def train(cfg: Dict[str, Any], step_callback=None) -> Dict[str, Any]:
    """Train a supernet from a validated config; returns the last metrics entry."""
    return Trainer(cfg, step_callback=step_callback).fit()
