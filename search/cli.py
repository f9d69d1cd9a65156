"""``python search.py`` / ``mpq-search``: greedy mixed-precision search of a trained supernet.

    python search.py                                   # runs/default/supernet.pt, default budget
    python search.py --checkpoint runs/X/supernet.pt --budget 22.8G --out runs/X/search
    python search.py --checkpoint ... --budgets 34.7G,22.8G,14.4G   # several budgets, one path
    torchrun --nproc_per_node 4 search.py --checkpoint ...          # evaluation sharded over ranks

Outputs (in ``--out``, rank 0 only): ``config.json``, ``pareto.csv``, ``pareto.png``,
``model_fixed.pt`` (see the README). Errors a user can cause print one ``error: ...`` line on stderr
and exit with status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from mpq.errors import UserError
from mpq.rundir import RunFolder, sigterm_exits

from .budget import ACCEPTED, Budget, format_bitops, format_bytes, parse_budget, parse_budget_list
from .greedy import DEFAULT_REFINE_ITERS, DEFAULT_REFINE_TOP_K

DEFAULT_CHECKPOINT = os.path.join("runs", "default", "supernet.pt")
DEFAULT_CALIB_SIZE = 4096
DEFAULT_BATCH_SIZE = 256
DEFAULT_BN_BATCHES = 8
DEFAULT_MARGIN = 2.0
DEFAULT_REFINE_MARGIN = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="search.py",
        description="Greedy per-layer bit-width search of a trained mpq supernet under a BitOPs or "
                    "size budget (inference only), then export of the chosen fixed-precision model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Budgets: " + ACCEPTED + ". Without a budget the BitOPs of the uniform 3-bit "
               "configuration are used (or the middle of the achievable range when 3 bits is not a "
               "candidate). Outputs: config.json, pareto.csv, pareto.png, model_fixed.pt.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="supernet checkpoint (train.py's supernet.pt)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/search)")
    g = p.add_argument_group("budget (the constraints given together must all hold)")
    g.add_argument("--budget", default=None, help="BitOPs ('22.8G', '1.5e9'), size ('2.5MB') or ratio ('0.2')")
    g.add_argument("--budget-size", default=None, help="weight-size budget ('2.5MB', '800KB', '1.2MiB')")
    g.add_argument("--budget-ratio", default=None, help="fraction of the all-8-bit BitOPs ('0.2')")
    g.add_argument("--budgets", default=None,
                   help="comma-separated budgets, each answered separately from one search path "
                        "('34.7G,22.8G,14.4G'); not combinable with the three options above")
    g.add_argument("--full-path", action="store_true",
                   help="walk down to the lowest configuration (the whole Pareto path) instead of "
                        "stopping at the budget")
    d = p.add_argument_group("data")
    d.add_argument("--calib-size", type=int, default=DEFAULT_CALIB_SIZE,
                   help="samples the search scores configurations on (never trained on)")
    d.add_argument("--calib-split", choices=("auto", "train", "val"), default="auto",
                   help="where calibration samples come from: training images left out of training "
                        "(data.train_subset), or a part of the held-out split; auto: train when "
                        "enough are left out")
    d.add_argument("--eval-size", type=int, default=0,
                   help="held-out (val) samples for the final accuracy, disjoint from calibration; "
                        "0 = all of them")
    d.add_argument("--bn-batches", type=int, default=DEFAULT_BN_BATCHES,
                   help="training-split batches for BN re-calibration of each configuration (shared-BN supernets)")
    d.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="evaluation batch size")
    d.add_argument("--seed", type=int, default=None, help="data-subset seed (default: the checkpoint's data seed)")
    d.add_argument("--data-root", default=None, help="override the checkpoint's data.root")
    d.add_argument("--data-name", default=None, help="override the checkpoint's data.name")
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    s = p.add_argument_group("search")
    s.add_argument("--strategy", choices=("fast", "naive"), default="fast",
                   help="fast: proxy pre-ranking + exact check of the top-k moves; naive: every move exactly")
    s.add_argument("--top-k", type=int, default=2, help="fast strategy: moves checked exactly per step")
    s.add_argument("--refresh", type=int, default=0,
                   help="fast strategy: re-measure all proxy deltas every N steps (0: only the moved layer's)")
    s.add_argument("--proxy-batches", type=int, default=4,
                   help="fast strategy: calibration batches of the proxy evaluation (at most all of them)")
    s.add_argument("--score", choices=("ratio", "reference"), default="ratio",
                   help="ratio: metric increase per BitOPs saved; reference: 1.5*err/max_err - (1 - bitops/max_bitops)")
    s.add_argument("--metric", choices=("loss", "err"), default="loss",
                   help="what a greedy move may cost: calibration loss or error increase")
    s.add_argument("--select", choices=("acc", "loss"), default="loss",
                   help="what the configuration for a budget optimises among the path points and the "
                        "uniform configurations that fit (and in the refinement): calibration loss, or "
                        "accuracy (ties: lower loss)")
    s.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="a mixed configuration replaces the largest uniform W=A configuration within "
                        "the budget only if it beats it on the calibration samples by this many "
                        "standard errors of the paired per-sample difference (0: take the best)")
    s.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="after the greedy walk, improve each budget's configuration by bidirectional "
                        "moves within the budget (one bit-width up, optionally another one down)")
    s.add_argument("--refine-top-k", type=int, default=DEFAULT_REFINE_TOP_K,
                   help="refinement: candidate moves evaluated exactly per step (ranked by single-move "
                        "deltas: proxy in the fast strategy)")
    s.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_ITERS,
                   help="refinement: at most this many moves per budget")
    s.add_argument("--refine-margin", type=float, default=DEFAULT_REFINE_MARGIN,
                   help="refinement: a move is taken only if it improves the calibration loss (--select "
                        "acc: accuracy) by this many standard errors of the paired per-sample difference")
    o = p.add_argument_group("output")
    o.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write model_fixed.pt (the accuracy of the fixed model is measured either way)")
    o.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="with --export, also write model.onnx (QDQ, opset 21, for onnxruntime) and "
                        "encodings.json, and measure the ONNX model's accuracy in onnxruntime "
                        "(needs the onnx extra)")
    o.add_argument("--compare-uniform", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the uniform W=A configurations and the searched ones at their BitOPs "
                        "on the evaluation split")
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available; "
                                                  "under torchrun cuda:LOCAL_RANK)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------------------- helpers
def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def heldout_split(n: int, calib_size: int, eval_size: int, seed: int):
    """``(calib_indices, eval_indices)``: disjoint, sorted index lists of an ``n``-sample split, drawn
    from a permutation seeded by ``seed``; ``eval_size`` 0 takes all the samples not in calibration."""
    import torch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1000)).tolist()
    rest = perm[calib_size:]
    return sorted(perm[:calib_size]), sorted(rest[:eval_size] if eval_size else rest)


def bn_indices(n_train: int, count: int, seed: int) -> list:
    """Sorted indices of the training samples used for BN re-calibration."""
    import torch
    idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 2000))[:min(n_train, count)]
    return sorted(idx.tolist())


@dataclass
class DataSplit:
    """Where each part of the search's data comes from (see :func:`split_data`)."""

    calib: Any
    eval: Any
    bn: Any
    calib_split: str
    calib_indices: List[int]
    eval_indices: List[int]


def split_data(info, calib_size: int, eval_size: int, bn_samples: int, seed: int,
               calib_split: str = "auto") -> DataSplit:
    """Calibration (search scoring), evaluation (final accuracy) and BN re-calibration data.

    * ``calib_split="train"``: calibration samples are training images the supernet was *not*
      trained on (``data.train_subset`` left them out); the final evaluation uses the held-out
      (validation/test) split: all of it, or ``eval_size`` samples of it.
    * ``"val"``: calibration and evaluation are disjoint parts of the held-out split.
    * ``"auto"``: ``"train"`` when enough unused training images exist and the training split has
      no random transforms (augmentation), else ``"val"``.

    BN re-calibration batches are ``bn_samples`` images of the training data the supernet saw.
    Every choice is a seeded permutation: the same ``seed`` gives the same samples.
    """
    import torch
    from torch.utils.data import Subset
    train = info.train
    if isinstance(train, Subset):
        full, used = train.dataset, set(int(i) for i in train.indices)
        unused = [i for i in range(len(full)) if i not in used]
    else:
        full, unused = train, []
    if calib_split not in ("auto", "train", "val"):
        raise UserError(f"--calib-split: {calib_split!r} is not allowed; allowed: auto, train, val")
    if calib_split == "auto":
        # training images only when they come without random training transforms (augmentation)
        plain = getattr(full, "transform", None) is None
        calib_split = "train" if plain and len(unused) >= calib_size else "val"
    n_val = len(info.val)
    room = n_val if calib_split == "train" else n_val - calib_size
    if eval_size and eval_size > room > 0:
        raise UserError(f"--eval-size: {eval_size} is more than the {room} held-out samples available "
                        f"({n_val} in the val split" + ("" if calib_split == "train" else
                                                          f", {calib_size} of them for calibration")
                        + "); use at most {room}, or 0 for all of them".format(room=room))
    if calib_split == "train":
        if len(unused) < calib_size:
            raise UserError(f"--calib-split train: only {len(unused)} training images were left out of "
                            f"training (data.train_subset), fewer than --calib-size {calib_size}")
        perm = torch.randperm(len(unused), generator=torch.Generator().manual_seed(seed + 1000)).tolist()
        calib_idx = sorted(unused[i] for i in perm[:calib_size])
        calib = Subset(full, calib_idx)
        if eval_size and eval_size < n_val:
            eval_idx = sorted(torch.randperm(n_val, generator=torch.Generator().manual_seed(seed + 3000))
                              [:eval_size].tolist())
        else:
            eval_idx = list(range(n_val))
    else:
        if calib_size >= n_val:
            raise UserError(f"--calib-size {calib_size} leaves no held-out samples for the final "
                            f"evaluation: the held-out split has {n_val}")
        calib_idx, eval_idx = heldout_split(n_val, calib_size, eval_size, seed)
        calib = Subset(info.val, calib_idx)
    bn = Subset(train, bn_indices(len(train), bn_samples, seed))
    return DataSplit(calib, Subset(info.val, eval_idx), bn, calib_split, calib_idx, eval_idx)


@dataclass
class Target:
    """One budget: all of its constraints must hold."""

    label: str
    max_bitops: Optional[float] = None
    max_size: Optional[float] = None
    budgets: List[Budget] = field(default_factory=list)

    def fits(self, cost, config) -> bool:
        return ((self.max_bitops is None or cost.bitops(config) <= self.max_bitops)
                and (self.max_size is None or cost.size_bytes(config) <= self.max_size))

    def as_dict(self) -> Dict[str, Any]:
        return {"text": self.label, "bitops": self.max_bitops, "size_bytes": self.max_size,
                "given": [{"kind": b.kind, "value": b.value, "text": b.text} for b in self.budgets]}


def _apply(target: Target, b: Budget, cost) -> None:
    if b.kind == "size":
        target.max_size = b.value if target.max_size is None else min(target.max_size, b.value)
    else:
        value = b.value * cost.uniform8_bitops() if b.kind == "ratio" else b.value
        target.max_bitops = value if target.max_bitops is None else min(target.max_bitops, value)
    target.budgets.append(b)


def _init_distributed(device_arg: Optional[str]):
    import torch
    initialized_here = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        try:
            device = torch.device(device_arg)
        except (RuntimeError, ValueError):
            raise UserError(f"--device: {device_arg!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device: {device_arg!r} requested but CUDA is not available")
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world > 1 else 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return device, initialized_here


def _log(msg: str, main: bool) -> None:
    if main:
        print(msg, flush=True)


def _resolve_data(ckpt: Dict[str, Any], args) -> Dict[str, Any]:
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = dict(cfg.get("data") or {}) if isinstance(cfg.get("data", {}), dict) else {}
    if args.data_name:
        data["name"] = args.data_name
    if args.data_root:
        data["root"] = args.data_root
    if "name" not in data:
        raise UserError(f"checkpoint: {args.checkpoint!r} names no data set (config.data.name); "
                        f"pass --data-name and --data-root")
    data.setdefault("seed", 0)
    data["train_seed"] = data["seed"]
    if args.seed is not None:
        data["seed"] = args.seed
    data.setdefault("root", None)
    return data


def _uniform_bits(net) -> List[int]:
    """Bit-widths b such that every non-pinned layer has b among its weight and activation candidates."""
    from mpq.supernet import is_pinned, quant_layers
    common = None
    for m in quant_layers(net).values():
        if is_pinned(m):
            continue
        s = set(m.w_candidates) & set(m.a_candidates)
        common = s if common is None else common & s
    return sorted(b for b in (common or set()) if b != 32)


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


# ----------------------------------------------------------------------------------------------- run
def run(args) -> int:
    import torch
    from torch.utils.data import Subset

    import mpq
    from mpq.checkpoint import load_supernet
    from mpq.data import build_datasets
    from mpq.supernet import max_config, min_config, uniform_config
    from . import pareto as pareto_mod
    from .evaluator import Evaluator, ForwardCounter, dist_info, evaluate
    from mpq.export import fixed_from_payload, fixed_payload, float_model_bytes
    from .greedy import CostModel, refine_supernet, search_supernet

    # budgets first: a malformed one fails before anything is loaded
    single: List[Budget] = []
    if args.budget is not None:
        single.append(parse_budget(args.budget))
    if args.budget_size is not None:
        single.append(parse_budget(args.budget_size, "size"))
    if args.budget_ratio is not None:
        single.append(parse_budget(args.budget_ratio, "ratio"))
    listed: List[Budget] = parse_budget_list(args.budgets) if args.budgets is not None else []
    if listed and single:
        raise UserError("--budgets cannot be combined with --budget, --budget-size or --budget-ratio")
    for name in ("calib_size", "batch_size", "bn_batches", "top_k", "proxy_batches", "refine_top_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    from mpq.config import MAX_SEED, MAX_WORKERS, check_device, check_range
    if args.seed is not None:
        check_range("--seed", args.seed, 0, MAX_SEED, integer=True)
    check_range("--workers", args.workers, 0, MAX_WORKERS, integer=True)
    check_device("--device", args.device)
    for name in ("eval_size", "refine_steps", "refresh", "workers", "margin", "refine_margin"):
        value = getattr(args, name)
        if not value >= 0 or not math.isfinite(value):  # also NaN and inf
            raise UserError(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {value}")

    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "search")
    device, dist_here = _init_distributed(args.device)
    folder = None
    try:
        rank, world = dist_info()
        main = rank == 0
        show = main and not args.quiet
        t_start = time.time()
        if os.path.isdir(args.checkpoint):
            raise UserError(f"checkpoint: {args.checkpoint!r} is a folder; give train.py's supernet.pt")
        if not os.path.isfile(args.checkpoint):
            hint = " (train one first: python train.py)" if args.checkpoint == DEFAULT_CHECKPOINT else ""
            raise UserError(f"checkpoint: no such file {args.checkpoint!r}{hint}")
        # the output folder: writable and not in use, before anything is loaded (rank 0 holds it)
        folder = RunFolder(out_dir, "search.py", log_name="search.log", what="--out", enabled=main)
        refused: Optional[UserError] = None
        try:
            folder.open()
        except UserError as e:
            refused = e
        if world > 1:
            flag = torch.tensor([float(refused is not None)])
            torch.distributed.all_reduce(flag.to(device), op=torch.distributed.ReduceOp.MAX)
            if refused is None and float(flag) > 0:
                refused = UserError(f"--out: rank 0 refused {out_dir!r}")
        if refused is not None:
            folder = None  # nothing of this job's is in the folder: leave it as it is
            raise refused
        folder.start_log()

        try:
            net, ckpt = load_supernet(args.checkpoint)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"checkpoint: {args.checkpoint!r} has a malformed model spec "
                            f"({type(e).__name__}: {e})") from None
        spec = ckpt["spec"]
        digest = sha256_file(args.checkpoint)
        model_name = spec.get("model", {}).get("name", "?") if isinstance(spec, dict) else "?"
        input_size = [int(v) for v in spec.get("input_size", [])]
        if len(input_size) != 4:
            raise UserError(f"checkpoint: {args.checkpoint!r} spec has no 4-d input_size "
                            f"(got {spec.get('input_size')!r})")
        net.to(device).eval()
        cost = CostModel(net, input_size)
        cmin, cmax = min_config(net, respect_frozen=False), max_config(net)
        min_bitops, min_size = cost.bitops(cmin), cost.size_bytes(cmin)

        # targets
        if listed:
            targets = []
            for b in listed:
                t = Target(b.text)
                _apply(t, b, cost)
                targets.append(t)
        elif single:
            t = Target(",".join(b.text for b in single))
            for b in single:
                _apply(t, b, cost)
            targets = [t]
        else:
            ub = _uniform_bits(net)
            if 3 in ub:
                value = cost.bitops(uniform_config(net, 3, 3))
                t = Target(f"W3A3 BitOPs ({format_bitops(value)})")
            else:
                value = math.sqrt(min_bitops * cost.bitops(cmax))
                t = Target(f"default ({format_bitops(value)})")
            _apply(t, Budget("bitops", value, t.label), cost)
            targets = [t]
        for t in targets:
            if t.max_bitops is not None and t.max_bitops < min_bitops:
                raise UserError(f"budget {t.label!r} = {format_bitops(t.max_bitops)} BitOPs is below the "
                                f"minimum achievable {format_bitops(min_bitops)} BitOPs ({min_bitops:.6g}; "
                                f"every layer at its lowest bit-width)")
            if t.max_size is not None and t.max_size < min_size:
                raise UserError(f"budget {t.label!r} = {format_bytes(t.max_size)} is below the minimum "
                                f"achievable size {format_bytes(min_size)} ({min_size:.0f} bytes; every "
                                f"layer at its lowest weight bit-width)")
            max_bitops, max_size = cost.bitops(cmax), cost.size_bytes(cmax)
            if ((t.max_bitops is None or t.max_bitops >= max_bitops)
                    and (t.max_size is None or t.max_size >= max_size)):
                _log(f"warning: budget {t.label!r} is at or above the largest configuration's cost "
                     f"({format_bitops(max_bitops)} BitOPs, {format_bytes(max_size)}); the largest "
                     f"configuration is returned", main)

        # data: calibration from training images left out of training or from the held-out split,
        # final evaluation on the held-out split, BN batches from the training data (split_data).
        # The training subset is rebuilt with the checkpoint's data seed; --seed only draws the
        # search's own samples.
        data = _resolve_data(ckpt, args)
        seed = int(data["seed"])
        try:
            info = build_datasets(data["name"], data.get("root"), train_subset=data.get("train_subset"),
                                  seed=int(data["train_seed"]), image_size=input_size[-1])
        except UserError as e:  # name the flag the user typed
            if args.data_root and str(e).startswith("data.root:"):
                raise UserError("--data-root" + str(e)[len("data.root"):]) from None
            raise
        except TypeError as e:
            raise UserError(f"checkpoint: malformed data config {data!r} ({e})") from None
        m_spec = spec.get("model", {})
        if (m_spec.get("in_channels") not in (None, info.in_channels)
                or m_spec.get("num_classes") not in (None, info.num_classes)):
            raise UserError(f"checkpoint: model {model_name!r} takes {m_spec.get('in_channels')} channels "
                            f"and {m_spec.get('num_classes')} classes, data set {data['name']!r} has "
                            f"{info.in_channels} and {info.num_classes}")
        split = split_data(info, args.calib_size, args.eval_size, args.bn_batches * args.batch_size,
                           seed, args.calib_split)
        calib_set, eval_set, bn_set = split.calib, split.eval, split.bn
        calib_idx, eval_idx = split.calib_indices, split.eval_indices
        torch.manual_seed(seed)  # random training transforms of the BN batches
        counter = ForwardCounter()
        evaluator = Evaluator(net, calib_set, bn_set, batch_size=args.batch_size,
                              bn_batches=args.bn_batches, proxy_batches=args.proxy_batches,
                              device=device, counter=counter, workers=args.workers)
        _log(f"mpq search: {model_name} from {args.checkpoint} (sha256 {digest[:12]}), "
             f"{len(calib_idx)} calibration ({split.calib_split} split) / {len(eval_idx)} evaluation "
             f"(val split) samples of {data['name']}, "
             f"BN {'re-calibrated on ' + str(args.bn_batches) + ' batches' if evaluator.recalibrate else 'switchable'}, "
             f"device {device}, {world} rank(s)", main)
        _log(f"cost: max {format_bitops(cost.bitops(cmax))} BitOPs / {format_bytes(cost.size_bytes(cmax))}, "
             f"min {format_bitops(min_bitops)} BitOPs / {format_bytes(min_size)}; budget(s): "
             + "; ".join(t.label for t in targets), main)

        # uniform configurations on the calibration set (plot + candidates at their BitOPs)
        ubits = _uniform_bits(net)
        uniform = []
        before = counter.copy()
        for b in ubits:
            cfg = uniform_config(net, b, b)
            r = evaluator.exact(cfg)
            uniform.append({"bits": b, "label": f"W{b}A{b}", "config": cfg, "bitops": cost.bitops(cfg),
                            "size_bytes": cost.size_bytes(cfg), "acc": r["acc"], "loss": r["loss"],
                            "metric": r[args.metric] if args.metric in r else 1.0 - r["acc"]})
        uniform_counts = (counter - before).as_dict()

        # the greedy walk
        from tqdm import tqdm
        total = sum(len(m[0]) - 1 + len(m[1]) - 1 for m in
                    ((l.w_candidates, l.a_candidates) for l in mpq.quant_layers(net).values()))
        bar = tqdm(total=total, desc=f"search ({args.strategy})", unit="step", disable=not show,
                   dynamic_ncols=True)

        def progress(step) -> None:
            if step.index > 0:
                bar.update(1)
            bar.set_postfix_str(f"{format_bitops(step.bitops)} BitOPs, acc {100 * step.result['acc']:.2f}%")

        def fits_all(cfg) -> bool:
            return all(t.fits(cost, cfg) for t in targets)

        size_only = all(t.max_bitops is None for t in targets)
        before = counter.copy()
        t0 = time.time()
        result = search_supernet(net, evaluator, cost, fits=None if args.full_path else fits_all,
                                 cost_kind="size" if size_only else "bitops",
                                 to_min=args.full_path, strategy=args.strategy, top_k=args.top_k,
                                 refresh=args.refresh, score=args.score, metric=args.metric,
                                 progress=progress)
        bar.close()
        search_seconds = time.time() - t0
        search_counts = (counter - before).as_dict()
        _log(f"search: {len(result.path) - 1} steps, {search_counts['forwards']} subnet forward passes "
             f"({search_counts['evaluations']} exact + {search_counts['proxy_evaluations']} proxy "
             f"evaluations), {search_seconds:.1f}s", main)

        refine_counts = ForwardCounter()

        picked: Dict[Any, Dict[str, Any]] = {}

        def pick(fit, cost_kind: str, key: Any) -> Dict[str, Any]:
            """The answer for one budget (``key`` identifies it: the same budget is answered once)."""
            if key in picked:
                return picked[key]
            refine = None
            if args.refine and args.refine_steps > 0:
                def refine(cfg):
                    before_r = counter.copy()
                    rbar = tqdm(desc="refine", unit="move", disable=not show, leave=False,
                                dynamic_ncols=True)

                    def moved(step) -> None:
                        if step.index > 0:
                            rbar.update(1)
                        rbar.set_postfix_str(f"{format_bitops(step.bitops)} BitOPs, "
                                             f"loss {step.result['loss']:.4f}")
                    res = refine_supernet(net, evaluator, cost, cfg, fit, strategy=args.strategy,
                                          cost_kind=cost_kind,
                                          top_k=args.refine_top_k, max_iters=args.refine_steps,
                                          metric="loss" if args.select == "loss" else "err",
                                          margin=args.refine_margin, progress=moved)
                    rbar.close()
                    refine_counts.add(counter - before_r)
                    return res
            picked[key] = pick_config(result.path, uniform, fit, evaluator, args.select, args.margin, refine)
            return picked[key]

        from mpq.data import preprocess_of
        preprocess = preprocess_of(data["name"], input_size[-1])
        onnx_wanted = bool(args.export and args.onnx)
        if onnx_wanted:
            from .onnx_export import INSTALL_HINT, onnx_available
            if not onnx_available():
                _log(f"note: no model.onnx: {INSTALL_HINT}", main)
                onnx_wanted = False
        if main:
            folder.keep_log()  # inputs are valid: from here on the job writes into --out
        eval_bar = tqdm(total=len(targets) * 2, desc="final evaluation", unit="eval", disable=not show,
                        dynamic_ncols=True)
        results = []
        float_bytes = float_model_bytes(net)
        for i, t in enumerate(targets):
            chosen = pick(lambda c, t=t: t.fits(cost, c), "size" if t.max_bitops is None else "bitops",
                          (t.max_bitops, t.max_size))
            if not chosen:
                raise UserError(f"budget {t.label!r}: no configuration on the search path fits "
                                f"(use --full-path)")
            cfg = chosen["config"]
            sup = evaluator.evaluate(cfg, eval_set)
            eval_bar.update(1)
            evaluator.prepare(cfg)
            meta = {"budget": t.as_dict(), "bitops": cost.bitops(cfg), "size_bytes": cost.size_bytes(cfg),
                    "checkpoint_sha256": digest, "model": model_name, "preprocess": preprocess}
            payload = fixed_payload(net, cfg, spec, meta=meta)
            fixed = fixed_from_payload(payload).to(device)
            fx = evaluate(fixed, None, eval_set, device=device, recalibrate=False,
                          batch_size=args.batch_size)
            eval_bar.update(1)
            fname = None
            fbytes = None
            onnx_info: Dict[str, Any] = {}
            if args.export:
                suffix = "" if i == 0 else f"_{i + 1}"
                fname = f"model_fixed{suffix}.pt"
                if main:
                    from mpq.checkpoint import atomic_save
                    meta.update({"accuracy": fx["acc"], "eval_samples": fx["n"]})
                    payload["meta"] = meta
                    atomic_save(payload, os.path.join(out_dir, fname))
                    fbytes = os.path.getsize(os.path.join(out_dir, fname))
                    if onnx_wanted:
                        from .onnx_export import write_onnx
                        try:
                            onnx_info = write_onnx(payload, out_dir, suffix, preprocess, eval_set,
                                                   args.batch_size)
                        except ValueError as e:  # an architecture the QDQ emitter does not cover
                            _log(f"note: no model.onnx ({' '.join(str(e).split())}); "
                                 f"{fname} is the exported model", main)
                            onnx_wanted = False
            results.append({
                "budget": t.as_dict(),
                "layers": {n: {"w_bits": int(w), "a_bits": int(a)} for n, (w, a) in cfg.items()},
                "bitops": cost.bitops(cfg), "size_bytes": cost.size_bytes(cfg),
                "accuracy": fx["acc"], "loss": fx["loss"], "eval_samples": fx["n"],
                "supernet_accuracy": sup["acc"], "supernet_loss": sup["loss"],
                "calib_accuracy": chosen["acc"], "calib_loss": chosen["loss"], "source": chosen["source"],
                "z_vs_uniform": chosen.get("z_vs_uniform"), "uniform_ref": chosen.get("uniform_ref"),
                "fixed_model": fname, "fixed_model_bytes": fbytes, "float_model_bytes": float_bytes,
                **onnx_info,
            })
            del fixed
        eval_bar.close()

        # uniform configs vs the searched configs at their BitOPs, on the evaluation split
        comparison = []
        if args.compare_uniform and uniform:
            cmp_bar = tqdm(total=2 * len(uniform), desc="uniform comparison", unit="eval",
                           disable=not show, dynamic_ncols=True)
            for u in uniform:
                ur = evaluator.evaluate(u["config"], eval_set)
                cmp_bar.update(1)
                chosen = pick(lambda c, u=u: cost.bitops(c) <= u["bitops"], "bitops", (u["bitops"], None))
                sr = evaluator.evaluate(chosen["config"], eval_set) if chosen else None
                cmp_bar.update(1)
                comparison.append({
                    "bits": u["bits"], "bitops": u["bitops"], "size_bytes": u["size_bytes"],
                    "accuracy": ur["acc"], "calib_accuracy": u["acc"],
                    "searched_bitops": cost.bitops(chosen["config"]) if chosen else None,
                    "searched_accuracy": sr["acc"] if sr else None,
                    "searched_source": chosen.get("source") if chosen else None,
                    "searched_z_vs_uniform": chosen.get("z_vs_uniform") if chosen else None,
                    "searched_layers": ({n: [int(w), int(a)] for n, (w, a) in chosen["config"].items()}
                                        if chosen else None)})
            cmp_bar.close()

        first = results[0]
        doc = {
            "model": model_name,
            "checkpoint": os.path.abspath(args.checkpoint),
            "checkpoint_sha256": digest,
            "budget": first["budget"],
            "layers": first["layers"],
            "bitops": first["bitops"], "size_bytes": first["size_bytes"],
            "accuracy": first["accuracy"], "loss": first["loss"],
            "supernet_accuracy": first["supernet_accuracy"], "supernet_loss": first["supernet_loss"],
            "eval_samples": first["eval_samples"],
            "calib_accuracy": first["calib_accuracy"], "source": first["source"],
            "fixed_model": first["fixed_model"], "fixed_model_bytes": first["fixed_model_bytes"],
            "float_model_bytes": float_bytes,
            "onnx_model": first.get("onnx_model"), "onnx_model_bytes": first.get("onnx_model_bytes"),
            "onnx_accuracy": first.get("onnx_accuracy"), "encodings": first.get("encodings"),
            "preprocess": preprocess,
            # how each figure was measured: training's metrics.jsonl measures the same configs with
            # its own BN batches ("acc_measured" there), so the two can differ by a little
            "measured": {
                "accuracy": f"exported fixed model (integer weights, BN folded) on {len(eval_idx)} "
                            f"held-out samples (val split)",
                "supernet_accuracy": "supernet, BN " + (
                    f"re-calibrated per config on {args.bn_batches} batches of {args.batch_size} "
                    f"training images (search seed {seed})" if evaluator.recalibrate else
                    "running statistics from training (switchable BN)")
                    + f", on the same {len(eval_idx)} held-out samples",
                "calib_accuracy": f"supernet on the {len(calib_idx)} calibration samples "
                                  f"({split.calib_split} split) that guided the search",
                "onnx_accuracy": "model.onnx in onnxruntime on the held-out samples"},
            "data": {"name": data["name"], "root": data.get("root"), "seed": seed,
                     "calib_split": split.calib_split, "eval_split": "val",
                     "calib_samples": len(calib_idx),
                     "eval_samples": len(eval_idx), "bn_batches": args.bn_batches,
                     "batch_size": args.batch_size, "bn_split": "train"},
            "cost": {"max_bitops": cost.bitops(cmax), "min_bitops": min_bitops,
                     "uniform8_bitops": cost.uniform8_bitops(), "max_size_bytes": cost.size_bytes(cmax),
                     "min_size_bytes": min_size, "input_size": input_size},
            "search": {"strategy": args.strategy, "score": args.score, "metric": args.metric,
                       "select": args.select, "margin": args.margin, "refine": bool(args.refine),
                       "refine_margin": args.refine_margin,
                       "refine_top_k": args.refine_top_k, "refine_steps": args.refine_steps,
                       "refine_forwards": refine_counts.as_dict(),
                       "top_k": args.top_k, "refresh": args.refresh, "proxy_batches": args.proxy_batches,
                       "steps": len(result.path) - 1, "full_path": bool(args.full_path),
                       "seconds": search_seconds, "forwards": search_counts,
                       "uniform_forwards": uniform_counts, "world_size": world},
            "uniform": comparison,
            "results": results,
            "seconds": time.time() - t_start,
        }
        if main:
            tmp = os.path.join(out_dir, ".config.json.tmp")
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
            os.replace(tmp, os.path.join(out_dir, "config.json"))
            pareto_mod.write_csv(os.path.join(out_dir, "pareto.csv"), result.path)
            sel = [{"bitops": r["bitops"], "acc": r["calib_accuracy"], "label": r["budget"]["text"]}
                   for r in results]
            pareto_mod.plot(os.path.join(out_dir, "pareto.png"), result.path, uniform, sel,
                            title=f"{model_name}: greedy mixed-precision path ({args.strategy})")
        if args.refine and args.refine_steps > 0:
            _log(f"refinement: {refine_counts.forwards} subnet forward passes ({refine_counts.evaluations} "
                 f"exact + {refine_counts.proxy_evaluations} proxy evaluations) over "
                 f"{len(picked)} budget(s)", main)
        for r in results:
            _log(f"budget {r['budget']['text']}: {format_bitops(r['bitops'])} BitOPs, "
                 f"{format_bytes(r['size_bytes'])}, accuracy {100 * r['accuracy']:.2f}% on "
                 f"{r['eval_samples']} held-out samples (supernet {100 * r['supernet_accuracy']:.2f}%; "
                 f"{r['source']})", main)
        for c in comparison:
            if c["searched_accuracy"] is None:
                continue
            _log(f"  uniform W{c['bits']}A{c['bits']}: {format_bitops(c['bitops'])} BitOPs, "
                 f"{100 * c['accuracy']:.2f}%  |  searched at <= its BitOPs: "
                 f"{format_bitops(c['searched_bitops'])}, {100 * c['searched_accuracy']:.2f}%", main)
        _log(f"wrote {out_dir}/config.json, pareto.csv, pareto.png"
             + (", model_fixed.pt" if args.export else "")
             + (", model.onnx, encodings.json" if onnx_wanted else ""), main)
        if world > 1:
            torch.distributed.barrier()
        return 0
    except BaseException as e:
        if folder is not None:
            folder.close(e)
            folder = None
        raise
    finally:
        if folder is not None:
            folder.close()
        if dist_here and torch_dist_initialized():
            import torch
            torch.distributed.destroy_process_group()


def torch_dist_initialized() -> bool:
    import torch
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python search.py`` and ``mpq-search``; returns the exit status."""
    parser = build_parser()

    def _arg_error(message: str) -> None:  # one line, like every other user error
        print(f"error: {message} (see search.py --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = _arg_error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed above)
        return int(e.code or 0)
    try:
        with sigterm_exits():
            return run(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a full disk, a vanished mount), not a bug: one line
        print(f"error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
