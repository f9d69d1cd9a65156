"""Quant-Noise (Fan, Stock et al., 2020): quantize only a random subset of weight blocks per forward.

    w_used = where(mask, q(w), w),   mask ~ Bernoulli(p) per block of ``block`` consecutive weights
    of one output channel

The unmasked blocks stay full precision, so their gradient is the exact (unbiased) one; the masked
blocks go through the straight-through quantizer. ``p = 1`` is full quantization (used at eval).
"""
from __future__ import annotations

import torch


def quant_noise_mask(weight: torch.Tensor, p: float, block: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask shaped like ``weight``: True where the weight is quantized this forward."""
    out = weight.shape[0]
    inner = weight[0].numel()
    block = max(1, min(int(block), inner))
    n_blocks = -(-inner // block)
    keep = torch.rand(out, n_blocks, device=weight.device, generator=generator) < p
    mask = keep.repeat_interleave(block, dim=1)[:, :inner]
    return mask.reshape(weight.shape)


def quant_noise_mix(weight: torch.Tensor, quantized: torch.Tensor, p: float, block: int = 8,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Mix float and quantized weights: a fraction ``p`` of blocks quantized."""
    if p >= 1.0:
        return quantized
    if p <= 0.0:
        return weight
    return torch.where(quant_noise_mask(weight, p, block, generator), quantized, weight)
