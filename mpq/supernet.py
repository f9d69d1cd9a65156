"""Supernet conversion and bit-configuration API.

A *configuration* is a dict ``{layer_name: (w_bits, a_bits)}`` over the quantized layers of a model,
named as in ``model.named_modules()`` of the float model.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import (QUANT_LAYERS, QuantConv2d, QuantLinear, SwitchableBatchNorm2d, bn_key,
                     reroute_functional_layers)
from .quantizer import FLOAT_BITS, check_bits

BitConfig = Dict[str, Tuple[int, int]]
PINNED_BITS = 8


def is_pinned(layer: nn.Module) -> bool:
    """A layer with a single weight and a single activation candidate (the 8-bit first/last layers)
    never changes bits: it is not sampled, scheduled or searched."""
    return len(layer.w_candidates) == 1 and len(layer.a_candidates) == 1


def has_weight_choice(layer: nn.Module) -> bool:
    """A layer whose weight bit-width can change (more than one weight candidate): only such a layer
    is scheduled (bit-width freezing) and gets the IDM / quantization-error losses."""
    return len(layer.w_candidates) > 1


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise conv: one input channel per group (``weight.shape[1] == 1``) and several groups."""
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.weight.shape[1] == 1


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / torch.compile wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not isinstance(model, QUANT_LAYERS):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# Statuses of :class:`LayerReport`.
QUANTIZED = "quantized"
PINNED = "pinned 8-bit"
LEFT_FLOAT = "left float"


class LayerReport(NamedTuple):
    """What :func:`quantize_model` did with one weight layer.

    Attributes:
        name: the module name (as in ``model.named_modules()``).
        kind: the float module's type name (``"Conv2d"``, ``"Linear"``, ``"MultiheadAttention"``
            for its in-projection, ``"ConvTranspose2d"``, ...).
        status: ``"quantized"`` (switchable bits), ``"pinned 8-bit"`` (quantized, fixed at 8/8) or
            ``"left float"`` (not converted: it runs in float and costs no BitOPs).
        reason: why it is pinned or left float (``""`` for a plainly quantized layer).
    """
    name: str
    kind: str
    status: str
    reason: str


_MHA_IN = "nn.MultiheadAttention's fused kernel reads in_proj_weight directly"
_MHA_CHILD = "inside nn.MultiheadAttention: its fused kernel reads the weights directly"
# Weight layers mpq does not convert (quantize_model handles Conv2d and Linear only).
_OTHER_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Bilinear)


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _weight_read_by(ancestors: Sequence[Tuple[str, nn.Module]], name: str) -> Optional[str]:
    """The type name of the first enclosing module whose ``forward`` reads the layer ``name``'s
    weight as a tensor (``self.<path>.weight`` handed to a functional call, bypassing the layer's
    own forward), or None. Reading only its ``dtype``/``device``/``shape`` is harmless."""
    for anc_name, anc in ancestors:
        rel = re.escape(name[len(anc_name) + 1:] if anc_name else name)
        if re.search(rf"self\.{rel}\.weight\b(?!\.(dtype|device|shape|size|ndim))", _forward_source(type(anc))):
            return type(anc).__name__
    return None


def _scan(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[LayerReport]]:
    """``(convertible, left_float)``: the Conv2d/Linear layers to convert, in registration order,
    and the weight layers that stay float with the reason: those inside nn.MultiheadAttention,
    those whose weight an enclosing module's forward reads directly (a replaced layer's forward
    would never run) and unsupported types (Conv1d/3d, ConvTranspose, Bilinear)."""
    convertible: List[Tuple[str, nn.Module]] = []
    left: List[LayerReport] = []

    def visit(module: nn.Module, prefix: str, ancestors: List[Tuple[str, nn.Module]]) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QUANT_LAYERS):
                continue
            if isinstance(child, nn.MultiheadAttention):
                left.append(LayerReport(full, type(child).__name__, LEFT_FLOAT, _MHA_IN))
                left.extend(LayerReport(f"{full}.{n}", type(m).__name__, LEFT_FLOAT, _MHA_CHILD)
                            for n, m in child.named_modules()
                            if n and isinstance(m, (nn.Linear,) + _OTHER_WEIGHT_LAYERS))
            elif isinstance(child, (nn.Conv2d, nn.Linear)):
                reader = _weight_read_by(ancestors, full)
                if reader is None:
                    convertible.append((full, child))
                else:
                    left.append(LayerReport(full, type(child).__name__, LEFT_FLOAT,
                                            f"{reader}.forward reads its .weight directly (bypasses the layer)"))
            elif isinstance(child, _OTHER_WEIGHT_LAYERS):
                left.append(LayerReport(full, type(child).__name__, LEFT_FLOAT,
                                        f"{type(child).__name__} is not supported (Conv2d and Linear only)"))
            else:
                visit(child, full, ancestors + [(full, child)])

    visit(model, "", [("", model)])
    return convertible, left


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``model`` by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def quantize_model(model: nn.Module, w_bits: Sequence[int] = (2, 3, 4, 5, 6),
                   a_bits: Sequence[int] = (2, 3, 4, 5, 6),
                   keep_8bit: Iterable[str] = ("first", "last"), per_channel: bool = True,
                   bn: str = "shared", w_init: str = "mean_abs", grad_scale: bool = True,
                   depthwise_bits: Optional[Sequence[int]] = None,
                   first_input_bits: int = PINNED_BITS) -> nn.Module:
    """Turn every Conv2d/Linear of ``model`` into a switchable-precision layer, in place.

    Args:
        w_bits, a_bits: candidate weight / activation bit-widths (2-8, 32 = float).
        keep_8bit: layers pinned to 8/8 bits: ``"first"``, ``"last"`` and/or layer names; ``()``
            quantizes every layer with the candidates.
        per_channel: per-output-channel weight step sizes (else per tensor).
        bn: ``"shared"`` (one BatchNorm per layer; re-calibrate per configuration before evaluating)
            or ``"switchable"`` (one BatchNorm per (w_bits, a_bits) of the conv that feeds it).
        w_init: weight step-size init, ``"mean_abs"`` (LSQ) or ``"three_sigma"`` (the one-shot
            paper's ``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``).
        grad_scale: LSQ step-size gradient scale ``1/sqrt(N Q_P)`` (the paper's code: off).
        depthwise_bits: weight and activation candidates of depthwise convs (``None``: ``w_bits`` /
            ``a_bits``; the paper's MobileNetV2 uses (3, 4, 5, 6)).
        first_input_bits: input bits of the pinned first layer: 8, or 32 to leave the image
            unquantized as the paper does (BitOPs still count that input at 8 bits).
    Returns the same ``model`` object. What happened to each weight layer (quantized, pinned 8-bit,
    left float and why) is in :func:`quantization_report` (``model.mpq_report``).

    Modules whose forward hands a child layer's ``.weight`` to a functional call (torchvision's
    Swin window attention) are first replaced by equivalents that call the layer
    (:func:`mpq.layers.reroute_functional_layers`), so their projections are quantized for real;
    any other layer whose weight an enclosing forward reads directly is left float and reported.
    """
    w_bits = check_bits(w_bits, "w_bits")
    a_bits = check_bits(a_bits, "a_bits")
    dw_bits = None if depthwise_bits is None else check_bits(depthwise_bits, "depthwise_bits")
    if first_input_bits not in (PINNED_BITS, FLOAT_BITS):
        raise ValueError(f"first_input_bits: must be {PINNED_BITS} or {FLOAT_BITS}, got {first_input_bits!r}")
    if bn not in ("shared", "switchable"):
        raise ValueError(f"bn: {bn!r} is not allowed; allowed: ['shared', 'switchable']")
    rerouted = reroute_functional_layers(model)
    layers, left_float = _scan(model)
    if not layers:
        raise ValueError("quantize_model: the model has no Conv2d or Linear layer to quantize")
    names = [n for n, _ in layers]
    pinned = set()
    for k in keep_8bit:
        if k == "first":
            pinned.add(names[0])
        elif k == "last":
            pinned.add(names[-1])
        elif k in names:
            pinned.add(k)
        else:
            raise ValueError(f"keep_8bit: {k!r} is neither 'first', 'last' nor a quantizable layer; "
                             f"layers: {names}")
    if first_input_bits != PINNED_BITS and names[0] not in pinned:
        raise ValueError(f"first_input_bits: {first_input_bits} needs the first layer pinned "
                         f"(keep_8bit with 'first' or {names[0]!r})")
    for name, layer in layers:
        if name in pinned:
            wb = (PINNED_BITS,)
            ab = (first_input_bits,) if name == names[0] else (PINNED_BITS,)
        elif dw_bits is not None and is_depthwise(layer):
            wb, ab = dw_bits, dw_bits
        else:
            wb, ab = w_bits, a_bits
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        set_submodule(model, name, cls.from_float(layer, wb, ab, per_channel=per_channel,
                                                   w_init=w_init, grad_scale=grad_scale))
    if bn == "switchable":
        _make_switchable_bn(model)
    model.mpq_report = _build_report(model, layers, left_float, pinned, rerouted, first_input_bits)
    model.mpq_spec = {"w_bits": list(w_bits), "a_bits": list(a_bits),
                      "pinned": sorted(pinned), "per_channel": per_channel, "bn": bn,
                      "depthwise_bits": None if dw_bits is None else list(dw_bits),
                      "first_input_bits": int(first_input_bits)}
    return model


def _pinned_reason(name: str, names: Sequence[str], first_input_bits: int) -> str:
    why = [w for w, hit in (("first layer", name == names[0]), ("last layer", name == names[-1])) if hit]
    reason = " and ".join(why) or "named"
    reason += " in keep_8bit"
    if name == names[0] and first_input_bits == FLOAT_BITS:
        reason += "; its input stays float (first_input_bits=32)"
    return reason


def _build_report(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]],
                  left_float: Sequence[LayerReport], pinned: Iterable[str], rerouted: Mapping[str, str],
                  first_input_bits: int) -> List[LayerReport]:
    """One :class:`LayerReport` per weight layer, in registration order."""
    names = [n for n, _ in layers]
    pinned = set(pinned)
    rows = list(left_float)
    for name, layer in layers:
        parent = name.rpartition(".")[0]
        if name in pinned:
            status, reason = PINNED, _pinned_reason(name, names, first_input_bits)
        elif parent in rerouted:
            status, reason = QUANTIZED, f"called by {rerouted[parent]} (re-routed functional attention)"
        else:
            status, reason = QUANTIZED, ""
        rows.append(LayerReport(name, type(layer).__name__, status, reason))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(rows, key=lambda r: order.get(r.name, len(order)))


def quantization_report(model: nn.Module) -> List[LayerReport]:
    """What :func:`quantize_model` did with each weight layer of ``model``, in registration order:
    a list of :class:`LayerReport` ``(name, kind, status, reason)`` with status ``"quantized"``,
    ``"pinned 8-bit"`` or ``"left float"``. Every layer reported quantized or pinned runs its weight
    and input quantizers in the forward and is counted by the BitOPs model; a layer left float
    runs in float and costs no BitOPs. Example (a torchvision ViT)::

        [r for r in mpq.quantization_report(net) if r.status == "left float"]
        # [LayerReport(name='encoder.layers.encoder_layer_0.self_attention', kind='MultiheadAttention',
        #              status='left float', reason="nn.MultiheadAttention's fused kernel reads ..."), ...]
    """
    net = unwrap(model)
    report = getattr(net, "mpq_report", None)
    if report is None:
        raise ValueError("quantization_report: the model was not converted by mpq.quantize_model")
    return list(report)


def bn_after_conv(model: nn.Module) -> Dict[str, str]:
    """``{conv_layer_name: bn_module_name}`` for each BatchNorm2d (plain or switchable) that directly
    follows a quantized conv in registration order with matching channels (conv -> BN as in every
    torchvision CNN). Used for switchable BN and for IDM's post-BN feature alignment."""
    model = unwrap(model)
    links: Dict[str, str] = {}
    prev_name, prev = None, None
    for name, m in model.named_modules():
        if prev_name is not None and name.startswith(prev_name + "."):
            continue  # children of a quant layer (its quantizers) or of a switchable BN
        if isinstance(m, (nn.BatchNorm2d, SwitchableBatchNorm2d)):
            if isinstance(prev, QuantConv2d) and prev.out_channels == m.num_features:
                links[prev_name] = name
        elif len(list(m.children())) and not isinstance(m, QUANT_LAYERS):
            continue  # containers do not break a conv -> BN pair
        if isinstance(m, nn.Identity):
            continue
        prev_name, prev = name, m
    return links


def _make_switchable_bn(model: nn.Module) -> None:
    """Replace each BatchNorm2d that directly follows a quantized conv by a
    :class:`SwitchableBatchNorm2d` linked to that conv."""
    for src_name, bn_name in bn_after_conv(model).items():
        bnm = model.get_submodule(bn_name)
        if isinstance(bnm, SwitchableBatchNorm2d):
            continue
        src = model.get_submodule(src_name)
        keys = [bn_key(w, a) for w in src.w_candidates for a in src.a_candidates]
        sbn = SwitchableBatchNorm2d(bnm, keys)
        sbn.source = src_name
        sbn.active = bn_key(src.w_bits, src.a_bits)
        set_submodule(model, bn_name, sbn)


def quant_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: layer}`` of the switchable layers, in registration order."""
    model = unwrap(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def _switchable_bns(model: nn.Module) -> Iterator[SwitchableBatchNorm2d]:
    for m in unwrap(model).modules():
        if isinstance(m, SwitchableBatchNorm2d):
            yield m


def _check_pair(name: str, value, layer) -> Tuple[int, int]:
    allowed = f"allowed w_bits {list(layer.w_candidates)}, a_bits {list(layer.a_candidates)}"
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise ValueError(f"layer {name!r}: malformed bit value {value!r}; expected a pair "
                         f"(w_bits, a_bits) of integers, {allowed}")
    w, a = int(value[0]), int(value[1])
    if w not in layer.w_candidates or a not in layer.a_candidates:
        raise ValueError(f"layer {name!r}: bits (w={w}, a={a}) are not among the candidates; {allowed}")
    return w, a


def set_bits(model: nn.Module, config: Mapping[str, Sequence[int]]) -> None:
    """Select a subnet: set ``(w_bits, a_bits)`` of the named layers (others keep theirs).

    The whole config is validated before anything changes; a bad entry raises ``ValueError`` naming
    the layer and the allowed values.
    """
    layers = quant_layers(model)
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping {{layer_name: (w_bits, a_bits)}}, got {type(config).__name__}")
    checked = {}
    for name, value in config.items():
        if name not in layers:
            raise ValueError(f"unknown layer {name!r}; quantized layers: {list(layers)}")
        checked[name] = _check_pair(name, value, layers[name])
    for name, (w, a) in checked.items():
        layers[name].set_active(w, a)
    for sbn in _switchable_bns(model):
        src = layers[sbn.source]
        sbn.active = bn_key(src.w_bits, src.a_bits)


def use_tensor_bits(model: nn.Module, enabled: bool = True) -> None:
    """Make every quantized layer read its bit-widths from tensors (``train.compile``): a compiled
    supernet then traces one graph for all configurations instead of one per configuration
    (torch.compile guards on Python attributes such as ``w_bits``; it does not on tensor values).
    Outputs equal the default path's; every step size of a layer then gets a gradient (zeros for
    the unselected ones), which :func:`drop_unused_step_grads` removes before the optimizer step."""
    for m in quant_layers(model).values():
        m.bits_as_tensors = bool(enabled)
        m.set_active(m.w_bits, m.a_bits)


def drop_unused_step_grads(model: nn.Module, configs: Sequence[Mapping[str, Sequence[int]]]) -> None:
    """Set to ``None`` the gradient of every step size whose bit-width no config of ``configs`` used
    at that layer, so the optimizer (momentum, weight decay) leaves it alone, as when the default
    path never touched it."""
    for name, m in quant_layers(model).items():
        if any(name not in c for c in configs):
            continue   # a config without the layer ran it at whatever bits it had: keep its gradients
        used_w = {int(c[name][0]) for c in configs}
        used_a = {int(c[name][1]) for c in configs}
        for quant, used in ((m.w_quant, used_w), (m.a_quant, used_a)):
            for b, p in quant.step_sizes().items():
                if b not in used:
                    p.grad = None


def get_bits(model: nn.Module) -> BitConfig:
    """The active configuration ``{layer_name: (w_bits, a_bits)}``."""
    return {n: (m.w_bits, m.a_bits) for n, m in quant_layers(model).items()}


def uniform_config(model: nn.Module, w_bits: int, a_bits: int) -> BitConfig:
    """Every quantized layer at ``w_bits``/``a_bits``; pinned (8/8) layers keep their bits."""
    cfg = {}
    for name, layer in quant_layers(model).items():
        if is_pinned(layer):
            cfg[name] = (layer.w_candidates[0], layer.a_candidates[0])
        else:
            cfg[name] = _check_pair(name, (w_bits, a_bits), layer)
    return cfg


def _w_choices(layer, respect_frozen: bool) -> Tuple[int, ...]:
    return tuple(layer.w_allowed) if respect_frozen else layer.w_candidates


def _a_choices(layer, respect_frozen: bool) -> Tuple[int, ...]:
    return tuple(getattr(layer, "a_allowed", layer.a_candidates)) if respect_frozen else layer.a_candidates


def max_config(model: nn.Module) -> BitConfig:
    """Every layer at its highest candidate bit-widths."""
    return {n: (max(m.w_candidates), max(m.a_candidates)) for n, m in quant_layers(model).items()}


def min_config(model: nn.Module, respect_frozen: bool = True) -> BitConfig:
    """Every layer at its lowest bit-widths (the lowest *allowed* bits when ``respect_frozen``)."""
    return {n: (min(_w_choices(m, respect_frozen)), min(_a_choices(m, respect_frozen)))
            for n, m in quant_layers(model).items()}


def random_config(model: nn.Module, generator: Optional[torch.Generator] = None,
                  respect_frozen: bool = True) -> BitConfig:
    """Independently uniform per layer over its (allowed) candidates, drawn from ``generator``.

    Every rank of a distributed job passes a generator seeded alike, so all draw the same config.
    """
    cfg = {}
    for name, m in quant_layers(model).items():
        ws, acts = _w_choices(m, respect_frozen), _a_choices(m, respect_frozen)
        wi = int(torch.randint(len(ws), (1,), generator=generator))
        ai = int(torch.randint(len(acts), (1,), generator=generator))
        cfg[name] = (ws[wi], acts[ai])
    return cfg


def calibrate_activations(model: nn.Module, batch: torch.Tensor) -> None:
    """Initialise every activation step size (and its sign) from one batch, at the max config.

    BatchNorm layers normalise with the batch's own statistics during this forward (as in a
    training forward), so a fresh model's mean-0/var-1 running statistics cannot shrink the
    activations the step sizes are fitted to; the running statistics are left unchanged.
    """
    net = unwrap(model)
    saved = get_bits(net)
    set_bits(net, max_config(net))
    for layer in quant_layers(net).values():
        layer.a_quant.mark_uncalibrated()
    was_training = net.training
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn_state = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    net.eval()
    for m in bns:
        m.train()
    try:
        with torch.no_grad():
            net(batch)
    finally:
        for m, state in zip(bns, bn_state):
            for k, v in state.items():
                getattr(m, k).copy_(v)
        net.train(was_training)
        set_bits(net, saved)
