"""Greedy bit-width search: walk down from the highest configuration, one bit-width step at a time.

At each iteration every *move* is considered: lowering the weight **or** the activation bit-width of
one layer by one candidate step (e.g. 6 -> 5 in ``(2, 3, 4, 5, 6)``). Each move is scored by the
metric it costs (loss or error increase, measured on the calibration set) against the cost it saves;
the best move is applied; the walk stops when the budget is met (or, with ``to_min``, at the lowest
configuration). Every visited configuration is recorded: the path is a set of Pareto candidates, so one
walk answers every budget above its end.

Scores (lower is better, configurable with ``score``):

* ``"ratio"`` (default): ``(metric(c') - metric(c)) / ((cost(c) - cost(c')) / cost(start))`` - the
  metric increase per fraction of the start cost saved ("delta loss / delta BitOPs");
* ``"reference"``: the one-shot paper's ``1.5 * metric(c') / max_metric - (1 - cost(c') / cost(start))``
  with ``max_metric`` the largest metric among the moves scored in that iteration.

``metric`` is ``"loss"`` (mean cross-entropy, default: smoother than accuracy on a small calibration
set) or ``"err"`` (``1 - accuracy``).

Strategies:

* ``"naive"``: every iteration evaluates every move exactly (whole calibration set, BN re-calibrated);
* ``"fast"`` (default): moves are pre-ranked by a cheap *proxy* (a few calibration batches with
  batch-statistics BN: no BN re-calibration, one forward pass per batch) and only the best ``top_k``
  are evaluated exactly; the proxy deltas are
  *lazy*: a move's proxy delta is re-measured only when its layer changed (or every ``refresh``
  iterations when ``refresh > 0``), the others reuse the previous measurement. Exact results are
  memoised by configuration.

Refinement (:func:`refine_search`): the greedy walk only ever lowers bits, so the point where it meets
a budget can be improved by trading bits *between* layers. From a configuration within the budget,
every one-step move up is tried alone (when it fits) and together with one one-step move down of
another bit-width (a *swap*); the candidates are ranked by the sum of their single-move metric deltas
(proxy evaluations in the fast strategy), the best ``top_k`` are evaluated exactly, and the best is
taken when it lowers the exact metric (and passes an optional ``accept`` test, e.g. a paired
significance test); repeated until nothing improves. This is the reference search's bidirectional
step, applied where it matters: at the budget.

The algorithms (:func:`greedy_search`, :func:`refine_search`) are pure: they take a cost function and
evaluation functions over configurations ``{layer: (w_bits, a_bits)}``, so they are testable on a
constructed table; :func:`search_supernet` and :func:`refine_supernet` bind them to a supernet, an
:class:`~search.evaluator.Evaluator` and the cost model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .cost import CostModel  # it lived here first: ``from search.greedy import CostModel`` still works

Config = Dict[str, Tuple[int, int]]
Choices = Mapping[str, Tuple[Sequence[int], Sequence[int]]]
EvalFn = Callable[[Config], Union[float, Mapping[str, float]]]

STRATEGIES = ("fast", "naive")
SCORES = ("ratio", "reference")
METRICS = ("loss", "err")
DEFAULT_TOP_K = 2
DEFAULT_REFRESH = 0
DEFAULT_REFINE_TOP_K = 6
DEFAULT_REFINE_ITERS = 20


@dataclass(frozen=True)
class Move:
    """Lower ``kind`` (``"w"`` or ``"a"``) of ``layer`` from ``old`` to ``new`` bits."""

    layer: str
    kind: str
    old: int
    new: int

    def apply(self, config: Mapping[str, Tuple[int, int]]) -> Config:
        out = dict(config)
        w, a = out[self.layer]
        out[self.layer] = (self.new, a) if self.kind == "w" else (w, self.new)
        return out

    def __str__(self) -> str:
        return f"{self.layer}.{self.kind}{self.old}->{self.new}"


@dataclass(frozen=True)
class Swap:
    """Several one-step moves applied together (refinement: one up, optionally one down)."""

    moves: Tuple[Move, ...]

    def apply(self, config: Mapping[str, Tuple[int, int]]) -> Config:
        out = dict(config)
        for mv in self.moves:
            out = mv.apply(out)
        return out

    def __str__(self) -> str:
        return "+".join(str(mv) for mv in self.moves)


@dataclass
class Step:
    """One point of the search path.

    ``cost``: the search cost (BitOPs or bytes); ``metric``: the exact metric (lower is better);
    ``result``: the full evaluation result (e.g. ``acc``, ``loss``, ``n``); ``move``/``score``: the
    move that led here and its score (``None`` for the start); ``bitops``/``size_bytes`` are filled by
    :func:`search_supernet`.
    """

    index: int
    config: Config
    cost: float
    metric: float
    result: Dict[str, float]
    move: Optional[Union[Move, Swap]] = None
    score: Optional[float] = None
    bitops: Optional[float] = None
    size_bytes: Optional[float] = None


@dataclass
class SearchResult:
    path: List[Step]
    strategy: str
    score: str
    metric: str
    exact_calls: int = 0
    proxy_calls: int = 0
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Step:
        return self.path[-1]

    def select(self, fits: Callable[[Config], bool]) -> Optional[Step]:
        """The best path point (lowest metric; ties: the earliest) that ``fits``; ``None`` if none."""
        ok = [s for s in self.path if fits(s.config)]
        if not ok:
            return None
        return min(ok, key=lambda s: (s.metric, s.index))


def config_key(config: Mapping[str, Tuple[int, int]]) -> Tuple:
    return tuple(sorted((k, int(v[0]), int(v[1])) for k, v in config.items()))


def _metric_of(result: Union[float, Mapping[str, float]], metric: str) -> Tuple[float, Dict[str, float]]:
    if isinstance(result, Mapping):
        out = {k: float(v) for k, v in result.items()}
        if metric == "err" and "err" not in out and "acc" in out:
            out["err"] = 1.0 - out["acc"]
        if metric not in out:
            raise KeyError(f"the evaluation result has no {metric!r} entry: {sorted(out)}")
        return out[metric], out
    value = float(result)
    return value, {metric: value}


class _Memo:
    """Exact and proxy evaluations of configurations, each measured once, with call counts.
    Without a proxy function the proxy is the exact metric."""

    def __init__(self, evaluate_fn: EvalFn, proxy_fn: Optional[EvalFn], metric: str) -> None:
        self.evaluate_fn, self.proxy_fn, self.metric = evaluate_fn, proxy_fn, metric
        self._exact: Dict[Tuple, Tuple[float, Dict[str, float]]] = {}
        self._proxy: Dict[Tuple, float] = {}
        self.exact_calls = self.proxy_calls = 0

    def exact(self, cfg: Config) -> Tuple[float, Dict[str, float]]:
        key = config_key(cfg)
        if key not in self._exact:
            self.exact_calls += 1
            self._exact[key] = _metric_of(self.evaluate_fn(cfg), self.metric)
        return self._exact[key]

    def proxy(self, cfg: Config) -> float:
        if self.proxy_fn is None:
            return self.exact(cfg)[0]
        key = config_key(cfg)
        if key not in self._proxy:
            self.proxy_calls += 1
            self._proxy[key] = _metric_of(self.proxy_fn(cfg), self.metric)[0]
        return self._proxy[key]


def _one_step_moves(config: Mapping[str, Tuple[int, int]], choices: Choices, kinds: Sequence[str],
                    up: bool) -> List[Move]:
    moves = []
    for layer in config:
        for kind in ("w", "a"):
            if kind not in kinds:
                continue
            cands = choices[layer][0 if kind == "w" else 1]
            cur = config[layer][0 if kind == "w" else 1]
            if up:
                nxt = [int(c) for c in cands if c > cur]
                if nxt:
                    moves.append(Move(layer, kind, cur, min(nxt)))
            else:
                nxt = [int(c) for c in cands if c < cur]
                if nxt:
                    moves.append(Move(layer, kind, cur, max(nxt)))
    return moves


def down_moves(config: Mapping[str, Tuple[int, int]], choices: Choices,
               kinds: Sequence[str] = ("w", "a")) -> List[Move]:
    """Every one-step-down move from ``config``, in layer order, weights before activations."""
    return _one_step_moves(config, choices, kinds, up=False)


def up_moves(config: Mapping[str, Tuple[int, int]], choices: Choices,
             kinds: Sequence[str] = ("w", "a")) -> List[Move]:
    """Every one-step-up move from ``config``, in layer order, weights before activations."""
    return _one_step_moves(config, choices, kinds, up=True)


def _score(kind: str, m0: float, m1: float, c0: float, c1: float, cost_ref: float,
           metric_ref: float) -> float:
    saved = c0 - c1
    if saved <= 0:
        return math.inf
    if kind == "ratio":
        return (m1 - m0) / (saved / cost_ref)
    return 1.5 * m1 / max(metric_ref, 1e-12) - (1.0 - c1 / cost_ref)


def greedy_search(start: Mapping[str, Tuple[int, int]], choices: Choices,
                  cost_fn: Callable[[Config], float], evaluate_fn: EvalFn, *,
                  proxy_fn: Optional[EvalFn] = None, budget: Optional[float] = None,
                  fits: Optional[Callable[[Config], bool]] = None, to_min: bool = False,
                  strategy: str = "fast", top_k: int = DEFAULT_TOP_K, refresh: int = DEFAULT_REFRESH,
                  score: str = "ratio", metric: str = "loss", kinds: Sequence[str] = ("w", "a"),
                  progress: Optional[Callable[[Step], None]] = None) -> SearchResult:
    """Greedy walk from ``start`` down the bit-widths (see the module docstring).

    Args:
        start: the first configuration (usually every layer at its highest bits).
        choices: ``{layer: (w_candidates, a_candidates)}``.
        cost_fn: configuration -> cost (BitOPs or bytes); moves that do not lower it are skipped.
        evaluate_fn: exact evaluation: configuration -> metric value or a mapping holding ``metric``
            (or ``acc`` for ``metric="err"``).
        proxy_fn: cheap evaluation for the fast strategy (default: ``evaluate_fn``, i.e. lazy exact).
        budget / fits: stop once ``cost <= budget`` / ``fits(config)`` (both when both are given).
        to_min: keep walking to the lowest configuration (the whole Pareto path).
        strategy: ``"fast"`` or ``"naive"``.
        top_k: fast strategy: moves evaluated exactly per iteration.
        refresh: fast strategy: re-measure every proxy delta every ``refresh`` iterations (0: only
            those of the layer that changed).
        score: ``"ratio"`` or ``"reference"``; metric: result key to minimise (``"loss"``/``"err"``).
        kinds: which bit-widths may move (``("w",)`` for a size budget that ignores activations).
        progress: called with every new path step.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not allowed; allowed: {list(STRATEGIES)}")
    if score not in SCORES:
        raise ValueError(f"score: {score!r} is not allowed; allowed: {list(SCORES)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")

    def satisfied(cfg: Config, cost: float) -> bool:
        ok = True
        if budget is not None:
            ok = ok and cost <= budget
        if fits is not None:
            ok = ok and bool(fits(cfg))
        return ok and (budget is not None or fits is not None)

    memo = _Memo(evaluate_fn, proxy_fn, metric)
    exact, proxy = memo.exact, memo.proxy

    base: Config = {k: (int(v[0]), int(v[1])) for k, v in start.items()}
    base_cost = float(cost_fn(base))
    cost_ref = base_cost if base_cost > 0 else 1.0
    m_base, r_base = exact(base)
    path = [Step(0, dict(base), base_cost, m_base, r_base)]
    if progress:
        progress(path[-1])
    order = {(layer, kind): i for i, (layer, kind) in
             enumerate((layer, kind) for layer in base for kind in ("w", "a"))}
    # fast strategy state: proxy delta per (layer, kind, current bits of that layer)
    lazy: Dict[Tuple, Tuple[float, int]] = {}
    p_base: Optional[float] = None
    iteration = 0
    while to_min or not satisfied(base, base_cost):
        moves = []
        for mv in down_moves(base, choices, kinds):
            cfg = mv.apply(base)
            c = float(cost_fn(cfg))
            if c < base_cost:
                moves.append((mv, cfg, c))
        if not moves:
            break
        if strategy == "naive":
            evaluated = [(mv, cfg, c, *exact(cfg)) for mv, cfg, c in moves]
        else:
            if p_base is None:
                p_base = proxy(base)
            fresh: Dict[Move, float] = {}
            ranked = []
            for mv, cfg, c in moves:
                key = (mv.layer, mv.kind, base[mv.layer])
                hit = lazy.get(key)
                if hit is None or (refresh > 0 and iteration - hit[1] >= refresh):
                    p = proxy(cfg)
                    fresh[mv] = p
                    lazy[key] = (p - p_base, iteration)
                ranked.append((mv, cfg, c, p_base + lazy[key][0]))
            p_ref = max(r[3] for r in ranked)
            ranked.sort(key=lambda r: (_score(score, p_base, r[3], base_cost, r[2], cost_ref, p_ref),
                                       order[(r[0].layer, r[0].kind)]))
            evaluated = [(mv, cfg, c, *exact(cfg)) for mv, cfg, c, _ in ranked[:top_k]]
        m_ref = max(e[3] for e in evaluated)
        scored = [(_score(score, m_base, e[3], base_cost, e[2], cost_ref, m_ref),
                   order[(e[0].layer, e[0].kind)], e) for e in evaluated]
        best_score, _, (mv, cfg, c, m, r) = min(scored, key=lambda s: (s[0], s[1]))
        if strategy == "fast":
            p_base = fresh.get(mv)  # None: measured lazily at the next iteration
        base, base_cost, m_base = cfg, c, m
        iteration += 1
        path.append(Step(len(path), dict(base), base_cost, m, r, mv, best_score))
        if progress:
            progress(path[-1])
    return SearchResult(path, strategy, score, metric, memo.exact_calls, memo.proxy_calls)


def refine_search(start: Mapping[str, Tuple[int, int]], choices: Choices,
                  cost_fn: Callable[[Config], float], evaluate_fn: EvalFn,
                  fits: Callable[[Config], bool], *, proxy_fn: Optional[EvalFn] = None,
                  metric: str = "loss", top_k: int = DEFAULT_REFINE_TOP_K,
                  max_iters: int = DEFAULT_REFINE_ITERS, kinds: Sequence[str] = ("w", "a"),
                  accept: Optional[Callable[[Config, Config], bool]] = None,
                  progress: Optional[Callable[[Step], None]] = None) -> SearchResult:
    """Bidirectional local search within a budget, from ``start`` (see the module docstring).

    Args:
        start: a configuration with ``fits(start)`` true.
        fits: the budget; every configuration visited satisfies it.
        evaluate_fn / proxy_fn / metric: as in :func:`greedy_search`; the single-move deltas that rank
            the candidates come from ``proxy_fn`` when given, else from ``evaluate_fn``.
        top_k: candidates (single up-moves and swaps) evaluated exactly per iteration.
        max_iters: at most this many accepted moves.
        accept: ``accept(new, current)``: an extra test a better configuration must pass (both have
            been evaluated exactly); default: any exact improvement is taken.
    Returns a :class:`SearchResult` whose path starts at ``start``; every later step lowers the
    exact metric. ``stats`` holds ``iterations`` and ``stopped`` (why it ended).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    base: Config = {k: (int(v[0]), int(v[1])) for k, v in start.items()}
    if not fits(base):
        raise ValueError("refine_search: the start configuration does not fit the budget")
    memo = _Memo(evaluate_fn, proxy_fn, metric)
    exact, single = memo.exact, memo.proxy

    order = {(layer, kind): i for i, (layer, kind) in
             enumerate((layer, kind) for layer in base for kind in ("w", "a"))}
    m_base, r_base = exact(base)
    path = [Step(0, dict(base), float(cost_fn(base)), m_base, r_base)]
    if progress:
        progress(path[-1])
    stopped = "max_iters"
    for _ in range(max_iters):
        ups = up_moves(base, choices, kinds)
        downs = down_moves(base, choices, kinds)
        # a swap is worth trying only with an up-move; downs alone never lower the metric
        if not ups:
            stopped = "no move up"
            break
        p_base = single(base)
        delta: Dict[Move, float] = {}   # single-move deltas, measured only for moves in a fitting option
        cands: Dict[Tuple, Tuple[float, Tuple[int, ...], Swap, Config]] = {}
        for up in ups:
            options = [Swap((up,))] + [Swap((up, dn)) for dn in downs
                                       if (dn.layer, dn.kind) != (up.layer, up.kind)]
            for sw in options:
                cfg = sw.apply(base)
                if not fits(cfg):
                    continue
                for mv in sw.moves:
                    if mv not in delta:
                        delta[mv] = single(mv.apply(base)) - p_base
                pred = sum(delta[mv] for mv in sw.moves)
                rank = tuple(order[(mv.layer, mv.kind)] for mv in sw.moves)
                key = config_key(cfg)
                if key not in cands or (pred, rank) < cands[key][:2]:
                    cands[key] = (pred, rank, sw, cfg)
        if not cands:
            stopped = "no candidate fits"
            break
        ranked = sorted(cands.values(), key=lambda c: (c[0], c[1]))[:top_k]
        evaluated = [(exact(cfg)[0], rank, sw, cfg) for _, rank, sw, cfg in ranked]
        m_new, _, sw, cfg = min(evaluated, key=lambda e: (e[0], e[1]))
        if not m_new < m_base:
            stopped = "no improvement"
            break
        if accept is not None and not accept(cfg, base):
            stopped = "not accepted"
            break
        base, m_base = cfg, m_new
        path.append(Step(len(path), dict(base), float(cost_fn(base)), m_new, exact(base)[1], sw,
                         m_new - path[-1].metric))
        if progress:
            progress(path[-1])
    return SearchResult(path, "refine", "delta", metric, memo.exact_calls, memo.proxy_calls,
                        {"iterations": len(path) - 1, "stopped": stopped})


# ------------------------------------------------------------------------------ supernet binding
def _annotator(cost: CostModel, progress: Optional[Callable[[Step], None]]) -> Callable[[Step], None]:
    """A path callback that fills a step's ``bitops`` and ``size_bytes`` and then calls ``progress``."""
    def annotate(step: Step) -> None:
        step.bitops = cost.bitops(step.config)
        step.size_bytes = cost.size_bytes(step.config)
        if progress:
            progress(step)
    return annotate


def free_layers(choices: Mapping[str, Tuple[Sequence[int], Sequence[int]]]) -> List[str]:
    """The layers of ``choices`` a search may change: all but the pinned ones (a single weight and a
    single activation candidate, :func:`mpq.supernet.is_pinned`)."""
    return [n for n, (w, a) in choices.items() if not (len(w) == 1 and len(a) == 1)]


def layer_choices(net) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """``{layer: (w_candidates, a_candidates)}`` of a supernet."""
    from mpq.supernet import quant_layers
    return {n: (tuple(m.w_candidates), tuple(m.a_candidates)) for n, m in quant_layers(net).items()}


def search_supernet(net, evaluator, cost: CostModel, *, max_bitops: Optional[float] = None,
                    max_size: Optional[float] = None, fits: Optional[Callable[[Config], bool]] = None,
                    cost_kind: Optional[str] = None, to_min: bool = False, strategy: str = "fast",
                    top_k: int = DEFAULT_TOP_K, refresh: int = DEFAULT_REFRESH, score: str = "ratio",
                    metric: str = "loss", start: Optional[Mapping[str, Tuple[int, int]]] = None,
                    progress: Optional[Callable[[Step], None]] = None) -> SearchResult:
    """Greedy search of a supernet under a BitOPs and/or weight-size budget.

    Args:
        evaluator: provides ``exact(config)`` and ``proxy(config)`` (an
            :class:`~search.evaluator.Evaluator`).
        max_bitops / max_size / fits: the budget (all given constraints must hold); none of them:
            walk to the lowest configuration.
        cost_kind: ``"bitops"`` or ``"size"``, the cost moves are scored against; default BitOPs
            unless only ``max_size`` is given. Against size only weight bit-widths move (activations
            do not change the size).
    Steps get ``bitops`` and ``size_bytes`` filled in.
    """
    from mpq.supernet import max_config
    if cost_kind is None:
        cost_kind = "size" if (max_size is not None and max_bitops is None and fits is None) else "bitops"
    if cost_kind not in ("bitops", "size"):
        raise ValueError(f"cost_kind: {cost_kind!r} is not allowed; allowed: ['bitops', 'size']")
    cost_fn = cost.size_bytes if cost_kind == "size" else cost.bitops
    has_budget = max_bitops is not None or max_size is not None or fits is not None

    def fits_all(cfg: Config) -> bool:
        return ((max_bitops is None or cost.bitops(cfg) <= max_bitops)
                and (max_size is None or cost.size_bytes(cfg) <= max_size)
                and (fits is None or bool(fits(cfg))))

    annotate = _annotator(cost, progress)

    return greedy_search(dict(start) if start is not None else max_config(net), layer_choices(net),
                         cost_fn, evaluator.exact,
                         proxy_fn=evaluator.proxy if strategy == "fast" else None,
                         fits=fits_all if has_budget else None, to_min=to_min or not has_budget,
                         strategy=strategy, top_k=top_k, refresh=refresh, score=score,
                         metric=metric, kinds=("w",) if cost_kind == "size" else ("w", "a"),
                         progress=annotate)


def refine_supernet(net, evaluator, cost: CostModel, start: Mapping[str, Tuple[int, int]],
                    fits: Callable[[Config], bool], *, strategy: str = "fast",
                    cost_kind: str = "bitops", top_k: int = DEFAULT_REFINE_TOP_K,
                    max_iters: int = DEFAULT_REFINE_ITERS, metric: str = "loss",
                    margin: float = 0.0,
                    progress: Optional[Callable[[Step], None]] = None) -> SearchResult:
    """:func:`refine_search` on a supernet: single-move deltas from ``evaluator.proxy`` (fast
    strategy) or ``evaluator.exact`` (naive); a move is accepted only when the new configuration
    beats the current one by ``margin`` standard errors of the paired per-sample difference on the
    calibration samples (:meth:`~search.evaluator.Evaluator.paired_z`; ``metric`` ``"err"`` tests
    accuracy). ``cost_kind`` (``"bitops"`` or ``"size"``) is the cost recorded in the path; weights
    and activations both move (under a size budget raising activation bits is free, and ``fits``
    keeps every step within the budget)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not allowed; allowed: {list(STRATEGIES)}")

    def accept(new: Config, cur: Config) -> bool:
        return margin <= 0 or evaluator.paired_z(new, cur, "acc" if metric == "err" else "loss") >= margin

    annotate = _annotator(cost, progress)

    return refine_search(start, layer_choices(net), cost.size_bytes if cost_kind == "size" else cost.bitops,
                         evaluator.exact, fits,
                         proxy_fn=evaluator.proxy if strategy == "fast" else None, metric=metric,
                         top_k=top_k, max_iters=max_iters,
                         accept=accept, progress=annotate)
