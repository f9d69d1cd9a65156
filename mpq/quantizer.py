"""LSQ fake-quantizer with one learnable step size per candidate bit-width.

The weights (or activations) are shared by every bit-width; each bit-width ``b`` has its own step
size ``s_b``. Quantization follows LSQ (Esser et al., 2020):

    q(v; s, b) = round(clip(v / s, -Q_N, Q_P)) * s

    signed:   Q_N = 2^(b-1),  Q_P = 2^(b-1) - 1
    unsigned: Q_N = 0,        Q_P = 2^b - 1

with a straight-through estimator for ``round``. The gradients are

    dq/dv = 1 inside [-Q_N, Q_P], 0 outside
    dq/ds = round(v/s) - v/s inside, -Q_N below, Q_P above   (times the LSQ scale g = 1/sqrt(N*Q_P))

and are computed by one fused autograd function (:class:`LsqFakeQuantFn`) so the quantizer costs
one elementwise pass forward and one backward instead of a chain of autograd nodes.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

FLOAT_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Return ``(Q_N, Q_P)``: the integer grid is ``[-Q_N, Q_P]``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quant(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Forward-only fake quantization ``round(clip(x / s, -Q_N, Q_P)) * s``.

    The one place the forward formula lives: the trainable quantizer and the exported fixed-precision
    model both call it, so the searched accuracy and the exported accuracy are computed the same way.
    """
    return torch.round(torch.clamp(x / step, -qn, qp)) * step


def integer_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Integer codes ``round(clip(x / s, -Q_N, Q_P))`` (as a float tensor)."""
    return torch.round(torch.clamp(x / step, -qn, qp))


class LsqFakeQuantFn(torch.autograd.Function):
    """Fused LSQ fake-quant: straight-through rounding, LSQ step-size gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float):
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return fake_quant(x, step, qn, qp)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, step = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        v = x / step
        below = v < -qn
        above = v > qp
        inside = ~(below | above)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            # d q / d s: (round(v) - v) inside the grid, the clipped bound outside it.
            ds = torch.where(inside, torch.round(v) - v, torch.where(below, -float(qn), float(qp)))
            grad_step = (grad_out * ds).sum_to_size(step.shape) * ctx.grad_scale
        return grad_x, grad_step, None, None, None


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                   grad_scale: float = 1.0) -> torch.Tensor:
    """Differentiable LSQ fake quantization of ``x`` at ``bits`` with step size ``step``."""
    qn, qp = qrange(bits, signed)
    return LsqFakeQuantFn.apply(x, step, qn, qp, grad_scale)


class LsqQuantizer(nn.Module):
    """Fake-quantizer for one tensor with a separate learnable LSQ step size per candidate bit-width.

    Args:
        bits: candidate bit-widths; ``32`` means "no quantization" and has no step size.
        signed: integer grid sign; ``None`` decides from the first tensor seen (unsigned when it has
            no negative value, i.e. after a ReLU). Weights are always signed.
        channels: number of output channels for per-channel step sizes (``1`` = per tensor).
        channel_dim_count: number of dims of the quantized tensor, for the step-size shape.
        use_grad_scale: multiply the step-size gradient by ``g = 1/sqrt(N * Q_P)`` (LSQ).
        per_sample: ``N`` counts the elements of one sample (activations) rather than the whole
            tensor (weights).
    """

    def __init__(self, bits: Sequence[int], signed: Optional[bool] = True, channels: int = 1,
                 ndim: int = 1, use_grad_scale: bool = True, per_sample: bool = False) -> None:
        super().__init__()
        self.bits = tuple(sorted(set(int(b) for b in bits)))
        shape = (channels,) + (1,) * (ndim - 1) if channels > 1 else (1,)
        self.step = nn.ParameterDict(
            {str(b): nn.Parameter(torch.ones(shape)) for b in self.bits if b != FLOAT_BITS})
        self.register_buffer("signed", torch.tensor(True if signed is None else signed))
        self.register_buffer("initialized", torch.tensor(False))
        self.auto_sign = signed is None
        self.use_grad_scale = use_grad_scale
        self.per_sample = per_sample

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """LSQ step-size init ``s_b = 2 * mean|x| / sqrt(Q_P)`` for every bit-width (per channel if
        the step is per channel)."""
        if self.auto_sign:
            self.signed.fill_(bool((x < 0).any()))
        signed = bool(self.signed)
        for key, step in self.step.items():
            _, qp = qrange(int(key), signed)
            if step.numel() > 1:
                mean_abs = x.abs().flatten(1).mean(1).view_as(step)
            else:
                mean_abs = x.abs().mean().view_as(step)
            step.copy_((2 * mean_abs / math.sqrt(qp)).clamp_min(1e-8))
        self.initialized.fill_(True)

    def grid(self, bits: int) -> tuple[int, int]:
        return qrange(bits, bool(self.signed))

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FLOAT_BITS:
            return x
        if not bool(self.initialized):
            self.init_from(x.detach())
        step = self.step[str(bits)]
        qn, qp = self.grid(bits)
        g = 1.0
        if self.use_grad_scale:
            n = x[0].numel() if self.per_sample else x.numel() // step.numel()
            g = 1.0 / math.sqrt(max(n, 1) * qp)
        return LsqFakeQuantFn.apply(x, step, qn, qp, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, per_channel={next(iter(self.step.values())).numel() > 1 if len(self.step) else False}"


def check_bits(bits: Iterable[int], what: str) -> tuple[int, ...]:
    """Validate a candidate bit-width list; returns it sorted."""
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or b not in SUPPORTED_BITS:
            raise ValueError(f"{what}: bit-width {b!r} is not supported; allowed: {list(SUPPORTED_BITS)}")
        out.append(b)
    if not out:
        raise ValueError(f"{what}: the candidate bit-width list is empty")
    return tuple(sorted(set(out)))
