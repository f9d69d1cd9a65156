"""Distributed training helpers: process-group set-up from the ``torchrun`` environment, the DDP
wrapper, gradient all-reduce of parameters outside the model, a resumable ``DistributedSampler`` and small collective utilities.

Design (see also :mod:`mpq.trainer`):

* Rank, world size and local rank come from the environment variables ``RANK``, ``WORLD_SIZE`` and
  ``LOCAL_RANK`` that ``torchrun`` sets -- never from a command-line argument. Without them the same
  code runs as a single process (world size 1) and every collective is a no-op.
* The supernet is wrapped in ``DistributedDataParallel`` (:func:`wrap_ddp`) with
  ``find_unused_parameters=True``: a training step runs several subnets (max, random configs, min)
  whose backward passes accumulate into the shared weights, and the step sizes of bit-widths that
  no subnet sampled get no gradient at all. Every backward but the step's last runs under
  ``no_sync()``, so the gradients are all-reduced (averaged) once per step, bucket by bucket,
  overlapped with the last backward. Every rank samples the same configurations, so the parameters
  with a gradient are the same on every rank; a parameter no subnet used keeps ``grad=None`` and the
  optimizer skips it, exactly as in a single process. ``broadcast_buffers=False``: each rank keeps
  its BatchNorm statistics, averaged before an evaluation or a checkpoint (:func:`average_buffers`).
* Parameters and buffers are broadcast from rank 0 once after initialisation
  (:func:`broadcast_module`), so every rank starts from the same weights and activation step sizes.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from .errors import UserError


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, local rank and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # this process created the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise UserError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(device: str = "auto", backend: str = "auto",
                     timeout_min: float = 30.0) -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, pick the device and, when
    the world size is > 1, join the process group (``env://``: ``MASTER_ADDR``/``MASTER_PORT``).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; ``backend``: ``auto`` (NCCL on
    GPU, gloo on CPU), ``nccl`` or ``gloo``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' was asked for but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        n = torch.cuda.device_count()
        dev = torch.device("cuda", local_rank % max(n, 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1:
        be = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        if be == "nccl" and not use_cuda:
            raise UserError("dist.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        env.backend = be
        if not dist.is_initialized():
            dist.init_process_group(be, init_method="env://", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=timeout_min))
            env.owns_group = True
    return env


def cleanup(env: DistEnv) -> None:
    """Destroy the process group if this process created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        env.owns_group = False


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _bucket_sizes(tensors: List[torch.Tensor], bucket_bytes: int) -> Iterator[List[torch.Tensor]]:
    bucket: List[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > bucket_bytes or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_gradients(params: Iterable[nn.Parameter], env: DistEnv,
                         bucket_mb: float = 25.0) -> None:
    """Average ``.grad`` over the ranks for every parameter whose gradient is not ``None``.

    Flattens the gradients into buckets (one all-reduce per bucket). Every rank must hold gradients
    for the same parameters (true when all ranks sample the same bit configurations).
    """
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _bucket_sizes(grads, int(bucket_mb * 2 ** 20)):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(env.world_size)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def wrap_ddp(module: nn.Module, env: DistEnv) -> Optional[nn.Module]:
    """``DistributedDataParallel`` around ``module`` for training (``None`` in a single process)."""
    if not env.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True,
                                   broadcast_buffers=False)


@torch.no_grad()
def broadcast_module(module: nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks."""
    if not env.distributed:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def average_buffers(module: nn.Module, env: DistEnv) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, so every
    rank holds the same statistics before an evaluation or a checkpoint."""
    if not env.distributed:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(env.world_size)


def _all_reduce_list(values: List[float], env: DistEnv, op) -> List[float]:
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: List[float], env: DistEnv) -> List[float]:
    """Sum a list of numbers over the ranks (float64)."""
    return _all_reduce_list(values, env, dist.ReduceOp.SUM)


def all_reduce_max(values: List[float], env: DistEnv) -> List[float]:
    """Element-wise maximum of a list of numbers over the ranks (float64)."""
    return _all_reduce_list(values, env, dist.ReduceOp.MAX)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is True on at least one rank."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start in the middle of an epoch.

    The order of an epoch depends only on ``(seed, epoch)``; :meth:`set_start` skips the first
    ``start`` samples of this rank's share, so a resumed run sees exactly the samples the
    interrupted one had not yet used, without loading the skipped ones. Used with
    ``num_replicas=1`` in a single process as well, so both paths share one data order: rank ``r``
    of ``K`` gets ``perm[r::K]``, i.e. the interleaved ``r``-th share of each global batch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = max(0, int(start))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    @property
    def full_length(self) -> int:
        """Samples of this rank per epoch (ignoring ``start``)."""
        return self.num_samples


def shard(n: int, rank: int, world: int) -> List[int]:
    """Indices ``rank, rank + world, ...`` of ``range(n)``: this rank's part of an evaluation split,
    without padding (every sample is evaluated exactly once over all ranks)."""
    return list(range(rank, n, world))


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
