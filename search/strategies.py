"""What answers the budgets of a search (``--strategy``), bound to one supernet and its evaluator.

* ``fast`` / ``naive`` (:mod:`search.greedy`): ONE greedy walk down to the budgets; each budget is
  then answered by the pick rule (:class:`search.select.Picker`: the best fitting path point or
  uniform configuration, refined, and a mixed one only when it clearly beats uniform).
* ``reference`` (:mod:`search.reference_greedy`): the paper's greedy, run per BitOPs budget from
  uniform ``W{s}A{s}``; its last configuration is the answer, as in the authors' code.
* ``evolution`` / ``random`` (:mod:`search.evolution`): per budget, a population search (or the
  random baseline) scored by the exact calibration figures; the fittest individual is the answer.

:func:`run_strategy` returns a :class:`Searched`: the answers (``picker.pick`` for a budget, as the
greedy's :class:`~search.select.Picker`), the traces that ``pareto.csv`` / ``pareto.png`` show and
the strategy's own figures for ``config.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mpq.errors import UserError

from .budget import Target, format_bitops
from .greedy import STRATEGIES as GREEDY_STRATEGIES
from .greedy import Step

TARGET_STRATEGIES = ("reference", "evolution", "random")
ALL_STRATEGIES = tuple(GREEDY_STRATEGIES) + TARGET_STRATEGIES
STATE_FILE = "evolution_state{suffix}.json"


@dataclass
class Searched:
    """The outcome of a strategy: ``picker.pick(fit, cost_kind, key)`` answers a budget;
    ``segments`` are ``(label, steps)`` traces for the Pareto table and plot; ``steps`` the
    strategy's iterations (greedy moves, reference moves, generations or samples) and ``stats`` its
    own figures."""

    picker: Any
    segments: List[Tuple[str, List[Step]]]
    steps: int
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> List[Step]:
        """Every step of every segment, in order (``pareto.csv``)."""
        return [s for _, steps in self.segments for s in steps]


class AnswerPicker:
    """The answers of a per-budget strategy. ``pick`` returns the answer of the budget with that
    ``key``; for any other constraint (the uniform comparison) the answer with the lowest
    calibration loss among those that fit, or ``{}``."""

    refines = False

    def __init__(self, answers: Dict[Any, Dict[str, Any]]) -> None:
        from .evaluator import ForwardCounter
        self.answers = answers
        self.picked: Dict[Any, Dict[str, Any]] = dict(answers)
        self.refine_counts = ForwardCounter()

    def pick(self, fit: Callable[[Any], bool], cost_kind: str, key: Any) -> Dict[str, Any]:
        if key in self.answers:
            return self.answers[key]
        ok = [a for a in self.answers.values() if fit(a["config"])]
        return min(ok, key=lambda a: (a["loss"], -a["acc"])) if ok else {}


def target_key(t: Target) -> Tuple[Optional[float], Optional[float]]:
    """How :func:`run_strategy`'s answers and the pipeline name a budget."""
    return (t.max_bitops, t.max_size)


def evolution_settings(options, seed: int):
    """:class:`~search.evolution.EvolutionSettings` of the options: ``population`` individuals for
    ``generations`` generations; a quarter of them parents, half mutations, half crossovers."""
    from .evolution import EvolutionSettings
    p = options.population
    return EvolutionSettings(population=p, generations=options.generations, parents=max(2, p // 4),
                             mutations=p // 2, crossovers=p // 2, seed=seed)


def data_tag(source_digest: str, options, seed: int) -> str:
    """What the calibration fitness depends on besides the configuration (a state file written
    for another checkpoint or other data is not resumed)."""
    o = options
    blob = json.dumps([source_digest, o.calib_size, o.calib_split, o.bn_batches, o.batch_size, seed,
                       o.data_name, o.data_root])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_strategy(options, net, evaluator, cost, targets: Sequence[Target], uniform: Sequence[Dict[str, Any]],
                 *, seed: int, out_dir: str, main: bool, world: int, source_digest: str,
                 show: bool, sensitivity: Optional[Sequence[Dict[str, Any]]] = None) -> Searched:
    """Run ``options.strategy`` for ``targets`` (module docstring); ``uniform``: the uniform
    configurations measured on the calibration samples (the greedy's pick rule uses them);
    ``sensitivity``: the rows of the sensitivity report (``--greedy-start sensitivity``)."""
    o = options
    if o.strategy in GREEDY_STRATEGIES:
        start = None
        if o.greedy_start == "sensitivity":
            from .sensitivity import tolerant_start
            start = tolerant_start(net, sensitivity or [], o.start_tolerance)
        return _greedy(o, net, evaluator, cost, targets, uniform, show, start)
    if o.strategy == "reference":
        runs = [_reference(o, net, evaluator, cost, t, show) for t in targets]
    else:
        tag = data_tag(source_digest, o, seed)
        runs = []
        for i, t in enumerate(targets):
            state = os.path.join(out_dir, STATE_FILE.format(suffix="" if i == 0 else f"_{i + 1}"))
            runs.append(_population(o, net, evaluator, cost, t, seed, state if main else None,
                                    world == 1, tag, show))
    answers, segments, stats = {}, [], []
    for t, (result, answer) in zip(targets, runs):
        answers[target_key(t)] = answer
        what = {"reference": "reference walk, one-batch accuracy", "evolution": "evolution, best per generation",
                "random": "random, best so far"}[o.strategy]
        segments.append((f"{what} ({t.label})", result.path))
        stats.append({"budget": t.label, **result.stats})
    return Searched(AnswerPicker(answers), segments, sum(len(r.path) - 1 for r, _ in runs),
                    {"per_budget": stats})


# ------------------------------------------------------------------------------------ strategies
def _greedy(o, net, evaluator, cost, targets: Sequence[Target], uniform, show: bool,
            start: Optional[Dict[str, Tuple[int, int]]] = None) -> Searched:
    """The greedy walk: down to the budgets (all must hold), or with ``full_path`` to the lowest
    configuration. Moves are scored against size only when no target constrains BitOPs."""
    from tqdm import tqdm

    from mpq.supernet import quant_layers

    from .greedy import search_supernet
    from .select import Picker
    total = sum(len(m[0]) - 1 + len(m[1]) - 1 for m in
                ((layer.w_candidates, layer.a_candidates) for layer in quant_layers(net).values()))
    bar = tqdm(total=total, desc=f"search ({o.strategy})", unit="step", disable=not show,
               dynamic_ncols=True)

    def progress(step) -> None:
        if step.index > 0:
            bar.update(1)
        bar.set_postfix_str(f"{format_bitops(step.bitops)} BitOPs, acc {100 * step.result['acc']:.2f}%")

    def fits_all(cfg) -> bool:
        return all(t.fits(cost, cfg) for t in targets)

    size_only = all(t.max_bitops is None for t in targets)
    result = search_supernet(net, evaluator, cost, fits=None if o.full_path else fits_all,
                             cost_kind="size" if size_only else "bitops",
                             to_min=o.full_path, strategy=o.strategy, top_k=o.top_k,
                             refresh=o.refresh, score=o.score, metric=o.metric,
                             start=start, progress=progress)
    bar.close()
    picker = Picker(net, evaluator, cost, result.path, uniform, o, show=show)
    return Searched(picker, [(f"greedy path ({o.strategy})", result.path)], len(result.path) - 1)


def _choices_and_base(net):
    from mpq.supernet import max_config

    from .greedy import layer_choices
    return layer_choices(net), max_config(net)


def _annotate(steps: Sequence[Step], cost) -> None:
    """Fill each step's ``bitops`` and ``size_bytes`` (as the greedy's path callback does)."""
    from .greedy import _annotator
    fill = _annotator(cost, None)
    for s in steps:
        fill(s)


def _answer(evaluator, config, source: str) -> Dict[str, Any]:
    """A budget's answer with its exact calibration figures (what config.json reports)."""
    r = evaluator.exact(config)
    return {"config": dict(config), "acc": r["acc"], "loss": r["loss"], "source": source}


def _reference(o, net, evaluator, cost, t: Target, show: bool):
    """The paper's greedy for one BitOPs budget; the batch errors come from
    :meth:`~search.evaluator.Evaluator.batch_error` (one calibration batch per iteration)."""
    from tqdm import tqdm

    from .reference_greedy import reference_greedy
    if t.max_bitops is None or t.max_size is not None:
        raise UserError(f"--strategy reference: budget {t.label!r}: the reference greedy answers a "
                        f"BitOPs budget alone (--budget with BitOPs, or --budget-ratio); use --strategy "
                        f"fast, evolution or random for a size budget")
    from .greedy import free_layers
    choices, base = _choices_and_base(net)
    free = set(free_layers(choices))
    fixed = cost.bitops({n: ((0, 0) if n in free else bits) for n, bits in base.items()})
    bar = tqdm(desc=f"search (reference, {t.label})", unit="move", disable=not show, dynamic_ncols=True)

    def progress(step: Step) -> None:
        if step.index > 0:
            bar.update(1)
        bar.set_postfix_str(f"{format_bitops(step.cost)} BitOPs, batch acc "
                            f"{100 * step.result.get('acc', float('nan')):.1f}%")
    result = reference_greedy(choices, base, evaluator.batch_error, cost.bitops, t.max_bitops,
                              fixed_cost=fixed, progress=progress)
    bar.close()
    _annotate(result.path, cost)
    st = result.stats
    source = (f"reference greedy: {st['iterations']} moves from W{st['start_bits']}A{st['start_bits']} "
              f"(floor {st['floor']} bits, stopped: {st['stopped']})")
    if not st["reached"]:
        raise UserError(f"--strategy reference: budget {t.label!r} was not reached ({source}); give a "
                        f"larger budget or use --strategy fast")
    return result, _answer(evaluator, result.final.config, source)


def _population(o, net, evaluator, cost, t: Target, seed: int, state_path: Optional[str], resume: bool,
                tag: str, show: bool):
    """Evolution or random search for one budget: under its BitOPs (or, for a size-only budget, its
    size), with the other constraint of the budget as a further condition."""
    from tqdm import tqdm

    from .evolution import evolution_search, random_search
    choices, base = _choices_and_base(net)
    primary, limit = (cost.bitops, t.max_bitops) if t.max_bitops is not None else (cost.size_bytes, t.max_size)

    def fits(c) -> bool:
        return t.fits(cost, c)
    total = o.generations if o.strategy == "evolution" else o.random_samples
    bar = tqdm(total=total, desc=f"search ({o.strategy}, {t.label})",
               unit="generation" if o.strategy == "evolution" else "sample", disable=not show,
               dynamic_ncols=True)

    def progress(done: int, of: int, best: float) -> None:
        bar.total = of
        bar.n = done
        bar.set_postfix_str(f"best {o.metric} {best:.4f}")
        bar.refresh()
    try:
        if o.strategy == "evolution":
            settings = evolution_settings(o, seed)
            result = evolution_search(choices, base, evaluator.exact, primary, limit, settings, o.metric,
                                      state_path, progress, fits=fits, tag=tag, resume=resume)
            what = (f"evolution: best of {result.stats['evaluations']} evaluated configurations over "
                    f"{settings.generations} generations of {settings.population}")
            if result.stats.get("resumed_from"):
                what += f" (resumed after generation {result.stats['resumed_from']})"
        else:
            result = random_search(choices, base, evaluator.exact, primary, limit, o.random_samples, o.metric,
                                   seed=seed, progress=progress, fits=fits)
            what = f"random: best of {result.stats['evaluations']} random configurations within the budget"
    except ValueError as e:
        raise UserError(f"--strategy {o.strategy}: budget {t.label!r}: {e}") from None
    finally:
        bar.close()
    _annotate(result.path, cost)
    final = result.final
    answer = {"config": dict(final.config), "acc": final.result["acc"], "loss": final.result["loss"],
              "source": what}
    result.stats.setdefault("settings", {"samples": o.random_samples, "seed": seed})   # evolution has its own
    return result, answer
