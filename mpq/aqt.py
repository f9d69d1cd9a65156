"""AQT-style activation clip calibration (Abdolrashidi et al., 2021; google-research ``aqt/jax``).

AQT keeps the activations "not quantized" until ``activation_bound_start_step``, collecting
per-channel statistics of every quantized layer's input from step 0, and then sets the clip bound
once from those statistics. :class:`ActivationClipCalibrator` does the same for an mpq supernet:

Float warm-up (``float_warmup=True``, the default)
    From construction until :meth:`~ActivationClipCalibrator.calibrate` every quantized layer runs
    its input unquantized (``layer.a_float = True``; weights stay quantized). For simplicity this is
    applied to *all* quantized layers, including those pinned to a single bit-width; the
    calibration sets ``a_float = False`` again. Evaluations run before the calibration therefore
    measure float activations. With ``float_warmup=False`` the activations stay LSQ-quantized
    during the warm-up (the previous behaviour) and only the step sizes are reset at the end.

Statistics (forward pre-hooks, training mode only)
    For each layer input ``x`` the per-channel batch maximum ``M_t`` and minimum ``m_t`` are
    reduced over every dim but the channel dim (dim 1 of an NCHW conv input or an (N, C) linear
    input, the last dim of an (N, ..., C) linear input), and tracked by an exponential moving
    average::

        EMA_max <- ema * EMA_max + (1 - ema) * M_t        (the same for EMA_min with m_t)

    started at the first batch's value. ``ema = 0.9`` matches AQT's ``ema_coeff = 0.1`` on the new
    batch. AQT starts its EMA at 0 without bias correction, so its bound is low by the factor
    ``1 - 0.9^t`` after ``t`` steps (0.65 after 10 steps); starting at the first value removes that
    bias for short warm-ups and is identical otherwise. As in AQT, non-finite batch values leave the
    average unchanged. With ``per_channel=False`` a single per-tensor ``max|x|`` is averaged
    instead (and a per-tensor batch minimum, only for the sign).

Calibration (once, when ``step(global_step)`` reaches ``warmup_steps``)
    * Under ``torch.distributed`` with world size > 1 the statistics are averaged over the ranks
      (all-reduce SUM / number of ranks), like AQT's per-device values averaged across devices.
    * The per-channel bound is AQT's "mean of max" bound ``c_ch = max(|EMA_max|, |EMA_min|)``
      (per tensor: ``c = EMA(max|x|)``). mpq's activation step sizes are per tensor, so the layer's
      single bound is ``c = max_ch c_ch``: no channel is clipped below its own bound (AQT keeps one
      bound per channel; small channels get a coarser grid here).
    * If the quantizer decides its sign automatically (``auto_sign``), ``signed`` becomes whether
      any channel's ``EMA_min < 0`` (unsigned after a ReLU).
    * For every candidate bit-width ``b < 32``: ``s_b = max(c, 1e-8) / Q_P(b)`` with
      ``Q_P = 2^b - 1`` (unsigned) or ``2^(b-1) - 1`` (signed), and ``initialized = True``.
    * ``freeze`` makes every activation step size non-trainable (``requires_grad = False``, grad
      dropped); otherwise LSQ keeps learning them from the calibrated start.

    A layer that saw no training input during the warm-up (or only non-finite values) keeps its
    step sizes and is LSQ-initialised from its first batch as usual.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .layers import QuantConv2d
from .supernet import quant_layers, unwrap

_STATE_VERSION = 2


def _channel_dim(layer: nn.Module, x: torch.Tensor) -> int:
    """Channel dim of ``layer``'s input ``x``: 1 for NCHW (0 for unbatched CHW) conv inputs, the
    last dim for linear inputs ((N, C), (N, T, C), ...)."""
    if isinstance(layer, QuantConv2d):
        return max(x.dim() - 3, 0)
    return x.dim() - 1


def _num_channels(layer: nn.Module) -> int:
    return int(layer.in_channels if isinstance(layer, QuantConv2d) else layer.in_features)


def _batch_minmax(x: torch.Tensor, dim: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(max, min)`` of ``x`` over every dim but ``dim`` (``None``: over all, shape (1,))."""
    if dim is None:
        mn, mx = torch.aminmax(x)
        return mx.reshape(1).float(), mn.reshape(1).float()
    dims = tuple(d for d in range(x.dim()) if d != dim)
    if not dims:
        return x.float().clone(), x.float().clone()
    return x.amax(dim=dims).float(), x.amin(dim=dims).float()


def _ema(old: Optional[torch.Tensor], new: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay * old + (1 - decay) * new``; the first value starts the average; non-finite new
    values leave it unchanged (a non-finite old value is replaced by the new one)."""
    if old is None:
        return new
    upd = torch.where(torch.isfinite(old), decay * old + (1.0 - decay) * new, new)
    return torch.where(torch.isfinite(new), upd, old)


def _check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"ActivationClipCalibrator: {name} must be a bool, got {v!r}")
    return v


class ActivationClipCalibrator:
    """AQT activation clip calibration of a quantized supernet (see the module docstring).

    Args:
        model: the quantized model (a DDP / ``torch.compile`` wrapper is unwrapped).
        warmup_steps: training steps of statistics before the one calibration (>= 1).
        ema: EMA decay in ``[0, 1)`` (0.9 = AQT's coefficient 0.1 on the new batch).
        freeze: keep the calibrated activation step sizes fixed (no gradient) afterwards.
        float_warmup: run the activations unquantized (``a_float``) until the calibration.
        per_channel: per-channel EMA of the batch max/min (AQT) rather than a per-tensor
            EMA of ``max|x|``.

    Call :meth:`step` after every optimizer step with the 1-based global step.
    """

    def __init__(self, model: nn.Module, warmup_steps: int, ema: float = 0.9, freeze: bool = True,
                 float_warmup: bool = True, per_channel: bool = True) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral):
            raise ValueError(f"ActivationClipCalibrator: warmup_steps must be an integer, "
                             f"got {warmup_steps!r}")
        if warmup_steps < 1:
            raise ValueError(f"ActivationClipCalibrator: warmup_steps must be >= 1, got {warmup_steps}")
        if isinstance(ema, bool) or not isinstance(ema, numbers.Real) or not math.isfinite(ema):
            raise ValueError(f"ActivationClipCalibrator: ema must be a finite number, got {ema!r}")
        if not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"ActivationClipCalibrator: ema must be in [0, 1), got {ema!r}")
        self.freeze = _check_bool("freeze", freeze)
        self.float_warmup = _check_bool("float_warmup", float_warmup)
        self.per_channel = _check_bool("per_channel", per_channel)
        self.model = unwrap(model)
        self.layers = quant_layers(self.model)
        if not self.layers:
            raise ValueError("ActivationClipCalibrator: the model has no quantized layer "
                             "(run mpq.quantize_model first)")
        self.warmup_steps = int(warmup_steps)
        self.ema = float(ema)
        self.done = False
        # per layer: EMA of the batch max (per tensor: of max|x|) and of the batch min
        self.ema_max: Dict[str, torch.Tensor] = {}
        self.ema_min: Dict[str, torch.Tensor] = {}
        self._handles: List[Any] = []
        self._attach()
        self._set_float(True)

    # ------------------------------------------------------------------ collection
    def _attach(self) -> None:
        if self._handles:
            return
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, inputs):
            if self.done or not module.training or not inputs:
                return
            x = inputs[0]
            if not torch.is_tensor(x) or not x.is_floating_point():
                return
            with torch.no_grad():
                dim = _channel_dim(module, x) if self.per_channel else None
                mx, mn = _batch_minmax(x.detach(), dim)
                if dim is None:
                    mx = torch.maximum(mx.abs(), mn.abs())  # max|x|
                self.ema_max[name] = _ema(self.ema_max.get(name), mx, self.ema)
                self.ema_min[name] = _ema(self.ema_min.get(name), mn, self.ema)
        return hook

    def remove(self) -> None:
        """Detach the statistics hooks (``a_float`` is left as it is)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _set_float(self, value: bool) -> None:
        if not self.float_warmup:
            return
        for layer in self.layers.values():
            layer.a_float = bool(value)

    # ------------------------------------------------------------------ calibration
    def step(self, global_step: int) -> bool:
        """Calibrate once when ``global_step`` reaches ``warmup_steps``; True when it did."""
        if self.done or int(global_step) < self.warmup_steps:
            return False
        self.calibrate()
        return True

    def _sizes(self) -> Dict[str, int]:
        return {n: (_num_channels(l) if self.per_channel else 1) for n, l in self.layers.items()}

    def _device(self) -> torch.device:
        for t in self.ema_max.values():
            return t.device
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _pack(self) -> torch.Tensor:
        """This rank's statistics as one flat vector: per layer ``[EMA_max, EMA_min, present]``
        (zeros where the layer has no statistics), in layer order."""
        dev = self._device()
        parts = []
        for name, size in self._sizes().items():
            if name in self.ema_max:
                parts += [self.ema_max[name].to(dev).reshape(-1), self.ema_min[name].to(dev).reshape(-1),
                          torch.ones(1, device=dev)]
            else:
                parts += [torch.zeros(2 * size + 1, device=dev)]
        return torch.cat(parts).float()

    def _unpack(self, flat: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        out, i = {}, 0
        for name, size in self._sizes().items():
            mx, mn, cnt = flat[i:i + size], flat[i + size:i + 2 * size], float(flat[i + 2 * size])
            i += 2 * size + 1
            if cnt > 0:
                out[name] = (mx / cnt, mn / cnt)
        return out

    def _gathered(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Statistics averaged over the ranks (the local ones without a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = self._pack()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            # each layer is divided by the number of ranks that saw it (= the world size normally)
            return self._unpack(flat)
        return {n: (self.ema_max[n], self.ema_min[n]) for n in self.layers if n in self.ema_max}

    @torch.no_grad()
    def calibrate(self) -> None:
        """Set every activation step size from the statistics, end the float warm-up, freeze."""
        for name, (mx, mn) in self._gathered().items():
            if self.per_channel:
                bound_ch = torch.maximum(mx.abs(), mn.abs())
            else:
                bound_ch = mx.abs()
            ok = torch.isfinite(bound_ch)
            if not bool(ok.any()):
                continue
            clip = float(bound_ch[ok].max())
            aq = self.layers[name].a_quant
            if aq.auto_sign:
                aq.set_signed(bool((mn[torch.isfinite(mn)] < 0).any()))  # buffer and Python flag
            for b in aq.step_sizes():
                _, qp = aq.grid(b)
                aq.set_step(b, max(clip, 1e-8) / qp)
        self.done = True
        self._set_float(False)
        self._apply_freeze()
        self.remove()

    def _apply_freeze(self) -> None:
        if not self.freeze:
            return
        for layer in self.layers.values():
            for p in layer.a_quant.step_sizes().values():
                p.requires_grad_(False)
                p.grad = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": _STATE_VERSION,
            "done": bool(self.done),
            "per_channel": bool(self.per_channel),
            "ema_max": {n: [float(v) for v in t.reshape(-1).tolist()] for n, t in self.ema_max.items()},
            "ema_min": {n: [float(v) for v in t.reshape(-1).tolist()] for n, t in self.ema_min.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "done" not in state:
            raise ValueError("ActivationClipCalibrator.load_state_dict: expected a dict with 'done'")
        done = bool(state["done"])
        ema_max: Dict[str, torch.Tensor] = {}
        ema_min: Dict[str, torch.Tensor] = {}
        if "ema_max" in state:
            if bool(state.get("per_channel", True)) != self.per_channel:
                raise ValueError(f"ActivationClipCalibrator.load_state_dict: the state has "
                                 f"per_channel={state.get('per_channel')}, this calibrator "
                                 f"per_channel={self.per_channel}")
            dev = self._device()
            sizes = self._sizes()
            mx_in, mn_in = dict(state["ema_max"]), dict(state.get("ema_min", {}))
            if set(mx_in) != set(mn_in):
                raise ValueError("ActivationClipCalibrator.load_state_dict: ema_max and ema_min "
                                 "name different layers")
            for name, vals in mx_in.items():
                if name not in sizes:
                    raise ValueError(f"ActivationClipCalibrator.load_state_dict: unknown layer {name!r}")
                for what, v, out in (("ema_max", vals, ema_max), ("ema_min", mn_in[name], ema_min)):
                    t = torch.tensor([float(a) for a in v], dtype=torch.float32, device=dev)
                    if t.numel() != sizes[name]:
                        raise ValueError(f"ActivationClipCalibrator.load_state_dict: {what}[{name!r}] "
                                         f"has {t.numel()} values, expected {sizes[name]}")
                    out[name] = t
        elif state.get("values") and not done:  # version 1: per-tensor EMA(max|x|) without a minimum
            warnings.warn("ActivationClipCalibrator: an old (version 1) state in the warm-up has no "
                          "batch minima; the activation statistics restart from this step")
        self.done = done
        self.ema_max, self.ema_min = ema_max, ema_min
        if self.done:
            self._set_float(False)
            self._apply_freeze()
            self.remove()
        else:
            self._set_float(True)
            self._attach()
