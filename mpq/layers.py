"""Switchable-precision layers: Conv2d / Linear whose weights and input activations are fake-quantized
at a bit-width chosen at run time, over one shared set of float weights; switchable BatchNorm; and
Swin window attention re-routed to call its projection layers (so they can be quantized)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

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

    def __init__(self, *args, w_bits: Sequence[int] = (2, 3, 4, 5, 6),
                 a_bits: Sequence[int] = (2, 3, 4, 5, 6), per_channel: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)   # nn.Conv2d / nn.Linear: the layer's own arguments
        self._init_quant(w_bits, a_bits, per_channel, self.weight.shape[0])

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
        # bits_as_tensors: the forward reads the bit-widths from the quantizers' tensors (one
        # traced graph for every configuration, mpq.supernet.use_tensor_bits) instead of w_bits
        self.bits_as_tensors = False
        self.set_active(self.w_bits, self.a_bits)

    @classmethod
    def from_float(cls, module: nn.Module, w_bits: Sequence[int], a_bits: Sequence[int],
                   per_channel: bool = True, w_init: str = "mean_abs", grad_scale: bool = True):
        """The quantized layer of a float Conv2d / Linear: the same geometry, and the same weight and
        bias Parameters (shared, not copied)."""
        q = cls.__new__(cls)
        cls._float_init(q, module)
        q.weight = module.weight
        q.bias = module.bias
        q._init_quant(w_bits, a_bits, per_channel, module.weight.shape[0], w_init, grad_scale)
        return q

    def quantized_weight(self) -> torch.Tensor:
        if self.bits_as_tensors:
            wq = self.w_quant.forward_selected(self.weight)
            w_float = self.w_quant._selected_float
        else:
            wq = self.w_quant(self.weight, self.w_bits)
            w_float = self.w_bits == FLOAT_BITS
        if self.training and self.quant_noise_p < 1.0 and not w_float:
            from .quant_noise import quant_noise_mix
            wq = quant_noise_mix(self.weight, wq, self.quant_noise_p, self.quant_noise_block)
        return wq

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_float:
            return x
        if self.bits_as_tensors:
            return self.a_quant.forward_selected(x)
        return self.a_quant(x, self.a_bits)

    def set_active(self, w_bits: int, a_bits: int) -> None:
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.w_quant.select(self.w_bits)
        self.a_quant.select(self.a_bits)

    def quant_repr(self) -> str:
        return f"w_bits={self.w_bits}/{list(self.w_candidates)}, a_bits={self.a_bits}/{list(self.a_candidates)}"


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with switchable weight and input-activation bit-widths."""

    @staticmethod
    def _float_init(q: "QuantConv2d", conv: nn.Conv2d) -> None:
        nn.Conv2d.__init__(q, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                           conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quant_repr()


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with switchable weight and input-activation bit-widths."""

    @staticmethod
    def _float_init(q: "QuantLinear", linear: nn.Linear) -> None:
        nn.Linear.__init__(q, linear.in_features, linear.out_features, linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)

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


# ------------------------------------------------------------------ Swin window attention, re-routed
class SwinWindowAttention(ShiftedWindowAttention):
    """torchvision's (shifted) window attention with its ``qkv`` and ``proj`` layers *called as
    modules*.

    torchvision's forward hands ``self.qkv.weight`` / ``self.proj.weight`` to the functional
    ``shifted_window_attention``, so replacing the two ``nn.Linear`` by :class:`QuantLinear` would
    change nothing: their quantizers would never run, their forward hooks (the BitOPs counter)
    would never fire, and a fixed layer without ``.weight`` would crash. This forward is that
    function step for step (pad, cyclic shift, window partition, attention with the relative
    position bias and shift mask, reverse), except the two projections are ``self.qkv(x)`` and
    ``self.proj(x)``: whatever module sits there (Linear, QuantLinear, FixedLinear) runs. Same
    parameters, buffers and state_dict keys as the torchvision module; same numbers for float layers.
    """

    @classmethod
    def from_float(cls, attn: ShiftedWindowAttention) -> "SwinWindowAttention":
        """The same module (parameters, buffers, children shared) with this class's forward."""
        q = cls.__new__(cls)
        q.__dict__.update(attn.__dict__)
        return q

    def _k_bias_mask(self, channels: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """V1 attention adds the full qkv bias (no mask)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x, self.get_relative_position_bias(), getattr(self, "logit_scale", None))


class SwinWindowAttentionV2(SwinWindowAttention, ShiftedWindowAttentionV2):
    """:class:`SwinWindowAttention` for Swin V2 (cosine attention, continuous position bias).

    torchvision zeroes the key third of the qkv bias on every forward (Swin V2 has no key bias).
    :meth:`from_float` zeroes it once in the weights (the forward never used it, so the output is
    unchanged) and the forward subtracts it again after ``self.qkv(x)``, so its gradient is exactly
    zero and it stays zero through training and export."""

    @classmethod
    def from_float(cls, attn: ShiftedWindowAttention) -> "SwinWindowAttentionV2":
        q = super().from_float(attn)
        if q.qkv.bias is not None:
            with torch.no_grad():
                n = q.qkv.bias.numel() // 3
                q.qkv.bias[n:2 * n].zero_()
        return q

    def _k_bias_mask(self, channels: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        mask = torch.zeros(3 * channels, dtype=like.dtype, device=like.device)
        mask[channels:2 * channels] = 1
        return mask


def _window_attention(m: SwinWindowAttention, x: torch.Tensor, relative_position_bias: torch.Tensor,
                      logit_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (input ``[B, H, W, C]``) with ``m.qkv`` and
    ``m.proj`` called as modules."""
    window_size, num_heads = m.window_size, m.num_heads
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(m.shift_size)
    # a window as large as the feature map needs no shift
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    qkv = m.qkv(x)
    k_mask = m._k_bias_mask(C, qkv) if m.qkv.bias is not None else None
    if k_mask is not None:
        qkv = qkv - m.qkv.bias * k_mask
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=m.attention_dropout, training=m.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = m.proj(x)
    x = F.dropout(x, p=m.dropout, training=m.training)

    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def reroute_functional_layers(model: nn.Module) -> Dict[str, str]:
    """Replace, in place, the modules whose forward reads a child layer's ``.weight`` instead of
    calling the layer, by equivalents that call it (today: torchvision's Swin window attention).

    Run by :func:`mpq.quantize_model` before converting layers, and by the fixed-model loader on the
    rebuilt float architecture. Returns ``{module_name: new class name}``."""
    done: Dict[str, str] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, SwinWindowAttention):
            continue
        if isinstance(m, ShiftedWindowAttentionV2):
            new: nn.Module = SwinWindowAttentionV2.from_float(m)
        elif type(m) is ShiftedWindowAttention:
            new = SwinWindowAttention.from_float(m)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        done[name] = type(new).__name__
    return done
