"""Switchable-precision layers: Conv2d / Linear whose weights and input activations are fake-quantized
at a bit-width chosen at run time, over one shared set of float weights."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .quantizer import FLOAT_BITS, LsqQuantizer


class QuantMixin:
    """Shared state and logic of :class:`QuantConv2d` and :class:`QuantLinear`.

    Attributes:
        w_candidates / a_candidates: the bit-widths this layer can run at.
        w_allowed: the weight bit-widths that may currently be *sampled* during training (the
            bit-width freezing scheduler removes entries; ``set_bits`` still accepts any candidate).
        w_bits / a_bits: the active bit-widths.
        quant_noise_p: fraction of weight blocks quantized per training forward (Quant-Noise);
            ``1.0`` quantizes the whole tensor (always the case in eval mode).
        a_allowed: the activation bit-widths that may currently be sampled (the scheduler removes
            the lowest one only when weight and activation candidates are frozen together).
        a_float: when True the input activation is not quantized at all (AQT's float warm-up, before
            the activation clip bounds are calibrated).
    """

    w_candidates: tuple[int, ...]
    a_candidates: tuple[int, ...]

    def _init_quant(self, w_bits: Sequence[int], a_bits: Sequence[int], per_channel: bool,
                    channels: int, w_init: str = "mean_abs", grad_scale: bool = True) -> None:
        self.w_candidates = tuple(sorted(set(w_bits)))
        self.a_candidates = tuple(sorted(set(a_bits)))
        self.w_allowed = self.w_candidates
        self.a_allowed = self.a_candidates
        self.a_float = False
        self.w_bits = max(self.w_candidates)
        self.a_bits = max(self.a_candidates)
        self.quant_noise_p = 1.0
        self.quant_noise_block = 8
        self.w_quant = LsqQuantizer(self.w_candidates, signed=True,
                                    channels=channels if per_channel else 1, ndim=self.weight.dim(),
                                    use_grad_scale=grad_scale, init=w_init)
        self.a_quant = LsqQuantizer(self.a_candidates, signed=None, per_sample=True,
                                    use_grad_scale=grad_scale)
        self.w_quant.init_from(self.weight.detach())

    def quantized_weight(self) -> torch.Tensor:
        wq = self.w_quant(self.weight, self.w_bits)
        if self.training and self.quant_noise_p < 1.0 and self.w_bits != FLOAT_BITS:
            from .quant_noise import quant_noise_mix
            wq = quant_noise_mix(self.weight, wq, self.quant_noise_p, self.quant_noise_block)
        return wq

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_float:
            return x
        return self.a_quant(x, self.a_bits)

    def set_active(self, w_bits: int, a_bits: int) -> None:
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)

    def quant_repr(self) -> str:
        return f"w_bits={self.w_bits}/{list(self.w_candidates)}, a_bits={self.a_bits}/{list(self.a_candidates)}"


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with switchable weight and input-activation bit-widths."""

    def __init__(self, *args, w_bits: Sequence[int] = (2, 3, 4, 5, 6),
                 a_bits: Sequence[int] = (2, 3, 4, 5, 6), per_channel: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant(w_bits, a_bits, per_channel, self.out_channels)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: Sequence[int], a_bits: Sequence[int],
                   per_channel: bool = True, w_init: str = "mean_abs",
                   grad_scale: bool = True) -> "QuantConv2d":
        q = cls.__new__(cls)
        nn.Conv2d.__init__(q, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                           conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        q.weight = conv.weight
        q.bias = conv.bias
        q._init_quant(w_bits, a_bits, per_channel, conv.out_channels, w_init, grad_scale)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quant_repr()


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with switchable weight and input-activation bit-widths."""

    def __init__(self, *args, w_bits: Sequence[int] = (2, 3, 4, 5, 6),
                 a_bits: Sequence[int] = (2, 3, 4, 5, 6), per_channel: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant(w_bits, a_bits, per_channel, self.out_features)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: Sequence[int], a_bits: Sequence[int],
                   per_channel: bool = True, w_init: str = "mean_abs",
                   grad_scale: bool = True) -> "QuantLinear":
        q = cls.__new__(cls)
        nn.Linear.__init__(q, linear.in_features, linear.out_features, linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q._init_quant(w_bits, a_bits, per_channel, linear.out_features, w_init, grad_scale)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quant_repr()


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def bn_key(w_bits: int, a_bits: int) -> str:
    return f"w{w_bits}a{a_bits}"


class SwitchableBatchNorm2d(nn.Module):
    """One ``BatchNorm2d`` per (w_bits, a_bits) of the quantized layer that feeds it.

    The statistics of a conv's output differ per bit configuration, so each configuration keeps its
    own running mean/var and affine parameters (initialised from the float BN). ``active`` is set by
    :func:`mpq.set_bits`.
    """

    def __init__(self, bn: nn.BatchNorm2d, keys: Sequence[str]) -> None:
        super().__init__()
        self.num_features = bn.num_features
        self.bns = nn.ModuleDict()
        for k in keys:
            new = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                 bn.track_running_stats, device=bn.running_mean.device
                                 if bn.running_mean is not None else None)
            new.load_state_dict(bn.state_dict())
            self.bns[k] = new
        self.active = keys[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.active](x)

    def current(self) -> nn.BatchNorm2d:
        return self.bns[self.active]

    def extra_repr(self) -> str:
        return f"{self.num_features}, configs={len(self.bns)}, active={self.active}"
