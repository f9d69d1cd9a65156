"""Population-based search under a budget (``--strategy evolution``) and its baseline
(``--strategy random``), after the reference's ``evolution_search.py`` and ``util/random_search.py``
(``../shared/REFERENCE_RECIPE.md`` item 9), scored on the calibration split only.

Evolution, per generation (the reference's numbers in brackets; mpq's defaults are smaller so a
search of the embedded default takes minutes on 2 cores)::

    parents   = the best `parents` individuals by fitness                        [10 of 50]
    mutations = `mutations` children of random parents, each gene (a layer's weight or activation
                bit-width) re-drawn from its candidates with probability `mutate_prob`   [25, 0.2]
    crossover = `crossovers` children of two distinct parents, each gene from either  [25]
    population = parents + children, refilled with random individuals to `population`   [50]

A child is kept only when it is legal: within the budget and at least ``min_ratio`` x the budget
(the reference: 33.7-33.9 G for a 33.9 G target), tried at most ``max_tries`` times [250]. Random
individuals are drawn per layer uniformly, then lowered one random step at a time until they fit,
so they sit near the budget. Fitness is the calibration loss (``metric="loss"``) or error
(``"err"``) from the search's evaluator; identical configurations are evaluated once.

The reference scores its evolution on the ImageNet validation set it reports (a selection on test
data, item 10): here the evaluator only ever sees the calibration samples. The search is seeded and
writes its state (generation, population, fitness cache, RNG) to ``state_path`` after every
generation; a search started with the same settings resumes from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .greedy import Config, SearchResult, Step, free_layers

Choices = Mapping[str, Tuple[Sequence[int], Sequence[int]]]
STATE_VERSION = 1


@dataclass
class EvolutionSettings:
    population: int = 24
    generations: int = 12
    parents: int = 6
    mutations: int = 12
    crossovers: int = 12
    mutate_prob: float = 0.2
    max_tries: int = 250
    min_ratio: float = 0.9
    seed: int = 0

    def check(self) -> None:
        for name in ("population", "generations", "parents", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"evolution: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("mutations", "crossovers"):
            if getattr(self, name) < 0:
                raise ValueError(f"evolution: {name} must be >= 0, got {getattr(self, name)}")
        if self.parents > self.population:
            raise ValueError(f"evolution: parents ({self.parents}) must be <= population ({self.population})")
        if not 0.0 <= self.mutate_prob <= 1.0 or not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError("evolution: mutate_prob and min_ratio must be in [0, 1]")


def _key(config: Mapping[str, Tuple[int, int]]) -> str:
    return json.dumps(sorted([n, int(w), int(a)] for n, (w, a) in config.items()))


class _Space:
    """The legal configurations: base (pinned layers) + a gene pair per free layer, within the band."""

    def __init__(self, choices: Choices, base: Mapping[str, Tuple[int, int]], cost: Callable[[Config], float],
                 budget: float, min_ratio: float, rng: random.Random,
                 fits: Optional[Callable[[Config], bool]] = None) -> None:
        self.choices, self.base, self.cost, self.budget, self.rng = choices, dict(base), cost, budget, rng
        self.low = min_ratio * budget
        self.free = free_layers(choices)
        self.fits = fits

    def within(self, c: Config) -> bool:
        """Within the budget (and every further constraint ``fits`` adds)."""
        return self.cost(c) <= self.budget and (self.fits is None or bool(self.fits(c)))

    def legal(self, c: Config) -> bool:
        return self.low <= self.cost(c) and self.within(c)

    def random(self) -> Optional[Config]:
        """Uniform bits per layer, then one random one-step decrease at a time until it fits."""
        c = dict(self.base)
        for n in self.free:
            w, a = self.choices[n]
            c[n] = (self.rng.choice(sorted(w)), self.rng.choice(sorted(a)))
        while not self.within(c):
            steps = []
            for n in self.free:
                w, a = (sorted(x) for x in self.choices[n])
                if w.index(c[n][0]) > 0:
                    steps.append((n, 0, w[w.index(c[n][0]) - 1]))
                if a.index(c[n][1]) > 0:
                    steps.append((n, 1, a[a.index(c[n][1]) - 1]))
            if not steps:
                return None
            n, k, b = self.rng.choice(steps)
            c[n] = (b, c[n][1]) if k == 0 else (c[n][0], b)
        return c

    def mutate(self, parent: Config, p: float) -> Config:
        c = dict(parent)
        for n in self.free:
            w, a = self.choices[n]
            wb = self.rng.choice(sorted(w)) if self.rng.random() < p else c[n][0]
            ab = self.rng.choice(sorted(a)) if self.rng.random() < p else c[n][1]
            c[n] = (wb, ab)
        return c

    def crossover(self, p1: Config, p2: Config) -> Config:
        c = dict(p1)
        for n in self.free:
            c[n] = (self.rng.choice((p1[n][0], p2[n][0])), self.rng.choice((p1[n][1], p2[n][1])))
        return c


def _fingerprint(kind: str, choices: Choices, budget: float, settings: EvolutionSettings, metric: str,
                 tag: str) -> str:
    blob = json.dumps({"kind": kind, "choices": {n: [list(w), list(a)] for n, (w, a) in choices.items()},
                       "budget": budget, "settings": asdict(settings), "metric": metric, "tag": tag},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_state(path: Optional[str], fingerprint: str) -> Optional[Dict[str, Any]]:
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        return None   # other settings: start afresh (the file is replaced)
    return state


def _save_state(path: Optional[str], state: Dict[str, Any]) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _rng_to_json(rng: random.Random) -> list:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _rng_from_json(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


class _Fitness:
    """Calibration fitness with a cache (lower is better)."""

    def __init__(self, evaluate: Callable[[Config], Mapping[str, float]], metric: str,
                 cache: Optional[Dict[str, Dict[str, float]]] = None) -> None:
        if metric not in ("loss", "err"):
            raise ValueError(f"metric {metric!r} is not allowed; allowed: ['loss', 'err']")
        self.evaluate, self.metric, self.cache = evaluate, metric, dict(cache or {})
        self.calls = 0

    def result(self, c: Config) -> Dict[str, float]:
        k = _key(c)
        if k not in self.cache:
            r = self.evaluate(c)
            self.cache[k] = {"loss": float(r["loss"]), "acc": float(r["acc"])}
            self.calls += 1
        return self.cache[k]

    def __call__(self, c: Config) -> float:
        r = self.result(c)
        return r["loss"] if self.metric == "loss" else 1.0 - r["acc"]


def _result(kind: str, best_per_round: List[Tuple[Config, Dict[str, float], float]], cost, fitness: _Fitness,
            stats: Dict[str, Any]) -> SearchResult:
    path = [Step(i, dict(c), cost(c), m, dict(r)) for i, (c, r, m) in enumerate(best_per_round)]
    return SearchResult(path, kind, "fitness", fitness.metric, exact_calls=fitness.calls, stats=stats)


def evolution_search(choices: Choices, base: Mapping[str, Tuple[int, int]],
                     evaluate: Callable[[Config], Mapping[str, float]], cost: Callable[[Config], float],
                     budget: float, settings: EvolutionSettings = EvolutionSettings(), metric: str = "loss",
                     state_path: Optional[str] = None,
                     progress: Optional[Callable[[int, int, float], None]] = None, *,
                     fits: Optional[Callable[[Config], bool]] = None, tag: str = "",
                     resume: bool = True) -> SearchResult:
    """Evolutionary search (module docstring). ``evaluate(config)`` -> ``{"loss", "acc"}`` on the
    calibration data. The path holds the best individual after each generation (generation 0: the
    initial population); its last step is the answer. ``progress(generation, generations, best)``.

    ``fits``: a further constraint every individual must meet (e.g. a size budget beside the BitOPs
    one); ``tag``: what else the fitness depends on (checkpoint, calibration data), so a state file
    written for other data is not resumed; ``resume=False`` ignores an existing state file (it is
    still written)."""
    settings.check()
    fp = _fingerprint("evolution", choices, budget, settings, metric, tag)
    state = _load_state(state_path, fp) if resume else None
    rng = _rng_from_json(state["rng"]) if state else random.Random(settings.seed)
    space = _Space(choices, base, cost, budget, settings.min_ratio, rng, fits)
    fitness = _Fitness(evaluate, metric, state["cache"] if state else None)
    if state:
        population = [dict((n, tuple(v)) for n, v in c.items()) for c in state["population"]]
        history = [(dict((n, tuple(v)) for n, v in c.items()), r, m) for c, r, m in state["history"]]
        start = state["generation"] + 1
    else:
        population = _fill([], space, settings.population, settings.max_tries)
        if not population:
            raise ValueError("evolution: no legal configuration found (the budget is below the smallest "
                             "configuration, or min_ratio excludes every configuration)")
        best = min(population, key=fitness)
        history = [(best, fitness.result(best), fitness(best))]
        start = 1
    for gen in range(start, settings.generations + 1):
        ranked = sorted(population, key=lambda c: (fitness(c), _key(c)))
        parents = ranked[:settings.parents]
        children = _children(space, parents, settings, lambda p: space.mutate(p, settings.mutate_prob),
                             settings.mutations, one_parent=True)
        if len(parents) > 1:
            children += _children(space, parents, settings, None, settings.crossovers, one_parent=False)
        population = _fill(parents + children, space, settings.population, settings.max_tries)
        best = min(population, key=lambda c: (fitness(c), _key(c)))
        history.append((best, fitness.result(best), fitness(best)))
        _save_state(state_path, {"version": STATE_VERSION, "fingerprint": fp, "generation": gen,
                                 "population": [{n: list(v) for n, v in c.items()} for c in population],
                                 "history": [[{n: list(v) for n, v in c.items()}, r, m] for c, r, m in history],
                                 "cache": fitness.cache, "rng": _rng_to_json(rng)})
        if progress:
            progress(gen, settings.generations, history[-1][2])
    return _result("evolution", history, cost, fitness,
                   {"generations": settings.generations, "evaluations": len(fitness.cache),
                    "settings": asdict(settings), "resumed_from": start - 1 if state else None})


def _children(space: _Space, parents: List[Config], settings: EvolutionSettings, make, count: int,
              one_parent: bool) -> List[Config]:
    out = []
    for _ in range(count):
        for _ in range(settings.max_tries):
            if one_parent:
                child = make(space.rng.choice(parents))
            else:
                p1, p2 = space.rng.sample(parents, 2)
                child = space.crossover(p1, p2)
            if space.legal(child):
                out.append(child)
                break
    return out


def _fill(pop: List[Config], space: _Space, size: int, max_tries: int) -> List[Config]:
    """``pop`` without duplicates, refilled with random legal individuals up to ``size``."""
    seen, out = set(), []
    for c in pop:
        if _key(c) not in seen:
            seen.add(_key(c))
            out.append(c)
    tries = 0
    while len(out) < size and tries < max_tries * size:
        tries += 1
        c = space.random()
        if c is not None and space.legal(c) and _key(c) not in seen:
            seen.add(_key(c))
            out.append(c)
    return out


def random_search(choices: Choices, base: Mapping[str, Tuple[int, int]],
                  evaluate: Callable[[Config], Mapping[str, float]], cost: Callable[[Config], float],
                  budget: float, samples: int, metric: str = "loss", min_ratio: float = 0.9, seed: int = 0,
                  progress: Optional[Callable[[int, int, float], None]] = None, *,
                  fits: Optional[Callable[[Config], bool]] = None) -> SearchResult:
    """The baseline: ``samples`` random legal configurations (drawn as the evolution draws its
    random individuals), the best by calibration fitness. The path holds the best so far after each
    sample; its last step is the answer."""
    if samples < 1:
        raise ValueError(f"random search: samples must be >= 1, got {samples}")
    rng = random.Random(seed)
    space = _Space(choices, base, cost, budget, min_ratio, rng, fits)
    fitness = _Fitness(evaluate, metric)
    pop = _fill([], space, samples, 250)
    if not pop:
        raise ValueError("random search: no legal configuration found")
    history, best = [], None
    for i, c in enumerate(pop):
        if best is None or (fitness(c), _key(c)) < (fitness(best), _key(best)):
            best = c
        history.append((best, fitness.result(best), fitness(best)))
        if progress:
            progress(i + 1, len(pop), history[-1][2])
    return _result("random", history, cost, fitness, {"samples": len(pop), "evaluations": len(fitness.cache)})

