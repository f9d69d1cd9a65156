"""Sandwich sampling and the loss of each sampled subnet (one training step of the supernet).

Sampling (:func:`sample_configs`): the subnets of a step, in ``train.order``: ``max`` (every layer at
its highest allowed bit-widths), ``train.num_random`` random configurations (each layer's weight and
activation bit-width drawn uniformly from its allowed ones) and optionally ``min``. One generator,
seeded alike on every rank, so every rank draws the same configurations. The paper: max + 3 random.

Loss of one subnet (:class:`SubnetLoss`), with ``z`` its logits, ``z_max`` / ``F_max`` the detached
logits / features of the max subnet of the same batch::

    max:    L = CE(z, y) + lambda_R2 * R2(W)
    other:  L = (1 - w) * CE(z, y) + w * KD(z, z_max; T)
                + lambda_IDM * IDM(F, F_max)          (on the layers at their lowest allowed bit-width)
                + lambda_QE(t) * QE(W)                (random subnets only; 0 unless train.qe_weight)

(:func:`mpq.losses.kd_loss`, :func:`mpq.losses.idm_feature_loss`, :class:`mpq.losses.R2Loss`,
:func:`mpq.losses.quantization_error_loss`). A subnet sampled before the max one (``train.order``
not starting with max) has no teacher yet and trains on CE alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .supernet import BitConfig, is_pinned, max_config, min_config, quant_layers, random_config, uniform_config

EVAL_CONFIG_SEED = 1234   # the fixed random configurations evaluated during training


def sample_configs(net: nn.Module, order: Sequence[str], num_random: int,
                   generator: torch.Generator) -> List[Tuple[str, BitConfig]]:
    """``[(kind, config), ...]`` of one step in ``order`` (``max`` / ``random`` / ``min``); each
    ``random`` entry stands for ``num_random`` draws from ``generator``."""
    out: List[Tuple[str, BitConfig]] = []
    for kind in order:
        if kind == "max":
            out.append(("max", max_config(net)))
        elif kind == "min":
            out.append(("min", min_config(net)))
        else:
            out.extend(("random", random_config(net, generator)) for _ in range(num_random))
    return out


def evaluation_configs(net: nn.Module, uniform_bits: Sequence[int], random_configs: int
                       ) -> Dict[str, BitConfig]:
    """The configurations evaluated during training: max, min, each uniform W{b}A{b} that every
    non-pinned layer offers, and ``random_configs`` fixed seeded random ones (the scheduler's
    freezing ignored, so they stay the same for the whole run)."""
    out = {"max": max_config(net), "min": min_config(net, respect_frozen=False)}
    layers = quant_layers(net).values()
    for b in uniform_bits:
        if all(is_pinned(m) or (b in m.w_candidates and b in m.a_candidates) for m in layers):
            out[f"w{b}a{b}"] = uniform_config(net, b, b)
    g = torch.Generator().manual_seed(EVAL_CONFIG_SEED)
    for i in range(random_configs):
        out[f"random{i}"] = random_config(net, g, respect_frozen=False)
    return out


@dataclass
class SubnetLoss:
    """The loss of one sampled subnet (module docstring). ``kd_weight`` 0 turns distillation off,
    ``idm_weight`` 0 IDM, ``r2=None`` R2."""

    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    temperature: float = 1.0
    idm_weight: float = 0.0
    idm_reduction: str = "mean"
    r2: Optional[nn.Module] = None
    r2_weight: float = 0.0

    def __call__(self, kind: str, logits: torch.Tensor, y: torch.Tensor, net: nn.Module,
                 config: Mapping[str, Tuple[int, int]], teacher: Optional[torch.Tensor] = None,
                 features: Optional[Mapping[str, torch.Tensor]] = None,
                 teacher_features: Optional[Mapping[str, torch.Tensor]] = None,
                 qe_weight: float = 0.0) -> torch.Tensor:
        from .losses import idm_feature_loss, kd_loss, lowest_bit_layers, quantization_error_loss
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if kind != "max" and teacher is not None:
            if self.kd_weight > 0:
                w = self.kd_weight
                loss = (1 - w) * loss + w * kd_loss(logits, teacher, self.temperature)
            if self.idm_weight > 0 and teacher_features is not None and features is not None:
                loss = loss + self.idm_weight * idm_feature_loss(
                    features, teacher_features, lowest_bit_layers(net, config), reduction=self.idm_reduction)
        if kind == "random" and qe_weight > 0:   # the paper: random subnets only
            loss = loss + qe_weight * quantization_error_loss(net)
        if kind == "max" and self.r2 is not None:
            loss = loss + self.r2_weight * self.r2(net)
        return loss
