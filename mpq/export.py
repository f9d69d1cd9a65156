"""Export one configuration of a supernet as a fixed-precision model.

The exported model is the float architecture (rebuilt with :func:`mpq.models.build_model` from the
checkpoint's spec) in which

* every quantized Conv2d / Linear becomes a :class:`FixedConv2d` / :class:`FixedLinear`: plain
  modules holding the weights as **integer codes** plus a per-output-channel scale, the bias, and the
  input-activation step size - no per-bit-width step sizes, no switchable state;
* every BatchNorm that directly follows a quantized conv (:func:`mpq.supernet.bn_after_conv`) is
  **folded** into that conv (per-channel scale ``s_w * gamma / sqrt(var + eps)`` and bias
  ``beta - mean * gamma / sqrt(var + eps)``) and replaced by ``nn.Identity``;
* the bias is held as an integer runtime holds it: ``round(bias / (s_a * s_w))`` in int32, times
  ``s_a * s_w`` (per output channel; a layer with a float input keeps a float bias);
* input activations are still fake-quantized with :func:`mpq.quantizer.fake_quant`, the function the
  supernet's forward uses.

Folding and the int32 bias change the numbers a little (values at rounding midpoints flip), so the
search scores configurations in exactly this form: :func:`fixed_model` builds it in memory and
:class:`search.evaluator.Evaluator` (``form="exported"``) evaluates it; the searched accuracy is the
exported model's. :mod:`search.onnx_export` writes the same model as ONNX QDQ.

File format (``torch.load(path, weights_only=True)`` loads it; plain containers and tensors only)::

    {"format": "mpq-fixed", "version": 1,
     "spec": checkpoint spec ({"model": {...}, "quant": {...}, "input_size": [...]}) or None,
     "config": {layer: [w_bits, a_bits]},
     "layers": {layer: {"kind": "conv2d" | "linear", "w_bits", "a_bits", "shape",
                        "packed": uint8 tensor (codes + 2^(b-1), bit-packed LSB first) | None,
                        "weight": float tensor (only for 32-bit weights) | None,
                        "scale": float tensor (C_out, 1, ...), "bias": float tensor | None,
                        "act_step": tensor | None, "act_qn", "act_qp", "folded_bn": name | None,
                        + geometry: in/out channels, kernel_size, stride, padding, dilation,
                          groups, padding_mode}},
     "state": the remaining float parameters/buffers (other BNs, embeddings, ...),
     "meta": free-form info (bitops, accuracy, checkpoint hash, "preprocess": {"mean", "std",
             "input_size"} of the input, ...)}
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .errors import UserError
from .layers import QuantConv2d, QuantLinear, SwitchableBatchNorm2d, reroute_functional_layers
from .quantizer import FLOAT_BITS, fake_quant, integer_codes
from .supernet import bn_after_conv, get_bits, quant_layers, set_bits, set_submodule, unwrap

FORMAT = "mpq-fixed"
VERSION = 1


# --------------------------------------------------------------------------------------- bit packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes in ``[-2^(b-1), 2^(b-1) - 1]`` into a uint8 stream of
    ``ceil(numel * bits / 8)`` bytes (each code offset by ``2^(b-1)``, bits LSB first)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits must be in 1..8, got {bits}")
    offset = 2 ** (bits - 1)
    u = codes.detach().flatten().to(torch.int32) + offset
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2 ** bits):
        raise ValueError(f"pack_codes: codes outside the {bits}-bit signed range")
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((u.unsqueeze(1) >> shifts) & 1).to(torch.uint8).flatten()
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, torch.zeros(pad, dtype=torch.uint8)])
    weights = (2 ** torch.arange(8, dtype=torch.int32))
    return (stream.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` signed codes as int16."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_codes: bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.numel() * 8 < numel * bits:
        raise ValueError("unpack_codes: the packed tensor is not uint8 or too short")
    shifts = torch.arange(8, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 1).flatten()[:numel * bits]
    u = (stream.view(numel, bits) * (2 ** torch.arange(bits, dtype=torch.int32))).sum(1)
    return (u - 2 ** (bits - 1)).to(torch.int16)


# ---------------------------------------------------------------------------------- fixed modules
class _FixedMixin:
    w_bits: int
    a_bits: int

    def _init_fixed(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    act_step: Optional[torch.Tensor], act_qn: int, act_qp: int, w_bits: int,
                    a_bits: int) -> None:
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.act_qn, self.act_qp = int(act_qn), int(act_qp)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("act_step", act_step)
        # Derived once (not saved: the file holds the packed codes and the float bias), so that
        # inference costs what the float model costs plus the activation fake-quant, and the forward
        # is a pure function of buffers (torch.export / ONNX export work after any number of calls).
        self.register_buffer("weight_dq", None, persistent=False)
        self.register_buffer("bias_q", None, persistent=False)
        self.register_buffer("bias_dq", None, persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the derived buffers from the codes, scales, bias and activation step:

        * ``weight_dq = codes * scale`` (BN folded into the scale where it was folded);
        * the bias as a deployment runtime holds it: ``bias_q = round(bias / (s_a * s_w))`` in int32
          and ``bias_dq = bias_q * (s_a * s_w)`` per output channel (``s_a`` the input step, ``s_w``
          the channel's weight scale); a float input (no ``s_a``) keeps the float bias.
        """
        self.weight_dq = self.weight_codes.to(self.weight_scale.dtype) * self.weight_scale
        self.bias_q, self.bias_dq = None, self.bias
        if self.bias is not None and self.act_step is not None:
            bscale = self.bias_scale()
            q = torch.round(self.bias / torch.where(bscale == 0, torch.ones_like(bscale), bscale))
            q = q.clamp_(-2.0 ** 31, 2.0 ** 31 - 1)
            self.bias_q = q.to(torch.int32)
            self.bias_dq = self.bias_q.to(bscale.dtype) * bscale

    def bias_scale(self) -> torch.Tensor:
        """``s_a * s_w`` per output channel (float32, as ONNX's int32 bias DequantizeLinear uses it)."""
        return (self.act_step.reshape(()) * self.weight_scale.reshape(-1)).to(self.weight_scale.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * scale`` (see :meth:`refresh`)."""
        return self.weight_dq

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_step is None:
            return x
        return fake_quant(x, self.act_step, self.act_qn, self.act_qp)

    def fixed_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}"


class FixedConv2d(_FixedMixin, nn.Module):
    """A Conv2d with integer weight codes, a per-channel scale and fake-quantized input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 groups: int, padding_mode: str, codes: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], act_step: Optional[torch.Tensor], act_qn: int,
                 act_qp: int, w_bits: int, a_bits: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self._init_fixed(codes, scale, bias, act_step, act_qn, act_qp, w_bits, a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        w = self.dequantized_weight()
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(F.pad(x, pad, mode=self.padding_mode), w, self.bias_dq, self.stride, 0,
                            self.dilation, self.groups)
        return F.conv2d(x, w, self.bias_dq, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, {self.fixed_repr()}")


class FixedLinear(_FixedMixin, nn.Module):
    """A Linear layer with integer weight codes, a per-channel scale and fake-quantized input."""

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], act_step: Optional[torch.Tensor], act_qn: int,
                 act_qp: int, w_bits: int, a_bits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_fixed(codes, scale, bias, act_step, act_qn, act_qp, w_bits, a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.dequantized_weight(), self.bias_dq)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fixed_repr()}"


# ------------------------------------------------------------------------------------------ payload
def _bn_fold(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(g, h)`` with ``bn(y) == g * y + h`` in eval mode (computed in float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    g = 1.0 / torch.sqrt(var + bn.eps)
    if bn.affine:
        g = g * bn.weight.detach().double()
        h = bn.bias.detach().double() - mean * g
    else:
        h = -mean * g
    return g, h


def _direct_state(module: nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    out = {}
    for n, p in module.named_parameters(recurse=False):
        if p is not None:
            out[prefix + n] = p.detach().cpu().clone()
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for n, b in module.named_buffers(recurse=False):
        if b is not None and n not in non_persistent:
            out[prefix + n] = b.detach().cpu().clone()
    return out


def _plain_state(net: nn.Module, skipped: set, float_layers: Optional[Mapping[str, nn.Module]] = None
                 ) -> Dict[str, torch.Tensor]:
    """The float state of every module outside ``skipped`` (name prefixes): the active BN of a
    switchable BN, and for the layers in ``float_layers`` only their float weight and bias."""
    state: Dict[str, torch.Tensor] = {}
    for name, module in net.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skipped):
            continue
        if float_layers is not None and name in float_layers:
            state[f"{name}.weight"] = module.weight.detach().cpu()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().cpu()
            skipped.add(name)
            continue
        if isinstance(module, SwitchableBatchNorm2d):
            state.update(_direct_state(module.current(), f"{name}."))
            skipped.add(name)
            continue
        state.update(_direct_state(module, f"{name}." if name else ""))
    return state


def layer_arrays(net: nn.Module, name: str, layer: nn.Module, bn_name: Optional[str]) -> Dict[str, Any]:
    """The exported form of one quantized layer at its active bits: integer weight codes, the
    per-output-channel scale (times the folded BN's ``gamma / sqrt(var + eps)`` when ``bn_name``
    names the BN that follows it), the bias (with the folded BN's shift), the input step and grid,
    and the layer geometry. Scale and bias are computed in float64 and stored in the weights' dtype."""
    w_bits, a_bits = int(layer.w_bits), int(layer.a_bits)
    weight = layer.weight.detach().cpu()
    out_ch = weight.shape[0]
    shape = (out_ch,) + (1,) * (weight.dim() - 1)
    bias = layer.bias.detach().cpu().double() if layer.bias is not None else None
    if w_bits == FLOAT_BITS:
        codes = weight.clone()
        scale = torch.ones(shape, dtype=torch.float64)
    else:
        step = layer.w_quant.step_for(w_bits).detach().cpu()
        qn, qp = layer.w_quant.grid(w_bits)
        codes = integer_codes(weight, step, qn, qp).to(torch.int16)
        scale = step.double().expand(shape).clone() if step.numel() == 1 else step.double().reshape(shape)
    if bn_name is not None:
        bn_mod = net.get_submodule(bn_name)
        bn = bn_mod.current() if isinstance(bn_mod, SwitchableBatchNorm2d) else bn_mod
        g, h = _bn_fold(bn)
        g = g.cpu()
        scale = scale * g.view(shape)
        bias = h.cpu() + (bias * g if bias is not None else 0.0)
    if a_bits == FLOAT_BITS:
        act_step, act_qn, act_qp = None, 0, 0
    else:
        act_step = layer.a_quant.step_for(a_bits).detach().cpu().clone()
        act_qn, act_qp = layer.a_quant.grid(a_bits)
    entry: Dict[str, Any] = {
        "kind": "conv2d" if isinstance(layer, QuantConv2d) else "linear",
        "w_bits": w_bits, "a_bits": a_bits, "shape": list(weight.shape), "codes": codes,
        "scale": scale.to(weight.dtype), "bias": bias.to(weight.dtype) if bias is not None else None,
        "act_step": act_step, "act_qn": int(act_qn), "act_qp": int(act_qp), "folded_bn": bn_name,
    }
    if isinstance(layer, QuantConv2d):
        entry.update({"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                      "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                      "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                      "dilation": list(layer.dilation), "groups": layer.groups,
                      "padding_mode": layer.padding_mode})
    else:
        entry.update({"in_features": layer.in_features, "out_features": layer.out_features})
    return entry


def fixed_payload(net: nn.Module, config: Optional[Mapping[str, Sequence[int]]] = None,
                  spec: Optional[Mapping[str, Any]] = None, fold_bn: bool = True,
                  meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The exported file's content (a dict of plain containers and tensors) for ``config``.

    The BN statistics in ``net`` are used as they are: with a shared-BN supernet, re-calibrate them
    for ``config`` first (:meth:`search.evaluator.Evaluator.prepare`, or pass ``bn_data`` to
    :func:`export`)."""
    net = unwrap(net)
    if config is not None:
        set_bits(net, config)
    config = get_bits(net)
    links = bn_after_conv(net) if fold_bn else {}
    skip_prefixes = []
    entries: Dict[str, Dict[str, Any]] = {}
    folded: Dict[str, str] = {}
    for name, layer in quant_layers(net).items():
        skip_prefixes.append(name)
        entry = layer_arrays(net, name, layer, links.get(name))
        codes = entry.pop("codes")
        w_bits = entry["w_bits"]
        entry["packed"] = None if w_bits == FLOAT_BITS else pack_codes(codes, w_bits)
        entry["weight"] = codes.float() if w_bits == FLOAT_BITS else None
        if entry["folded_bn"] is not None:
            folded[name] = entry["folded_bn"]
            skip_prefixes.append(entry["folded_bn"])
        entries[name] = entry
    # everything else: the float state of the modules that are neither quantized layers nor folded BNs
    state = _plain_state(net, set(p for p in skip_prefixes if p))
    _share_storage(entries)
    return {"format": FORMAT, "version": VERSION,
            "spec": _plain(spec) if spec is not None else None,
            "config": {n: [int(w), int(a)] for n, (w, a) in config.items()},
            "layers": entries, "folded": folded, "state": state,
            "meta": _plain(meta) if meta is not None else {}}


def fixed_model(net: nn.Module, config: Optional[Mapping[str, Sequence[int]]] = None,
                fold_bn: bool = True) -> nn.Module:
    """The fixed-precision model of ``config`` built in memory (no file), numerically the model
    :func:`export` writes and :func:`load_fixed` reads: the search scores configurations in this
    form, so the searched accuracy is the exported model's. BN statistics are used as they are."""
    import copy
    net = unwrap(net)
    if config is not None:
        set_bits(net, config)
    links = bn_after_conv(net) if fold_bn else {}
    arrays = {name: layer_arrays(net, name, layer, links.get(name))
              for name, layer in quant_layers(net).items()}
    model = copy.deepcopy(net)
    for name, entry in arrays.items():
        set_submodule(model, name, _fixed_module(entry))
        if entry["folded_bn"] is not None:
            set_submodule(model, entry["folded_bn"], nn.Identity())
    for name, m in list(model.named_modules()):
        if isinstance(m, SwitchableBatchNorm2d):
            set_submodule(model, name, m.current())
    p = next(net.parameters(), None)
    if p is not None:
        model.to(p.device)   # the fixed layers were built on the CPU
    model.eval()
    model.mpq_fixed_config = {n: (int(e["w_bits"]), int(e["a_bits"])) for n, e in arrays.items()}
    return model


def _share_storage(entries: Dict[str, Dict[str, Any]]) -> None:
    """Make the layers' tensors views of one buffer per dtype, in place: ``torch.save`` then writes
    one storage per dtype instead of one file record (with its alignment padding) per tensor, which
    is most of the overhead of a small model's file."""
    groups: Dict[torch.dtype, list] = {}
    for name, entry in entries.items():
        for key, t in entry.items():
            if isinstance(t, torch.Tensor):
                groups.setdefault(t.dtype, []).append((name, key, t))
    for dtype, items in groups.items():
        flat = torch.cat([t.detach().reshape(-1) for _, _, t in items]) if items else None
        offset = 0
        for name, key, t in items:
            n = t.numel()
            entries[name][key] = flat[offset:offset + n].view(t.shape)
            offset += n


def _plain(obj: Any) -> Any:
    """Deep-copy into plain containers (lists, dicts, numbers, strings, tensors)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None or isinstance(obj, torch.Tensor):
        return obj
    return str(obj)


def _fixed_module(entry: Mapping[str, Any]) -> nn.Module:
    w_bits = int(entry["w_bits"])
    shape = [int(s) for s in entry["shape"]]
    numel = 1
    for s in shape:
        numel *= s
    if entry.get("codes") is not None:   # in memory (fixed_model)
        codes = entry["codes"].reshape(shape).clone()
        codes = codes.to(torch.int8) if w_bits <= 8 else codes
    elif w_bits == FLOAT_BITS:
        codes = entry["weight"].reshape(shape).clone()
    else:
        codes = unpack_codes(entry["packed"], w_bits, numel).reshape(shape)
        codes = codes.to(torch.int8) if w_bits <= 8 else codes
    scale = entry["scale"].clone()
    bias = entry["bias"].clone() if entry.get("bias") is not None else None
    act = entry["act_step"].clone() if entry.get("act_step") is not None else None
    common = dict(codes=codes, scale=scale, bias=bias, act_step=act, act_qn=int(entry["act_qn"]),
                  act_qp=int(entry["act_qp"]), w_bits=w_bits, a_bits=int(entry["a_bits"]))
    if entry["kind"] == "conv2d":
        pad = entry["padding"]
        return FixedConv2d(entry["in_channels"], entry["out_channels"], entry["kernel_size"],
                           entry["stride"], pad if isinstance(pad, str) else tuple(pad),
                           entry["dilation"], entry["groups"], entry["padding_mode"], **common)
    if entry["kind"] == "linear":
        return FixedLinear(entry["in_features"], entry["out_features"], **common)
    raise ValueError(f"unknown layer kind {entry['kind']!r}")


def fixed_from_payload(payload: Mapping[str, Any], model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild the fixed-precision model from an exported payload.

    ``model``: the float architecture to fill in (default: ``mpq.models.build_model`` from the
    payload's spec). Returns it in eval mode, with ``mpq_fixed_config`` set."""
    if model is None:
        spec = payload.get("spec")
        if not spec or "model" not in spec:
            raise UserError("exported model: it carries no model spec; pass the float architecture "
                            "as load_fixed(path, model=...)")
        from .models import build_model_from_spec
        m = spec["model"]
        model = build_model_from_spec(m)
    # the float architecture's Swin attention reads .weight itself: make it call the fixed layers
    reroute_functional_layers(model)
    for name, entry in payload["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"exported model: layer {name!r} does not exist in the architecture") from None
        if not isinstance(old, (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear)):
            raise UserError(f"exported model: {name!r} is a {type(old).__name__}, not a Conv2d/Linear")
        set_submodule(model, name, _fixed_module(entry))
    for bn_name in payload.get("folded", {}).values():
        set_submodule(model, bn_name, nn.Identity())
    missing, unexpected = model.load_state_dict(payload["state"], strict=False)
    fixed_keys = {k for k in model.state_dict() if any(
        k.startswith(n + ".") for n in payload["layers"])}
    really_missing = [k for k in missing if k not in fixed_keys]
    if unexpected or really_missing:
        raise UserError(f"exported model: the state does not fit the architecture (missing "
                        f"{really_missing[:5]}, unexpected {list(unexpected)[:5]})")
    model.eval()
    model.mpq_fixed_config = {n: tuple(v) for n, v in payload["config"].items()}
    model.mpq_fixed_meta = dict(payload.get("meta") or {})
    model.mpq_fixed_spec = payload.get("spec")
    return model


# ------------------------------------------------------------------------------------ public API
def export(net: nn.Module, config: Optional[Mapping[str, Sequence[int]]], path: str,
           spec: Optional[Mapping[str, Any]] = None, bn_data=None, bn_batches: int = 8,
           fold_bn: bool = True, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Write the fixed-precision model of ``config`` to ``path`` (atomically).

    Args:
        net: the supernet (its BN statistics are used as they are unless ``bn_data`` is given).
        config: ``{layer: (w_bits, a_bits)}`` (``None``: the active configuration).
        spec: the checkpoint's spec (``ckpt["spec"]``), needed for :func:`load_fixed` to rebuild the
            architecture by name; without it pass the float architecture to ``load_fixed``.
        bn_data: data to re-calibrate BN for ``config`` first (shared-BN supernets), ``bn_batches``
            batches of it.
    Returns ``{"path", "bytes", "float_bytes", "ratio"}`` (file size, size of the float model's
    state saved the same way, and their ratio).
    """
    from .checkpoint import atomic_save
    net = unwrap(net)
    if spec is None and getattr(net, "mpq_model_spec", None) is not None:
        spec = net.mpq_model_spec
    if config is not None:
        set_bits(net, config)
    if bn_data is not None:
        from .batchnorm import recalibrate_bn
        recalibrate_bn(net, bn_data, bn_batches)
    net.eval()
    payload = fixed_payload(net, None, spec, fold_bn, meta)
    atomic_save(payload, path)
    size = os.path.getsize(path)
    fb = float_model_bytes(net)
    return {"path": path, "bytes": size, "float_bytes": fb, "ratio": size / fb if fb else float("nan")}


def load_fixed(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Load an exported fixed-precision model (``weights_only=True``); see :func:`fixed_from_payload`."""
    from .checkpoint import safe_load
    payload = safe_load(path, "exported model")
    if payload.get("format") != FORMAT or "layers" not in payload or "state" not in payload:
        raise UserError(f"exported model: {path!r} is not an mpq fixed-precision model "
                        f"(no 'format: {FORMAT}')")
    return fixed_from_payload(payload, model)


def float_model_bytes(net: nn.Module) -> int:
    """Bytes of the float model's state (quantized layers' float weights and biases, all other
    parameters and buffers; no step sizes, one BN per conv) saved with ``torch.save``: the
    reference for the exported file's size."""
    net = unwrap(net)
    state = _plain_state(net, set(), float_layers=quant_layers(net))
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


__all__ = ["FORMAT", "VERSION", "FixedConv2d", "FixedLinear", "export", "fixed_from_payload", "fixed_model",
           "fixed_payload", "float_model_bytes", "layer_arrays", "load_fixed", "pack_codes", "unpack_codes"]
