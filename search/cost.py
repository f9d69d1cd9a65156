"""Cost model: BitOPs and weight size of a bit configuration.

    BitOPs(conv)   = b_w * b_a * K_h * K_w * (C_in / groups) * C_out * H_out * W_out
    BitOPs(linear) = b_w * b_a * C_in * C_out * tokens     (tokens = 1 for a plain classifier head)
    size           = sum(params * b_w) / 8 bytes           (bias and float layers counted at 32 bits)

The MAC count of each layer is measured once per input size with forward hooks, then any
configuration's cost is a dot product with the per-layer bit products. :class:`CostModel` answers
both costs of one supernet for the search (and the ``all-8-bit`` reference of ratio budgets).
"""
from __future__ import annotations

import weakref
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mpq.layers import QuantConv2d, QuantLinear
from mpq.quantizer import FLOAT_BITS
from mpq.supernet import PINNED_BITS, get_bits, is_pinned, quant_layers, unwrap


class BitOpsCounter:
    """Per-layer multiply-accumulate counts of a supernet at one input size (per sample).

    >>> counter = BitOpsCounter(net, (1, 3, 224, 224))
    >>> counter.bitops(cfg)   # float BitOPs of cfg
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        self.model = unwrap(model)
        self.input_size = tuple(input_size)
        self.macs: Dict[str, int] = measure_macs(self.model, self.input_size)
        # A pinned layer with a float input (the paper's unquantized image into the first conv) is
        # counted at 8-bit input, as the paper counts it: the image itself is 8-bit data.
        self.image_input = {n for n, m in quant_layers(self.model).items()
                            if is_pinned(m) and m.a_candidates == (FLOAT_BITS,)}

    def _a(self, name: str, a_bits: int) -> int:
        return PINNED_BITS if name in self.image_input else a_bits

    def bitops(self, config: Optional[Mapping[str, Tuple[int, int]]] = None) -> float:
        config = get_bits(self.model) if config is None else config
        return float(sum(self.macs[n] * config[n][0] * self._a(n, config[n][1]) for n in self.macs))

    def layer_bitops(self, config: Optional[Mapping[str, Tuple[int, int]]] = None) -> Dict[str, float]:
        """``{layer: BitOPs}`` of ``config`` (default: the active one)."""
        config = get_bits(self.model) if config is None else config
        return {n: float(self.macs[n] * config[n][0] * self._a(n, config[n][1])) for n in self.macs}


def measure_macs(model: nn.Module, input_size: Sequence[int]) -> Dict[str, int]:
    """MACs per sample of every quantized layer, measured with forward hooks on ONE zero sample of
    ``input_size`` (its batch dimension is ignored). One sample, because a layer's leading
    dimension is not always the batch: Swin's attention projections see ``(B * windows, tokens, C)``
    and Swin V2's position-bias MLP runs once per forward whatever the batch; every token a Linear
    layer sees is counted."""
    model = unwrap(model)
    layers = quant_layers(model)
    macs: Dict[str, int] = {n: 0 for n in layers}

    def hook(name):
        def fn(mod, inputs, output):
            if isinstance(mod, QuantConv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
                macs[name] += k * output.numel()  # C_out * H_out * W_out (of the one sample)
            elif isinstance(mod, QuantLinear):
                macs[name] += mod.in_features * output.numel()   # in * out * tokens
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_size)[1:], device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


# Per-model cache of measured MACs (weak keys: a cached counter never keeps a model alive).
_COUNTERS: "weakref.WeakKeyDictionary[nn.Module, Dict[Tuple[int, ...], BitOpsCounter]]" = weakref.WeakKeyDictionary()


def bitops(model: nn.Module, config: Optional[Mapping[str, Tuple[int, int]]] = None,
           input_size: Sequence[int] = (1, 3, 224, 224)) -> float:
    """BitOPs of ``config`` (default: the active one) for one sample of ``input_size``."""
    net = unwrap(model)
    per_size = _COUNTERS.setdefault(net, {})
    counter = per_size.get(tuple(input_size))
    if counter is None:
        counter = per_size[tuple(input_size)] = BitOpsCounter(net, input_size)
    return counter.bitops(config)


def model_size_bytes(model: nn.Module, config: Optional[Mapping[str, Tuple[int, int]]] = None) -> float:
    """Weight size in bytes: quantized weights at their bit-width, everything else (biases, BN,
    unquantized layers) at 32 bits. Step sizes are not counted."""
    net = unwrap(model)
    config = get_bits(net) if config is None else config
    layers = quant_layers(net)
    quant_weights = {id(m.weight) for m in layers.values()}
    bits = sum(m.weight.numel() * config[n][0] for n, m in layers.items())
    seen = set()
    for name, p in net.named_parameters():
        if id(p) in quant_weights or id(p) in seen or ".w_quant." in name or ".a_quant." in name:
            continue
        seen.add(id(p))
        bits += p.numel() * 32
    return bits / 8.0


class CostModel:
    """BitOPs and weight size of configurations of one supernet, as fast dot products.

    ``bitops(c)`` equals :func:`search.bitops` and ``size_bytes(c)`` equals
    :func:`search.model_size_bytes` for the same configuration.
    """

    def __init__(self, net, input_size: Sequence[int]) -> None:
        net = unwrap(net)
        self.counter = BitOpsCounter(net, input_size)
        layers = quant_layers(net)
        self.numel = {n: m.weight.numel() for n, m in layers.items()}
        self.fixed_bytes = model_size_bytes(net, {n: (0, 0) for n in layers})
        self.layers = list(layers)

    def bitops(self, config: Mapping[str, Tuple[int, int]]) -> float:
        return self.counter.bitops(config)

    def size_bytes(self, config: Mapping[str, Tuple[int, int]]) -> float:
        return self.fixed_bytes + sum(self.numel[n] * config[n][0] for n in self.numel) / 8.0

    def uniform8_bitops(self) -> float:
        """BitOPs with every quantized layer at 8/8 bits (the reference of ratio budgets)."""
        return float(sum(m * 64 for m in self.counter.macs.values()))
