"""AQT-style activation clip calibration (Abdolrashidi et al., 2021).

During the first ``warmup_steps`` training steps, an exponential moving average of ``max|x|`` of
each quantized layer's input is recorded (``m <- ema * m + (1 - ema) * max|x|``, started at the
first value). At ``warmup_steps`` the clip bound ``c = m`` fixes every activation step size of that
layer once: ``s_b = c / Q_P(b)`` for each candidate bit-width ``b`` (``Q_P = 2^b - 1`` unsigned,
``2^(b-1) - 1`` signed). With ``freeze`` the activation step sizes then stay fixed (no gradient);
otherwise LSQ keeps learning them from that starting point.

In a distributed job the EMA values are max-reduced over the ranks before they are applied, so
every rank sets the same step sizes.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from .quantizer import FLOAT_BITS
from .supernet import quant_layers, unwrap


class ActivationClipCalibrator:
    """Records EMA(max|x|) of each quantized layer's input, then sets the activation step sizes once.

    Call :meth:`step` after every training step with the global step number.
    """

    def __init__(self, model: nn.Module, warmup_steps: int, ema: float = 0.9,
                 freeze: bool = True) -> None:
        self.model = unwrap(model)
        self.warmup_steps = int(warmup_steps)
        self.ema = float(ema)
        self.freeze = bool(freeze)
        self.done = False
        self.values: Dict[str, torch.Tensor] = {}
        self._handles = []
        self._attach()

    def _attach(self) -> None:
        for name, layer in quant_layers(self.model).items():
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, inputs):
            if self.done or not module.training:
                return
            with torch.no_grad():
                m = inputs[0].detach().abs().amax().float()
                old = self.values.get(name)
                self.values[name] = m if old is None else self.ema * old + (1.0 - self.ema) * m
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def step(self, global_step: int) -> bool:
        """Calibrate once when ``global_step`` reaches ``warmup_steps``; True when it did."""
        if self.done or global_step < self.warmup_steps:
            return False
        self.calibrate()
        return True

    @torch.no_grad()
    def calibrate(self) -> None:
        layers = quant_layers(self.model)
        names = [n for n in layers if n in self.values]
        if names:
            vals = torch.stack([self.values[n].reshape(()) for n in names])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(vals, op=dist.ReduceOp.MAX)
            for name, clip in zip(names, vals.tolist()):
                aq = layers[name].a_quant
                for key, step in aq.step.items():
                    b = int(key)
                    if b == FLOAT_BITS:
                        continue
                    _, qp = aq.grid(b)
                    step.fill_(max(clip, 1e-8) / qp)
                aq.initialized.fill_(True)
        self.done = True
        self._apply_freeze()
        self.remove()

    def _apply_freeze(self) -> None:
        if not self.freeze:
            return
        for layer in quant_layers(self.model).values():
            for p in layer.a_quant.step.values():
                p.requires_grad_(False)
                p.grad = None

    def state_dict(self) -> Dict[str, Any]:
        return {"done": self.done, "values": {n: float(v) for n, v in self.values.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))
        dev = next(self.model.parameters()).device
        self.values = {str(n): torch.tensor(float(v), device=dev)
                       for n, v in dict(state.get("values", {})).items()}
        if self.done:
            self._apply_freeze()
            self.remove()
