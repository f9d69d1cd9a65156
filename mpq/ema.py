"""Model EMA: an exponential moving average of the supernet's weights, used for evaluation and search.

After every optimizer step, for every floating-point entry of the state dict (weights, step sizes,
BatchNorm statistics)::

    ema <- decay * ema + (1 - decay) * value

and every other entry (integer/bool buffers: BN step counters, quantizer flags) is copied. The paper's
code keeps such an EMA with ``decay = 0.9997`` per step over its 150-epoch ImageNet run (375,300 steps
at global batch 512): a horizon ``1 / (1 - decay)`` of 3,333 steps, 0.888% of training.
:func:`ema_decay_for` keeps that horizon as a fraction of the run, so a short run gets a shorter one.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .supernet import unwrap

PAPER_DECAY = 0.9997
PAPER_STEPS = 150 * 2502                                   # 150 epochs x 2502 steps
HORIZON_FRACTION = 1.0 / ((1.0 - PAPER_DECAY) * PAPER_STEPS)   # = 0.00888


def ema_decay_for(total_steps: int) -> float:
    """``1 - 1 / (HORIZON_FRACTION * total_steps)`` (0.9997 for the paper's run length), at least 0."""
    horizon = HORIZON_FRACTION * max(int(total_steps), 1)
    return max(0.0, 1.0 - 1.0 / horizon) if horizon > 1.0 else 0.0


class ModelEma:
    """An EMA copy of a model (``.module``, in eval mode, no gradients).

    Create it before attaching training-only hooks to the model (they would be copied with it).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEma: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current state."""
        src = unwrap(model).state_dict()
        floats_e, floats_s = [], []
        for name, e in self.module.state_dict().items():
            v = src[name]
            if e.is_floating_point():
                floats_e.append(e)
                floats_s.append(v.detach().to(e.dtype))
            else:
                e.copy_(v)
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_s, 1.0 - self.decay)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state, strict: Optional[bool] = True) -> None:
        self.module.load_state_dict(state, strict=bool(strict))
