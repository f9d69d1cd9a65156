"""Every setting of a search: its default, its allowed values and what it does, in one place.

:class:`SearchOptions` is what :func:`search.pipeline.run_search` takes. ``search.py``'s command
line is built from it (each field is a flag, :func:`flag`: ``refine_top_k`` is ``--refine-top-k``;
its default, ``choices`` and help text come from here), and the quality benchmark takes its search
settings from it, so a default changed here changes everywhere. Defaults that belong to an
algorithm are that algorithm's own constants (the greedy's ``top_k``, the evaluator's proxy
batches, the pick rule's margin), referenced rather than repeated.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from mpq.batchnorm import DEFAULT_BATCH_SIZE, DEFAULT_BN_BATCHES
from mpq.errors import UserError

from .budget import Budget, parse_budget, parse_budget_list
from .data import CALIB_SPLITS
from .evaluator import DEFAULT_PROXY_BATCHES
from .greedy import (DEFAULT_REFINE_ITERS, DEFAULT_REFINE_TOP_K, DEFAULT_REFRESH, DEFAULT_TOP_K, METRICS,
                     SCORES)
from .select import DEFAULT_MARGIN, SELECTS
from .sensitivity import MODES as SENSITIVITY_MODES
from .strategies import ALL_STRATEGIES

DEFAULT_CHECKPOINT = os.path.join("runs", "default", "supernet.pt")


def _opt(default: Any, help: str, choices: Optional[Tuple[str, ...]] = None,
         group: Optional[str] = None) -> Any:
    """A field: its default, what it does (``search.py --help``), its allowed values, and, on the
    first field of a group of the help, that group's title."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "group": group}
    return field(default=default, metadata=meta)


@dataclass
class SearchOptions:
    """The settings of one search; each field's ``metadata["help"]`` says what it does."""

    checkpoint: str = _opt(DEFAULT_CHECKPOINT, "supernet checkpoint (train.py's supernet.pt)")
    out: Optional[str] = _opt(None, "output folder (default: <checkpoint folder>/search)")
    budget: Optional[str] = _opt(
        None, "BitOPs ('22.8G', '1.5e9'), size ('2.5MB') or ratio ('0.2')",
        group="budget (the constraints given together must all hold)")
    budget_size: Optional[str] = _opt(None, "weight-size budget ('2.5MB', '800KB', '1.2MiB')")
    budget_ratio: Optional[str] = _opt(None, "fraction of the all-8-bit BitOPs ('0.2')")
    budgets: Optional[str] = _opt(None, "comma-separated budgets, each answered separately from one "
                                        "search path ('34.7G,22.8G,14.4G'); not combinable with the "
                                        "three options above")
    full_path: bool = _opt(False, "walk down to the lowest configuration (the whole Pareto path) "
                                  "instead of stopping at the budget")

    calib_size: int = _opt(4096, "samples the search scores configurations on (never trained on)",
                           group="data")
    calib_split: str = _opt(
        "auto", "where calibration samples come from: training images left out of training "
                "(data.train_subset), or a part of the held-out split; auto: train when enough are "
                "left out", CALIB_SPLITS)
    eval_size: int = _opt(0, "held-out (val) samples for the final accuracy, disjoint from "
                             "calibration; 0 = all of them")
    bn_batches: int = _opt(DEFAULT_BN_BATCHES, "training-split batches for BN re-calibration of each "
                                               "configuration (shared-BN supernets)")
    batch_size: int = _opt(DEFAULT_BATCH_SIZE, "evaluation batch size")
    seed: Optional[int] = _opt(None, "data-subset seed (default: the checkpoint's data seed)")
    data_root: Optional[str] = _opt(None, "override the checkpoint's data.root")
    data_name: Optional[str] = _opt(None, "override the checkpoint's data.name")
    workers: int = _opt(0, "DataLoader workers")

    strategy: str = _opt("fast", "fast: greedy walk, proxy pre-ranking + exact check of the top-k "
                                 "moves; naive: greedy walk, every move exactly; reference: the "
                                 "paper's greedy per BitOPs budget (from W5A5, +/- moves, weight then "
                                 "activation phase, one batch per iteration); evolution: population "
                                 "search per budget on the calibration loss; random: the best of "
                                 "--random-samples random configurations per budget",
                         ALL_STRATEGIES, group="search")
    top_k: int = _opt(DEFAULT_TOP_K, "fast strategy: moves checked exactly per step")
    refresh: int = _opt(DEFAULT_REFRESH, "fast strategy: re-measure all proxy deltas every N steps "
                                         "(0: only the moved layer's)")
    proxy_batches: int = _opt(DEFAULT_PROXY_BATCHES, "fast strategy: calibration batches of the proxy "
                                                     "evaluation (at most all of them)")
    score: str = _opt("ratio", "ratio: metric increase per BitOPs saved; reference: "
                               "1.5*err/max_err - (1 - bitops/max_bitops)", SCORES)
    metric: str = _opt("loss", "what a greedy move may cost: calibration loss or error increase", METRICS)
    select: str = _opt(
        "loss", "what the configuration for a budget optimises among the path points and the uniform "
                "configurations that fit (and in the refinement): calibration loss, or accuracy "
                "(ties: lower loss)", SELECTS)
    margin: float = _opt(
        DEFAULT_MARGIN, "a mixed configuration replaces the largest uniform W=A configuration within "
                        "the budget only if it beats it on the calibration samples by this many "
                        "standard errors of the paired per-sample difference (0: take the best)")
    population: int = _opt(24, "evolution: individuals per generation (a quarter are the parents, "
                               "half mutations, half crossovers)")
    generations: int = _opt(12, "evolution: generations")
    random_samples: int = _opt(150, "random: configurations drawn per budget")
    greedy_start: str = _opt("max", "fast/naive: where the greedy walk starts: every layer at its "
                                    "highest bits, or (sensitivity) each layer's weight and "
                                    "activation at the lowest bits whose sensitivity loss increase "
                                    "is at most --start-tolerance", ("max", "sensitivity"))
    start_tolerance: float = _opt(0.005, "--greedy-start sensitivity: the calibration loss increase "
                                         "a layer's bits may cost alone")
    refine: bool = _opt(True, "after the greedy walk, improve each budget's configuration by "
                              "bidirectional moves within the budget (one bit-width up, optionally "
                              "another one down)")
    refine_top_k: int = _opt(DEFAULT_REFINE_TOP_K, "refinement: candidate moves evaluated exactly per "
                                                   "step (ranked by single-move deltas: proxy in the "
                                                   "fast strategy)")
    refine_steps: int = _opt(DEFAULT_REFINE_ITERS, "refinement: at most this many moves per budget")
    refine_margin: float = _opt(1.0, "refinement: a move is taken only if it improves the calibration "
                                     "loss (--select acc: accuracy) by this many standard errors of "
                                     "the paired per-sample difference")

    sensitivity: bool = _opt(True, "write sensitivity.csv / sensitivity.png: each layer's weight or "
                                   "activation bits lowered alone, every other layer at its highest "
                                   "bits, on the calibration samples", group="output")
    sensitivity_mode: str = _opt("exact", "sensitivity: exact (all calibration samples, BN "
                                          "re-calibrated as the search scores) or proxy (the proxy "
                                          "batches)", SENSITIVITY_MODES)
    sensitivity_only: bool = _opt(False, "write the sensitivity report and stop (no search)")
    export: bool = _opt(True, "write model_fixed.pt (the accuracy of the fixed model is measured "
                              "either way)")
    onnx: bool = _opt(True, "with --export, also write model.onnx (QDQ, opset 21, for onnxruntime) "
                            "and encodings.json, and measure the ONNX model's accuracy in "
                            "onnxruntime (needs the onnx extra)")
    compare_uniform: bool = _opt(True, "evaluate the uniform W=A configurations and the searched ones "
                                       "at their BitOPs on the evaluation split")
    device: Optional[str] = _opt(None, "cpu, cuda, cuda:1 (default: cuda when available; under "
                                       "torchrun cuda:LOCAL_RANK)")
    quiet: bool = _opt(False, "no progress bars")

    @classmethod
    def from_namespace(cls, ns: Any) -> "SearchOptions":
        """The options of an ``argparse`` namespace with one attribute per field."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})

    def out_dir(self) -> str:
        return self.out or os.path.join(os.path.dirname(os.path.abspath(self.checkpoint)), "search")

    def parse_budgets(self) -> Tuple[List[Budget], List[Budget]]:
        """``(single, listed)``: the budgets of ``budget``/``budget_size``/``budget_ratio`` (to hold
        together) and of ``budgets`` (each answered alone); a malformed one fails before anything
        is loaded."""
        single: List[Budget] = []
        if self.budget is not None:
            single.append(parse_budget(self.budget))
        if self.budget_size is not None:
            single.append(parse_budget(self.budget_size, "size"))
        if self.budget_ratio is not None:
            single.append(parse_budget(self.budget_ratio, "ratio"))
        listed: List[Budget] = parse_budget_list(self.budgets) if self.budgets is not None else []
        if listed and single:
            raise UserError("--budgets cannot be combined with --budget, --budget-size or --budget-ratio")
        return single, listed

    def check(self) -> None:
        """Refuse (:class:`~mpq.errors.UserError`, naming the flag) a value out of range or not
        among its choices."""
        from mpq.config import MAX_SEED, MAX_WORKERS, check_device, check_range
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise UserError(f"{flag(f.name)}: {getattr(self, f.name)!r} is not allowed; allowed: "
                                f"{', '.join(allowed)}")
        for name in ("calib_size", "batch_size", "bn_batches", "top_k", "proxy_batches", "refine_top_k",
                     "population", "generations", "random_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)}: must be at least 1, got {getattr(self, name)}")
        if self.population < 2:
            raise UserError(f"--population: must be at least 2 (crossover takes two parents), got "
                            f"{self.population}")
        if self.seed is not None:
            check_range("--seed", self.seed, 0, MAX_SEED, integer=True)
        check_range("--workers", self.workers, 0, MAX_WORKERS, integer=True)
        check_device("--device", self.device)
        if self.greedy_start == "sensitivity" and not (self.sensitivity or self.sensitivity_only):
            raise UserError("--greedy-start sensitivity needs the sensitivity report: drop --no-sensitivity")
        for name in ("eval_size", "refine_steps", "refresh", "workers", "margin", "refine_margin",
                     "start_tolerance"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):  # also NaN and inf
                raise UserError(f"{flag(name)}: must be a finite number >= 0, got {value}")


def flag(name: str) -> str:
    """The command-line flag of field ``name`` (also in the error messages of a library call: the
    user knows the options by their flags)."""
    return "--" + name.replace("_", "-")
