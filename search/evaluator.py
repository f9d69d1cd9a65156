"""Accuracy / loss of one bit configuration of a supernet, with BatchNorm re-calibration.

BatchNorm statistics depend on the bit configuration. A supernet trained with *shared* BN
(``quant.bn == "shared"``) keeps one set of running statistics for every configuration, so before a
configuration is evaluated the BN layers it uses are re-calibrated: their running statistics are reset
and recomputed as a cumulative average (``momentum=None``) over a few batches in train mode, under
``no_grad``. A supernet with *switchable* BN stores statistics per (w_bits, a_bits), so no
re-calibration is needed (it can still be forced).

Every subnet forward pass (one batch) is counted in a :class:`ForwardCounter`, so the cost of a search
can be reported and compared.

Distributed (``torch.distributed`` initialised, world size > 1): the evaluation data is sharded across
ranks by index striding (rank ``r`` takes samples ``r, r + W, r + 2W, ...``; no shuffle) and the sums of
correct predictions, loss and sample count are all-reduced, so every rank gets the same result. BN
re-calibration and the proxy batch use the *same* batches on every rank (no communication needed, the
statistics are identical everywhere). Without ``torch.distributed`` everything runs in one process.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

# BatchNorm handling lives in mpq (training re-calibrates too); re-exported here for the search's users
from mpq.batchnorm import (DEFAULT_BATCH_SIZE, DEFAULT_BN_BATCHES, Batch, Data, _device_of,  # noqa: F401
                           _split, batch_stat_bn, bn_modules_in_use, make_loader, recalibrate_bn,
                           uses_shared_bn)
from mpq.distributed import shard as shard_indices
from mpq.supernet import set_bits, unwrap

DEFAULT_PROXY_BATCHES = 4


@dataclass
class ForwardCounter:
    """Subnet forward passes (batches through the network), split by purpose.

    ``eval_forwards``: batches of exact evaluations; ``bn_forwards``: batches spent re-calibrating BN;
    ``proxy_forwards``: batches of cheap proxy evaluations; ``evaluations`` / ``proxy_evaluations``:
    configurations evaluated exactly / by proxy.
    """

    eval_forwards: int = 0
    bn_forwards: int = 0
    proxy_forwards: int = 0
    evaluations: int = 0
    proxy_evaluations: int = 0
    samples: int = 0

    @property
    def forwards(self) -> int:
        """All subnet forward passes."""
        return self.eval_forwards + self.bn_forwards + self.proxy_forwards

    def reset(self) -> None:
        self.eval_forwards = self.bn_forwards = self.proxy_forwards = 0
        self.evaluations = self.proxy_evaluations = self.samples = 0

    def as_dict(self) -> Dict[str, int]:
        return {"forwards": self.forwards, "eval_forwards": self.eval_forwards,
                "bn_forwards": self.bn_forwards, "proxy_forwards": self.proxy_forwards,
                "evaluations": self.evaluations, "proxy_evaluations": self.proxy_evaluations,
                "samples": self.samples}

    def __sub__(self, other: "ForwardCounter") -> "ForwardCounter":
        return ForwardCounter(*(getattr(self, f) - getattr(other, f) for f in
                                ("eval_forwards", "bn_forwards", "proxy_forwards", "evaluations",
                                 "proxy_evaluations", "samples")))

    def add(self, other: "ForwardCounter") -> None:
        """Add ``other``'s counts to this counter, in place."""
        for f in ("eval_forwards", "bn_forwards", "proxy_forwards", "evaluations", "proxy_evaluations",
                  "samples"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def copy(self) -> "ForwardCounter":
        return self - ForwardCounter()


# ----------------------------------------------------------------------------------------- distributed
def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(dataset: Dataset, rank: Optional[int] = None, world: Optional[int] = None) -> Dataset:
    """This rank's part of ``dataset`` by index striding (no shuffle, no padding: every sample is
    evaluated exactly once over all ranks)."""
    r, w = dist_info()
    rank = r if rank is None else rank
    world = w if world is None else world
    if world <= 1:
        return dataset
    return Subset(dataset, shard_indices(len(dataset), rank, world))


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    rank, world = dist_info()
    if world <= 1:
        return values
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = values.to(device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.cpu()


# ------------------------------------------------------------------------------------------------ data
def take_batches(data: Data, num_batches: Optional[int] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 workers: int = 0, device: Optional[torch.device] = None) -> List[Batch]:
    """Materialise the first ``num_batches`` batches (all when ``None``) as a list, on ``device``."""
    out: List[Batch] = []
    if num_batches is not None and num_batches <= 0:
        return out
    for batch in make_loader(data, batch_size, workers):
        x, y = _split(batch)
        out.append((x.to(device) if device is not None else x,
                    y.to(device) if (y is not None and device is not None) else y))
        if num_batches is not None and len(out) >= num_batches:
            break
    return out


# ---------------------------------------------------------------------------------------------- eval
def _key(config: Mapping[str, Sequence[int]]) -> Tuple:
    return tuple(sorted((k, int(v[0]), int(v[1])) for k, v in config.items()))


BN_MODES = ("auto", "recalibrate", "stored", "batch")
FORMS = ("supernet", "exported")


@torch.no_grad()
def _run(net: nn.Module, loader: Iterable, device: torch.device, batch_size: int,
         max_batches: Optional[int], collect: Optional[Dict[str, Any]] = None
         ) -> Tuple[float, float, int, int]:
    correct = 0
    loss_sum = 0.0
    n = 0
    batches = 0
    per_correct: List[torch.Tensor] = []
    per_loss: List[torch.Tensor] = []
    for batch in make_loader(loader, batch_size):
        if max_batches is not None and batches >= max_batches:
            break
        x, y = _split(batch)
        if y is None:
            raise ValueError("evaluation batches need targets: (inputs, targets) pairs")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = net(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        hits = logits.argmax(1) == y
        loss_sum += float(losses.sum())
        correct += int(hits.sum())
        n += int(y.numel())
        batches += 1
        if collect is not None:
            per_correct.append(hits.cpu())
            per_loss.append(losses.detach().cpu())
    if collect is not None:
        collect["correct"] = torch.cat(per_correct) if per_correct else torch.zeros(0, dtype=torch.bool)
        collect["loss"] = torch.cat(per_loss) if per_loss else torch.zeros(0)
    return correct, loss_sum, n, batches


def evaluate(net: nn.Module, config: Optional[Mapping[str, Sequence[int]]], loader: Data,
             bn_loader: Optional[Data] = None, bn_batches: int = DEFAULT_BN_BATCHES, device=None,
             recalibrate: Optional[bool] = None, bn_mode: str = "auto",
             counter: Optional[ForwardCounter] = None, batch_size: int = DEFAULT_BATCH_SIZE,
             max_batches: Optional[int] = None, reduce: Optional[bool] = None,
             collect: Optional[Dict[str, Any]] = None, form: str = "supernet") -> Dict[str, float]:
    """Accuracy and mean cross-entropy of ``config`` (``None``: the active one) on ``loader``.

    Args:
        loader: a Dataset (wrapped in an unshuffled DataLoader of ``batch_size``; sharded across
            ranks under ``torch.distributed``) or any iterable of ``(inputs, targets)`` batches (taken
            to be this rank's shard).
        bn_loader: batches for BN re-calibration (default: ``loader``); the same on every rank.
        bn_batches: number of re-calibration batches.
        recalibrate: ``None`` re-calibrates when the supernet shares BN across configurations
            (``quant.bn == "shared"``); ``True`` forces it, ``False`` skips it.
        bn_mode: ``"auto"`` (as ``recalibrate`` says), ``"recalibrate"``, ``"stored"`` (use the
            running statistics as they are) or ``"batch"`` (normalise with each batch's own
            statistics, nothing changes in the network).
        counter: counts the forward passes.
        reduce: all-reduce the sums across ranks (default: when ``torch.distributed`` runs with
            more than one rank).
        collect: a dict that receives this rank's per-sample ``"correct"`` (bool) and ``"loss"``
            tensors, in data order.
        form: ``"supernet"`` runs the supernet as it is; ``"exported"`` runs the configuration in
            the arithmetic of the exported model (:func:`mpq.export.fixed_model`: BN folded into
            the weight scales, bias rounded to int32 at ``s_a * s_w``), after the BN step, so the
            figure is the exported model's.
    Returns ``{"acc", "loss", "n"}`` (accuracy in [0, 1], mean loss, number of samples).
    """
    net = unwrap(net)
    device = _device_of(net, device)
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode: {bn_mode!r} is not allowed; allowed: {list(BN_MODES)}")
    if form not in FORMS:
        raise ValueError(f"form: {form!r} is not allowed; allowed: {list(FORMS)}")
    if config is not None:
        set_bits(net, config)
    if bn_mode == "auto":
        do_recal = uses_shared_bn(net) if recalibrate is None else bool(recalibrate)
        bn_mode = "recalibrate" if do_recal else "stored"
    rank, world = dist_info()
    if bn_mode == "recalibrate":   # the same BN batches on every rank (never the shard)
        recalibrate_bn(net, loader if bn_loader is None else bn_loader, bn_batches, device, counter,
                       batch_size)
    if isinstance(loader, Dataset):
        loader = shard(loader)
    net.eval()
    model = net
    if form == "exported":
        if bn_mode == "batch":
            raise ValueError("evaluate: form='exported' needs stored or re-calibrated BN statistics, "
                             "not bn_mode='batch'")
        from mpq.export import fixed_model
        model = fixed_model(net).to(device)
    ctx = batch_stat_bn(net) if bn_mode == "batch" else contextlib.nullcontext()
    with ctx:
        correct, loss_sum, n, batches = _run(model, loader, device, batch_size, max_batches, collect)
    if counter is not None:
        counter.eval_forwards += batches
        counter.samples += n
        counter.evaluations += 1
    if (world > 1) if reduce is None else reduce:
        sums = _all_reduce_sum(torch.tensor([correct, loss_sum, n], dtype=torch.float64))
        correct, loss_sum, n = int(round(float(sums[0]))), float(sums[1]), int(round(float(sums[2])))
    if n == 0:
        raise ValueError("evaluate: the evaluation data is empty")
    return {"acc": correct / n, "loss": loss_sum / n, "n": n}


class Evaluator:
    """Evaluates configurations of one supernet on fixed, in-memory calibration batches.

    * :meth:`exact`: the whole calibration set (this rank's shard, all-reduced), BN re-calibrated on
      the BN batches first when the supernet shares BN, in the exported model's arithmetic
      (``form="exported"``, default: folded BN, int32 bias; ``"supernet"``: the supernet as it is);
    * :meth:`proxy`: the first ``proxy_batches`` calibration batches (default 4; the same on every
      rank, no communication) with batch-statistics BN (shared BN) or the stored statistics
      (switchable BN): one forward pass per batch, no re-calibration; used to pre-rank greedy moves.

    Results are returned as ``{"acc", "loss", "n"}``; forward passes are counted in ``counter``.

    Args:
        net: the supernet (any wrapper is unwrapped).
        calib: calibration Dataset (or list of batches) - the held-out search data.
        bn_data: data for BN re-calibration (default: ``calib``).
    """

    def __init__(self, net: nn.Module, calib: Data, bn_data: Optional[Data] = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, bn_batches: int = DEFAULT_BN_BATCHES,
                 proxy_batches: int = DEFAULT_PROXY_BATCHES, device=None,
                 recalibrate: Optional[bool] = None, counter: Optional[ForwardCounter] = None,
                 workers: int = 0, form: str = "exported") -> None:
        if form not in FORMS:
            raise ValueError(f"Evaluator: form {form!r} is not allowed; allowed: {list(FORMS)}")
        self.form = form
        self.net = unwrap(net)
        self.device = _device_of(self.net, device)
        self.batch_size = batch_size
        self.counter = counter if counter is not None else ForwardCounter()
        self.recalibrate = uses_shared_bn(self.net) if recalibrate is None else bool(recalibrate)
        self.shared_bn = uses_shared_bn(self.net)
        rank, world = dist_info()
        if world > 1 and isinstance(calib, Dataset):
            # this rank's shard for exact evaluation; the head (proxy / BN batches) is the same on
            # every rank
            head_len = max(1, proxy_batches, bn_batches if bn_data is None else 0)
            head = take_batches(calib, head_len, batch_size, workers, self.device)
            self.calib = take_batches(shard(calib), None, batch_size, workers, self.device)
        else:
            head = self.calib = take_batches(calib, None, batch_size, workers, self.device)
            if world > 1:   # batches given: every rank evaluates every world-th batch
                self.calib = self.calib[rank::world]
        if not head:
            raise ValueError("Evaluator: the calibration data is empty")
        self.proxy_data = head[:max(1, proxy_batches)]
        self.bn_batches = bn_batches
        self.bn_data = (take_batches(bn_data, bn_batches, batch_size, workers, self.device)
                        if bn_data is not None else head[:bn_batches])
        if self.recalibrate and not self.bn_data:
            raise ValueError("Evaluator: BN re-calibration needs at least one batch")
        self.samples: Dict[Tuple, Dict[str, torch.Tensor]] = {}

    def exact(self, config: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, float]:
        """The configuration's accuracy/loss on the whole calibration set (per-sample results are
        kept for :meth:`paired_z`)."""
        collect: Dict[str, Any] = {}
        out = evaluate(self.net, config, self.calib, self.bn_data, len(self.bn_data), self.device,
                       recalibrate=self.recalibrate, counter=self.counter, batch_size=self.batch_size,
                       reduce=dist_info()[1] > 1, collect=collect, form=self.form)
        from mpq.supernet import get_bits
        self.samples[_key(get_bits(self.net))] = collect
        return out

    def paired_z(self, a: Mapping[str, Sequence[int]], b: Mapping[str, Sequence[int]],
                 what: str = "acc") -> float:
        """How many standard errors ``a`` beats ``b`` by on the calibration set: the mean per-sample
        difference (correctness for ``"acc"``, minus the loss for ``"loss"``) over its standard
        error (a paired test on the same samples). Both must have been evaluated by :meth:`exact`.
        ``0`` when they agree on every sample; all ranks get the same value."""
        sa, sb = self.samples.get(_key(a)), self.samples.get(_key(b))
        if sa is None or sb is None:
            raise KeyError("paired_z: evaluate both configurations with exact() first")
        if what == "acc":
            d = sa["correct"].double() - sb["correct"].double()
        else:
            d = sb["loss"].double() - sa["loss"].double()
        sums = torch.tensor([float(d.sum()), float((d * d).sum()), float(d.numel())], dtype=torch.float64)
        if dist_info()[1] > 1:
            sums = _all_reduce_sum(sums)
        total, sq, n = float(sums[0]), float(sums[1]), float(sums[2])
        if n < 2:
            return 0.0
        mean = total / n
        var = max(sq / n - mean * mean, 0.0) * n / (n - 1)
        if var == 0.0:
            return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return mean / math.sqrt(var / n)

    def proxy(self, config: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, float]:
        """Cheap estimate on the proxy batch(es): one forward pass per batch, nothing re-calibrated."""
        return self._cheap(config, self.proxy_data, reduce=False)

    def batch_error(self, config: Optional[Mapping[str, Sequence[int]]], i: int) -> float:
        """Top-1 error in [0, 1] on calibration batch ``i`` (cycled through the calibration
        batches), normalised with the batch's own statistics (shared BN) or the stored ones
        (switchable BN): the reference greedy scores each iteration's moves on one fresh batch.
        Under ``torch.distributed`` every rank takes batch ``i`` of its shard and the counts are
        summed, so all ranks get the same error."""
        batch = self.calib[i % len(self.calib)]
        return 1.0 - self._cheap(config, [batch], reduce=dist_info()[1] > 1)["acc"]

    def _cheap(self, config: Optional[Mapping[str, Sequence[int]]], batches: List[Batch],
               reduce: bool) -> Dict[str, float]:
        """``config`` on ``batches`` without BN re-calibration, counted as a proxy evaluation."""
        before = self.counter.copy()
        out = evaluate(self.net, config, batches, device=self.device,
                       bn_mode="batch" if self.shared_bn else "stored", counter=self.counter,
                       batch_size=self.batch_size, reduce=reduce)
        spent = self.counter - before
        self.counter.eval_forwards -= spent.eval_forwards
        self.counter.evaluations -= spent.evaluations
        self.counter.samples -= spent.samples
        self.counter.proxy_forwards += spent.eval_forwards
        self.counter.proxy_evaluations += 1
        return out

    def evaluate(self, config: Optional[Mapping[str, Sequence[int]]], data: Data,
                 counter: Optional[ForwardCounter] = None) -> Dict[str, float]:
        """The configuration on other data (e.g. the held-out evaluation split), BN re-calibrated
        on the same BN batches as :meth:`exact`."""
        return evaluate(self.net, config, data, self.bn_data, len(self.bn_data), self.device,
                        recalibrate=self.recalibrate, counter=counter, batch_size=self.batch_size,
                        form=self.form)

    def prepare(self, config: Optional[Mapping[str, Sequence[int]]]) -> None:
        """Select ``config`` and re-calibrate BN for it (as :meth:`exact` would), e.g. before export."""
        net = self.net
        if config is not None:
            set_bits(net, config)
        if self.recalibrate:
            recalibrate_bn(net, self.bn_data, len(self.bn_data), self.device, None, self.batch_size)
        net.eval()
