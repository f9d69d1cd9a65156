"""The whole search of ``search.py`` as a library call: :func:`run_search`.

    from search.options import SearchOptions
    from search.pipeline import run_search
    outcome = run_search(SearchOptions(checkpoint="runs/X/supernet.pt", budget="22.8G"))
    outcome.doc["accuracy"]        # what config.json says

The steps, in order (each refuses bad input with one :class:`~mpq.errors.UserError` before anything
is written): validate the options and budgets; hold the output folder (:class:`mpq.rundir.RunFolder`:
lock, ``search.log``); load the checkpoint; resolve the budgets into targets; split the data
(:mod:`search.data`); measure the uniform configurations; walk the greedy path; pick and refine
each budget's configuration (:mod:`search.select`); evaluate and export it (``model_fixed*.pt``,
``model.onnx``); compare with the uniform configurations; write ``config.json``, ``pareto.csv``,
``pareto.png`` (:mod:`search.report`). Under ``torchrun`` every rank runs it (evaluation is
sharded) and rank 0 alone writes and logs.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from mpq.errors import UserError
from mpq.rundir import RunFolder

from .budget import Target, budget_targets, check_reachable, default_target, format_bitops, format_bytes
from .options import DEFAULT_CHECKPOINT, SearchOptions
from .report import Source

Log = Callable[[str], None]


@dataclass
class SearchOutcome:
    """What :func:`run_search` did: ``doc`` is config.json's content (written by rank 0 only, but
    computed on every rank), ``path`` the greedy walk (:class:`~search.greedy.SearchResult`)."""

    out_dir: str
    doc: Dict[str, Any]
    path: Any
    wrote: bool


def print_log(msg: str) -> None:
    """The default log: stdout, flushed (a log tailed during a long search is current)."""
    print(msg, flush=True)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- set-up steps
def init_distributed(device_arg: Optional[str]) -> Tuple[Any, bool]:
    """``(device, initialized_here)``: the device of this rank (``--device``, else cuda:LOCAL_RANK
    under torchrun, cuda, or cpu) and whether this call started the process group (so it also
    ends it)."""
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


def torch_dist_initialized() -> bool:
    import torch
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_checkpoint_path(path: str) -> None:
    if os.path.isdir(path):
        raise UserError(f"checkpoint: {path!r} is a folder; give train.py's supernet.pt")
    if not os.path.isfile(path):
        hint = " (train one first: python train.py)" if path == DEFAULT_CHECKPOINT else ""
        raise UserError(f"checkpoint: no such file {path!r}{hint}")


def _refusal(folder: RunFolder, out_dir: str, world: int, device) -> Optional[UserError]:
    """Open the output folder (rank 0 holds it); every rank learns whether rank 0 was refused,
    so all of them stop together."""
    import torch
    refused: Optional[UserError] = None
    try:
        folder.open()
    except UserError as e:
        refused = e
    if world > 1:
        # reduced in place on the device (NCCL needs a CUDA tensor): a reduced copy would leave
        # `flag` at this rank's own value, and the other ranks would go on without rank 0
        flag = torch.tensor([float(refused is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if refused is None and float(flag) > 0:
            refused = UserError(f"--out: rank 0 refused {out_dir!r}")
    return refused


def _load_checkpoint(path: str, device) -> Tuple[Any, Dict[str, Any], Source]:
    """``(net, checkpoint dict, source)``; a spec the model cannot be built from is a user error."""
    from mpq import checkpoint
    try:
        net, ckpt = checkpoint.load_supernet(path)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"checkpoint: {path!r} has a malformed model spec "
                        f"({type(e).__name__}: {e})") from None
    spec = ckpt["spec"]
    digest = sha256_file(path)
    model_name = spec.get("model", {}).get("name", "?") if isinstance(spec, dict) else "?"
    input_size = [int(v) for v in spec.get("input_size", [])]
    if len(input_size) != 4:
        raise UserError(f"checkpoint: {path!r} spec has no 4-d input_size "
                        f"(got {spec.get('input_size')!r})")
    net.to(device).eval()
    return net, ckpt, Source(path, digest, model_name, input_size)


def _targets(o: SearchOptions, single, listed, net, cost, cmin, cmax, say: Log) -> List[Target]:
    """The budgets to answer (the default one when none is given), each checked to be reachable."""
    from mpq.supernet import uniform_config

    from .select import uniform_bits
    min_bitops, max_bitops = cost.bitops(cmin), cost.bitops(cmax)
    targets = budget_targets(single, listed, cost)
    if not targets:
        w3a3 = cost.bitops(uniform_config(net, 3, 3)) if 3 in uniform_bits(net) else None
        targets = [default_target(w3a3, min_bitops, max_bitops, cost)]
    check_reachable(targets, min_bitops, cost.size_bytes(cmin), max_bitops, cost.size_bytes(cmax), say)
    return targets


# ------------------------------------------------------------------------------------ the search
def _onnx_wanted(o: SearchOptions, say: Log) -> bool:
    if not (o.export and o.onnx):
        return False
    from .onnx_export import INSTALL_HINT, onnx_available
    if not onnx_available():
        say(f"note: no model.onnx: {INSTALL_HINT}")
        return False
    return True


@dataclass
class _Delivery:
    """What the final evaluation and export of every budget share. ``onnx`` turns off for the rest
    of the run when an architecture cannot be emitted as ONNX; ``bar`` counts two evaluations per
    budget."""

    options: SearchOptions
    net: Any
    evaluator: Any
    cost: Any
    eval_set: Any
    spec: Dict[str, Any]
    source: Source
    device: Any
    preprocess: Dict[str, Any]
    out_dir: str
    main: bool
    onnx: bool
    say: Log
    bar: Any
    float_bytes: float

    def answer(self, i: int, t: Target, chosen: Dict[str, Any]) -> Dict[str, Any]:
        """Budget ``i``'s ``results`` entry: its configuration evaluated as the supernet and as the
        exported model on the evaluation split; with ``export``, ``model_fixed*.pt`` (and
        ``model.onnx``) written on rank 0."""
        from mpq.export import fixed_from_payload, fixed_payload

        from .evaluator import evaluate
        from .report import result_entry
        o, cost, cfg = self.options, self.cost, chosen["config"]
        sup = self.evaluator.evaluate(cfg, self.eval_set)
        self.bar.update(1)
        self.evaluator.prepare(cfg)
        meta = {"budget": t.as_dict(), "bitops": cost.bitops(cfg), "size_bytes": cost.size_bytes(cfg),
                "checkpoint_sha256": self.source.digest, "model": self.source.model_name,
                "preprocess": self.preprocess}
        payload = fixed_payload(self.net, cfg, self.spec, meta=meta)
        fixed = fixed_from_payload(payload).to(self.device)
        fx = evaluate(fixed, None, self.eval_set, device=self.device, recalibrate=False,
                      batch_size=o.batch_size)
        self.bar.update(1)
        fname = fbytes = None
        onnx_info: Dict[str, Any] = {}
        if o.export:
            suffix = "" if i == 0 else f"_{i + 1}"
            fname = f"model_fixed{suffix}.pt"
            if self.main:
                meta.update({"accuracy": fx["acc"], "eval_samples": fx["n"]})
                payload["meta"] = meta
                fbytes, onnx_info = self._write(payload, fname, suffix)
        return result_entry(t, cost, cfg, fx, sup, chosen, fname, fbytes, self.float_bytes, onnx_info)

    def _write(self, payload: Dict[str, Any], fname: str, suffix: str) -> Tuple[int, Dict[str, Any]]:
        """Save ``fname`` and, when wanted, its ONNX twin: ``(bytes of fname, ONNX entries)``."""
        from mpq.checkpoint import atomic_save
        path = os.path.join(self.out_dir, fname)
        atomic_save(payload, path)
        onnx_info: Dict[str, Any] = {}
        if self.onnx:
            from .onnx_export import write_onnx
            try:
                onnx_info = write_onnx(payload, self.out_dir, suffix, self.preprocess, self.eval_set,
                                       self.options.batch_size)
            except ValueError as e:  # an architecture the QDQ emitter does not cover
                self.say(f"note: no model.onnx ({' '.join(str(e).split())}); {fname} is the exported model")
                self.onnx = False
        return os.path.getsize(path), onnx_info


def _compare_uniform(uniform, picker, evaluator, cost, eval_set, show: bool) -> List[Dict[str, Any]]:
    """Each uniform configuration and the searched one at <= its BitOPs, on the evaluation split."""
    from tqdm import tqdm

    from .report import comparison_entry
    bar = tqdm(total=2 * len(uniform), desc="uniform comparison", unit="eval", disable=not show,
               dynamic_ncols=True)
    comparison = []
    for u in uniform:
        ur = evaluator.evaluate(u["config"], eval_set)
        bar.update(1)
        chosen = picker.pick(lambda c, u=u: cost.bitops(c) <= u["bitops"], "bitops", (u["bitops"], None))
        sr = evaluator.evaluate(chosen["config"], eval_set) if chosen else None
        bar.update(1)
        comparison.append(comparison_entry(u, ur, chosen, sr, cost))
    bar.close()
    return comparison


# ----------------------------------------------------------------------------------------- run
def run_search(options: Optional[SearchOptions] = None, log: Log = print_log) -> SearchOutcome:
    """Run the whole search of ``options`` (default: :class:`SearchOptions` defaults) and write
    its outputs into ``options.out_dir()``; ``log`` receives the progress lines (rank 0 only).
    Raises :class:`~mpq.errors.UserError` for anything the user can fix."""
    o = options if options is not None else SearchOptions()
    single, listed = o.parse_budgets()   # budgets first: a malformed one fails before anything is loaded
    o.check()
    out_dir = o.out_dir()
    device, dist_here = init_distributed(o.device)
    folder = None
    try:
        from .evaluator import dist_info
        rank, world = dist_info()
        main = rank == 0
        say: Log = log if main else (lambda msg: None)
        t_start = time.time()
        _check_checkpoint_path(o.checkpoint)
        # the output folder: writable and not in use, before anything is loaded (rank 0 holds it)
        folder = RunFolder(out_dir, "search.py", log_name="search.log", what="--out", enabled=main)
        refused = _refusal(folder, out_dir, world, device)
        if refused is not None:
            folder = None  # nothing of this job's is in the folder: leave it as it is
            raise refused
        folder.start_log()
        outcome = _search(o, single, listed, device, out_dir, folder, main, world, say, t_start)
        if world > 1:
            import torch
            torch.distributed.barrier()
        return outcome
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


def _evaluator(o: SearchOptions, net, ckpt: Dict[str, Any], source: Source, device):
    """``(data, seed, split, evaluator)``: calibration from training images left out of training or
    from the held-out split, final evaluation on the held-out split, BN batches from the training
    data (:func:`search.data.split_data`). The training subset is rebuilt with the checkpoint's
    data seed; ``seed`` (``--seed``) only draws the search's own samples."""
    import torch

    from .data import load_data, resolve_data, split_data
    from .evaluator import Evaluator, ForwardCounter
    data = resolve_data(ckpt, o.checkpoint, o.data_name, o.data_root, o.seed)
    seed = int(data["seed"])
    info = load_data(data, ckpt["spec"], source.input_size[-1], root_flag=bool(o.data_root))
    split = split_data(info, o.calib_size, o.eval_size, o.bn_batches * o.batch_size, seed, o.calib_split)
    torch.manual_seed(seed)  # random training transforms of the BN batches
    evaluator = Evaluator(net, split.calib, split.bn, batch_size=o.batch_size,
                          bn_batches=o.bn_batches, proxy_batches=o.proxy_batches, device=device,
                          counter=ForwardCounter(), workers=o.workers)
    return data, seed, split, evaluator


def _search(o: SearchOptions, single, listed, device, out_dir: str, folder: RunFolder, main: bool,
            world: int, say: Log, t_start: float) -> SearchOutcome:
    """:func:`run_search` once the output folder is held."""
    from tqdm import tqdm

    from mpq.data import preprocess_of
    from mpq.export import float_model_bytes
    from mpq.supernet import max_config, min_config

    from . import report
    from .cost import CostModel
    from .select import uniform_bits, uniform_candidates
    from .strategies import run_strategy

    net, ckpt, source = _load_checkpoint(o.checkpoint, device)
    spec, input_size = ckpt["spec"], source.input_size
    cost = CostModel(net, input_size)
    cmin, cmax = min_config(net, respect_frozen=False), max_config(net)
    targets = _targets(o, single, listed, net, cost, cmin, cmax, say)

    data, seed, split, evaluator = _evaluator(o, net, ckpt, source, device)
    say(f"mpq search: {source.model_name} from {o.checkpoint} (sha256 {source.digest[:12]}), "
        f"{len(split.calib_indices)} calibration ({split.calib_split} split) / {len(split.eval_indices)} "
        f"evaluation (val split) samples of {data['name']}, "
        f"BN {'re-calibrated on ' + str(o.bn_batches) + ' batches' if evaluator.recalibrate else 'switchable'}, "
        f"device {device}, {world} rank(s)")
    say(f"cost: max {format_bitops(cost.bitops(cmax))} BitOPs / {format_bytes(cost.size_bytes(cmax))}, "
        f"min {format_bitops(cost.bitops(cmin))} BitOPs / {format_bytes(cost.size_bytes(cmin))}; budget(s): "
        + "; ".join(t.label for t in targets))

    # uniform configurations on the calibration set (plot + candidates at their BitOPs)
    counter = evaluator.counter
    before = counter.copy()
    uniform = uniform_candidates(net, evaluator, cost, uniform_bits(net), o.metric)
    uniform_counts = (counter - before).as_dict()

    show = main and not o.quiet
    sensitivity_rows, sensitivity_counts = _sensitivity(o, net, evaluator, cost, source, out_dir, folder,
                                                        main, show, say)
    if o.sensitivity_only:
        return SearchOutcome(out_dir, {}, None, main)
    before = counter.copy()
    t0 = time.time()
    searched = run_strategy(o, net, evaluator, cost, targets, uniform, seed=seed, out_dir=out_dir,
                            main=main, world=world, source_digest=source.digest, show=show,
                            sensitivity=sensitivity_rows)
    search_seconds = time.time() - t0
    search_counts = (counter - before).as_dict()
    say(f"search ({o.strategy}): {searched.steps} steps, {search_counts['forwards']} subnet forward "
        f"passes ({search_counts['evaluations']} exact + {search_counts['proxy_evaluations']} proxy "
        f"evaluations), {search_seconds:.1f}s")
    picker = searched.picker

    preprocess = preprocess_of(data["name"], input_size[-1])
    onnx_wanted = _onnx_wanted(o, say)
    if main:
        folder.keep_log()  # inputs are valid: from here on the job writes into --out
    bar = tqdm(total=len(targets) * 2, desc="final evaluation", unit="eval", disable=not show,
               dynamic_ncols=True)
    delivery = _Delivery(o, net, evaluator, cost, split.eval, spec, source, device, preprocess, out_dir,
                         main, onnx_wanted, say, bar, float_model_bytes(net))
    results = []
    for i, t in enumerate(targets):
        chosen = picker.pick(lambda c, t=t: t.fits(cost, c), "size" if t.max_bitops is None else "bitops",
                             (t.max_bitops, t.max_size))
        if not chosen:
            raise UserError(f"budget {t.label!r}: no configuration on the search path fits "
                            f"(use --full-path)")
        results.append(delivery.answer(i, t, chosen))
    bar.close()
    comparison = (_compare_uniform(uniform, picker, evaluator, cost, split.eval, show)
                  if o.compare_uniform and uniform else [])

    stats = {"refine_forwards": picker.refine_counts.as_dict(), "steps": searched.steps,
             "seconds": search_seconds, "forwards": search_counts, "uniform_forwards": uniform_counts,
             "sensitivity_forwards": sensitivity_counts, "world_size": world, **searched.stats}
    sections = {"measured": report.measured(o, split, seed, evaluator.recalibrate),
                "data": report.data_section(o, data, split, seed),
                "cost": report.cost_section(cost, cmin, cmax, input_size),
                "search": report.search_section(o, stats)}
    doc = report.config_doc(source, results, preprocess, sections, comparison, time.time() - t_start)
    if main:
        report.write_outputs(out_dir, doc, searched.segments, uniform, targets,
                             title=f"{source.model_name}: mixed-precision search ({o.strategy})")
    if picker.refines:
        rc = picker.refine_counts
        say(f"refinement: {rc.forwards} subnet forward passes ({rc.evaluations} exact + "
            f"{rc.proxy_evaluations} proxy evaluations) over {len(picker.picked)} budget(s)")
    for line in report.summary_lines(results, comparison):
        say(line)
    say(f"wrote {out_dir}/config.json, pareto.csv, pareto.png"
        + (", sensitivity.csv, sensitivity.png" if o.sensitivity else "")
        + (", model_fixed.pt" if o.export else "")
        + (", model.onnx, encodings.json" if delivery.onnx else ""))
    return SearchOutcome(out_dir, doc, searched, main)


def _sensitivity(o: SearchOptions, net, evaluator, cost, source: Source, out_dir: str, folder: RunFolder,
                 main: bool, show: bool, say: Log) -> Tuple[Optional[List[Dict[str, Any]]], Optional[Dict[str, int]]]:
    """With ``sensitivity`` (default), measure every layer's sensitivity and write
    ``sensitivity.csv`` / ``sensitivity.png`` (rank 0); ``(rows, forward passes spent)``, or
    ``(None, None)``."""
    if not (o.sensitivity or o.sensitivity_only):
        return None, None
    from tqdm import tqdm

    from . import sensitivity
    counter = evaluator.counter
    before = counter.copy()
    bar = tqdm(desc=f"sensitivity ({o.sensitivity_mode})", unit="eval", disable=not show, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    rows = sensitivity.layer_sensitivity(net, evaluator, cost, o.sensitivity_mode, progress)
    bar.close()
    if main:
        folder.keep_log()
        sensitivity.write_csv(os.path.join(out_dir, "sensitivity.csv"), rows)
        sensitivity.plot(os.path.join(out_dir, "sensitivity.png"), rows,
                         title=f"{source.model_name}: per-layer sensitivity ({o.sensitivity_mode})")
    for kind in ("weight", "activation"):
        top = sensitivity.most_sensitive(rows, kind, 3)
        if top:
            say(f"sensitivity: most sensitive {kind}s: {', '.join(top)}")
    if o.sensitivity_only:
        say(f"wrote {out_dir}/sensitivity.csv, sensitivity.png")
    return rows, (counter - before).as_dict()
