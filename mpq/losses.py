"""Training losses of the supernet: in-place distillation, information-distortion mitigation (IDM)
and the R2 weight range-restriction losses.

In-place distillation (:func:`kd_loss`)
    ``KD(s, t) = T^2 * mean_batch KL( softmax(t / T) || softmax(s / T) )`` with the teacher logits
    ``t`` (the max subnet's) detached; each non-max subnet mixes it with cross-entropy.

Information-distortion mitigation (:class:`FeatureTap`, :func:`idm_feature_loss`,
:func:`lowest_bit_layers`)
    In the layers sampled at their current *lowest* allowed weight bit-width, the features of the
    subnet are pulled towards the detached features of the max subnet at the same layer:
    ``IDM = sum_l MSE(F_l^student, sg(F_l^teacher))`` (the paper's code; ``mean_l`` as an option).
    ``F_l`` is the output of the BatchNorm after conv ``l`` (``features="post_bn"``) or, as the
    paper's code effectively aligns it (``features="reference"``), that tensor after the in-place
    ops that follow it: post-ReLU for BN -> ReLU(inplace), the block output for a ResNet ``bn2``
    followed by ``out += identity``; pure BN output where nothing in-place follows.

Quantization-error loss (:func:`quantization_error_loss`, the paper's code, random subnets only)
    For every non-pinned layer at its sampled weight bit-width ``b`` with step ``s_b`` (detached)
    and clip range ``[-Q_N s_b, Q_P s_b]``:
    ``QE_l = mean_over_weight_positions( sum_out_channels (clip(w) - q~)^2 )``, where ``q~ = q_b(w)``
    when ``q_b(w)`` lies on the grid ``k * 2^(b - b_min) * s_b`` of the layer's lowest allowed bit
    ``b_min`` (``k`` in that bit's integer range), else ``clip(w)`` (no loss there); at ``b = b_min``
    every weight counts. ``q~`` is detached: the gradient reaches the weights only.

R2 range restriction (:class:`R2Loss`), over the weight ``W_l`` of every quantized layer ``l``
    * ``linf``:       ``sum_l max|W_l|``
    * ``margin``:     ``sum_l ( sum relu(|W_l| - |M_l|)^2 + |M_l| )``, learnable margin ``M_l``
    * ``softminmax``: ``sum_l ( smax_l - smin_l + eta * exp(-a_l) )``, learnable temperature ``a_l``,
      ``smax = sum w e^(a w) / sum e^(a w)``, ``smin`` likewise with ``-a``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .quantizer import FLOAT_BITS
from .supernet import bn_after_conv, has_weight_choice, quant_layers, unwrap

R2_KINDS = ("linf", "margin", "softminmax")
SCALE_AWARE_TEMPERATURE = 10.0   # soft-min-max alpha init = this / std(W_l) when not given


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (half / bfloat16 logits under AMP are upcast, float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------- in-place distillation
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """In-place distillation loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    ``teacher_logits`` is detached here, so no gradient reaches the teacher. Logits are ``(N, C)``;
    extra leading dims (e.g. tokens) are flattened into the batch. Computed in at least float32.
    The result is exactly 0 when the logits are equal and positive otherwise.
    """
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    dtype = _compute_dtype(student_logits.dtype)
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c).to(dtype) / temperature
    t = teacher_logits.detach().reshape(-1, c).to(dtype) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    # sum_c p_t * (log p_t - log p_s), mean over rows
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature ** 2)


# --------------------------------------------------------------------------- IDM
class FeatureTap:
    """Records the post-BatchNorm output that follows each quantized conv, keyed by the conv's name.

    Forward hooks sit on the BatchNorm (plain ``BatchNorm2d`` or :class:`SwitchableBatchNorm2d`)
    found by :func:`mpq.supernet.bn_after_conv`. They record only while ``enabled`` is True; each
    recorded forward overwrites the previous entry of that layer. The stored tensor is a copy of the
    BN output that still carries its autograd graph, so a following in-place ReLU does not turn it
    into a post-ReLU feature and the IDM loss back-propagates into the subnet.

    Args:
        model: the supernet (may be wrapped in DDP / ``torch.compile``).
        layers: conv layer names to tap (default: every quantized conv followed by a BN). Quantized
            layers without a following BN (e.g. linear layers) are skipped; names that are not
            quantized layers raise ``ValueError``.
        copy: True stores a copy of the BN output (post-BN features); False stores the BN output
            tensor itself, so the in-place ops that follow it (``ReLU(inplace=True)``, ``+=``) are
            seen in it, as in the paper's code (``idm.features: reference``).

    Usage::

        with FeatureTap(net) as tap:
            tap.enabled = True
            net(x); teacher = dict(tap.features); tap.clear()
    """

    def __init__(self, model: nn.Module, layers: Optional[Iterable[str]] = None,
                 copy: bool = True) -> None:
        net = unwrap(model)
        self.copy = bool(copy)
        links = bn_after_conv(net)
        if layers is None:
            names = list(links)
        else:
            known = quant_layers(net)
            names = []
            for name in layers:
                if name not in known:
                    raise ValueError(f"FeatureTap: {name!r} is not a quantized layer; quantized "
                                     f"layers: {list(known)}")
                if name in links and name not in names:
                    names.append(name)
        self.layers: List[str] = names
        self.enabled: bool = False
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            bn = net.get_submodule(links[name])
            self._handles.append(bn.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if self.enabled:
                self.features[name] = output.clone() if self.copy else output
        return hook

    def clear(self) -> None:
        """Forget the recorded features."""
        self.features = {}

    def remove(self) -> None:
        """Remove the hooks (and the recorded features)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def idm_feature_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                     layers: Iterable[str], reduction: str = "mean") -> torch.Tensor:
    """Information-distortion mitigation feature term.

    ``sum_l`` (``reduction="sum"``, the paper's code) or ``mean_l`` (``"mean"``) of
    ``MSE(student[l], teacher[l].detach())`` over the names in ``layers`` present in both dicts
    (each MSE is the mean over the elements of that layer's feature map). Returns a scalar 0
    (float, on the features' device) when no layer qualifies.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"idm_feature_loss: reduction {reduction!r} is not allowed; allowed: ['mean', 'sum']")
    used = [l for l in dict.fromkeys(layers) if l in student and l in teacher]
    if not used:
        ref = next(iter(student.values()), None)
        if ref is None:
            return torch.zeros(())
        return torch.zeros((), dtype=_compute_dtype(ref.dtype), device=ref.device)
    total = None
    for l in used:
        s, t = student[l], teacher[l].detach()
        if s.shape != t.shape:
            raise ValueError(f"idm_feature_loss: layer {l!r}: student features {tuple(s.shape)} and "
                             f"teacher features {tuple(t.shape)} differ in shape")
        dtype = _compute_dtype(s.dtype)
        term = F.mse_loss(s.to(dtype), t.to(dtype))
        total = term if total is None else total + term
    return total / len(used) if reduction == "mean" else total


def lowest_bit_layers(model: nn.Module, config: Mapping[str, Sequence[int]]) -> List[str]:
    """Names of the layers that ``config`` runs at their lowest *allowed* weight bit-width
    (``min(layer.w_allowed)``), in layer order; pinned layers (a single weight candidate) and layers
    absent from ``config`` are left out. These are the layers IDM aligns."""
    out = []
    for name, layer in quant_layers(model).items():
        if not has_weight_choice(layer) or name not in config:
            continue
        if int(config[name][0]) == min(layer.w_allowed):
            out.append(name)
    return out


# --------------------------------------------------------------------------- QE loss
def qe_weight_at(progress: float, weight: float, start: float) -> float:
    """The QE loss weight at ``progress`` (fraction of training done): 0 before ``start``, then a
    cosine ramp ``weight * (1 - cos(pi * (p - start) / (1 - start))) / 2`` reaching ``weight`` at the
    end (the paper: 0 at epoch 40 of 150, 0.05 at 95, 0.1 at 150)."""
    if weight <= 0 or progress <= start:
        return 0.0
    x = min(1.0, (progress - start) / max(1e-12, 1.0 - start))
    return weight * 0.5 * (1.0 - math.cos(math.pi * x))


def quantization_error_loss(model: nn.Module) -> torch.Tensor:
    """The quantization-error loss of the active configuration (see the module docstring)."""
    total = None
    for layer in quant_layers(model).values():
        if not has_weight_choice(layer) or layer.w_bits >= FLOAT_BITS:
            continue
        b, b_min = int(layer.w_bits), int(min(layer.w_allowed))
        w = layer.weight
        wq = layer.w_quant
        step = wq.step_for(b).detach().to(w.dtype)
        qn, qp = wq.grid(b)
        clipped = torch.maximum(torch.minimum(w, qp * step), -qn * step)
        with torch.no_grad():
            codes = torch.round(clipped / step)
            target = codes * step
            ratio = 2 ** (b - b_min)
            if ratio > 1:
                qn_min, qp_min = wq.grid(b_min)
                coarse = torch.remainder(codes, ratio) == 0
                k = codes / ratio
                coarse &= (k >= -qn_min) & (k <= qp_min)
                target = torch.where(coarse, target, clipped)
        term = (clipped - target).pow(2).sum(0).mean()
        total = term if total is None else total + term
    if total is None:
        p = next(unwrap(model).parameters())
        return torch.zeros((), device=p.device, dtype=p.dtype)
    return total


# --------------------------------------------------------------------------- R2
def _param_key(layer_name: str) -> str:
    return layer_name.replace(".", "__")


class R2Loss(nn.Module):
    """R2 range-restriction loss over the weights of every quantized layer (pinned ones included).

    ``loss = CE + lambda * R2(model)``; ``kind`` selects the variant:

    * ``"linf"``: ``R2 = sum_l max|W_l|`` (no parameters).
    * ``"margin"``: ``R2 = sum_l ( sum_i relu(|W_l,i| - |M_l|)^2 + |M_l| )`` with one learnable
      scalar margin ``M_l`` per layer, initialised to ``init_margin`` when given, else to the
      layer's current ``max|W_l|`` (the restriction starts inactive and tightens as the ``|M_l|``
      term pulls the margin in).
    * ``"softminmax"``: ``R2 = sum_l ( smax_l - smin_l + eta * exp(-a_l) )`` with
      ``smax_l = sum_i w_i e^(a_l w_i) / sum_i e^(a_l w_i)`` (a softmax-weighted mean, computed
      with the numerically stable ``softmax``) and ``smin_l`` the same with ``-a_l``; one
      learnable temperature ``a_l`` per layer, initialised to ``init_temperature``, or, when it
      is ``None``, scale-aware to ``10 / std(W_l)`` (at ``a = 1`` and weights of scale 0.01 the
      soft extremes collapse to the mean and the term is a variance penalty of order 2 Var(W)).
      The ``eta * exp(-a_l)`` term pushes ``a_l`` up so the soft extremes approach the hard ones.

    The learnable parameters live in ``self.params`` (a ``ParameterDict`` keyed by the layer name
    with ``.`` replaced by ``__``): put ``r2.parameters()`` into the optimizer and save
    ``r2.state_dict()``. Their gradients depend only on the (replicated) weights, so they are the
    same on every DDP rank without an all-reduce.
    """

    def __init__(self, model: nn.Module, kind: str, eta: float = 0.01,
                 init_margin: Optional[float] = None,
                 init_temperature: Optional[float] = None) -> None:
        super().__init__()
        if kind not in R2_KINDS:
            raise ValueError(f"R2Loss: kind {kind!r} is not allowed; allowed: {list(R2_KINDS)}")
        self.kind = kind
        self.eta = float(eta)
        layers = quant_layers(model)
        if not layers:
            raise ValueError("R2Loss: the model has no quantized layer")
        self.layer_names: List[str] = list(layers)
        self.params = nn.ParameterDict()
        for name, layer in layers.items():
            w = layer.weight.detach()
            if kind == "margin":
                value = float(init_margin) if init_margin is not None else float(w.abs().max())
            elif kind == "softminmax":
                if init_temperature is not None:
                    value = float(init_temperature)
                else:
                    value = SCALE_AWARE_TEMPERATURE / max(float(w.float().std()), 1e-12)
            else:
                continue
            self.params[_param_key(name)] = nn.Parameter(
                torch.tensor(value, dtype=w.dtype, device=w.device))

    def forward(self, model: nn.Module) -> torch.Tensor:
        layers = quant_layers(model)
        missing = [n for n in self.layer_names if n not in layers]
        if missing:
            raise ValueError(f"R2Loss: layers {missing} are not in the model it was built for")
        total = None
        for name in self.layer_names:
            w = layers[name].weight
            if self.kind == "linf":
                term = w.abs().max()
            elif self.kind == "margin":
                m = self.params[_param_key(name)].abs()
                term = F.relu(w.abs() - m).pow(2).sum() + m
            else:
                a = self.params[_param_key(name)]
                flat = w.reshape(-1)
                smax = (flat * torch.softmax(a * flat, dim=0)).sum()
                smin = (flat * torch.softmax(-a * flat, dim=0)).sum()
                term = smax - smin + self.eta * torch.exp(-a)
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layers={len(self.layer_names)}" + (
            f", eta={self.eta}" if self.kind == "softminmax" else "")
