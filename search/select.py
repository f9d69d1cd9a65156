"""Which configuration answers a budget: the pick rule, its uniform references and the refinement.

The greedy walk (:mod:`search.greedy`) gives a path of candidates; for each budget :func:`pick_config`
takes the best path point or uniform W=A configuration that fits, refines it by bidirectional moves
within the budget (:func:`search.greedy.refine_supernet`) and keeps a mixed result only when it
clearly beats the largest uniform configuration that fits. :class:`Picker` binds that rule to one
supernet and one search (each budget answered once, refinement forward passes counted), so the
command line and the quality benchmark pick the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from mpq.supernet import is_pinned, quant_layers, uniform_config

from .budget import format_bitops

SELECTS = ("acc", "loss")
DEFAULT_MARGIN = 2.0


def uniform_bits(net) -> List[int]:
    """Bit-widths b such that every non-pinned layer has b among its weight and activation candidates."""
    common = None
    for m in quant_layers(net).values():
        if is_pinned(m):
            continue
        s = set(m.w_candidates) & set(m.a_candidates)
        common = s if common is None else common & s
    return sorted(b for b in (common or set()) if b != 32)


def uniform_candidates(net, evaluator, cost, bits: Sequence[int], metric: str = "loss") -> List[Dict[str, Any]]:
    """The uniform W=A configurations of ``bits`` measured on the calibration samples: the pick
    rule's candidates and references besides the path (and the plot's uniform points)."""
    out = []
    for b in bits:
        cfg = uniform_config(net, b, b)
        r = evaluator.exact(cfg)
        out.append({"bits": b, "label": f"W{b}A{b}", "config": cfg, "bitops": cost.bitops(cfg),
                    "size_bytes": cost.size_bytes(cfg), "acc": r["acc"], "loss": r["loss"],
                    "metric": r[metric] if metric in r else 1.0 - r["acc"]})
    return out


def pick_config(path: Sequence[Any], uniform: Sequence[Dict[str, Any]], fit, evaluator,
                select: str = "loss", margin: float = DEFAULT_MARGIN,
                refine: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
    """The configuration answering one budget.

    1. Candidates: the path points and the uniform configurations for which ``fit(config)`` holds;
       the best by calibration loss (``select="acc"``: accuracy, ties: lower loss) is the start.
    2. ``refine(config)``, when given, improves it by bidirectional moves within the budget
       (:func:`search.greedy.refine_supernet`) and returns a :class:`~search.greedy.SearchResult`.
    3. A mixed result must beat the largest uniform configuration that fits by ``margin`` standard
       errors of the paired per-sample difference on the calibration samples
       (:meth:`search.evaluator.Evaluator.paired_z`); if it does not, and the start was not that
       uniform configuration, the refinement is tried from the uniform configuration too; if
       nothing passes, the uniform configuration is kept - a mixed configuration must earn its place.

    Returns ``{}`` when nothing fits.
    """
    cands = [{"config": s.config, "acc": s.result["acc"], "loss": s.result["loss"],
              "bitops": s.bitops, "source": f"path step {s.index}", "order": (0, s.index)}
             for s in path if fit(s.config)]
    fitting_uniform = [u for u in uniform if fit(u["config"])]
    cands += [{"config": u["config"], "acc": u["acc"], "loss": u["loss"], "bitops": u["bitops"],
               "source": f"uniform {u['label']}", "order": (1, u["bits"])} for u in fitting_uniform]
    if not cands:
        return {}
    if select == "acc":
        best = min(cands, key=lambda c: (-c["acc"], c["loss"], c["order"]))
    else:
        best = min(cands, key=lambda c: (c["loss"], -c["acc"], c["order"]))
    ref = ref_u = None
    if fitting_uniform:
        ref_u = max(fitting_uniform, key=lambda u: (u["bitops"], u["bits"]))
        ref = [c for c in cands if c["source"] == f"uniform {ref_u['label']}"][0]

    def refined(start: Dict[str, Any]) -> Dict[str, Any]:
        if refine is None:
            return start
        res = refine(start["config"])
        if len(res.path) <= 1:
            return start
        final = res.final
        moves = ", ".join(str(s.move) for s in res.path[1:])
        return dict(start, config=final.config, acc=final.result["acc"], loss=final.result["loss"],
                    bitops=final.bitops, refined_from=start["source"],
                    source=f"{start['source']} refined by {len(res.path) - 1} move(s): {moves}")

    if ref is None:
        return refined(best)
    tried = []
    for start in ([best] if best is ref else [best, ref]):
        cand = refined(start)
        if cand["config"] == ref["config"]:
            if not tried:
                return ref
            continue
        z = evaluator.paired_z(cand["config"], ref["config"], select)
        cand = dict(cand, z_vs_uniform=z, uniform_ref=ref_u["label"])
        if margin <= 0 or z >= margin:
            return cand
        tried.append(cand)
    if not tried:
        return ref
    closest = max(tried, key=lambda c: c["z_vs_uniform"])
    return dict(ref, z_vs_uniform=closest["z_vs_uniform"], uniform_ref=ref_u["label"],
                source=f"uniform {ref_u['label']}: the best candidate ({closest['source']}) beats it "
                       f"by only {closest['z_vs_uniform']:.2f} s.e. < margin {margin:g}")


class Picker:
    """:func:`pick_config` for one searched supernet, with the refinement bound to it.

    ``options`` holds the pick settings (a :class:`search.options.SearchOptions`: ``select``,
    ``margin``, ``refine``, ``refine_top_k``, ``refine_steps``, ``refine_margin``, ``strategy``).
    Each budget is answered once (``key`` identifies it), so the comparison with the uniform
    configurations reuses the answers of the budgets; ``refine_counts`` sums the refinement's
    forward passes. ``show``: a progress bar per refinement.
    """

    def __init__(self, net, evaluator, cost, path: Sequence[Any], uniform: Sequence[Dict[str, Any]],
                 options, show: bool = False) -> None:
        from .evaluator import ForwardCounter
        self.net, self.evaluator, self.cost, self.options, self.show = net, evaluator, cost, options, show
        self.path, self.uniform = path, uniform
        self.refine_counts = ForwardCounter()
        self.picked: Dict[Any, Dict[str, Any]] = {}

    @property
    def refines(self) -> bool:
        return bool(self.options.refine) and self.options.refine_steps > 0

    def pick(self, fit: Callable[[Any], bool], cost_kind: str, key: Any) -> Dict[str, Any]:
        """The answer for one budget (``{}`` when nothing fits); ``cost_kind`` (``"bitops"`` or
        ``"size"``) is the cost the refinement records."""
        if key not in self.picked:
            refine = (lambda cfg: self._refine(cfg, fit, cost_kind)) if self.refines else None
            self.picked[key] = pick_config(self.path, self.uniform, fit, self.evaluator,
                                           self.options.select, self.options.margin, refine)
        return self.picked[key]

    def _refine(self, cfg, fit: Callable[[Any], bool], cost_kind: str):
        from tqdm import tqdm

        from .greedy import refine_supernet
        o, counter = self.options, self.evaluator.counter
        before = counter.copy()
        bar = tqdm(desc="refine", unit="move", disable=not self.show, leave=False, dynamic_ncols=True)

        def moved(step) -> None:
            if step.index > 0:
                bar.update(1)
            bar.set_postfix_str(f"{format_bitops(step.bitops)} BitOPs, loss {step.result['loss']:.4f}")
        res = refine_supernet(self.net, self.evaluator, self.cost, cfg, fit, strategy=o.strategy,
                              cost_kind=cost_kind, top_k=o.refine_top_k, max_iters=o.refine_steps,
                              metric="loss" if o.select == "loss" else "err", margin=o.refine_margin,
                              progress=moved)
        bar.close()
        self.refine_counts.add(counter - before)
        return res
