"""The training state a checkpoint holds, and its restoration for an exact resume (the format is
documented in :mod:`mpq.checkpoint`). Both functions read and write the attributes of a
:class:`mpq.trainer.Trainer`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from . import checkpoint as ckpt_io
from .errors import UserError
from .supernet import quant_layers

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


def training_state(tr: "Trainer") -> Dict[str, Any]:
    """The full checkpoint of a run at its current step."""
    net = tr.net
    return {
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
        "spec": tr.spec,
        "model": net.state_dict(),
        "model_ema": tr.ema.state_dict() if tr.ema is not None else None,
        "config": tr.cfg,
        "allowed": {n: [int(b) for b in m.w_allowed] for n, m in quant_layers(net).items()},
        "allowed_acts": {n: [int(b) for b in m.a_allowed] for n, m in quant_layers(net).items()},
        "metrics": tr.metrics,
        "train_state": {
            "epoch": tr.epoch, "step_in_epoch": tr.step_in_epoch,
            "global_step": tr.global_step, "total_steps": tr.total_steps,
            "steps_per_epoch": tr.steps_per_epoch, "world_size": tr.env.world_size,
            "complete": tr.global_step >= tr.total_steps,
            "optimizer": tr.opt.state_dict(),
            "step_optimizer": tr.step_opt.state_dict() if tr.step_opt is not None else None,
            "lr_schedule": {"kind": "warmup_cosine", "step": tr.global_step,
                            "warmup_steps": tr.warmup_steps, "total_steps": tr.total_steps},
            "scaler": tr.scaler.state_dict(),
            "rng": ckpt_io.rng_state({"config_gen": tr.config_gen}, tr.device),
            "loader_gen_epoch_start": tr.epoch_loader_state,
            "sampler": {"epoch": tr.epoch, "start": tr.step_in_epoch * tr.rank_batch,
                        "seed": tr.cfg["data"]["seed"]},
            "bit_scheduler": tr.bit_sched.state_dict() if tr.bit_sched is not None else None,
            "r2": tr.r2.state_dict() if tr.r2 is not None else None,
            "aqt": tr.aqt.state_dict() if tr.aqt is not None else None,
            "history": tr.history,
            "epoch_loss": tr.epoch_loss_total,
        },
    }


def restore_training_state(tr: "Trainer", ckpt: Dict[str, Any], path: str) -> None:
    """Restore everything from a checkpoint (validated by :func:`mpq.checkpoint.check_compatible`)."""
    ckpt_io.check_compatible(ckpt, tr.spec, path)
    ts = ckpt.get("train_state")
    if not isinstance(ts, dict):
        raise UserError(f"checkpoint: {path!r} holds no training state (an exported or stripped "
                        f"supernet?); it cannot be resumed")
    try:
        tr.net.load_state_dict(ckpt["model"])
        if tr.ema is not None:
            tr.ema.load_state_dict(ckpt["model_ema"] if ckpt.get("model_ema") is not None else ckpt["model"])
        tr.opt.load_state_dict(ts["optimizer"])
        if tr.step_opt is not None:
            if ts.get("step_optimizer") is None:
                raise ValueError("the checkpoint has no step-size optimizer state "
                                 "(it was trained with train.step_optimizer=main)")
            tr.step_opt.load_state_dict(ts["step_optimizer"])
        tr.scaler.load_state_dict(ts["scaler"])
        if tr.bit_sched is not None and ts.get("bit_scheduler"):
            tr.bit_sched.load_state_dict(ts["bit_scheduler"])
        else:
            for n, m in quant_layers(tr.net).items():
                if n in ckpt.get("allowed", {}):
                    m.w_allowed = tuple(int(b) for b in ckpt["allowed"][n])
                if n in ckpt.get("allowed_acts", {}):
                    m.a_allowed = tuple(int(b) for b in ckpt["allowed_acts"][n])
        if tr.r2 is not None and ts.get("r2") is not None:
            tr.r2.load_state_dict(ts["r2"])
        if tr.aqt is not None and ts.get("aqt") is not None:
            tr.aqt.load_state_dict(ts["aqt"])
        ckpt_io.set_rng_state(ts["rng"], {"config_gen": tr.config_gen}, tr.device)
        tr.epoch_loader_state = ts["loader_gen_epoch_start"]
        tr.epoch, tr.step_in_epoch = int(ts["epoch"]), int(ts["step_in_epoch"])
        tr.global_step = int(ts["global_step"])
        tr.history = list(ts.get("history", []))
        loss_so_far = ts.get("epoch_loss") if tr.env.is_main else None  # summed over ranks
        tr.epoch_loss_sums = {str(k): float(v) for k, v in (loss_so_far or {}).get("sums", {}).items()}
        tr.epoch_loss_steps = float((loss_so_far or {}).get("steps", 0.0))
        if tr.step_in_epoch and loss_so_far is None:
            tr.log.print("note: this checkpoint predates the saved epoch loss; the resumed epoch's "
                         "train_loss covers only the steps after the resume")
        tr.metrics = dict(ckpt.get("metrics") or {})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint: {path!r} cannot be resumed with this config: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
    if int(ts.get("world_size", tr.env.world_size)) != tr.env.world_size or \
            int(ts.get("steps_per_epoch", tr.steps_per_epoch)) != tr.steps_per_epoch:
        tr.log.print(f"warning: resuming with a different world size or epoch length "
                     f"({ts.get('world_size')} -> {tr.env.world_size} ranks); the data order differs "
                     f"from an uninterrupted run")
        tr.step_in_epoch = min(tr.step_in_epoch, tr.steps_per_epoch)
