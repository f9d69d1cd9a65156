"""Bit-width freezing scheduler: stop sampling the bit-widths whose weights oscillate the most.

In a weight-sharing supernet the bit-widths interfere: the gradient of one bit-width moves a
shared weight across a rounding boundary of another, and the weights keep oscillating. The scheduler
measures that turbulence and, for one period at a time, excludes the most turbulent bit-width of
the most turbulent layers from sampling.

Measure (:func:`layer_turbulence`)
    For a quantized layer with weights ``w``, and each candidate weight bit-width ``b`` (< 32) with
    its own step size ``s_b`` (per tensor or per output channel) and grid ``[-Q_N, Q_P]``::

        turb_b = #{ i : -Q_N <= w_i / s_b <= Q_P  and  |w_i - q_b(w_i)| > threshold * s_b } / (N * b)

    i.e. the fraction of the ``N`` weights that are not clipped and lie close to a rounding boundary
    (``threshold = 0.375`` by default: within 1/8 step of the midpoint between two levels), divided
    by ``b`` (fewer levels, larger steps, larger effect per flip). Pinned layers (one candidate) are
    not measured. :meth:`BitWidthFreezingScheduler.observe` keeps an exponential moving average
    ``E <- ema * E + (1 - ema) * turb`` per (layer, bit-width), started at the first measurement.
    A layer's turbulence is the mean of its EMA over its candidates.

Schedule (:meth:`BitWidthFreezingScheduler.step`), all times as fractions of ``total_steps``
    * The first update happens at the first step ``>= warmup * total_steps``; the next ones every
      ``period * total_steps`` steps, or every ``late_period * total_steps`` steps once the step is
      ``>= late_start * total_steps`` when ``late_period`` is given (longer periods late in training).
    * At an update, with progress ``p = step / total_steps`` (capped at 1), the ratio decays by a
      cosine ``ratio = ratio_end + (ratio_start - ratio_end) * (1 + cos(pi * p)) / 2`` and the
      ``ceil(ratio * L)`` most turbulent of the ``L`` non-pinned layers are chosen (ties: layer
      order). Each chosen layer loses ONE more weight bit-width from ``layer.w_allowed``: the one
      with the highest EMA turbulence among its allowed bits (``which="most_turbulent"``, ties: the
      lower bit) or its lowest allowed bit (``which="lowest"``). The max candidate is never removed
      (the max config is the distillation teacher) and at least two bit-widths stay allowed, so a
      layer with two allowed bits left is not changed. Every non-chosen layer gets its full
      candidate list back.
    * The frozen bit-widths are excluded by :func:`mpq.random_config` and :func:`mpq.min_config`
      (which read ``layer.w_allowed``); :func:`mpq.set_bits` still accepts any candidate, so the
      search is unaffected.

Every rank of a DDP job sees the same (synchronised) weights, so every rank reaches the same
decisions without communication. :meth:`~BitWidthFreezingScheduler.state_dict` holds only plain
Python values (safe for ``torch.load(weights_only=True)``) and restores ``w_allowed`` on load.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .quantizer import FLOAT_BITS
from .supernet import quant_layers, unwrap

WHICH = ("most_turbulent", "lowest")


def _is_pinned(layer: nn.Module) -> bool:
    """A layer with a single weight candidate (e.g. the 8-bit first/last layers) is never scheduled."""
    return len(layer.w_candidates) <= 1


@torch.no_grad()
def _turbulence_counts(layer: nn.Module, threshold: float) -> Dict[int, torch.Tensor]:
    """``{bit: number of unclipped weights near a rounding boundary}`` as 0-dim tensors (no sync)."""
    w = layer.weight.detach()
    w = w.to(torch.promote_types(w.dtype, torch.float32))   # half / bfloat16 weights: measure in fp32
    out: Dict[int, torch.Tensor] = {}
    for b in layer.w_candidates:
        if b >= FLOAT_BITS:
            continue
        s = layer.w_quant.step[str(b)].detach().to(w.dtype).abs().clamp_min(1e-12)
        qn, qp = layer.w_quant.grid(b)
        v = w / s
        inside = (v >= -qn) & (v <= qp)
        near = (v - torch.round(v)).abs() > threshold
        out[int(b)] = (inside & near).sum()
    return out


def layer_turbulence(layer: nn.Module, threshold: float = 0.375) -> Dict[int, float]:
    """``{bit: turbulence}`` of one quantized layer, for each candidate weight bit-width < 32.

    ``turbulence_b`` = fraction of the layer's weights that are inside the ``b``-bit grid (not
    clipped) and farther than ``threshold * s_b`` from their quantized value, divided by ``b``.
    Uses the layer's own step size ``s_b`` (per tensor or per channel). Pinned layers (a single
    candidate) give ``{}``.
    """
    if _is_pinned(layer):
        return {}
    counts = _turbulence_counts(layer, threshold)
    if not counts:
        return {}
    n = layer.weight.numel()
    values = torch.stack(list(counts.values())).tolist()   # one device sync per layer
    return {b: c / (n * b) for b, c in zip(counts, values)}


class BitWidthFreezingScheduler:
    """Freezes (stops sampling) the most turbulent weight bit-width of the most turbulent layers.

    See the module docstring for the measure and the schedule. Call :meth:`observe` as often as
    wanted (e.g. every step or every few steps) and :meth:`step` once per training step with the
    global step; ``step`` returns True when it changed any layer's allowed bit-widths.

    Args:
        model: the supernet (may be DDP-wrapped).
        total_steps: the number of training steps; ``warmup``, ``period``, ``late_period`` and
            ``late_start`` are fractions of it.
        warmup: fraction of training before the first update.
        period: fraction of training between updates.
        late_period: period used from ``late_start`` on (``None``: keep ``period``).
        late_start: fraction of training after which ``late_period`` applies.
        ratio_start, ratio_end: fraction of the non-pinned layers frozen, cosine-decayed over
            training.
        threshold: closeness to a rounding boundary, in steps (``|w - q(w)| > threshold * s``).
        ema: EMA decay of the turbulence (``0 <= ema < 1``; 0 keeps only the latest measurement).
        which: ``"most_turbulent"`` or ``"lowest"``: which bit-width a chosen layer loses.
    """

    def __init__(self, model: nn.Module, total_steps: int, warmup: float = 0.1, period: float = 0.1,
                 late_period: Optional[float] = None, late_start: float = 0.7,
                 ratio_start: float = 0.5, ratio_end: float = 0.2, threshold: float = 0.375,
                 ema: float = 0.9, which: str = "most_turbulent") -> None:
        if which not in WHICH:
            raise ValueError(f"BitWidthFreezingScheduler: which={which!r} is not allowed; "
                             f"allowed: {list(WHICH)}")
        if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"BitWidthFreezingScheduler: total_steps must be a positive integer, "
                             f"got {total_steps!r}")
        for name, value in (("warmup", warmup), ("late_start", late_start)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"BitWidthFreezingScheduler: {name} must be in [0, 1], got {value}")
        for name, value in (("period", period), ("late_period", late_period)):
            if value is not None and not value > 0:
                raise ValueError(f"BitWidthFreezingScheduler: {name} must be > 0, got {value}")
        for name, value in (("ratio_start", ratio_start), ("ratio_end", ratio_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"BitWidthFreezingScheduler: {name} must be in [0, 1], got {value}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"BitWidthFreezingScheduler: ema must be in [0, 1), got {ema}")
        if not 0.0 <= threshold <= 0.5:
            raise ValueError(f"BitWidthFreezingScheduler: threshold must be in [0, 0.5], got {threshold}")
        self.model = unwrap(model)
        self.total_steps = int(total_steps)
        self.warmup, self.period = float(warmup), float(period)
        self.late_period = None if late_period is None else float(late_period)
        self.late_start = float(late_start)
        self.ratio_start, self.ratio_end = float(ratio_start), float(ratio_end)
        self.threshold, self.ema, self.which = float(threshold), float(ema), which
        self._ema: Dict[str, Dict[int, float]] = {}
        self.next_update: int = int(math.ceil(self.warmup * self.total_steps - 1e-9))
        self.num_updates: int = 0

    # ------------------------------------------------------------------ helpers
    def _layers(self) -> Dict[str, nn.Module]:
        """The non-pinned quantized layers, in layer order."""
        return {n: m for n, m in quant_layers(self.model).items() if not _is_pinned(m)}

    def _steps(self, fraction: float) -> int:
        return max(1, int(round(fraction * self.total_steps)))

    def ratio(self, global_step: int) -> float:
        """The cosine-decayed fraction of layers frozen at ``global_step``."""
        p = min(max(global_step / self.total_steps, 0.0), 1.0)
        return self.ratio_end + (self.ratio_start - self.ratio_end) * 0.5 * (1.0 + math.cos(math.pi * p))

    def _period_at(self, global_step: int) -> int:
        if self.late_period is not None and global_step >= self.late_start * self.total_steps:
            return self._steps(self.late_period)
        return self._steps(self.period)

    # ------------------------------------------------------------------ measurement
    def observe(self) -> None:
        """Measure :func:`layer_turbulence` of every non-pinned layer and update the EMA."""
        layers = self._layers()
        counts = {n: _turbulence_counts(m, self.threshold) for n, m in layers.items()}
        flat = [c for cs in counts.values() for c in cs.values()]
        values = iter(torch.stack([c.to(flat[0].device) for c in flat]).tolist() if flat else [])  # one sync
        for name, layer in layers.items():
            n = layer.weight.numel()
            cur = {b: next(values) / (n * b) for b in counts[name]}
            old = self._ema.get(name)
            if old is None:
                self._ema[name] = cur
            else:
                for b, t in cur.items():
                    old[b] = self.ema * old[b] + (1.0 - self.ema) * t if b in old else t

    def _score(self, name: str) -> float:
        e = self._ema.get(name, {})
        return sum(e.values()) / len(e) if e else 0.0

    # ------------------------------------------------------------------ schedule
    def step(self, global_step: int) -> bool:
        """Apply an update if ``global_step`` reached the next update step; True if anything changed."""
        if global_step < self.next_update:
            return False
        layers = self._layers()
        if any(n not in self._ema for n in layers):
            self.observe()  # never decide on missing measurements
        before = {n: tuple(m.w_allowed) for n, m in layers.items()}
        k = int(math.ceil(self.ratio(global_step) * len(layers) - 1e-9))
        # sorted() is stable: equal turbulence keeps layer order
        chosen = set(sorted(layers, key=lambda n: -self._score(n))[:k])
        for name, layer in layers.items():
            if name not in chosen:
                layer.w_allowed = tuple(layer.w_candidates)
                continue
            allowed = sorted(layer.w_allowed)
            top = max(layer.w_candidates)
            removable = [b for b in allowed if b != top]
            if len(allowed) <= 2 or not removable:
                continue
            if self.which == "lowest":
                drop = removable[0]
            else:
                e = self._ema.get(name, {})
                drop = max(removable, key=lambda b: (e.get(b, 0.0), -b))
            layer.w_allowed = tuple(b for b in allowed if b != drop)
        self.num_updates += 1
        self.next_update = global_step + self._period_at(global_step)
        return any(tuple(m.w_allowed) != before[n] for n, m in layers.items())

    # ------------------------------------------------------------------ reporting
    def frozen(self) -> Dict[str, List[int]]:
        """``{layer: [removed weight bits]}`` for the layers with frozen bit-widths."""
        out = {}
        for name, layer in quant_layers(self.model).items():
            removed = sorted(set(layer.w_candidates) - set(layer.w_allowed))
            if removed:
                out[name] = removed
        return out

    def num_frozen(self) -> int:
        """Total number of frozen (layer, weight bit-width) pairs."""
        return sum(len(v) for v in self.frozen().values())

    def turbulence(self) -> Dict[str, Dict[int, float]]:
        """The EMA turbulence ``{layer: {bit: value}}`` (a copy)."""
        return {n: dict(e) for n, e in self._ema.items()}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Plain-Python state: EMA, next update step, update count, allowed lists, settings."""
        return {
            "ema": self.turbulence(),
            "next_update": int(self.next_update),
            "num_updates": int(self.num_updates),
            "allowed": {n: [int(b) for b in m.w_allowed] for n, m in quant_layers(self.model).items()},
            "settings": {"total_steps": self.total_steps, "warmup": self.warmup,
                         "period": self.period, "late_period": self.late_period,
                         "late_start": self.late_start, "ratio_start": self.ratio_start,
                         "ratio_end": self.ratio_end, "threshold": self.threshold,
                         "ema": self.ema, "which": self.which},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the EMA and schedule position and re-apply ``w_allowed`` to the model's layers.

        Raises ``ValueError`` when the state names a layer the model lacks or a bit-width that is
        not among a layer's candidates (nothing is changed in that case). The settings stored in the
        state are informational: those given to the constructor stay in force.
        """
        layers = quant_layers(self.model)
        allowed = {}
        for name, bits in dict(state.get("allowed", {})).items():
            if name not in layers:
                raise ValueError(f"bit-width scheduler state: unknown layer {name!r}; quantized "
                                 f"layers: {list(layers)}")
            bits = tuple(sorted(int(b) for b in bits))
            bad = [b for b in bits if b not in layers[name].w_candidates]
            if bad or not bits:
                raise ValueError(f"bit-width scheduler state: layer {name!r}: allowed bits "
                                 f"{list(bits)} are not a non-empty subset of the candidates "
                                 f"{list(layers[name].w_candidates)}")
            allowed[name] = bits
        for name, bits in allowed.items():
            layers[name].w_allowed = bits
        self._ema = {str(n): {int(b): float(v) for b, v in e.items()}
                     for n, e in dict(state.get("ema", {})).items()}
        self.next_update = int(state.get("next_update", self.next_update))
        self.num_updates = int(state.get("num_updates", self.num_updates))
