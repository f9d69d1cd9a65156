"""ONNX QDQ export of a fixed-precision model: what onnxruntime runs with the searched accuracy.

The fixed model (:func:`mpq.export.load_fixed` / :func:`mpq.export.fixed_model`) is traced with
``torch.fx`` and written node by node as an ONNX graph (opset 21) in the QDQ form that onnxruntime,
TensorRT and other toolchains turn into integer kernels:

* a quantized input activation ``round(clip(x / s_a, -Q_N, Q_P)) * s_a`` becomes
  ``QuantizeLinear(x, s_a, 0) [-> Clip(q, -Q_N, Q_P)] -> DequantizeLinear(q, s_a, 0)`` in an
  INT8/UINT8 container, with the Clip for bit-widths below 8. (4-bit activation containers are
  valid ONNX, but onnxruntime 1.32's graph optimizer breaks on them: it fuses UINT4 Q/DQ into
  QLinearConv, which has no 4-bit kernel, and its Clip/QuantizeLinear fusion rejects 4-bit zero
  points.)
* weights are integer initializers (INT4 for <= 4 bits, 2- and 3-bit codes included; INT8 for 5-8)
  with a per-output-channel scale (axis 0, BatchNorm folded into it) feeding ``DequantizeLinear``;
* a bias after a quantized input is an INT32 initializer at scale ``s_a * s_w`` (per channel), as
  the torch fixed model rounds it (:meth:`mpq.export._FixedMixin.refresh`), so onnxruntime's QDQ
  fusions (e.g. QLinearConv for 8-bit blocks) compute the same numbers;
* 32-bit (float) layers stay float Conv/Gemm.

The input is float32 NCHW, already normalised (``preprocess`` in the metadata: ``(pixel / 255 -
mean) / std`` per channel), with a dynamic batch dimension; the output is the logits.

Supported operations (what torchvision classifiers and mpq's models use): the fixed Conv2d/Linear,
BatchNorm2d (not folded), ReLU, ReLU6/Hardtanh, Sigmoid, SiLU, Hardswish, Tanh, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d to 1x1, Flatten, Dropout/Identity (no-ops), add, mul, cat, ``mean`` over the
spatial dims. Anything else raises a ``ValueError`` naming the operation.
"""
from __future__ import annotations

import json
import operator
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import fx, nn
import torch.nn.functional as F

from mpq.errors import UserError

from mpq.export import FixedConv2d, FixedLinear, _FixedMixin, fixed_from_payload, load_fixed

OPSET = 21
INSTALL_HINT = 'the ONNX export needs the "onnx" extra: pip install -e ".[onnx]"'


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper, TensorProto  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return onnx


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (FixedConv2d, FixedLinear)):
            return True
        return super().is_leaf_module(m, qualname)


def _act_container(bits: int, signed: bool) -> Tuple[int, int, int]:
    """``(onnx dtype, lo, hi)``: the Q/DQ container of a ``bits``-bit activation and its range."""
    from onnx import TensorProto
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    return (TensorProto.INT8 if signed else TensorProto.UINT8), lo, hi


def _np_dtype(onnx_type: int):
    from onnx import TensorProto
    return {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT32: np.int32,
            TensorProto.FLOAT: np.float32, TensorProto.INT64: np.int64}[onnx_type]


class _Builder:
    """Accumulates nodes and initializers; names are unique and readable (module-path based)."""

    def __init__(self) -> None:
        self.nodes: List[Any] = []
        self.inits: List[Any] = []
        self._names: Dict[str, int] = {}

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def const(self, base: str, array: np.ndarray, onnx_type: Optional[int] = None) -> str:
        from onnx import helper, numpy_helper, TensorProto
        name = self.name(base)
        if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
            t = helper.make_tensor(name, onnx_type, list(array.shape), array.astype(np.int32).flatten().tolist())
        elif onnx_type is not None:
            t = numpy_helper.from_array(np.asarray(array).astype(_np_dtype(onnx_type)), name)
        else:
            t = numpy_helper.from_array(np.asarray(array), name)
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, **attrs) -> str:
        from onnx import helper
        out = self.name(base)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _emit_act_quant(b: _Builder, x: str, m: _FixedMixin, base: str, encodings: Dict[str, Any]) -> str:
    if m.act_step is None:
        return x
    signed = m.act_qn > 0
    bits = m.a_bits
    dtype, lo, hi = _act_container(bits, signed)
    step = np.float32(_np(m.act_step).reshape(-1)[0])
    scale = b.const(f"{base}_in_scale", np.array(step, dtype=np.float32))
    zp = b.const(f"{base}_in_zp", np.array(0), dtype)
    q = b.node("QuantizeLinear", [x, scale, zp], f"{base}_in_q")
    if bits < 8:   # narrower than its container
        q = b.node("Clip", [q, b.const(f"{base}_in_lo", np.array(lo), dtype),
                            b.const(f"{base}_in_hi", np.array(hi), dtype)], f"{base}_in_clip")
    dq = b.node("DequantizeLinear", [q, scale, zp], f"{base}_in_dq")
    # keyed by the quantized tensor (two layers may quantize one input differently)
    encodings["activation_encodings"][dq] = [{"bitwidth": bits, "scale": float(step), "offset": 0,
                                              "dtype": "int", "is_symmetric": "True" if signed else "False",
                                              "signed": bool(signed), "input": x, "layer": base}]
    return dq


def _emit_weight(b: _Builder, m: _FixedMixin, base: str, encodings: Dict[str, Any]) -> str:
    from onnx import TensorProto
    codes = _np(m.weight_codes)
    if m.w_bits >= 32:
        return b.const(f"{base}_weight", (codes.astype(np.float32) * _np(m.weight_scale)).astype(np.float32))
    dtype = TensorProto.INT4 if m.w_bits <= 4 else TensorProto.INT8
    w = b.const(f"{base}_weight_q", codes.astype(np.int32), dtype)
    scale_np = _np(m.weight_scale).reshape(-1).astype(np.float32)
    scale = b.const(f"{base}_weight_scale", scale_np)
    zp = b.const(f"{base}_weight_zp", np.zeros(scale_np.shape, dtype=np.int32), dtype)
    encodings["param_encodings"][f"{base}.weight"] = [
        {"bitwidth": int(m.w_bits), "scale": float(s), "offset": 0, "dtype": "int", "is_symmetric": "True"}
        for s in scale_np]
    return b.node("DequantizeLinear", [w, scale, zp], f"{base}_weight_dq", axis=0)


def _emit_bias(b: _Builder, m: _FixedMixin, base: str) -> Optional[str]:
    if m.bias is None:
        return None
    if m.bias_q is None:   # float input: float bias
        return b.const(f"{base}_bias", _np(m.bias).astype(np.float32))
    q = b.const(f"{base}_bias_q", _np(m.bias_q).astype(np.int32))
    scale = b.const(f"{base}_bias_scale", _np(m.bias_scale()).astype(np.float32))
    return b.node("DequantizeLinear", [q, scale], f"{base}_bias_dq", axis=0)


def _pads(padding, kernel, dilation) -> List[int]:
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]   # "same", stride 1
        begin = [t // 2 for t in total]
        return begin + [t - bb for t, bb in zip(total, begin)]
    p = list(padding)
    return p + p


def _emit_fixed(b: _Builder, x: str, m: nn.Module, base: str, encodings: Dict[str, Any]) -> str:
    xq = _emit_act_quant(b, x, m, base, encodings)
    w = _emit_weight(b, m, base, encodings)
    bias = _emit_bias(b, m, base)
    ins = [xq, w] + ([bias] if bias is not None else [])
    if isinstance(m, FixedConv2d):
        if m.padding_mode != "zeros":
            raise ValueError(f"ONNX export: {base}: padding_mode {m.padding_mode!r} is not supported "
                             f"(only 'zeros')")
        return b.node("Conv", ins, base, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                      pads=_pads(m.padding, m.kernel_size, m.dilation), dilations=list(m.dilation),
                      group=int(m.groups))
    return b.node("Gemm", ins, base, transB=1)


def _scalar_attr(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def _pair(v) -> List[int]:
    return [int(v[0]), int(v[1])] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _emit_module(b: _Builder, node: fx.Node, m: nn.Module, args: List[Any], base: str,
                 encodings: Dict[str, Any]) -> str:
    x = args[0]
    if isinstance(m, (FixedConv2d, FixedLinear)):
        return _emit_fixed(b, x, m, base, encodings)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return x
    if isinstance(m, nn.ReLU):
        return b.node("Relu", [x], base)
    if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
        lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
        return b.node("Clip", [x, b.const(f"{base}_min", np.array(lo, np.float32)),
                               b.const(f"{base}_max", np.array(hi, np.float32))], base)
    if isinstance(m, nn.Sigmoid):
        return b.node("Sigmoid", [x], base)
    if isinstance(m, nn.Tanh):
        return b.node("Tanh", [x], base)
    if isinstance(m, nn.SiLU):
        return b.node("Mul", [x, b.node("Sigmoid", [x], f"{base}_sigmoid")], base)
    if isinstance(m, nn.Hardswish):
        return b.node("HardSwish", [x], base)
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None:
            raise ValueError(f"ONNX export: {base}: BatchNorm without running statistics")
        c = m.num_features
        gamma = _np(m.weight) if m.affine else np.ones(c, np.float32)
        beta = _np(m.bias) if m.affine else np.zeros(c, np.float32)
        return b.node("BatchNormalization",
                      [x, b.const(f"{base}_gamma", gamma.astype(np.float32)),
                       b.const(f"{base}_beta", beta.astype(np.float32)),
                       b.const(f"{base}_mean", _np(m.running_mean).astype(np.float32)),
                       b.const(f"{base}_var", _np(m.running_var).astype(np.float32))],
                      base, epsilon=float(m.eps))
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ValueError(f"ONNX export: {base}: MaxPool2d(return_indices=True) is not supported")
        return b.node("MaxPool", [x], base, kernel_shape=_pair(m.kernel_size), strides=_pair(m.stride),
                      pads=_pair(m.padding) * 2, dilations=_pair(m.dilation), ceil_mode=int(m.ceil_mode))
    if isinstance(m, nn.AvgPool2d):
        return b.node("AveragePool", [x], base, kernel_shape=_pair(m.kernel_size),
                      strides=_pair(m.stride), pads=_pair(m.padding) * 2, ceil_mode=int(m.ceil_mode),
                      count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != [1, 1]:
            raise ValueError(f"ONNX export: {base}: AdaptiveAvgPool2d({m.output_size}) is not "
                             f"supported (only output size 1)")
        return b.node("GlobalAveragePool", [x], base)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ValueError(f"ONNX export: {base}: Flatten({m.start_dim}, {m.end_dim}) is not supported")
        return b.node("Flatten", [x], base, axis=1)
    raise ValueError(f"ONNX export: module {base!r} of type {type(m).__name__} is not supported")


def _emit_function(b: _Builder, node: fx.Node, args: List[Any], kwargs: Dict[str, Any], base: str) -> str:
    t = node.target
    if t in (operator.add, operator.iadd, torch.add) or t == "add" or t == "add_":
        if len(args) != 2 or not all(isinstance(a, str) for a in args) or kwargs.get("alpha", 1) != 1:
            raise ValueError(f"ONNX export: {base}: only tensor + tensor additions are supported")
        return b.node("Add", args, base)
    if t in (operator.mul, torch.mul) or t == "mul":
        if not all(isinstance(a, str) for a in args):
            raise ValueError(f"ONNX export: {base}: only tensor * tensor products are supported")
        return b.node("Mul", args, base)
    if t in (F.relu, torch.relu) or t in ("relu", "relu_"):
        return b.node("Relu", [args[0]], base)
    if t is F.relu6:
        return b.node("Clip", [args[0], b.const(f"{base}_min", np.array(0.0, np.float32)),
                               b.const(f"{base}_max", np.array(6.0, np.float32))], base)
    if t in (torch.sigmoid, F.sigmoid) or t == "sigmoid":
        return b.node("Sigmoid", [args[0]], base)
    if t in (F.dropout, F.dropout2d):
        return args[0]
    if t in (torch.flatten,) or t == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if start != 1 or end != -1:
            raise ValueError(f"ONNX export: {base}: flatten({start}, {end}) is not supported (only 1, -1)")
        return b.node("Flatten", [args[0]], base, axis=1)
    if t is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if _pair(size) != [1, 1]:
            raise ValueError(f"ONNX export: {base}: adaptive_avg_pool2d({size}) is not supported")
        return b.node("GlobalAveragePool", [args[0]], base)
    if t is torch.cat:
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return b.node("Concat", list(tensors), base, axis=int(dim))
    if t == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dims = [dims] if isinstance(dims, int) else list(dims)
        axes = b.const(f"{base}_axes", np.array(dims, dtype=np.int64))
        return b.node("ReduceMean", [args[0], axes], base, keepdims=int(bool(keep)))
    raise ValueError(f"ONNX export: operation {t!r} ({node.op} {node.name}) is not supported")


def _as_model(model_or_payload: Union[nn.Module, Mapping[str, Any], str],
              config: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    if isinstance(model_or_payload, str):
        return load_fixed(model_or_payload)
    if isinstance(model_or_payload, Mapping):
        return fixed_from_payload(model_or_payload)
    if isinstance(model_or_payload, nn.Module):
        from mpq.supernet import quant_layers
        if quant_layers(model_or_payload):   # a supernet: its config (BN statistics as they are)
            from mpq.export import fixed_model
            return fixed_model(model_or_payload, config)
        if not any(isinstance(m, _FixedMixin) for m in model_or_payload.modules()):
            raise ValueError("to_onnx: the model holds no fixed-precision layer; export a supernet "
                             "configuration first (mpq.export.fixed_model / load_fixed)")
        return model_or_payload
    raise TypeError(f"to_onnx: expected a fixed model, an exported payload or a path, got "
                    f"{type(model_or_payload).__name__}")


def build_onnx(model_or_payload, input_shape: Sequence[int], preprocess: Optional[Mapping[str, Any]] = None,
               metadata: Optional[Mapping[str, Any]] = None, opset: int = OPSET):
    """The ``onnx.ModelProto`` and AIMET-style encodings of a fixed model (see the module docstring).

    ``input_shape``: ``[C, H, W]`` of one sample (the batch dimension is dynamic)."""
    onnx = _onnx()
    from onnx import helper, TensorProto
    if opset < OPSET:
        raise ValueError(f"to_onnx: opset must be >= {OPSET} (INT4 Q/DQ), got {opset}")
    model = _as_model(model_or_payload).cpu().eval()
    try:
        graph = _Tracer().trace(model)
    except fx.proxy.TraceError as e:   # shape-dependent control flow (e.g. Swin's window padding)
        raise ValueError(f"ONNX export: the model cannot be traced with torch.fx: {e}") from None
    b = _Builder()
    encodings: Dict[str, Any] = {"version": "1.0.0", "activation_encodings": {}, "param_encodings": {},
                                 "quantizer_args": {"activation_bitwidth": "mixed", "param_bitwidth": "mixed",
                                                    "per_channel_quantization": True}}
    env: Dict[str, Any] = {}
    inputs, outputs = [], []

    def lookup(a):
        if isinstance(a, fx.Node):
            return env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(lookup(v) for v in a)
        return a

    for node in graph.nodes:
        args = [lookup(a) for a in node.args]
        kwargs = {k: lookup(v) for k, v in node.kwargs.items()}
        if node.op == "placeholder":
            if inputs:
                raise ValueError("to_onnx: the model must take exactly one input tensor")
            inputs.append(helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        ["batch"] + [int(v) for v in input_shape]))
            env[node.name] = "input"
        elif node.op == "call_module":
            env[node.name] = _emit_module(b, node, model.get_submodule(node.target), args, str(node.target),
                                          encodings)
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _emit_function(b, node, args, kwargs, node.name)
        elif node.op == "output":
            out = args[0]
            if not isinstance(out, str):
                raise ValueError("to_onnx: the model must return one tensor")
            final = b.node("Identity", [out], "logits")
            outputs.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, ["batch", None]))
        else:
            raise ValueError(f"to_onnx: fx node {node.op} {node.target!r} is not supported")
    g = helper.make_graph(b.nodes, "mpq_fixed", inputs, outputs, initializer=b.inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="mpq")
    proto.ir_version = 10
    meta = dict(metadata or {})
    if preprocess is not None:
        meta["preprocess"] = preprocess
    cfg = getattr(model, "mpq_fixed_config", None)
    if cfg is not None:
        meta.setdefault("config", {n: list(v) for n, v in cfg.items()})
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), v if isinstance(v, str) else json.dumps(v)
    onnx.checker.check_model(proto)
    return proto, encodings


def to_onnx(model_or_payload, path: str, input_shape: Optional[Sequence[int]] = None,
            preprocess: Optional[Mapping[str, Any]] = None, metadata: Optional[Mapping[str, Any]] = None,
            encodings_path: Optional[str] = None, opset: int = OPSET,
            config: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Any]:
    """Write the QDQ ONNX model of a fixed model (a module from :func:`mpq.export.load_fixed` /
    :func:`~mpq.export.fixed_model`, an exported payload dict, the path of a
    ``model_fixed.pt``, or a supernet with ``config``: its BN statistics are used as they are, so
    re-calibrate shared BN for ``config`` first, e.g. :meth:`search.evaluator.Evaluator.prepare`)
    to ``path`` atomically, and ``encodings_path`` (JSON) when given.

    ``input_shape`` ``[C, H, W]`` defaults to the payload's spec ``input_size``; ``preprocess``
    (``{"mean", "std", "input_size"}``) and ``metadata`` go into the model's ``metadata_props``.
    Returns ``{"path", "bytes", "encodings"}``."""
    model = _as_model(model_or_payload, config)
    if input_shape is None:
        meta = getattr(model, "mpq_fixed_meta", {}) or {}
        pre = preprocess or meta.get("preprocess") or {}
        input_shape = pre.get("input_size")
        spec = getattr(model, "mpq_fixed_spec", None) or {}
        if input_shape is None and spec.get("input_size"):
            input_shape = list(spec["input_size"])[-3:]
        if input_shape is None:
            raise ValueError("to_onnx: give input_shape=[C, H, W] (the model carries neither a "
                             "preprocess nor a spec input_size)")
    if preprocess is None:
        preprocess = (getattr(model, "mpq_fixed_meta", {}) or {}).get("preprocess")
    proto, encodings = build_onnx(model, list(input_shape)[-3:], preprocess, metadata, opset)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)
    if encodings_path is not None:
        tmp = f"{encodings_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(encodings, f, indent=1)
        os.replace(tmp, encodings_path)
    return {"path": path, "bytes": os.path.getsize(path), "encodings": encodings_path}


def onnx_available() -> bool:
    """Whether the ``onnx`` extra (onnx + onnxruntime) is installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def ort_session(path: str):
    """An onnxruntime CPU session with the default (full) graph optimisation."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_accuracy(path: str, data, batch_size: int = 500) -> Dict[str, float]:
    """Top-1 accuracy of ``model.onnx`` in onnxruntime on ``data`` (a Dataset of normalised
    ``(image, label)`` pairs, as the supernet was trained on): ``{"acc", "n"}``."""
    from torch.utils.data import DataLoader
    sess = ort_session(path)
    correct, n = 0, 0
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        logits = sess.run(None, {"input": x.numpy().astype(np.float32)})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        n += int(y.numel())
    return {"acc": correct / max(n, 1), "n": n}


def write_onnx(payload, out_dir: str, suffix: str, preprocess, eval_set, batch_size: int = 500) -> Dict[str, Any]:
    """Write ``model{suffix}.onnx`` and ``encodings{suffix}.json`` of an exported payload and measure
    the ONNX model's accuracy in onnxruntime on ``eval_set``; returns the config.json entries."""
    onnx_name, enc_name = f"model{suffix}.onnx", f"encodings{suffix}.json"
    info = to_onnx(payload, os.path.join(out_dir, onnx_name), preprocess=preprocess,
                   encodings_path=os.path.join(out_dir, enc_name))
    acc = ort_accuracy(os.path.join(out_dir, onnx_name), eval_set, batch_size)
    return {"onnx_model": onnx_name, "onnx_model_bytes": info["bytes"], "onnx_accuracy": acc["acc"],
            "encodings": enc_name}
