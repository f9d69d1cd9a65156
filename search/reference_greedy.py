"""The paper's greedy search as its authors run it (``--strategy reference``), generalised to any
model. Read from ``util/greedy_search.py`` of ``1hunters/retraining-free-quantization`` (lines in
brackets); ``../shared/REFERENCE_RECIPE.md`` item 8 has the summary.

* **Start** (182-185): uniform ``W{s}A{s}``, ``s`` = one candidate below the highest common one
  (W5A5 for 2-6 bits); pinned layers keep their bits.
* **Phases** (176-198): first weight moves, until the BitOPs are at most ``0.95 x BitOPs(W{s-1}A{s})``
  (the reference takes this uniform configuration from a per-model table, ``bops_map_to_bits``:
  W4A5 for its ResNet-18 33.9 G and MobileNetV2 5.58 G targets); then activation moves until the
  target is met. Generalised: when no move of the current kind is left (all at the floor), the
  other kind continues, so any reachable target is reached.
* **Moves** (200-290): every non-pinned layer's weight (phase 1) or activation (phase 2) one
  candidate down (``-``) or up (``+``), never below the floor, never above the layer's highest
  candidate, never below its lowest one.
* **Floor** (130): 3 bits when the target is at or above the BitOPs of uniform W3A3 (the reference:
  3 when the target is >= 5.0 G, which holds for all its targets), else the lowest candidate.
* **Score** (323-338): all moves of one iteration are scored on ONE fresh batch (batch statistics in
  BatchNorm, as the reference's train-mode BN): with ``e`` the top-1 error after the move and ``b``
  its BitOPs, ``score = 1.5 * e / max(e) - (1 - b / B_max)``, ``max(e)`` and ``B_max`` over that
  iteration's moves; the lowest score wins (ties: the first layer, ``-`` before ``+``).
* **BitOPs** as the reference counts them: of the searched layers only (its first and last layers
  are not quantized modules), i.e. ``cost - fixed_cost`` with ``fixed_cost`` the pinned layers'
  BitOPs; with that count uniform W4A5 of ResNet-18 at 224x224 is 33.9 G, the reference's target.
  The phase threshold and the score use it; the target is met when ``cost <= target``.
* **Stop** (191-196): as soon as the BitOPs meet the target; that configuration is the answer.
  Each target starts again from ``W{s}A{s}`` (``switch_bit_width`` resets the model, 182-185).

Reference bugs not copied (item 10): every error 0 divides 0 by 0 there (here the error term is 0);
a chosen ``+`` move on a layer at the floor is skipped there, so iterations repeat (here it is
applied); ``+`` / ``-`` moves can alternate for ever there (a layer up, then down again: here a
``+`` move back to a configuration already on the path is not offered, so a layer goes up at most
once from any configuration, and at most ``max_iters`` iterations run). The batches come from the calibration split (the reference: the
training loader with training augmentation).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .greedy import Config, Move, SearchResult, Step, config_key, free_layers

ACC_SCALE = 1.5       # the weight of the error term (line 167)
PHASE_FACTOR = 0.95   # weight phase ends at this fraction of BitOPs(W{s-1}A{s}) (line 172)
FLOOR_BITS = 3        # the floor for targets at or above uniform W3A3 (line 130)

Choices = Mapping[str, Tuple[Sequence[int], Sequence[int]]]


def common_bits(choices: Choices) -> List[int]:
    """Bit-widths every non-pinned layer offers for both weights and activations."""
    common = None
    for name in free_layers(choices):
        w, a = choices[name]
        s = set(w) & set(a)
        common = s if common is None else common & s
    return sorted(common or ())


def uniform(choices: Choices, base: Mapping[str, Tuple[int, int]], w_bits: int, a_bits: int) -> Config:
    """``base`` with every non-pinned layer at ``(w_bits, a_bits)`` (clamped into its candidates)."""
    out = dict(base)
    for name in free_layers(choices):
        w, a = choices[name]
        out[name] = (min(w, key=lambda b: (abs(b - w_bits), b)), min(a, key=lambda b: (abs(b - a_bits), b)))
    return out


def reference_plan(choices: Choices, base: Mapping[str, Tuple[int, int]], cost: Callable[[Config], float],
                   target: float, start_bits: Optional[int] = None) -> Dict[str, float]:
    """``{"start_bits", "phase_bits", "phase_cost", "floor"}`` of one target (module docstring)."""
    bits = common_bits(choices)
    if len(bits) < 2:
        raise ValueError("reference greedy: the layers share fewer than two bit-widths")
    s = start_bits if start_bits is not None else bits[-2]
    if s not in bits:
        raise ValueError(f"reference greedy: start bit-width {s} is not common to every layer; allowed: {bits}")
    below = [b for b in bits if b < s]
    m = below[-1] if below else s
    floor = FLOOR_BITS if FLOOR_BITS in bits and target >= cost(uniform(choices, base, FLOOR_BITS, FLOOR_BITS)) \
        else bits[0]
    return {"start_bits": s, "phase_bits": m, "phase_cost": PHASE_FACTOR * cost(uniform(choices, base, m, s)),
            "floor": floor}


def _moves(config: Config, choices: Choices, kind: str, floor: int, visited=frozenset()) -> List[Move]:
    """The one-candidate moves of ``kind`` (``"w"``/``"a"``) of every non-pinned layer, ``-`` before
    ``+``; a ``+`` move only when it leads to a configuration not in ``visited``."""
    out = []
    for name in free_layers(choices):
        wc, ac = choices[name]
        cands = sorted(wc if kind == "w" else ac)
        cur = config[name][0 if kind == "w" else 1]
        i = cands.index(cur)
        if i > 0 and cands[i - 1] >= floor:
            out.append(Move(name, kind, cur, cands[i - 1]))
        if i + 1 < len(cands):
            out.append(Move(name, kind, cur, cands[i + 1]))
    return [mv for mv in out if mv.new < mv.old or config_key(mv.apply(config)) not in visited]


def reference_score(errors: Sequence[float], costs: Sequence[float]) -> List[float]:
    """``1.5 * e / max(e) - (1 - b / B_max)`` of each move (the error term is 0 when every e is 0)."""
    e_max, b_max = max(errors), max(costs)
    return [(ACC_SCALE * e / e_max if e_max > 0 else 0.0) - (1.0 - b / b_max if b_max > 0 else 0.0)
            for e, b in zip(errors, costs)]


def reference_greedy(choices: Choices, base: Mapping[str, Tuple[int, int]], batch_error: Callable[[Config, int], float],
                     bitops: Callable[[Config], float], target: float, *, fixed_cost: float = 0.0,
                     start_bits: Optional[int] = None, max_iters: Optional[int] = None,
                     progress: Optional[Callable[[Step], None]] = None) -> SearchResult:
    """Run the reference greedy for one BitOPs ``target``.

    ``choices``: ``{layer: (w_candidates, a_candidates)}``; ``base``: a configuration holding the
    pinned layers' bits; ``batch_error(config, i)``: top-1 error in [0, 1] on the ``i``-th fresh
    batch; ``bitops``: BitOPs of a configuration (all layers), ``fixed_cost`` the pinned layers' part
    of it (the rules count the searched layers only). The path holds the start and the configuration
    after every move; its last step is the answer (``stats["reached"]``: whether it meets the target).
    """
    def searched(c: Config) -> float:
        return bitops(c) - fixed_cost

    plan = reference_plan(choices, base, searched, target - fixed_cost, start_bits)
    config = uniform(choices, base, plan["start_bits"], plan["start_bits"])
    if max_iters is None:   # every layer from the top to the floor and back, twice over
        max_iters = 4 * sum(len(w) + len(a) for w, a in choices.values()) + 10
    path = [Step(0, dict(config), bitops(config), math.nan, {})]
    visited = {config_key(config)}
    phase, stopped, batch = "w", "target", 0
    if progress:
        progress(path[0])
    while bitops(config) > target:
        if len(path) > max_iters:
            stopped = "max_iters"
            break
        if phase == "w" and searched(config) <= plan["phase_cost"]:
            phase = "a"
        moves = _moves(config, choices, phase, plan["floor"], visited)
        if not any(mv.new < mv.old for mv in moves):   # this kind is at the floor: the other continues
            phase = "a" if phase == "w" else "w"
            moves = _moves(config, choices, phase, plan["floor"], visited)
            if not any(mv.new < mv.old for mv in moves):
                stopped = "floor"
                break
        trial = [mv.apply(config) for mv in moves]
        errors = [float(batch_error(c, batch)) for c in trial]
        costs = [searched(c) for c in trial]
        scores = reference_score(errors, costs)
        best = min(range(len(moves)), key=lambda i: (scores[i], i))
        config = trial[best]
        visited.add(config_key(config))
        path.append(Step(len(path), dict(config), bitops(config), errors[best],
                         {"err": errors[best], "acc": 1.0 - errors[best], "batch": batch, "phase": phase},
                         move=moves[best], score=scores[best]))
        batch += 1
        if progress:
            progress(path[-1])
    reached = bitops(config) <= target
    return SearchResult(path, "reference", "reference", "err", exact_calls=0, proxy_calls=0,
                        stats={**plan, "target": target, "fixed_cost": fixed_cost, "reached": reached,
                               "stopped": "target" if reached else stopped, "iterations": len(path) - 1,
                               "batches": batch})
