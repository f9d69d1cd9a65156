"""Held-out evaluation of supernet configurations during training.

For each configuration: set its bit-widths, re-calibrate the BatchNorm statistics on fixed training
batches when the supernet needs it (shared BN; switchable BN with ``eval.recalibrate_switchable``),
then top-1 accuracy (%) and mean cross-entropy on this rank's shard of the held-out split, summed
over the ranks. The supernet's state (BN statistics, active bits, Quant-Noise) is restored after.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Mapping, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .batchnorm import recalibrate_bn
from .distributed import DistEnv, all_reduce_sum, average_buffers
from .supernet import BitConfig, get_bits, quant_layers, set_bits


@torch.no_grad()
def heldout_accuracy(model: nn.Module, loader, device: torch.device, env: DistEnv,
                     prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                     autocast: Callable[[], ContextManager] = nullcontext) -> Tuple[float, float]:
    """``(accuracy %, mean loss)`` of ``model`` over ``loader`` on every rank together."""
    model.eval()
    correct, total, loss_sum = 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = prepare(x), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        total += y.numel()
    correct, total, loss_sum = all_reduce_sum([correct, total, loss_sum], env)
    return 100.0 * correct / max(total, 1), loss_sum / max(total, 1)


@torch.no_grad()
def evaluate_configs(net: nn.Module, model: nn.Module, configs: Mapping[str, BitConfig], val_loader,
                     recal_loader, recal_batches: int, device: torch.device, env: DistEnv,
                     prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                     autocast: Callable[[], ContextManager] = nullcontext,
                     train_after: bool = True) -> Dict[str, Dict[str, float]]:
    """``{name: {"acc", "loss"}}`` of each configuration (``model`` is ``net`` or its compiled
    form; ``recal_batches`` 0 keeps the trained BN statistics). A configuration equal to an earlier
    one is not evaluated twice. ``train_after``: put ``net`` back in training mode."""
    average_buffers(net, env)
    saved_buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    saved_bits = get_bits(net)
    saved_qn = {n: m.quant_noise_p for n, m in quant_layers(net).items()}
    for m in quant_layers(net).values():
        m.quant_noise_p = 1.0
    results: Dict[str, Dict[str, float]] = {}
    done: List[Tuple[BitConfig, Dict[str, float]]] = []
    try:
        for name, c in configs.items():
            prev = next((r for cc, r in done if cc == c), None)
            if prev is not None:
                results[name] = dict(prev)
                continue
            set_bits(net, c)
            if recal_batches > 0:
                recalibrate_bn(net, recal_loader, recal_batches)
            acc, loss = heldout_accuracy(model, val_loader, device, env, prepare, autocast)
            results[name] = {"acc": acc, "loss": loss}
            done.append((c, results[name]))
    finally:
        named = dict(net.named_buffers())
        for n, b in saved_buffers.items():
            named[n].copy_(b)
        set_bits(net, saved_bits)
        for n, m in quant_layers(net).items():
            m.quant_noise_p = saved_qn[n]
        net.train(train_after)
    return results
