"""Quality benchmark on the embedded default (Fashion-MNIST, its model): every figure is measured.

    python benchmarks/quality.py                        # full run (48.6 CPU-min: ~25-30 min on 2 idle cores)
    python benchmarks/quality.py --quick                # smoke run (~1.5 min)
    python benchmarks/quality.py --repeats 5 --epochs 3 --train-subset 30000 --sections 1,2

Four questions, each answered over ``--repeats`` seeds (mean +- sample standard deviation, and a
verdict from the paired per-seed differences: "better"/"worse" when a two-sided paired t-test rejects
"no difference" at 95%, else "within noise"):

1. **Search vs uniform.** The embedded-default supernet (``mpq.config`` defaults: sandwich sampling,
   in-place distillation, IDM, bit-width freezing scheduler) is trained once; one greedy walk
   (``search.greedy.search_supernet``, default fast strategy, scored on a calibration split of the
   training images that the supernet did not train on) gives the whole path; for each budget
   ``BitOPs(uniform WbAb)``, b = 2, 3, 4, the greedy answer (the first path point within the budget)
   and what ``search.py`` returns (selection among path points and uniform configs, then the
   bidirectional refinement, with its defaults) are compared with the uniform config of the same
   supernet on the held-out test set. (The lowest config of the supernet
   *is* uniform W2A2, so at b = 2 the search can only return it; the table says so.)
2. **Retraining-free.** A config taken from the supernet vs the same config trained alone with QAT
   (:class:`BenchTrainer`: the project's trainer with one config sampled per step, no
   distillation, IDM or scheduler; same optimizer, LR schedule, epochs, data and seed). Standalone
   QAT does one forward/backward per step, the supernet one per sampled config.
3. **Ablation.** Plain sandwich training (with in-place distillation) vs + bit-width freezing
   scheduler vs + IDM vs both: test accuracy of the lowest (W2A2) and highest (W6A6) config.
4. **R2 and 2-bit post-training quantization.** The float model is trained with each R2 variant
   (``mpq.losses.R2Loss``: linf, margin, softminmax; at each ``--r2-weights`` lambda) or without; then
   quantized without retraining: weights at 2 bits (first/last layer 8 bits, as everywhere in mpq),
   activations at 8 bits, each weight step size the per-channel MSE-optimal one (grid search), each
   activation step size the MSE-optimal one on calibration batches, BatchNorm re-calibrated.

Every accuracy is measured on the Fashion-MNIST test set (``--val-subset`` of it) with the search
side's evaluator (``search.evaluator``): shared BatchNorm statistics re-calibrated per config on fixed
training batches. Independent training runs execute in ``--jobs`` worker processes, one thread each.

Writes ``--out`` (JSON, every number per seed), ``--markdown`` (the tables) and ``--plot`` (accuracy
vs BitOPs: searched paths, uniform configs of the supernet, standalone QAT points).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mpq.data import build_datasets  # noqa: E402
from mpq.quantizer import FLOAT_BITS, qrange  # noqa: E402
from mpq.supernet import get_bits, quant_layers, set_bits, uniform_config  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
# mpq's scheduler and IDM before the paper's rules became the defaults (commit 5710f6c)
PREVIOUS_SCHEDULER = ["scheduler.schedule=periodic", "scheduler.which=most_turbulent",
                      "scheduler.cumulative=true", "scheduler.ema=0.9", "scheduler.measure=all",
                      "scheduler.round=ceil"]
PREVIOUS_IDM = ["idm.reduction=mean", "idm.features=post_bn"]
PAPER_SCHEDULER = ["scheduler.schedule=reference", "scheduler.which=lowest", "scheduler.cumulative=false",
                   "scheduler.ema=0.0", "scheduler.measure=allowed", "scheduler.round=floor"]
PAPER_IDM = ["idm.reduction=sum", "idm.features=reference"]
RECIPE_PAPER = os.path.join(ROOT, "configs", "recipe_paper.yaml")
# name: config overrides over the embedded default (distillation on in all of them); the recipe
# variants also merge a config file (VARIANT_CONFIG)
SUPERNET_VARIANTS: Dict[str, List[str]] = {
    "default": [],                                            # the embedded default, as it is
    "plain": ["scheduler.enabled=false", "idm.enabled=false"],
    "+scheduler (paper)": ["scheduler.enabled=true", *PAPER_SCHEDULER, "idm.enabled=false"],
    "+IDM (paper)": ["scheduler.enabled=false", "idm.enabled=true", *PAPER_IDM],
    "+both (paper)": ["scheduler.enabled=true", *PAPER_SCHEDULER, "idm.enabled=true", *PAPER_IDM],
    "previous defaults": ["scheduler.enabled=true", *PREVIOUS_SCHEDULER, "idm.enabled=true", *PREVIOUS_IDM],
    "paper recipe": [],
}
VARIANT_CONFIG = {"paper recipe": RECIPE_PAPER}
FULL = "default"               # = the embedded default (sections 1 and 2)
BUDGET_BITS = (2, 3, 4)
UNIFORM_BITS = (2, 3, 4, 5, 6)
R2_KINDS = ("linf", "margin", "softminmax")
PTQ_BITS = (2, 4)              # PTQ weight bit-widths reported (2 is the claim; 4 for context)
PTQ_A_BITS = 8


# ============================================================================ settings
def default_settings() -> Dict[str, Any]:
    """The benchmark's settings; training ones default to the embedded default (mpq.config)."""
    from mpq.config import default_config
    from search.options import SearchOptions
    d = default_config()
    return {
        "model": d["model"]["name"],
        "epochs": d["train"]["epochs"],
        # half the training set: fits the time budget and leaves unused training images for the
        # search calibration split (as search.py's --calib-split train)
        "train_subset": 30000,
        "val_subset": None,            # test images evaluated (None: all 10000)
        "repeats": 3,
        "seed0": 0,
        "calib_size": SearchOptions.calib_size,   # search calibration images (search.py's --calib-size)
        "bn_batches": 8,               # BN re-calibration batches (of 256 training images)
        "ptq_calib_batches": 2,        # activation step-size calibration batches for PTQ
        "path_points": 12,             # searched-path points evaluated on the test set (for the plot)
        "r2_weights": sorted({float(d["r2"]["weight"]), 1e-2}),
        "sections": [1, 2, 3, 4],
        "jobs": max(1, min(os.cpu_count() or 1, 8)),
        "threads": 1,                  # torch threads per worker process
        "max_steps": None,
    }


QUICK = {"epochs": 1, "train_subset": 4000, "val_subset": 1000, "repeats": 1, "calib_size": 512,
         "bn_batches": 2, "path_points": 6, "ptq_calib_batches": 1}


# ============================================================================ statistics
def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def t_critical(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:  # scipy is a dependency; the table is a fallback
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        return table.get(df, 2.228 if df < 20 else 1.96)


def verdict(diffs: Sequence[float]) -> str:
    """'better' / 'worse' when a paired two-sided t-test of the per-seed differences rejects 'no
    difference' at 95%, else 'within noise' (with one repeat: the sign, marked '(1 repeat)')."""
    d = [float(v) for v in diffs]
    if not d:
        return "n/a"
    m = statistics.fmean(d)
    if len(d) == 1:
        return ("better" if m > 0 else "worse" if m < 0 else "equal") + " (1 repeat)"
    se = statistics.stdev(d) / math.sqrt(len(d))
    if m == 0 or abs(m) <= t_critical(len(d) - 1) * se:
        return "within noise"
    return "better" if m > 0 else "worse"


# ============================================================================ data / evaluation
class EvalData:
    """The fixed data of one seed, split as ``search.py`` splits it (``search.data.split_data``):
    the search calibration set (training images left out of ``train_subset``, else a part of the
    held-out split), the held-out test batches (disjoint from calibration) and the BN re-calibration
    batches (training images)."""

    def __init__(self, s: Dict[str, Any], seed: int) -> None:
        from search.data import split_data
        from search.evaluator import take_batches
        info = build_datasets("fashion_mnist", train_subset=s["train_subset"], seed=seed)
        split = split_data(info, s["calib_size"], s["val_subset"] or 0, 256 * s["bn_batches"], seed)
        self.calib_split = split.calib_split
        self.calib = take_batches(split.calib, None, 256)
        self.bn = take_batches(split.bn, None, 256)
        self.ptq_calib = self.bn[:s["ptq_calib_batches"]]
        self.test = take_batches(split.eval, None, 500)
        self.test_size = len(split.eval)
        self.input_size = tuple(info.input_size)

    def evaluator(self, net):
        from search.evaluator import Evaluator
        return Evaluator(net, self.calib, bn_data=self.bn, bn_batches=len(self.bn), batch_size=256)

    def test_acc(self, ev, config, recalibrate: Optional[bool] = None) -> float:
        """Test accuracy (%) of ``config`` (BN re-calibrated on the BN batches when shared)."""
        from search.evaluator import evaluate
        r = evaluate(ev.net, config, self.test, bn_loader=self.bn, bn_batches=len(self.bn),
                     recalibrate=ev.recalibrate if recalibrate is None else recalibrate, batch_size=500)
        return 100.0 * r["acc"]


def cfg_json(config) -> Dict[str, List[int]]:
    return {k: [int(v[0]), int(v[1])] for k, v in config.items()}


def cfg_tuple(config) -> Dict[str, Tuple[int, int]]:
    return {k: (int(v[0]), int(v[1])) for k, v in config.items()}


def cfg_key(config) -> Tuple:
    return tuple(sorted((k, int(v[0]), int(v[1])) for k, v in config.items()))


def cfg_str(config, layers: Optional[Sequence[str]] = None) -> str:
    """Compact ``w/a`` per layer, e.g. ``8/8 6/4 3/5 ... 8/8``."""
    names = list(layers) if layers is not None else list(config)
    return " ".join(f"{config[n][0]}/{config[n][1]}" for n in names)


# ============================================================================ training (the trainer's API)
def make_trainer_class():
    from mpq.trainer import Trainer

    class BenchTrainer(Trainer):
        """The project's trainer, with two changes for the benchmark: when ``fixed_config`` is set
        (before :meth:`fit`) ONE bit config is sampled per step (standalone QAT / float training; same
        data, optimizer, LR schedule); and the trainer's own end-of-training evaluation is skipped
        (every accuracy here is measured afterwards, by :class:`EvalData`, the same way for all)."""

        fixed_config: Optional[Dict[str, Tuple[int, int]]] = None

        def sample_configs(self):
            if self.fixed_config is None:
                return super().sample_configs()
            return [("max", dict(self.fixed_config))]

        def evaluate(self):
            return {}

    return BenchTrainer


def trainer_cfg(s: Dict[str, Any], seed: int, workdir: str, name: str, overrides: Sequence[str],
                config_path: Optional[str] = None):
    from mpq.config import load_config
    base = [f"train.epochs={s['epochs']}",
            f"data.train_subset={'null' if s['train_subset'] is None else s['train_subset']}",
            f"train.seed={seed}", f"data.seed={seed}", "train.device=cpu",
            f"output.dir={workdir}", f"output.name={name}", "output.progress=false",
            "output.checkpoint_every=0", "output.keep_last=1",
            "eval.uniform_bits=[]", "eval.random_configs=0", "eval.every_epochs=1000"]
    if s.get("max_steps"):
        base.append(f"train.max_steps={s['max_steps']}")
    return load_config(config_path, overrides=base + list(overrides))


def train(s: Dict[str, Any], seed: int, name: str, overrides: Sequence[str],
          fixed: Optional[Callable] = None, config_path: Optional[str] = None) -> Tuple[Any, Dict[str, Any]]:
    """Run the trainer in a scratch folder (its log goes to a file); returns (trainer, info)."""
    BenchTrainer = make_trainer_class()
    workdir = tempfile.mkdtemp(prefix="mpq-quality-")
    cfg = trainer_cfg(s, seed, workdir, name, overrides, config_path)
    log_path = os.path.join(workdir, "train.log")
    t0 = time.time()
    try:
        with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            tr = BenchTrainer(cfg)
            if fixed is not None:
                tr.fixed_config = cfg_tuple(fixed(tr.net))
                set_bits(tr.net, tr.fixed_config)  # validates the config before training
            tr.fit()
    except BaseException:
        try:
            with open(log_path, encoding="utf-8") as f:
                tail = f.read()[-3000:]
        except OSError:
            tail = ""
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"training {name} (seed {seed}) failed; log tail:\n{tail}\n"
                           f"{traceback.format_exc()}") from None
    train_s = time.time() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    losses = (tr.metrics or {}).get("train_loss", {})
    return tr, {"train_s": round(train_s, 1), "steps": tr.global_step, "final_train_loss": losses}


# ============================================================================ tasks (run in workers)
def task_supernet(s: Dict[str, Any], variant: str, seed: int, do_search: bool) -> Dict[str, Any]:
    """Train one supernet variant; test accuracy of the uniform configs; with ``do_search`` the
    greedy path and the searched configs at the uniform budgets."""
    tr, out = train(s, seed, f"supernet-{variant}", SUPERNET_VARIANTS[variant],
                    config_path=VARIANT_CONFIG.get(variant))
    # the net evaluated and searched: the EMA when the recipe keeps one (what search.py loads)
    net = tr.ema.module if getattr(tr, "ema", None) is not None else tr.net
    data = EvalData(s, seed)
    ev = data.evaluator(net)
    t0 = time.time()
    layers = list(quant_layers(net))
    out.update({"task": "supernet", "variant": variant, "seed": seed, "layers": layers,
                "calib_split": data.calib_split, "test_size": data.test_size,
                "frozen_at_end": {n: [b for b in m.w_candidates if b not in m.w_allowed]
                                  for n, m in quant_layers(net).items()},
                "uniform": {}})
    from search.cost import CostModel
    cost = CostModel(net, data.input_size)
    for b in UNIFORM_BITS:
        try:
            c = uniform_config(net, b, b)
        except ValueError:   # e.g. depthwise layers without 2-bit candidates
            continue
        out["uniform"][str(b)] = {"config": cfg_json(c), "bitops": cost.bitops(c),
                                  "acc": data.test_acc(ev, c)}
    from mpq.supernet import max_config, min_config
    for key, c in (("lowest", min_config(net, respect_frozen=False)), ("highest", max_config(net))):
        out[key] = {"config": cfg_json(c), "bitops": cost.bitops(c), "acc": data.test_acc(ev, c)}
    if do_search:
        from search.greedy import search_supernet
        t1 = time.time()
        res = search_supernet(net, ev, cost, to_min=True)
        out["search_s"] = round(time.time() - t1, 1)
        out["search_calls"] = {"exact": res.exact_calls, "proxy": res.proxy_calls}
        path = [{"index": st.index, "config": cfg_json(st.config), "bitops": cost.bitops(st.config),
                 "calib_acc": 100.0 * st.result.get("acc", float("nan")),
                 "calib_loss": st.result.get("loss", float("nan"))} for st in res.path]
        # calibration results of the uniform configs (search.py's candidates besides the path), and
        # search.py's pick rule with its defaults over them and the path
        from search.options import SearchOptions
        from search.select import Picker, uniform_candidates
        uniform_cal = uniform_candidates(net, ev, cost, UNIFORM_BITS)
        picker = Picker(net, ev, cost, res.path, uniform_cal, SearchOptions())
        # test accuracy per config, measured once (the uniform ones are measured above)
        test_memo: Dict[Tuple, float] = {cfg_key(uniform_config(net, b, b)): out["uniform"][str(b)]["acc"]
                                         for b in UNIFORM_BITS}

        def test_of(config) -> float:
            if cfg_key(config) not in test_memo:
                test_memo[cfg_key(config)] = data.test_acc(ev, config)
            return test_memo[cfg_key(config)]

        out["budgets"] = {}
        chosen = set()
        for b in BUDGET_BITS:
            budget = cost.bitops(uniform_config(net, b, b))
            uni = cfg_tuple(uniform_config(net, b, b))

            def fit(c, budget=budget):
                return cost.bitops(c) <= budget * (1 + 1e-9)
            # the greedy answer: the first path point within the budget (where a greedy walk that
            # stops at the budget ends)
            fitting = [st for st in res.path if fit(st.config)]
            if not fitting:
                out["budgets"][str(b)] = {"budget": budget, "config": None}
                continue
            step = fitting[0]
            chosen.add(step.index)
            acc = test_of(step.config)
            path[step.index]["acc"] = acc
            info = {"budget": budget, "config": cfg_json(step.config), "bitops": cost.bitops(step.config),
                    "acc": acc, "calib_acc": 100.0 * step.result["acc"], "path_index": step.index,
                    "same_as_uniform": cfg_tuple(step.config) == uni}
            # what search.py returns for this budget, with its defaults: the best path point or
            # uniform config by calibration loss, refined by bidirectional moves in the budget, kept
            # only if it beats the largest fitting uniform config by --margin standard errors
            try:
                chosen_cli = picker.pick(fit, "bitops", budget)
            except Exception as e:  # noqa: BLE001 - a failing pick costs its row, not the run: say so
                info["cli_pick_error"] = f"{type(e).__name__}: {e}"
            else:
                c = cfg_tuple(chosen_cli["config"])
                info["cli_pick"] = {"config": cfg_json(c), "bitops": cost.bitops(c), "acc": test_of(c),
                                    "source": chosen_cli.get("source"),
                                    "z_vs_uniform": chosen_cli.get("z_vs_uniform"),
                                    "is_uniform": any(c == cfg_tuple(u["config"]) for u in uniform_cal)}
            out["budgets"][str(b)] = info
        # test accuracy of evenly spaced path points (plus the chosen ones) for the Pareto plot
        n = len(path)
        k = max(2, min(s["path_points"], n))
        picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} | chosen) if n > 1 else [0]
        for i in picks:
            if "acc" not in path[i]:
                path[i]["acc"] = test_of(path[i]["config"])
        out["path"] = path
    out["eval_s"] = round(time.time() - t0, 1)
    return out


def task_qat(s: Dict[str, Any], seed: int, label: str, config: Optional[Dict[str, List[int]]],
             bits: Optional[int]) -> Dict[str, Any]:
    """Standalone QAT of one config (``config``, or uniform ``bits``) for the same epochs."""
    def fixed(net):
        return cfg_tuple(config) if config is not None else uniform_config(net, bits, bits)
    tr, out = train(s, seed, f"qat-{label}", ["distill.enabled=false", "idm.enabled=false",
                                               "scheduler.enabled=false"], fixed=fixed)
    data = EvalData(s, seed)
    ev = data.evaluator(tr.net)
    from search.cost import CostModel
    c = tr.fixed_config
    out.update({"task": "qat", "label": label, "seed": seed, "config": cfg_json(c), "test_size": data.test_size,
                "bitops": CostModel(tr.net, data.input_size).bitops(c), "acc": data.test_acc(ev, c)})
    return out


# ---------------------------------------------------------------------------- section 4: R2 + PTQ
def _weight_rows(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(step.numel(), -1)


@torch.no_grad()
def mse_weight_step(w: torch.Tensor, bits: int, channels: int, grid: int = 100) -> torch.Tensor:
    """Per-row (output channel, or whole tensor when ``channels == 1``) step size minimising the
    quantization MSE ``||q(w; s, b) - w||^2`` over ``s = alpha * max|w_row| / Q_P``,
    ``alpha`` in ``(0, 1]`` (``grid`` values)."""
    qn, qp = qrange(bits, True)
    rows = w.detach().reshape(channels, -1).double()
    amax = rows.abs().amax(1, keepdim=True).clamp_min(1e-12)                   # (C, 1)
    alphas = torch.linspace(1.0 / grid, 1.0, grid, dtype=rows.dtype)           # (A,)
    steps = amax * alphas / qp                                                 # (C, A)
    q = (rows[:, None, :] / steps[:, :, None]).clamp(-qn, qp).round() * steps[:, :, None]
    err = (q - rows[:, None, :]).pow(2).sum(-1)                                # (C, A)
    best = err.argmin(1)
    return steps[torch.arange(channels), best].float()


@torch.no_grad()
def mse_act_step(x: torch.Tensor, bits: int, signed: bool, grid: int = 60,
                 max_elems: int = 1 << 20) -> float:
    """Per-tensor activation step size minimising the quantization MSE on calibration data."""
    flat = x.detach().reshape(-1)
    if flat.numel() > max_elems:
        g = torch.Generator().manual_seed(0)
        flat = flat[torch.randint(flat.numel(), (max_elems,), generator=g)]
    qn, qp = qrange(bits, signed)
    amax = float(flat.abs().max().clamp_min(1e-12))
    best, best_err = amax / qp, float("inf")
    for alpha in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = amax * alpha / qp
        err = float(((flat / s).clamp(-qn, qp).round() * s - flat).pow(2).sum())
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def ptq(net, config: Dict[str, Tuple[int, int]], calib_batches) -> None:
    """Post-training quantization of a float-trained supernet to ``config``, no retraining: MSE-
    optimal per-channel weight steps, MSE-optimal activation steps from the layer inputs of the
    (float) network on ``calib_batches``. BN is left alone (re-calibrated by the evaluator)."""
    layers = quant_layers(net)
    inputs: Dict[str, List[torch.Tensor]] = {n: [] for n in layers}
    saved = get_bits(net)
    set_bits(net, {n: (FLOAT_BITS, FLOAT_BITS) for n in layers})
    handles = [m.register_forward_pre_hook(
        lambda mod, args, n=n: inputs[n].append(args[0].detach().clone())) for n, m in layers.items()]
    net.eval()
    try:
        for x, _ in calib_batches:
            net(x)
    finally:
        for h in handles:
            h.remove()
    set_bits(net, saved)
    for n, m in layers.items():
        wb, ab = config[n]
        if wb != FLOAT_BITS:
            m.w_quant.set_step(wb, mse_weight_step(m.weight, wb, m.w_quant.step_for(wb).numel()))
        if ab != FLOAT_BITS:
            x = torch.cat(inputs[n])
            signed = bool((x < 0).any())
            m.a_quant.set_signed(signed)
            m.a_quant.set_step(ab, mse_act_step(x, ab, signed))
    set_bits(net, config)


def weight_range_stats(net) -> Dict[str, float]:
    """Mean over layers of max|W| / std(W) (how far the extreme weights stick out) and of max|W|."""
    ratios, maxes = [], []
    for m in quant_layers(net).values():
        w = m.weight.detach()
        maxes.append(float(w.abs().max()))
        ratios.append(float(w.abs().max() / w.std().clamp_min(1e-12)))
    return {"max_over_std": statistics.fmean(ratios), "max_abs": statistics.fmean(maxes)}


def task_r2(s: Dict[str, Any], seed: int, kind: str, weight: float) -> Dict[str, Any]:
    """Float training (every layer at 32/32 bits) with R2 ``kind`` (or ``"none"``), then PTQ."""
    over = ["quant.w_bits=[2,3,4,8,32]", "quant.a_bits=[8,32]", "quant.keep_8bit=[]",
            "distill.enabled=false", "idm.enabled=false", "scheduler.enabled=false"]
    if kind != "none":
        over += ["r2.enabled=true", f"r2.kind={kind}", f"r2.weight={weight}"]
    else:
        over += ["r2.enabled=false"]

    def fixed(net):
        return {n: (FLOAT_BITS, FLOAT_BITS) for n in quant_layers(net)}
    tr, out = train(s, seed, f"r2-{kind}", over, fixed=fixed)
    net = tr.net
    data = EvalData(s, seed)
    ev = data.evaluator(net)
    layers = list(quant_layers(net))
    out.update({"task": "r2", "kind": kind, "weight": weight if kind != "none" else 0.0, "seed": seed,
                "test_size": data.test_size,
                "float_acc": data.test_acc(ev, {n: (FLOAT_BITS, FLOAT_BITS) for n in layers}),
                "weights": weight_range_stats(net), "ptq": {}})
    float_state = {k: v.clone() for k, v in net.state_dict().items()}
    for wb in PTQ_BITS:
        cfg = {n: ((8, 8) if n in (layers[0], layers[-1]) else (wb, PTQ_A_BITS)) for n in layers}
        net.load_state_dict(float_state)
        ptq(net, cfg, data.ptq_calib)
        out["ptq"][str(wb)] = {"acc_bn_recal": data.test_acc(ev, cfg, recalibrate=True)}
        net.load_state_dict(float_state)
        ptq(net, cfg, data.ptq_calib)
        out["ptq"][str(wb)]["acc_no_recal"] = data.test_acc(ev, cfg, recalibrate=False)
    return out


# ============================================================================ scheduling
def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _call(fn_name: str, args: tuple) -> Dict[str, Any]:
    """Run task ``fn_name``; adds its wall and CPU seconds (CPU ~ wall on an idle machine with one
    thread per job, so the CPU seconds also predict the runtime where the machine is shared)."""
    t, c = time.time(), time.process_time()
    out = globals()[fn_name](*args)
    out["task_wall_s"] = round(time.time() - t, 1)
    out["task_cpu_s"] = round(time.process_time() - c, 1)
    return out


class Runner:
    """Runs tasks in ``jobs`` spawned worker processes (inline when ``jobs == 1``); tasks may be
    added while others run (the searched configs' QAT runs depend on the search)."""

    def __init__(self, jobs: int, threads: int, log: Callable[[str], None]) -> None:
        self.jobs, self.log = jobs, log
        self.pool = None
        if jobs > 1:
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                            initializer=_worker_init, initargs=(threads,))
        else:
            torch.set_num_threads(threads)
        self.pending: Dict[Any, Tuple[str, Callable]] = {}
        self.queue: List[Tuple[str, str, tuple, Callable]] = []
        self.failed: List[Dict[str, str]] = []
        self.on_progress: Optional[Callable[[], None]] = None
        self.t0 = time.time()

    def submit(self, label: str, fn_name: str, args: tuple, done: Callable[[Dict[str, Any]], None]) -> None:
        if self.pool is None:
            self.queue.append((label, fn_name, args, done))
        else:
            fut = self.pool.submit(_call, fn_name, args)
            self.pending[fut] = (label, done)

    def _finish(self, label: str, done: Callable, res: Optional[Dict[str, Any]], err: Optional[str],
                took: Optional[float] = None) -> None:
        when = f"[{time.time() - self.t0:6.0f}s]"
        if err is not None:
            self.failed.append({"task": label, "error": err})
            self.log(f"{when} FAILED {label}: {err.strip().splitlines()[-1] if err.strip() else err}")
            return
        self.log(f"{when} done {label}" + (f" ({took:.0f}s)" if took is not None else ""))
        done(res)
        if self.on_progress is not None:
            self.on_progress()

    def run(self) -> None:
        """Run everything submitted (also what gets submitted meanwhile). A failed task is logged
        and recorded in ``failed``; the others go on."""
        if self.pool is None:
            while self.queue:
                label, fn_name, args, done = self.queue.pop(0)
                t = time.time()
                try:
                    res, err = _call(fn_name, args), None
                except Exception:  # noqa: BLE001 - reported, the other tasks go on
                    res, err = None, traceback.format_exc()
                self._finish(label, done, res, err, time.time() - t)
            return
        try:
            while self.pending:
                finished, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    label, done = self.pending.pop(fut)
                    try:
                        res, err = fut.result(), None
                    except Exception as e:  # noqa: BLE001 - reported, the other tasks go on
                        res, err = None, f"{type(e).__name__}: {e}"
                    self._finish(label, done, res, err)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ============================================================================ main
def run_benchmark(s: Dict[str, Any], log: Callable[[str], None] = print,
                  partial_path: Optional[str] = None) -> Dict[str, Any]:
    """Run the selected sections; returns the raw results (``runs``), the summaries and the failed
    tasks. With ``partial_path`` the raw results so far are written there after every task."""
    t0 = time.time()
    sections = set(s["sections"])
    seeds = [s["seed0"] + i for i in range(s["repeats"])]
    runs: Dict[str, List[Dict[str, Any]]] = {"supernet": [], "qat": [], "r2": []}
    runner = Runner(s["jobs"], s["threads"], log)
    if partial_path:
        def save_partial():
            tmp = partial_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"settings": s, "partial": True, "runs": runs, "failed": runner.failed}, f)
            os.replace(tmp, partial_path)
        runner.on_progress = save_partial
    need_full = bool(sections & {1, 2})
    need_search = bool(sections & {1, 2})
    variants = [v for v in (s.get("variants") or SUPERNET_VARIANTS) if v != FULL] if 3 in sections else []

    def on_supernet(res):
        runs["supernet"].append(res)
        if res["variant"] == FULL and 2 in sections:
            for b, info in res.get("budgets", {}).items():
                if info.get("config") is not None and not info["same_as_uniform"]:
                    runner.submit(f"QAT searched@W{b}A{b} seed {res['seed']}", "task_qat",
                                  (s, res["seed"], f"searched@{b}", info["config"], None),
                                  runs["qat"].append)

    for seed in seeds:   # longest first: the full supernet (+ search) of every seed
        if need_full:
            runner.submit(f"supernet {FULL} seed {seed}", "task_supernet", (s, FULL, seed, need_search),
                          on_supernet)
    for seed in seeds:
        for v in variants:
            runner.submit(f"supernet {v} seed {seed}", "task_supernet", (s, v, seed, False), on_supernet)
    if 2 in sections:
        for seed in seeds:
            for b in BUDGET_BITS:
                runner.submit(f"QAT W{b}A{b} seed {seed}", "task_qat", (s, seed, f"uniform{b}", None, b),
                              runs["qat"].append)
    if 4 in sections:
        for seed in seeds:
            runner.submit(f"float seed {seed}", "task_r2", (s, seed, "none", 0.0), runs["r2"].append)
            for kind in R2_KINDS:
                for w in s["r2_weights"]:
                    runner.submit(f"float+R2 {kind} {w:g} seed {seed}", "task_r2", (s, seed, kind, w),
                                  runs["r2"].append)
    runner.run()
    for k in runs:
        runs[k].sort(key=lambda r: (r.get("seed", 0), str(r.get("variant", r.get("label", r.get("kind", "")))),
                                    r.get("weight", 0.0)))
    summary = summarize(s, runs, sections)
    return {"settings": s, "machine": machine_info(s), "runtime_s": round(time.time() - t0, 1),
            "summary": summary, "failed": runner.failed, "runs": runs}


def machine_info(s: Dict[str, Any]) -> Dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "jobs": s["jobs"], "threads_per_job": s["threads"]}


# ---------------------------------------------------------------------------- summaries
def summarize(s, runs, sections) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    sup = {(r["variant"], r["seed"]): r for r in runs["supernet"]}
    full = sorted([r for r in runs["supernet"] if r["variant"] == FULL], key=lambda r: r["seed"])
    if 1 in sections and full:
        rows = []
        for b in BUDGET_BITS:
            pairs = [(r["uniform"][str(b)]["acc"], r["budgets"][str(b)]["acc"], r) for r in full
                     if r.get("budgets", {}).get(str(b), {}).get("config") is not None]
            uni = [p[0] for p in pairs]
            srch = [p[1] for p in pairs]
            diffs = [p[1] - p[0] for p in pairs]
            row = {"bits": b, "budget_bitops": full[0]["budgets"][str(b)]["budget"],
                   "uniform_acc": uni, "searched_acc": srch, "diff": diffs,
                   "searched_bitops": [p[2]["budgets"][str(b)]["bitops"] for p in pairs],
                   "same_as_uniform": [p[2]["budgets"][str(b)]["same_as_uniform"] for p in pairs],
                   "searched_configs": [cfg_str(p[2]["budgets"][str(b)]["config"], p[2]["layers"])
                                        for p in pairs],
                   "verdict": verdict(diffs)}
            cli = [(p[0], p[2]["budgets"][str(b)]["cli_pick"]) for p in pairs
                   if "cli_pick" in p[2]["budgets"][str(b)]]
            if cli and len(cli) == len(pairs):
                row["cli_acc"] = [c["acc"] for _, c in cli]
                row["cli_diff"] = [c["acc"] - u for u, c in cli]
                row["cli_mixed"] = sum(not c["is_uniform"] for _, c in cli)
                row["cli_verdict"] = verdict(row["cli_diff"])
                row["cli_configs"] = [cfg_str(c["config"], p[2]["layers"]) for (_, c), p in zip(cli, pairs)]
            rows.append(row)
        out["search_vs_uniform"] = rows
    if 2 in sections and full:
        qat = {(r["label"], r["seed"]): r for r in runs["qat"]}
        rows = []
        for b in BUDGET_BITS:
            for kind in ("uniform", "searched"):
                sn, qa, bo = [], [], []
                for r in full:
                    if kind == "uniform":
                        q = qat.get((f"uniform{b}", r["seed"]))
                        acc = r["uniform"][str(b)]["acc"]
                        bitops = r["uniform"][str(b)]["bitops"]
                    else:
                        info = r.get("budgets", {}).get(str(b))
                        if not info or info.get("config") is None or info["same_as_uniform"]:
                            continue
                        q = qat.get((f"searched@{b}", r["seed"]))
                        acc, bitops = info["acc"], info["bitops"]
                    if q is None:
                        continue
                    sn.append(acc)
                    qa.append(q["acc"])
                    bo.append(bitops)
                if sn:
                    diffs = [a - q for a, q in zip(sn, qa)]
                    rows.append({"config": f"W{b}A{b}" if kind == "uniform" else f"searched @ W{b}A{b} budget",
                                 "bitops": bo, "supernet_acc": sn, "qat_acc": qa, "diff": diffs,
                                 "verdict": verdict(diffs)})
        out["retraining_free"] = rows
    if 3 in sections:
        rows = []
        seeds = sorted({r["seed"] for r in runs["supernet"]})
        for v in SUPERNET_VARIANTS:
            rs = [sup[(v, sd)] for sd in seeds if (v, sd) in sup]
            if not rs:
                continue
            row = {"variant": v, "min_acc": [r["lowest"]["acc"] for r in rs],
                   "min_bitops": [r["lowest"]["bitops"] for r in rs],
                   "max_acc": [r["highest"]["acc"] for r in rs],
                   "w4a4_acc": [r["uniform"]["4"]["acc"] for r in rs],
                   "train_s": [r["train_s"] for r in rs]}
            for ref, tag in (("plain", "plain"), ("previous defaults", "previous")):
                paired = [(r, sup[(ref, r["seed"])]) for r in rs if (ref, r["seed"]) in sup]
                if v == ref or not paired:
                    continue
                if tag == "previous" and v != "paper recipe":
                    continue
                for key, name in (("lowest", "min"), ("highest", "max")):
                    d = [r[key]["acc"] - p[key]["acc"] for r, p in paired]
                    row[f"{name}_diff_vs_{tag}"] = d
                    row[f"{name}_verdict_vs_{tag}"] = verdict(d)
                d = [r["uniform"]["4"]["acc"] - p["uniform"]["4"]["acc"] for r, p in paired]
                row[f"w4a4_diff_vs_{tag}"] = d
                row[f"w4a4_verdict_vs_{tag}"] = verdict(d)
            rows.append(row)
        out["ablation"] = rows
    if 4 in sections and runs["r2"]:
        rows = []
        none = {r["seed"]: r for r in runs["r2"] if r["kind"] == "none"}
        keys = [("none", 0.0)] + [(k, w) for k in R2_KINDS for w in s["r2_weights"]]
        for kind, w in keys:
            rs = [r for r in runs["r2"] if r["kind"] == kind and (kind == "none" or r["weight"] == w)]
            if not rs:
                continue
            row = {"kind": kind, "weight": w, "float_acc": [r["float_acc"] for r in rs],
                   "max_over_std": [r["weights"]["max_over_std"] for r in rs]}
            for wb in PTQ_BITS:
                row[f"ptq_w{wb}"] = [r["ptq"][str(wb)]["acc_bn_recal"] for r in rs]
                row[f"ptq_w{wb}_no_recal"] = [r["ptq"][str(wb)]["acc_no_recal"] for r in rs]
            if kind != "none" and all(r["seed"] in none for r in rs):
                row["diff_w2"] = [r["ptq"]["2"]["acc_bn_recal"] - none[r["seed"]]["ptq"]["2"]["acc_bn_recal"]
                                  for r in rs]
                row["verdict"] = verdict(row["diff_w2"])
            rows.append(row)
        out["r2_ptq"] = rows
    return out


CLAIM = {"better": "yes", "within noise": "not shown (within noise)", "worse": "no"}
CLAIM_TIE_OK = {"better": "yes (better)", "within noise": "yes (within noise)", "worse": "no"}


def _claim(v: str, table: Dict[str, str]) -> str:
    base, _, extra = v.partition(" (1 repeat)")
    word = table.get(base, base)
    return word + (" — 1 repeat" if v.endswith("(1 repeat)") else "")


def markdown(result: Dict[str, Any]) -> str:
    s, sm = result["settings"], result["summary"]
    n = s["repeats"]
    cpu = sum(r.get("task_cpu_s", 0.0) for rs in result["runs"].values() for r in rs)
    sizes = sorted({r.get("test_size") for rs in result["runs"].values() for r in rs if r.get("test_size")})
    lines = [f"Fashion-MNIST, {s.get('model', 'small_cnn')}, {s['epochs']} epoch(s) on {s['train_subset'] or 'all'} training "
             f"images, {'/'.join(map(str, sizes)) or '?'} held-out test images, {n} seed(s): mean ± std (%). "
             f"Verdicts: paired t-test of the per-seed differences at 95%. "
             + (f"Runtime {result['runtime_s'] / 60:.1f} min" if result.get("runtime_s") is not None
                else "PARTIAL results (run still going or interrupted)")
             + f" ({s['jobs']} jobs x {s['threads']} thread; {cpu / 60:.1f} CPU-min in the tasks).", ""]
    if "search_vs_uniform" in sm:
        lines += ["### 1. Searched mixed precision vs uniform, same supernet, equal BitOPs", "",
                  "greedy = the first greedy-path point within the budget; search.py = what `search.py` "
                  "returns with its defaults (the best path point or uniform config by calibration loss, "
                  "refined by bidirectional moves within the budget, kept only if it beats the largest "
                  "fitting uniform config by --margin standard errors, else that uniform config).", "",
                  "| budget | MBitOPs | uniform | greedy | greedy − uniform | greedy better? | search.py | search.py − uniform | search.py better? | search.py mixed | search.py configs (w/a per layer) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sm["search_vs_uniform"]:
            same = all(r["same_as_uniform"])
            cl = "n/a: W2A2 is the lowest config, the search can only return it" if same else _claim(r["verdict"], CLAIM)
            cfgs = "; ".join(sorted(set(r.get("cli_configs") or r["searched_configs"])))
            cli_cl = (("n/a" if same else _claim(r["cli_verdict"], CLAIM)) if "cli_verdict" in r else "n/a")
            cli = (f"{fmt(r['cli_acc'])} | {fmt(r['cli_diff'])} | {cli_cl} | {r['cli_mixed']}/{len(r['cli_acc'])}"
                   if "cli_acc" in r else "n/a | n/a | n/a | n/a")
            lines.append(f"| W{r['bits']}A{r['bits']} | {r['budget_bitops'] / 1e6:.2f} | {fmt(r['uniform_acc'])} | "
                         f"{fmt(r['searched_acc'])} | {fmt(r['diff'])} | {cl} | {cli} | {cfgs} |")
        lines.append("")
    if "retraining_free" in sm:
        lines += ["### 2. Retraining-free: config from the supernet vs the same config trained alone (QAT, same epochs)", "",
                  "| config | MBitOPs | supernet (no retraining) | standalone QAT | supernet − QAT | claim holds? |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sm["retraining_free"]:
            lines.append(f"| {r['config']} | {fmt([b / 1e6 for b in r['bitops']])} | {fmt(r['supernet_acc'])} | "
                         f"{fmt(r['qat_acc'])} | {fmt(r['diff'])} | {_claim(r['verdict'], CLAIM_TIE_OK)} |")
        lines.append("")
    if "ablation" in sm:
        lines += ["### 3. Ablation (all with in-place distillation; paired t-tests by seed)", "",
                  "lowest = every layer at its lowest candidate (W2A2; the paper recipe's depthwise layers "
                  "at 3/3), highest = W6A6.", "",
                  "| variant | lowest | highest | W4A4 | lowest vs plain | W4A4 vs plain | highest vs plain | train s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]

        def _d(r, key):
            return f"{fmt(r[key])} ({r[key.replace('diff', 'verdict')]})" if key in r else "—"
        for r in sm["ablation"]:
            lines.append(f"| {r['variant']} | {fmt(r['min_acc'])} | {fmt(r['max_acc'])} | {fmt(r['w4a4_acc'])} | "
                         f"{_d(r, 'min_diff_vs_plain')} | {_d(r, 'w4a4_diff_vs_plain')} | "
                         f"{_d(r, 'max_diff_vs_plain')} | {fmt(r['train_s'], 0)} |")
        prev = [r for r in sm["ablation"] if "min_diff_vs_previous" in r]
        if prev:
            lines += ["", "| paper recipe vs previous defaults | lowest | W4A4 | highest |", "| --- | --- | --- | --- |"]
            for r in prev:
                lines.append(f"| {r['variant']} | {_d(r, 'min_diff_vs_previous')} | "
                             f"{_d(r, 'w4a4_diff_vs_previous')} | {_d(r, 'max_diff_vs_previous')} |")
        lines.append("")
    if "r2_ptq" in sm:
        lines += ["### 4. R2 range restriction and 2-bit post-training quantization (float training, then PTQ, no retraining)", "",
                  "PTQ: weights W2 (first/last layer W8), activations A8; MSE-optimal per-channel weight steps, "
                  "MSE-optimal activation steps; BN re-calibrated (and without, for reference).", "",
                  "| R2 | lambda | float | PTQ W2A8 | PTQ W2A8 no BN recal | PTQ W4A8 | max\\|W\\|/std | W2A8 vs no R2 | R2 helps 2-bit PTQ? |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sm["r2_ptq"]:
            d = fmt(r["diff_w2"]) if "diff_w2" in r else "—"
            cl = _claim(r["verdict"], CLAIM) if "verdict" in r else "—"
            lam = "—" if r["kind"] == "none" else f"{r['weight']:g}"
            lines.append(f"| {r['kind']} | {lam} | {fmt(r['float_acc'])} | {fmt(r['ptq_w2'])} | "
                         f"{fmt(r['ptq_w2_no_recal'])} | {fmt(r['ptq_w4'])} | {fmt(r['max_over_std'])} | {d} | {cl} |")
        lines.append("")
    if result.get("failed"):
        lines += ["**Failed tasks** (missing from the tables): " +
                  "; ".join(f"{f['task']}: {f['error'].strip().splitlines()[-1][:200]}" for f in result["failed"]), ""]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: str) -> Optional[str]:
    """Accuracy vs BitOPs: searched paths (one line per seed), uniform configs and standalone QAT."""
    full = [r for r in result["runs"]["supernet"] if r["variant"] == FULL]
    if not full:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(full):
        pts = [(p["bitops"] / 1e6, p["acc"]) for p in r.get("path", []) if "acc" in p]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o", color="tab:blue", alpha=0.6, ms=3,
                    label="searched path (supernet)" if i == 0 else None)
    xs = [full[0]["uniform"][str(b)]["bitops"] / 1e6 for b in UNIFORM_BITS]
    ms = [mean_std([r["uniform"][str(b)]["acc"] for r in full]) for b in UNIFORM_BITS]
    ax.errorbar(xs, [m for m, _ in ms], yerr=[sd or 0 for _, sd in ms], fmt="s", color="tab:orange",
                capsize=3, label="uniform WbAb (supernet)")
    for x, b, (m, _) in zip(xs, UNIFORM_BITS, ms):
        ax.annotate(f"W{b}A{b}", (x, m), textcoords="offset points", xytext=(4, -10), fontsize=7)
    qat = result["runs"]["qat"]
    if qat:
        by: Dict[str, List[Dict[str, Any]]] = {}
        for q in qat:
            by.setdefault(q["label"], []).append(q)
        first = True
        for label, qs in sorted(by.items()):
            mx, _ = mean_std([q["bitops"] / 1e6 for q in qs])
            my, sy = mean_std([q["acc"] for q in qs])
            ax.errorbar([mx], [my], yerr=[sy or 0], fmt="^", color="tab:green", capsize=3,
                        label="standalone QAT" if first else None)
            first = False
    ax.set_xlabel("MBitOPs per image")
    ax.set_ylabel("test accuracy (%)")
    s = result["settings"]
    ax.set_title(f"Fashion-MNIST {s.get('model', 'small_cnn')}: accuracy vs BitOPs ({s['repeats']} seed(s), {s['epochs']} epoch(s))",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None) -> Tuple[Dict[str, Any], argparse.Namespace]:
    d = default_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 epoch on 4000 images, 1 seed, 1000 test images (about 2 minutes)")
    p.add_argument("--repeats", type=int, help=f"seeds (default {d['repeats']}; --quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--epochs", type=int, help=f"training epochs of every run (default: the embedded "
                                                 f"default's train.epochs = {d['epochs']})")
    p.add_argument("--train-subset", help=f"training images (default {d['train_subset']}: a seeded half of "
                                           f"the training set; 'all' for all 60000)")
    p.add_argument("--val-subset", type=int, help="test images evaluated (default: all 10000)")
    p.add_argument("--max-steps", type=int, help="cap the steps of every training run")
    p.add_argument("--sections", default="1,2,3,4", help="sections to run, e.g. 1,2 (default all)")
    p.add_argument("--variants", default=None,
                   help="section 3: comma list of supernet variants to train (default all: "
                        + ", ".join(SUPERNET_VARIANTS) + ")")
    p.add_argument("--r2-weights", help="comma-separated R2 lambdas (default: the embedded default's "
                                        f"r2.weight and 1e-2: {','.join(f'{w:g}' for w in d['r2_weights'])})")
    p.add_argument("--jobs", type=int, help=f"worker processes (default {d['jobs']}: the CPU count)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    p.add_argument("--out", default=os.path.join(RESULTS, "quality.json"), help="JSON output")
    p.add_argument("--markdown", default=os.path.join(RESULTS, "quality.md"), help="markdown output")
    p.add_argument("--plot", default=os.path.join(RESULTS, "pareto.png"), help="Pareto plot PNG")
    p.add_argument("--report", metavar="JSON",
                   help="train nothing: print the tables of a written (or partial: <out>.partial) JSON")
    a = p.parse_args(argv)
    s = dict(d)
    if a.quick:
        s.update(QUICK)
        s["r2_weights"] = sorted({float(d["r2_weights"][-1])})
    for key, val in (("repeats", a.repeats), ("epochs", a.epochs), ("val_subset", a.val_subset),
                     ("jobs", a.jobs), ("threads", a.threads), ("max_steps", a.max_steps)):
        if val is not None:
            if val < 1:
                p.error(f"--{key.replace('_', '-')}: must be >= 1, got {val}")
            s[key] = val
    if a.train_subset is not None:
        if a.train_subset == "all":
            s["train_subset"] = None
        else:
            try:
                s["train_subset"] = int(a.train_subset)
            except ValueError:
                p.error(f"--train-subset: expected an integer or 'all', got {a.train_subset!r}")
            if s["train_subset"] < 1:
                p.error(f"--train-subset: must be >= 1, got {s['train_subset']}")
    if a.r2_weights is not None:
        try:
            s["r2_weights"] = sorted({float(w) for w in a.r2_weights.split(",") if w.strip()})
        except ValueError:
            p.error(f"--r2-weights: expected comma-separated numbers, got {a.r2_weights!r}")
    try:
        s["sections"] = sorted({int(x) for x in a.sections.split(",") if x.strip()})
    except ValueError:
        p.error(f"--sections: expected comma-separated numbers 1-4, got {a.sections!r}")
    if not s["sections"] or any(x not in (1, 2, 3, 4) for x in s["sections"]):
        p.error(f"--sections: expected numbers among 1,2,3,4, got {a.sections!r}")
    s["seed0"] = a.seed
    s["quick"] = bool(a.quick)
    if a.variants:
        s["variants"] = [v.strip() for v in a.variants.split(",") if v.strip()]
        bad = [v for v in s["variants"] if v not in SUPERNET_VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad[0]!r}; allowed: {', '.join(SUPERNET_VARIANTS)}")
    return s, a


def report(path: str) -> int:
    """Print the tables of a result JSON (a finished one, or the ``.partial`` of a running one)."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    result["summary"] = summarize(result["settings"], result["runs"], set(result["settings"]["sections"]))
    result.setdefault("runtime_s", None)
    print(markdown(result))
    return 0


def main(argv=None) -> int:
    s, a = parse_args(argv)
    if a.report:
        return report(a.report)
    print(f"quality benchmark: sections {s['sections']}, {s['repeats']} seed(s), {s['epochs']} epoch(s), "
          f"train subset {s['train_subset']}, {s['jobs']} job(s) x {s['threads']} thread(s)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    partial = a.out + ".partial"
    result = run_benchmark(s, log=lambda m: print(m, flush=True), partial_path=partial)
    md = markdown(result)
    print()
    print(md)
    for path in (a.out, a.markdown):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(a.markdown, "w", encoding="utf-8") as f:
        f.write(md + "\n")
    png = plot(result, a.plot)
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {a.out}, {a.markdown}" + (f", {png}" if png else ""))
    if result["failed"]:
        print(f"{len(result['failed'])} task(s) failed: " + ", ".join(f["task"] for f in result["failed"]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
