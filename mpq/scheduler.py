"""Bit-width freezing scheduler: stop sampling the lowest bit-width of the most turbulent layers.

In a weight-sharing supernet the bit-widths interfere: the gradient of one bit-width moves a
shared weight across a rounding boundary of another, and the weights keep oscillating. The scheduler
measures that turbulence and, for one period at a time, takes the lowest weight bit-width of the most
turbulent layers out of sampling. The defaults are the paper's code (``util/qat.py``, ``process.py`` of
1hunters/retraining-free-quantization); every rule mpq used before is kept as an option.

Measure (:func:`layer_turbulence`, :meth:`BitWidthFreezingScheduler.observe`)
    For a quantized layer with weights ``w``, and each weight bit-width ``b`` (< 32) with its own step
    size ``s_b`` (per tensor or per output channel) and grid ``[-Q_N, Q_P]``::

        turb_b = #{ i : -Q_N <= w_i / s_b <= Q_P  and  |w_i - q_b(w_i)| > threshold * s_b } / (N * b)

    i.e. the fraction of the ``N`` weights that are not clipped and lie close to a rounding boundary
    (``threshold = 0.375`` = 0.5 (1 - 0.25), the paper's), divided by ``b``. A layer's score is the
    mean of ``turb_b`` over its currently *allowed* bit-widths (``measure="allowed"``, paper) or over
    all its candidates (``"all"``). With ``ema == 0`` (paper) each update measures a snapshot of the
    current weights; ``ema > 0`` keeps ``E <- ema * E + (1 - ema) * turb`` from :meth:`observe` calls.
    Pinned layers (one candidate) are not scheduled.

Schedule (:meth:`BitWidthFreezingScheduler.step`), as fractions of ``total_steps``
    * ``schedule="reference"`` (paper): the reference updates at the start of epochs
      e = 7, 9, ..., 107, 119, 134, 149 of its 150 (:func:`reference_update_epochs`); here the update
      happens at step ``ceil(e / 150 * total_steps)``: first at 4.67%, every 1.33% up to 71.3%, then at
      79.3, 89.3 and 99.3%, 54 updates whatever the run length (updates that land on one step of a
      run shorter than ~150 steps merge). The ratio is the reference's
      ``ratio_end + (ratio_start - ratio_end) (1 + cos(pi j / 75)) / 2`` with ``j = (e - 5) // 2``
      (:func:`reference_ratio`: 0.4999 at the first update, 0.2012 at the last).
    * ``schedule="periodic"``: first update at ``warmup``, then every ``period`` (``late_period``
      once past ``late_start``); ratio cosine-decayed over the progress ``step / total_steps``.
    * At an update ``floor(ratio * L)`` (``round="floor"``, paper; or ``ceil``) of the ``L``
      scheduled layers with the highest score are chosen (ties: layer order). A chosen layer lacks
      exactly ONE weight bit-width: its lowest candidate (``which="lowest"``, paper; or the most
      turbulent one, ``"most_turbulent"``), however often it is chosen (``cumulative=False``, paper;
      ``True`` removes one more per update, down to two). The max candidate is never removed (the max
      config is the distillation teacher). Every layer not chosen gets its full list back. With
      ``freeze_acts`` (the paper's ResNet-18, whose weights and activations share one candidate list)
      the removed bit-width also leaves the layer's activation candidates (``a_allowed``).
    * Frozen bit-widths are excluded by :func:`mpq.random_config` and :func:`mpq.min_config` (which read
      ``layer.w_allowed`` / ``a_allowed``) and shift the "lowest" bit-width used by IDM;
      :func:`mpq.set_bits` still accepts any candidate, so the search is unaffected.

Every rank of a DDP job sees the same (synchronised) weights, so every rank reaches the same
decisions without communication. :meth:`~BitWidthFreezingScheduler.state_dict` holds only plain
Python values (safe for ``torch.load(weights_only=True)``) and restores the allowed lists on load.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .quantizer import FLOAT_BITS
from .supernet import has_weight_choice, quant_layers, unwrap

WHICH = ("lowest", "most_turbulent")
SCHEDULES = ("reference", "periodic")
ROUNDING = ("floor", "ceil")
MEASURES = ("allowed", "all")
REFERENCE_EPOCHS = 150   # the paper's run length, the frame its update epochs are defined in


def reference_update_epochs(epochs: int = REFERENCE_EPOCHS) -> List[int]:
    """The 0-indexed epochs at whose start the reference code updates the frozen lists.

    Its rule (``process.py``): update at the start of epoch ``e`` when ``e > 5`` and
    ``(e + 1) % T == 0``, with ``T = 2`` while ``e <= int(0.72 * epochs)``, else ``T = 15``.
    For 150 epochs: e = 7, 9, ..., 107 (51 updates), then 119, 134, 149: 54 in all.
    """
    out = []
    for e in range(epochs):
        period = 2 if e <= int(0.72 * epochs) else 15
        if e > 5 and (e + 1) % period == 0:
            out.append(e)
    return out


def reference_ratio(epoch: int, ratio_start: float = 0.5, ratio_end: float = 0.2,
                    epochs: int = REFERENCE_EPOCHS) -> float:
    """The reference's frozen-layer ratio at update epoch ``e``: with ``j = (e - 5) // 2``,
    ``r = ratio_end + (ratio_start - ratio_end) * (1 + cos(pi * j / (epochs // 2))) / 2``
    (0.2 + 0.15 (1 + cos(pi j / 75)) in the paper: 0.4999 at e = 7, 0.2012 at e = 149)."""
    j = (epoch - 5) // 2
    return ratio_end + (ratio_start - ratio_end) * 0.5 * (1.0 + math.cos(math.pi * j / (epochs // 2)))


@torch.no_grad()
def _turbulence_counts(layer: nn.Module, threshold: float,
                       bits: Optional[Sequence[int]] = None) -> Dict[int, torch.Tensor]:
    """``{bit: number of unclipped weights near a rounding boundary}`` as 0-dim tensors (no sync),
    for ``bits`` (default: every weight candidate)."""
    w = layer.weight.detach()
    w = w.to(torch.promote_types(w.dtype, torch.float32))   # half / bfloat16 weights: measure in fp32
    out: Dict[int, torch.Tensor] = {}
    for b in (layer.w_candidates if bits is None else bits):
        if b >= FLOAT_BITS:
            continue
        s = layer.w_quant.step_for(b).detach().to(w.dtype).abs().clamp_min(1e-12)
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
    if not has_weight_choice(layer):
        return {}
    counts = _turbulence_counts(layer, threshold)
    if not counts:
        return {}
    n = layer.weight.numel()
    values = torch.stack(list(counts.values())).tolist()   # one device sync per layer
    return {b: c / (n * b) for b, c in zip(counts, values)}


class BitWidthFreezingScheduler:
    """Freezes (stops sampling) one weight bit-width of the most turbulent layers for a while.

    See the module docstring for the measure and the schedule. Call :meth:`observe` as often as
    wanted when ``ema > 0`` (with ``ema == 0`` every update measures a fresh snapshot itself) and
    :meth:`step` once per training step with the global step (the number of steps done); ``step``
    returns True when an update happened. :attr:`last_update` then describes it.

    Args:
        model: the supernet (may be DDP-wrapped).
        total_steps: the number of training steps; every time below is a fraction of it.
        schedule: ``"reference"`` (the paper's 54 update times, as fractions of training) or
            ``"periodic"`` (``warmup``, ``period``, ``late_period``, ``late_start``).
        warmup, period, late_period, late_start: the periodic schedule.
        ratio_start, ratio_end: fraction of the scheduled layers frozen, cosine-decayed.
        round: ``"floor"`` (paper) or ``"ceil"``: layers frozen = round(ratio * L).
        threshold: closeness to a rounding boundary, in steps (``|w - q(w)| > threshold * s``).
        measure: ``"allowed"`` (paper: the layer's currently allowed weight bits) or ``"all"``.
        ema: EMA decay of the turbulence (``0 <= ema < 1``; 0: a snapshot at each update, paper).
        which: ``"lowest"`` (paper) or ``"most_turbulent"``: which bit-width a chosen layer loses.
        cumulative: False (paper): a chosen layer lacks exactly one bit-width, however often it is
            chosen; True: it loses one more at each update (down to two).
        freeze_acts: also take the removed bit-width out of the layer's activation candidates (the
            paper's ResNet-18 shares one candidate list for weights and activations).
    """

    def __init__(self, model: nn.Module, total_steps: int, schedule: str = "reference",
                 warmup: float = 0.1, period: float = 0.1, late_period: Optional[float] = None,
                 late_start: float = 0.7, ratio_start: float = 0.5, ratio_end: float = 0.2,
                 threshold: float = 0.375, ema: float = 0.0, which: str = "lowest",
                 round: str = "floor", measure: str = "allowed", cumulative: bool = False,
                 freeze_acts: bool = False) -> None:
        for name, value, allowed in (("which", which, WHICH), ("schedule", schedule, SCHEDULES),
                                     ("round", round, ROUNDING), ("measure", measure, MEASURES)):
            if value not in allowed:
                raise ValueError(f"BitWidthFreezingScheduler: {name}={value!r} is not allowed; "
                                 f"allowed: {list(allowed)}")
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
        self.schedule = schedule
        self.warmup, self.period = float(warmup), float(period)
        self.late_period = None if late_period is None else float(late_period)
        self.late_start = float(late_start)
        self.ratio_start, self.ratio_end = float(ratio_start), float(ratio_end)
        self.threshold, self.ema, self.which = float(threshold), float(ema), which
        self.round, self.measure = round, measure
        self.cumulative, self.freeze_acts = bool(cumulative), bool(freeze_acts)
        self._ema: Dict[str, Dict[int, float]] = {}
        self.num_updates: int = 0
        self.last_update: Optional[Dict[str, Any]] = None
        if schedule == "reference":
            # (step, reference epoch) of every update: the start of epoch e is the fraction
            # e / 150 of training; several updates that land on one step of a very short run merge.
            self._plan = [(int(math.ceil(e / REFERENCE_EPOCHS * self.total_steps - 1e-9)), e)
                          for e in reference_update_epochs()]
            self.next_update = self._plan[0][0]
        else:
            self._plan = []
            self.next_update = int(math.ceil(self.warmup * self.total_steps - 1e-9))

    # ------------------------------------------------------------------ helpers
    def _layers(self) -> Dict[str, nn.Module]:
        """The non-pinned quantized layers, in layer order."""
        return {n: m for n, m in quant_layers(self.model).items() if has_weight_choice(m)}

    def _steps(self, fraction: float) -> int:
        return max(1, int(round(fraction * self.total_steps)))

    def ratio(self, global_step: int) -> float:
        """The cosine-decayed fraction of layers frozen at ``global_step`` (the reference schedule
        decays over its update epochs, the periodic one over the progress ``step / total_steps``)."""
        if self.schedule == "reference":
            epoch = self._plan[min(self.num_updates, len(self._plan) - 1)][1]
            for step, e in self._plan:
                if step <= global_step:
                    epoch = e
            return reference_ratio(epoch, self.ratio_start, self.ratio_end)
        p = min(max(global_step / self.total_steps, 0.0), 1.0)
        return self.ratio_end + (self.ratio_start - self.ratio_end) * 0.5 * (1.0 + math.cos(math.pi * p))

    def _period_at(self, global_step: int) -> int:
        if self.late_period is not None and global_step >= self.late_start * self.total_steps:
            return self._steps(self.late_period)
        return self._steps(self.period)

    def _advance(self, global_step: int) -> None:
        if self.schedule == "reference":
            later = [step for step, _ in self._plan if step > global_step]
            self.next_update = later[0] if later else self.total_steps + 1
        else:
            self.next_update = global_step + self._period_at(global_step)

    def _measured_bits(self, layer: nn.Module) -> Sequence[int]:
        return tuple(layer.w_allowed) if self.measure == "allowed" else tuple(layer.w_candidates)

    # ------------------------------------------------------------------ measurement
    def observe(self) -> None:
        """Measure the turbulence of every non-pinned layer (over its measured bit-widths) and
        update the EMA (with ``ema == 0``: replace it by this snapshot)."""
        layers = self._layers()
        counts = {n: _turbulence_counts(m, self.threshold, self._measured_bits(m)) for n, m in layers.items()}
        flat = [c for cs in counts.values() for c in cs.values()]
        values = iter(torch.stack([c.to(flat[0].device) for c in flat]).tolist() if flat else [])  # one sync
        for name, layer in layers.items():
            n = layer.weight.numel()
            cur = {b: next(values) / (n * b) for b in counts[name]}
            old = self._ema.get(name)
            if old is None or self.ema == 0.0:
                self._ema[name] = cur
            else:
                for b, t in cur.items():
                    old[b] = self.ema * old[b] + (1.0 - self.ema) * t if b in old else t

    def _score(self, name: str, layer: nn.Module) -> float:
        e = self._ema.get(name, {})
        vals = [e[b] for b in self._measured_bits(layer) if b in e]
        return sum(vals) / len(vals) if vals else 0.0

    def _drop(self, name: str, layer: nn.Module) -> Optional[int]:
        """The weight bit-width a chosen layer loses (None: it keeps its list)."""
        top = max(layer.w_candidates)
        base = sorted(layer.w_allowed) if self.cumulative else sorted(layer.w_candidates)
        removable = [b for b in base if b != top]
        if len(base) <= 2 or not removable:
            return None
        if self.which == "lowest":
            return removable[0]
        e = self._ema.get(name, {})
        return max(removable, key=lambda b: (e.get(b, 0.0), -b))

    # ------------------------------------------------------------------ schedule
    def step(self, global_step: int) -> bool:
        """Apply an update if ``global_step`` reached the next update step; True if one happened."""
        if global_step < self.next_update:
            return False
        layers = self._layers()
        if self.ema == 0.0 or any(n not in self._ema for n in layers):
            self.observe()  # a snapshot (paper), never decide on missing measurements
        before = {n: (tuple(m.w_allowed), tuple(m.a_allowed)) for n, m in layers.items()}
        r = self.ratio(global_step)
        exact = r * len(layers)
        k = int(math.floor(exact + 1e-9)) if self.round == "floor" else int(math.ceil(exact - 1e-9))
        # sorted() is stable: equal turbulence keeps layer order
        chosen = sorted(layers, key=lambda n: -self._score(n, layers[n]))[:k]
        for name, layer in layers.items():
            if name not in chosen:
                layer.w_allowed = tuple(layer.w_candidates)
                layer.a_allowed = tuple(layer.a_candidates)
                continue
            drop = self._drop(name, layer)
            base = layer.w_allowed if self.cumulative else layer.w_candidates
            if drop is not None:
                layer.w_allowed = tuple(b for b in sorted(base) if b != drop)
            elif not self.cumulative:
                layer.w_allowed = tuple(layer.w_candidates)
            if self.freeze_acts:
                removed = set(layer.w_candidates) - set(layer.w_allowed)
                acts = tuple(b for b in layer.a_candidates if b not in removed)
                layer.a_allowed = acts if acts else tuple(layer.a_candidates)
        self.num_updates += 1
        changed = any((tuple(m.w_allowed), tuple(m.a_allowed)) != before[n] for n, m in layers.items())
        self.last_update = {"step": int(global_step), "ratio": float(r), "layers": int(k),
                            "changed": bool(changed)}
        self._advance(global_step)
        return True

    def num_planned_updates(self) -> int:
        """Updates the schedule makes over the whole run (reference: distinct update steps)."""
        if self.schedule == "reference":
            return len({step for step, _ in self._plan if step <= self.total_steps})
        n, step = 0, int(math.ceil(self.warmup * self.total_steps - 1e-9))
        while step <= self.total_steps:
            n += 1
            step += self._period_at(step)
        return n

    # ------------------------------------------------------------------ reporting
    def _removed(self, kind: str) -> Dict[str, List[int]]:
        out = {}
        for name, layer in quant_layers(self.model).items():
            removed = sorted(set(getattr(layer, f"{kind}_candidates")) - set(getattr(layer, f"{kind}_allowed")))
            if removed:
                out[name] = removed
        return out

    def frozen(self) -> Dict[str, List[int]]:
        """``{layer: [removed weight bits]}`` for the layers with frozen bit-widths."""
        return self._removed("w")

    def frozen_acts(self) -> Dict[str, List[int]]:
        """``{layer: [removed activation bits]}`` (only with ``freeze_acts``)."""
        return self._removed("a")

    def num_frozen(self) -> int:
        """Total number of frozen (layer, weight bit-width) pairs."""
        return sum(len(v) for v in self.frozen().values())

    def turbulence(self) -> Dict[str, Dict[int, float]]:
        """The (EMA) turbulence ``{layer: {bit: value}}`` (a copy)."""
        return {n: dict(e) for n, e in self._ema.items()}

    def scores(self) -> Dict[str, float]:
        """``{layer: turbulence score}`` over the measured bit-widths, as used for the ranking."""
        return {n: self._score(n, m) for n, m in self._layers().items()}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """Plain-Python state: EMA, next update step, update count, allowed lists, settings."""
        layers = quant_layers(self.model)
        return {
            "ema": self.turbulence(),
            "next_update": int(self.next_update),
            "num_updates": int(self.num_updates),
            "allowed": {n: [int(b) for b in m.w_allowed] for n, m in layers.items()},
            "allowed_acts": {n: [int(b) for b in m.a_allowed] for n, m in layers.items()},
            "settings": {"total_steps": self.total_steps, "schedule": self.schedule,
                         "warmup": self.warmup, "period": self.period,
                         "late_period": self.late_period, "late_start": self.late_start,
                         "ratio_start": self.ratio_start, "ratio_end": self.ratio_end,
                         "threshold": self.threshold, "ema": self.ema, "which": self.which,
                         "round": self.round, "measure": self.measure,
                         "cumulative": self.cumulative, "freeze_acts": self.freeze_acts},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the EMA and schedule position and re-apply the allowed lists to the layers.

        Raises ``ValueError`` when the state names a layer the model lacks or a bit-width that is
        not among a layer's candidates (nothing is changed in that case). The settings stored in the
        state are informational: those given to the constructor stay in force.
        """
        layers = quant_layers(self.model)
        allowed: Dict[str, Any] = {}
        for key, attr, cands in (("allowed", "w_allowed", "w_candidates"),
                                 ("allowed_acts", "a_allowed", "a_candidates")):
            for name, bits in dict(state.get(key, {})).items():
                if name not in layers:
                    raise ValueError(f"bit-width scheduler state: unknown layer {name!r}; quantized "
                                     f"layers: {list(layers)}")
                bits = tuple(sorted(int(b) for b in bits))
                bad = [b for b in bits if b not in getattr(layers[name], cands)]
                if bad or not bits:
                    raise ValueError(f"bit-width scheduler state: layer {name!r}: allowed bits "
                                     f"{list(bits)} are not a non-empty subset of the candidates "
                                     f"{list(getattr(layers[name], cands))}")
                allowed[(name, attr)] = bits
        for (name, attr), bits in allowed.items():
            setattr(layers[name], attr, bits)
        self._ema = {str(n): {int(b): float(v) for b, v in e.items()}
                     for n, e in dict(state.get("ema", {})).items()}
        self.next_update = int(state.get("next_update", self.next_update))
        self.num_updates = int(state.get("num_updates", self.num_updates))
