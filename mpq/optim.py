"""Optimizers and learning-rate schedules of supernet training.

* Parameter groups: weight decay on conv (and, with ``train.decay_linear``, linear) weights only;
  none on LSQ step sizes, BatchNorm, biases or R2 parameters.
* The LSQ step sizes either join the main optimizer (``train.step_optimizer=main``) or get their own
  Adam (``adam``, the paper: lr ``train.step_lr``, betas (0.9, 0.999), cosine to 0, no warm-up).
* The main learning rate: linear warm-up to ``lr`` over ``W`` steps, then cosine decay to
  ``min_lr`` at the last step ``T``::

      lr(t) = lr * (t + 1) / W                                          t < W
      lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2   otherwise
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def is_step_size(name: str) -> bool:
    """Whether a parameter name is an LSQ step size (of a weight or activation quantizer)."""
    return ".w_quant." in name or ".a_quant." in name


def step_size_params(net: nn.Module) -> List[nn.Parameter]:
    """The LSQ step sizes (also the currently frozen ones, e.g. AQT-calibrated: an optimizer skips
    parameters without a gradient)."""
    return [p for n, p in net.named_parameters() if is_step_size(n)]


def param_groups(net: nn.Module, extra: Sequence[nn.Parameter], weight_decay: float,
                 decay_linear: bool = True, with_steps: bool = True) -> List[Dict[str, Any]]:
    """Weight decay on conv (and, with ``decay_linear``, linear) weights only; none on step sizes,
    BatchNorm, biases and ``extra`` (R2) parameters. ``with_steps=False`` leaves the step sizes out
    (they get their own optimizer)."""
    decay, no_decay = [], []
    min_dim = 2 if decay_linear else 4
    for name, p in net.named_parameters():
        if is_step_size(name):
            if with_steps:
                no_decay.append(p)
        elif not p.requires_grad:
            continue
        elif p.ndim >= min_dim:
            decay.append(p)
        else:
            no_decay.append(p)
    no_decay += list(extra)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizers(net: nn.Module, extra: Sequence[nn.Parameter], t: Dict[str, Any]
                     ) -> Tuple[torch.optim.Optimizer, Optional[torch.optim.Optimizer]]:
    """``(main optimizer, step-size Adam or None)`` from the ``train`` config section."""
    separate_steps = t["step_optimizer"] == "adam"
    groups = param_groups(net, extra, t["weight_decay"], decay_linear=t["decay_linear"],
                          with_steps=not separate_steps)
    if t["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"],
                              nesterov=t["nesterov"] and t["momentum"] > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=t["lr"], betas=(t["momentum"], 0.999))
    step_opt = None
    if separate_steps:
        step_opt = torch.optim.Adam(step_size_params(net), lr=t["step_lr"], betas=(0.9, 0.999),
                                    weight_decay=0.0)
    return opt, step_opt


def set_learning_rates(opt: torch.optim.Optimizer, step_opt: Optional[torch.optim.Optimizer],
                       step: int, total: int, warmup: int, t: Dict[str, Any]) -> float:
    """Set this step's learning rates (main: warm-up + cosine; step sizes: cosine from
    ``train.step_lr`` to 0, no warm-up); returns the main one."""
    lr = lr_at(step, total, warmup, t["lr"], t["min_lr"])
    for group in opt.param_groups:
        group["lr"] = lr
    if step_opt is not None:
        step_lr = lr_at(step, total, 0, t["step_lr"], 0.0)
        for group in step_opt.param_groups:
            group["lr"] = step_lr
    return lr
