"""BatchNorm of a supernet: which BN layers a configuration uses, and re-estimating their statistics.

BN statistics depend on the bit configuration. With *shared* BN (``quant.bn == "shared"``) one set of
running statistics serves every configuration, so before a configuration is evaluated the BN layers it
uses are re-calibrated: running statistics reset, then recomputed as the cumulative average
(``momentum=None``) of a few batches in train mode, under ``no_grad``. *Switchable* BN stores
statistics per (w_bits, a_bits); re-calibration is then optional (the paper re-estimates before
every evaluation: ``eval.recalibrate_switchable``). Training's evaluation and the search both use
:func:`recalibrate_bn`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from .layers import SwitchableBatchNorm2d
from .supernet import unwrap

DEFAULT_BN_BATCHES = 8
DEFAULT_BATCH_SIZE = 256

Batch = Tuple[torch.Tensor, torch.Tensor]
Data = Union[Dataset, Iterable]


# ------------------------------------------------------------------------------------------------ data
def _split(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"a batch must be a tensor or an (inputs, targets) pair, got {type(batch).__name__}")


def make_loader(data: Data, batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0) -> Iterable:
    """A deterministic (unshuffled) loader over a Dataset; any other iterable is returned as is."""
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                          drop_last=False)
    return data


# ------------------------------------------------------------------------------------------- batchnorm
def bn_modules_in_use(net: nn.Module) -> List[_BatchNorm]:
    """The BatchNorm modules a forward pass of the active configuration uses: every plain BatchNorm,
    and the active entry of every :class:`~mpq.layers.SwitchableBatchNorm2d`."""
    net = unwrap(net)
    used: List[_BatchNorm] = []
    inside_switchable = set()
    for m in net.modules():
        if isinstance(m, SwitchableBatchNorm2d):
            used.append(m.current())
            inside_switchable.update(id(b) for b in m.bns.values())
    for m in net.modules():
        if isinstance(m, _BatchNorm) and id(m) not in inside_switchable:
            used.append(m)
    return used


def uses_shared_bn(net: nn.Module) -> bool:
    """Whether each configuration needs BN re-calibration: the spec's ``bn_recalibrate`` when a
    checkpoint set it (switchable BN trained with ``eval.recalibrate_switchable``, as the paper
    re-estimates before every evaluation), else ``bn == "shared"``, else whether any plain
    BatchNorm is in use."""
    net = unwrap(net)
    spec = getattr(net, "mpq_spec", None)
    if isinstance(spec, Mapping) and spec.get("bn_recalibrate") is not None:
        return bool(spec["bn_recalibrate"])
    if isinstance(spec, Mapping) and "bn" in spec:
        return spec["bn"] == "shared"
    switchable = {id(b) for m in net.modules() if isinstance(m, SwitchableBatchNorm2d)
                  for b in m.bns.values()}
    return any(isinstance(m, _BatchNorm) and id(m) not in switchable for m in net.modules())


def _device_of(net: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def recalibrate_bn(net: nn.Module, loader: Data, num_batches: int = DEFAULT_BN_BATCHES,
                   device=None, counter: Optional[Any] = None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Reset the running statistics of the BN layers in use and recompute them as the cumulative
    average over ``num_batches`` batches of ``loader`` (BN in train mode, everything else in eval
    mode, under ``no_grad``). Leaves the network in eval mode; returns the batches used.
    ``counter`` (e.g. the search's ``ForwardCounter``) gets ``bn_forwards`` incremented per batch."""
    net = unwrap(net)
    device = _device_of(net, device)
    bns = bn_modules_in_use(net)
    if not bns:
        return 0
    if num_batches <= 0:
        raise ValueError(f"BN re-calibration needs at least one batch, got num_batches={num_batches}")
    momenta = [bn.momentum for bn in bns]
    net.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for batch in make_loader(loader, batch_size):
            if used >= num_batches:
                break
            x, _ = _split(batch)
            net(x.to(device, non_blocking=True))
            used += 1
            if counter is not None:
                counter.bn_forwards += 1
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
            bn.eval()
    if used == 0:
        raise ValueError("BN re-calibration: the calibration loader yielded no batch")
    return used


@contextlib.contextmanager
def batch_stat_bn(net: nn.Module) -> Iterator[None]:
    """Within the block, the BN layers in use normalise with the statistics of the current batch
    and leave their running statistics untouched (the reference search's cheap scoring mode)."""
    bns = bn_modules_in_use(net)
    saved = [(bn.training, bn.track_running_stats) for bn in bns]
    for bn in bns:
        bn.train()
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn, (training, track) in zip(bns, saved):
            bn.track_running_stats = track
            bn.train(training)
