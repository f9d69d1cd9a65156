"""Speed benchmark: every figure is a ratio of two timings taken in the same process, same threads.

    python benchmarks/speed.py [--out benchmarks/results/speed.json] [--kernel eager|compiled|both]
                               [--no-peers] [--repeats 15] [--warmup 3] [--threads N]

1. training step (forward + backward + SGD step, one batch) of the float model, the mpq supernet (one
   config: W4A4, first/last layer 8/8) with the eager and the compiled quantizer kernel, and the peers
   a user would pick instead, all on the same float weights (``--no-peers``: float and mpq only):
   a) a naive per-op LSQ module (plain torch ops, autograd backward), W4A4, first/last 8/8;
   b) PyTorch's LSQ ops ``torch._fake_quantize_learnable_per_{channel,tensor}_affine``, same bits;
   c) torch.ao.quantization eager QAT (``prepare_qat``, x86 default qconfig: 8-bit, conv+BN fused);
   d) Brevitas ``QuantConv2d``/``QuantLinear`` W4A4, first/last 8/8 (skipped when not installed);
   and, with the compiled kernel, ``mpq train.compile``: the whole supernet compiled (forward and
   backward, inductor) with bits as tensors, a new random configuration set in every timed step.
   torchvision ResNet-18 at 32x32 batch 64, the embedded default small_mobilenet and the previous
   default SmallCNN at 28x28 batch 256 (`--models` picks). The rows are timed in one process,
   round-robin (``--repeats`` rounds of one step per row, the starting row rotating), and each ratio
   is the median over rounds of (row / float in the same round). Each quantized row's forward is
   checked once before timing: finite, different from float's, and at most 2^b weight levels;
2. exported fixed-precision model inference vs the float model;
3. a full greedy search of a ResNet-18 supernet on a small calibration set: wall time and subnet
   forward passes, fast strategy vs naive greedy;
4. peak memory of supernet training vs float training: the peak RSS of a child process during three
   training steps (VmHWM reset after the first step), and the memory a step adds above the resident set;
5. ONNX: the QDQ ``model.onnx`` of uniform W4A4 (``search.onnx_export``) vs the float ONNX model of the
   same architecture (BatchNorm folded, every layer float): file bytes and onnxruntime CPU inference
   time (ORT_ENABLE_ALL), both sessions in this process.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mpq  # noqa: E402
from mpq.quantizer import get_kernel, set_kernel  # noqa: E402
from mpq.supernet import is_pinned, use_tensor_bits  # noqa: E402


def median_time(fn: Callable[[], None], warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return step


MODELS = ("resnet18", "small_mobilenet", "small_cnn")


def make_pair(name: str):
    """(float model, supernet of the same weights at W4A4 with first/last 8/8, input batch, labels)."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision
        float_net = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(64, 3, 32, 32)
    else:   # the embedded-default-sized models: small_mobilenet, small_cnn
        float_net = mpq.build_model(name, num_classes=10, in_channels=1)
        x = torch.randn(256, 1, 28, 28)
    y = torch.randint(0, 10, (x.shape[0],))
    return float_net, supernet_of(float_net, x), x, y


def supernet_of(float_net: nn.Module, x: torch.Tensor) -> nn.Module:
    """An mpq supernet of a copy of ``float_net`` (default candidates, keep_8bit first/last),
    activation steps calibrated on ``x``, at uniform W4A4 (the pinned first/last layers 8/8)."""
    supernet = mpq.quantize_model(copy.deepcopy(float_net))
    mpq.calibrate_activations(supernet, x)
    mpq.set_bits(supernet, mpq.uniform_config(supernet, 4, 4))
    return supernet


# ------------------------------------------------------------------------------- 1. training step
# One process, one batch, one thread setting for every row; the rows are timed round-robin (the
# starting row rotates each round) so that machine noise hits them alike, and each row's ratio to
# float is the median over rounds of (its step / float's step in the same round).
PINNED_BITS = 8          # first and last layer, as mpq.quantize_model's default keep_8bit=("first", "last")
LOW_BITS = 4             # every other layer: W4A4
TARGET_RATIO = 1.2       # the project's target for the mpq compiled step / the float step
MPQ_BITS = f"W{LOW_BITS}A{LOW_BITS}, first/last W{PINNED_BITS}A{PINNED_BITS}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_layers(net: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The Conv2d / Linear layers in registration order (the layers mpq.quantize_model converts)."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def bits_plan(names: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """``{layer: (w_bits, a_bits)}``: first and last layer 8/8, the others 4/4 (mpq's W4A4 config)."""
    pinned = {names[0], names[-1]}
    return {n: (PINNED_BITS, PINNED_BITS) if n in pinned else (LOW_BITS, LOW_BITS) for n in names}


def input_signs(float_net: nn.Module, x: torch.Tensor) -> Dict[str, bool]:
    """``{layer: its input has a negative value}`` on ``x`` (a training-mode forward of a copy): an
    unsigned activation grid after a ReLU, a signed one elsewhere, as mpq decides for its quantizers."""
    net = copy.deepcopy(float_net).train()
    signs: Dict[str, bool] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, inp, n=n: signs.__setitem__(n, bool((inp[0] < 0).any())))
             for n, m in weight_layers(net)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return signs


def _set_child(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, module)


def _qrange(bits: int, signed: bool) -> Tuple[int, int]:
    """``(Q_N, Q_P)``: the integer grid ``[-Q_N, Q_P]``."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _lsq_init(x: torch.Tensor, channels: int, qp: int) -> torch.Tensor:
    """LSQ's step-size init ``2 mean|x| / sqrt(Q_P)``, per output channel or per tensor."""
    rows = x.detach().flatten(1) if channels > 1 else x.detach().reshape(1, -1)
    return (2 * rows.abs().mean(1) / math.sqrt(qp)).clamp_min(1e-8)


class NaiveLsq(nn.Module):
    """Peer a): LSQ fake-quant as the paper's pseudo-code writes it (Esser et al., 2020), in plain
    torch ops that autograd differentiates: ``x / s``, clamp, round with the straight-through
    estimator ``(v.round() - v).detach() + v``, times ``s``; the step's gradient scaled by
    ``g = 1/sqrt(N Q_P)`` with ``(s - s g).detach() + s g``. Step init from the first batch seen."""

    def __init__(self, bits: int, signed: bool, channels: int = 1, ndim: int = 1,
                 per_sample: bool = False) -> None:
        super().__init__()
        self.qn, self.qp = _qrange(bits, signed)
        self.channels, self.per_sample = channels, per_sample
        self.step = nn.Parameter(torch.ones((channels,) + (1,) * (ndim - 1) if channels > 1 else (1,)))
        self.initialized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            with torch.no_grad():
                self.step.copy_(_lsq_init(x, self.channels, self.qp).view_as(self.step))
            self.initialized = True
        n = x[0].numel() if self.per_sample else x.numel() // self.step.numel()
        g = 1.0 / math.sqrt(n * self.qp)
        s = (self.step - self.step * g).detach() + self.step * g      # grad_scale(s, g)
        v = torch.clamp(x / s, -self.qn, self.qp)
        v = (v.round() - v).detach() + v                              # round_pass (STE)
        return v * s


class TorchLsq(nn.Module):
    """Peer b): PyTorch's own LSQ kernels, ``torch._fake_quantize_learnable_per_channel_affine``
    (weights, axis 0) and ``torch._fake_quantize_learnable_per_tensor_affine`` (activations): a
    learnable scale, a zero point fixed at 0 (symmetric grid, as LSQ), ``grad_factor = 1/sqrt(N Q_P)``."""

    def __init__(self, bits: int, signed: bool, channels: int = 1, per_sample: bool = False) -> None:
        super().__init__()
        self.qn, self.qp = _qrange(bits, signed)
        self.channels, self.per_sample = channels, per_sample
        self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels))
        self.initialized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            with torch.no_grad():
                self.scale.copy_(_lsq_init(x, self.channels, self.qp))
            self.initialized = True
        n = x[0].numel() if self.per_sample else x.numel() // self.scale.numel()
        g = 1.0 / math.sqrt(n * self.qp)
        if self.channels > 1:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, self.scale, self.zero_point, 0, -self.qn, self.qp, g)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale, self.zero_point, -self.qn, self.qp, g)


class QuantWrap(nn.Module):
    """A float Conv2d / Linear (its own weight and bias) with a weight and an input fake-quantizer."""

    def __init__(self, layer: nn.Module, w_quant: nn.Module, a_quant: nn.Module) -> None:
        super().__init__()
        self.layer, self.w_quant, self.a_quant = layer, w_quant, a_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.a_quant(x), self.w_quant(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


@dataclass
class Candidate:
    """One row of the training-step table: a model to train (``None`` when skipped)."""
    name: str
    bits: str
    notes: str
    net: Optional[nn.Module] = None
    kernel: Optional[str] = None                     # mpq quantizer kernel to set before each step
    probe: Optional[Callable[[], Tuple[torch.Tensor, int]]] = None   # a 4/8-bit layer's fake-quantized weight
    peer: bool = True
    skipped: str = ""
    before: Optional[Callable[[], None]] = None      # run inside the timed step, before it (set_bits)
    checks: Dict = field(default_factory=dict)


def _first_low_layer(net: nn.Module, names: Sequence[str], plan: Dict[str, Tuple[int, int]]) -> str:
    return next((n for n in names if plan[n][0] == LOW_BITS), names[0])


def build_lsq_peer(float_net: nn.Module, x: torch.Tensor, signs: Dict[str, bool], kind: str) -> Candidate:
    """Peers a) ``kind="naive"`` and b) ``kind="torch"``: every Conv2d/Linear of a copy of the float
    model wrapped with a per-channel weight and a per-tensor input LSQ quantizer, W4A4, first/last 8/8;
    step sizes initialised on ``x``."""
    net = copy.deepcopy(float_net)
    layers = weight_layers(net)
    names = [n for n, _ in layers]
    plan = bits_plan(names)
    for name, layer in layers:
        wb, ab = plan[name]
        c = layer.weight.shape[0]
        if kind == "naive":
            wq, aq = NaiveLsq(wb, True, c, layer.weight.dim()), NaiveLsq(ab, signs[name], per_sample=True)
        else:
            wq, aq = TorchLsq(wb, True, c), TorchLsq(ab, signs[name], per_sample=True)
        _set_child(net, name, QuantWrap(layer, wq, aq))
    net.train()
    with torch.no_grad():
        net(x)   # initialises every step size (training-mode forward: BN on batch statistics)
    probe_name = _first_low_layer(net, names, plan)
    wrap = net.get_submodule(probe_name)
    if kind == "naive":
        return Candidate("naive LSQ (plain torch ops)", MPQ_BITS,
                         "x/s, clamp, round STE, *s, grad-scaled step; autograd backward; per-channel "
                         "weight step, per-tensor input step", net=net,
                         probe=lambda: (wrap.w_quant(wrap.layer.weight), plan[probe_name][0]))
    return Candidate("torch LSQ ops (_fake_quantize_learnable_*)", MPQ_BITS,
                     "torch._fake_quantize_learnable_per_channel_affine (weights, axis 0), "
                     "_per_tensor_affine (inputs), zero point 0, grad_factor 1/sqrt(N Q_P)", net=net,
                     probe=lambda: (wrap.w_quant(wrap.layer.weight), plan[probe_name][0]))


def _fuse_sequentials(net: nn.Module) -> None:
    """Fuse Conv2d -> BatchNorm2d (-> ReLU) runs among the children of every nn.Sequential (the order
    a Sequential runs them in) for eager-mode QAT."""
    from torch.ao.quantization import fuse_modules_qat
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq.named_children())
        groups, i = [], 0
        while i < len(kids):
            if (i + 1 < len(kids) and isinstance(kids[i][1], nn.Conv2d)
                    and isinstance(kids[i + 1][1], nn.BatchNorm2d)):
                n = 3 if i + 2 < len(kids) and isinstance(kids[i + 2][1], nn.ReLU) else 2
                groups.append([kids[j][0] for j in range(i, i + n)])
                i += n
            else:
                i += 1
        if groups:
            fuse_modules_qat(seq, groups, inplace=True)


def build_qat_peer(float_net: nn.Module, x: torch.Tensor) -> Candidate:
    """Peer c): torch.ao.quantization eager-mode QAT, ``prepare_qat`` with the x86 default QAT qconfig
    (8-bit per-channel symmetric weights, 8-bit affine activations with reduce_range, fused moving-
    average min/max observer + fake-quant), on the float weights. A torchvision ResNet of basic blocks
    becomes torchvision's QuantizableResNet (QuantStub/DeQuantStub, FloatFunctional add_relu) with its
    ``fuse_model(is_qat=True)``; other models get QuantStub/DeQuantStub around them and their
    Conv2d-BN(-ReLU) runs inside nn.Sequential fused."""
    import warnings
    import torchvision
    from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qat_qconfig, prepare_qat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.ao.quantization's deprecation notices
        if (isinstance(float_net, torchvision.models.ResNet)
                and isinstance(float_net.layer1[0], torchvision.models.resnet.BasicBlock)):
            from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableResNet
            net = QuantizableResNet(QuantizableBasicBlock,
                                    [len(getattr(float_net, f"layer{i}")) for i in range(1, 5)],
                                    num_classes=float_net.fc.out_features)
            net.load_state_dict(float_net.state_dict())
            net.train()
            net.fuse_model(is_qat=True)
            how = "torchvision QuantizableResNet, fuse_model(is_qat=True)"
        else:
            inner = copy.deepcopy(float_net).train()
            _fuse_sequentials(inner)
            net = nn.Sequential(QuantStub(), inner, DeQuantStub()).train()
            how = "QuantStub/DeQuantStub wrapper, Conv-BN(-ReLU) in Sequentials fused"
        net.qconfig = get_default_qat_qconfig("x86")
        prepare_qat(net, inplace=True)
    fq = [m for m in net.modules() if hasattr(m, "weight_fake_quant")]
    if not fq:
        raise RuntimeError("prepare_qat made no QAT layer")
    probe_layer = fq[min(1, len(fq) - 1)]
    n_float = len(weight_layers(float_net))
    if len(fq) != n_float:
        raise RuntimeError(f"prepare_qat made {len(fq)} QAT layers of {n_float} Conv2d/Linear")
    with torch.no_grad():
        net(x)   # observers see one batch before timing, like the other rows' calibration
    return Candidate("torch.ao QAT (prepare_qat, x86 qconfig)", "W8A8 (x86 default: activations reduce_range)",
                     f"eager-mode QAT, {how}; per-channel weight / per-tensor activation fake-quant with "
                     f"moving-average min/max observers (not learned steps)", net=net,
                     probe=lambda: (probe_layer.weight_fake_quant(probe_layer.weight), 8))


def build_brevitas_peer(float_net: nn.Module, x: torch.Tensor, signs: Dict[str, bool]) -> Candidate:
    """Peer d): Brevitas. Every Conv2d/Linear of a copy of the float model becomes
    ``brevitas.nn.QuantConv2d`` / ``QuantLinear`` with the float weights copied, weight_quant
    ``Int8WeightPerChannelFloat`` (per-channel scale from the weights' max |w|, narrow range) at
    ``weight_bit_width`` 4 and input_quant ``Int8ActPerTensorFloat`` (``Uint8ActPerTensorFloat``
    after a ReLU; learned per-tensor scale) at ``input_bit_width`` 4, first/last 8/8; the activation
    scales are initialised on ``x`` with ``brevitas.graph.calibrate.calibration_mode``."""
    name = "Brevitas QuantConv2d/QuantLinear"
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # optional-kernel notices printed at import
            import brevitas.nn as qnn
            from brevitas.graph.calibrate import calibration_mode
            from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
    except ImportError as e:
        return Candidate(name, MPQ_BITS, "", skipped=f"brevitas not installed ({e.__class__.__name__}); "
                                                    "pip install brevitas")
    net = copy.deepcopy(float_net)
    layers = weight_layers(net)
    names = [n for n, _ in layers]
    plan = bits_plan(names)
    for lname, layer in layers:
        wb, ab = plan[lname]
        kw = dict(bias=layer.bias is not None, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=wb,
                  input_quant=Int8ActPerTensorFloat if signs[lname] else Uint8ActPerTensorFloat,
                  input_bit_width=ab)
        if isinstance(layer, nn.Conv2d):
            q = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                                padding_mode=layer.padding_mode, **kw)
        else:
            q = qnn.QuantLinear(layer.in_features, layer.out_features, **kw)
        with torch.no_grad():
            q.weight.copy_(layer.weight)
            if layer.bias is not None:
                q.bias.copy_(layer.bias)
        _set_child(net, lname, q)
    net.train()
    with torch.no_grad(), calibration_mode(net):
        net(x)
    net.train()
    probe_name = _first_low_layer(net, names, plan)
    probe_layer = net.get_submodule(probe_name)

    def probe() -> Tuple[torch.Tensor, int]:
        qt = probe_layer.quant_weight()
        return getattr(qt, "value", qt), plan[probe_name][0]
    return Candidate(name, MPQ_BITS, "Int8WeightPerChannelFloat (max-|w| per-channel scale) and "
                     "Int8/Uint8ActPerTensorFloat (learned scale, calibration_mode init) at bit width 4 "
                     "(8 first/last)", net=net, probe=probe)


def mpq_candidate(supernet: nn.Module, kernel: str) -> Candidate:
    net = copy.deepcopy(supernet)
    layer = next(m for m in mpq.quant_layers(net).values() if m.w_bits == LOW_BITS)
    return Candidate(f"mpq {kernel}", MPQ_BITS + " (quantize_model + uniform_config(4, 4))",
                     f"mpq supernet, one config active, set_kernel({kernel!r})", net=net, kernel=kernel,
                     peer=False, probe=lambda: (layer.w_quant(layer.weight, layer.w_bits), layer.w_bits))


def mpq_compiled_model_candidate(supernet: nn.Module, seed: int = 0) -> Candidate:
    """``train.compile``: the whole supernet under ``torch.compile`` (forward and backward, inductor)
    with its bit-widths read from tensors (:func:`mpq.supernet.use_tensor_bits`), a new random
    configuration set before every step (inside the timing), as the sandwich changes it per subnet."""
    import random
    net = copy.deepcopy(supernet)
    use_tensor_bits(net)
    layers = mpq.quant_layers(net)
    rng = random.Random(seed)

    def new_config() -> None:
        mpq.set_bits(net, {n: (rng.choice(m.w_candidates), rng.choice(m.a_candidates)) if not is_pinned(m)
                           else (m.w_bits, m.a_bits) for n, m in layers.items()})
    layer = next(m for m in layers.values() if not is_pinned(m))
    return Candidate("mpq train.compile", "random config per step (pinned first/last 8/8)",
                     "whole model compiled, bits as tensors (no recompile per config)",
                     net=torch.compile(net), kernel="eager", peer=False, before=new_config,
                     probe=lambda: (layer.w_quant(layer.weight, layer.w_bits), layer.w_bits))


def build_candidates(float_net: nn.Module, supernet: nn.Module, x: torch.Tensor, kernels: Sequence[str],
                     peers: bool = True) -> List[Candidate]:
    """float, mpq per kernel, and (``peers``) the four peers, each on its own copy of the weights.
    A peer that cannot be built is returned skipped, with the reason."""
    cands = [Candidate("float", "fp32", "the float model (reference)", net=float_net, peer=False)]
    cands += [mpq_candidate(supernet, k) for k in kernels]
    if "compiled" in kernels:
        cands.append(mpq_compiled_model_candidate(supernet))
    if not peers:
        return cands
    signs = input_signs(float_net, x)
    builders = [("naive LSQ (plain torch ops)", lambda: build_lsq_peer(float_net, x, signs, "naive")),
                ("torch LSQ ops (_fake_quantize_learnable_*)", lambda: build_lsq_peer(float_net, x, signs, "torch")),
                ("torch.ao QAT (prepare_qat, x86 qconfig)", lambda: build_qat_peer(float_net, x)),
                ("Brevitas QuantConv2d/QuantLinear", lambda: build_brevitas_peer(float_net, x, signs))]
    for name, build in builders:
        torch.manual_seed(0)
        try:
            cands.append(build())
        except Exception as e:  # noqa: BLE001 - a peer that fails to build is a skipped row, with why
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            cands.append(Candidate(name, "", "", skipped=f"{type(e).__name__}: {msg}"[:200]))
    return cands


def check_candidates(cands: Sequence[Candidate], x: torch.Tensor) -> None:
    """Once before timing: every quantized row's training-mode forward on ``x`` is finite and differs
    from float's (it quantizes), and one of its 4-bit (8-bit for QAT) layers' fake-quantized weight
    has at most 2^bits distinct values in its first output channel. Raises AssertionError otherwise."""
    def forward(net: nn.Module) -> torch.Tensor:
        torch.manual_seed(0)
        net.train()
        with torch.no_grad():
            return net(x).float()
    live = [c for c in cands if not c.skipped]
    prev = get_kernel()
    set_kernel("eager")
    try:
        ref = forward(live[0].net)
        for c in live[1:]:
            out = forward(c.net)
            assert out.shape == ref.shape, f"{c.name}: output shape {tuple(out.shape)} != {tuple(ref.shape)}"
            assert bool(torch.isfinite(out).all()), f"{c.name}: non-finite output"
            rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            assert rel > 1e-4, f"{c.name}: output equals the float model's (rel. diff {rel:.2e}): not quantizing"
            with torch.no_grad():
                w, bits = c.probe()
            levels = int(torch.unique(w.detach().reshape(w.shape[0], -1)[0]).numel())
            assert 1 < levels <= 2 ** bits, f"{c.name}: {levels} weight levels at {bits} bits"
            c.checks = {"out_rel_diff_vs_float": rel, "weight_levels": levels, "weight_levels_max": 2 ** bits}
    finally:
        set_kernel(prev)


def interleaved_times(cands: Sequence[Candidate], x: torch.Tensor, y: torch.Tensor, warmup: int,
                      repeats: int) -> Dict[str, List[float]]:
    """``{row: [seconds per training step, one per round]}``: ``warmup`` untimed steps per row (the
    compiled kernel compiles there), then ``repeats`` rounds of one timed step per row, round-robin,
    the first row rotating each round."""
    steps = {c.name: train_step_fn(c.net, x, y) for c in cands}
    prev = get_kernel()

    def run(c: Candidate) -> float:
        if c.kernel is not None:
            set_kernel(c.kernel)
        t = time.perf_counter()
        if c.before is not None:
            c.before()
        steps[c.name]()
        return time.perf_counter() - t
    times: Dict[str, List[float]] = {c.name: [] for c in cands}
    try:
        for c in cands:
            for _ in range(warmup):
                run(c)
        for r in range(repeats):
            k = r % len(cands)
            for c in list(cands[k:]) + list(cands[:k]):
                times[c.name].append(run(c))
    finally:
        set_kernel(prev)
    return times


def _quartiles(v: Sequence[float]) -> Tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def train_rows(model: str, x: torch.Tensor, cands: Sequence[Candidate],
               times: Dict[str, List[float]]) -> List[Dict]:
    """One row per candidate: median step (ms), median per-round ratio to float (and its quartiles),
    <= 1.2x, median per-round (mpq compiled / this row), and whether mpq compiled beat every peer."""
    tf = times["float"]
    comp = times.get("mpq compiled")
    ran_peers = [c for c in cands if c.peer and not c.skipped]
    rows = []
    for c in cands:
        row = {"model": model, "input": "x".join(map(str, x.shape)), "row": c.name, "bits": c.bits}
        if c.skipped:
            row.update({"status": "skipped: " + c.skipped})
            rows.append(row)
            continue
        t = times[c.name]
        ratios = [a / b for a, b in zip(t, tf)]
        q1, q3 = _quartiles(ratios)
        ratio = statistics.median(ratios)
        row.update({"step_ms": statistics.median(t) * 1e3, "ratio": ratio, "ratio_q1": q1, "ratio_q3": q3,
                    "le_1.2x": ratio <= TARGET_RATIO})
        if comp is not None:
            row["compiled_over_row"] = statistics.median([a / b for a, b in zip(comp, t)])
        row.update({"rounds": len(t), "status": "ok", "notes": c.notes, **c.checks})
        rows.append(row)
    if comp is not None and ran_peers:
        comp_row = next(r for r in rows if r["row"] == "mpq compiled")
        comp_row["faster_than_every_peer"] = all(r["compiled_over_row"] < 1.0 for r in rows
                                                 if r["row"] in {c.name for c in ran_peers})
    return rows


def bench_train_step(kernels: List[str], models: Sequence[str], peers: bool = True, repeats: int = 15,
                     warmup: int = 3) -> List[Dict]:
    rows = []
    for name in models:
        float_net, supernet, x, y = make_pair(name)
        cands = build_candidates(float_net, supernet, x, kernels, peers)
        check_candidates(cands, x)
        live = [c for c in cands if not c.skipped]
        times = interleaved_times(live, x, y, warmup, repeats)
        rows += train_rows(name, x, cands, times)
    return rows


def print_train_table(rows: List[Dict]) -> None:
    print("\n## 1. training step (forward + backward + SGD), interleaved; ratio = median over rounds of "
          "row / float")
    if not rows:
        return
    yn = {True: "yes", False: "no", None: ""}
    print("| model | row | bits | step ms | / float (q1-q3) | <= 1.2x | mpq compiled / row | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_ms" not in r:
            print(f"| {r['model']} | {r['row']} | {r['bits']} | | | | | {r['status']} |")
            continue
        co = r.get("compiled_over_row")
        status = r["status"]
        if "faster_than_every_peer" in r:
            status += "; faster than every peer: " + yn[r["faster_than_every_peer"]]
        print(f"| {r['model']} | {r['row']} | {r['bits']} | {r['step_ms']:.1f} | {r['ratio']:.2f} "
              f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | {yn[r['le_1.2x']]} | "
              f"{'' if co is None else f'{co:.2f}'} | {status} |")


def bench_export(models: Sequence[str]) -> List[Dict]:
    import tempfile
    from mpq.export import export, load_fixed
    rows = []
    for name in models:
        float_net, supernet, x, _ = make_pair(name)
        float_net.eval()
        supernet.eval()
        spec = {"model": {"name": name, "num_classes": 10, "in_channels": int(x.shape[1])},
                "input_size": [1, *x.shape[1:]]}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fixed.pt")
            export(supernet, mpq.get_bits(supernet), path, spec=spec)
            fixed = load_fixed(path).eval()
        with torch.inference_mode():
            tf1 = median_time(lambda: float_net(x))
            tx = median_time(lambda: fixed(x))
            ts = median_time(lambda: supernet(x))
            tf2 = median_time(lambda: float_net(x))
        tf = min(tf1, tf2)
        rows.append({"model": name, "batch": int(x.shape[0]), "float_ms": tf * 1e3, "fixed_ms": tx * 1e3,
                     "supernet_eval_ms": ts * 1e3, "ratio": tx / tf})
    return rows


def bench_onnx(models: Sequence[str]) -> List[Dict]:
    import numpy as np
    import onnxruntime as ort
    from mpq.export import fixed_model
    from search.onnx_export import build_onnx
    rows = []
    for name in models:
        float_net, supernet, x, _ = make_pair(name)
        supernet.eval()
        qdq, _ = build_onnx(fixed_model(supernet, mpq.uniform_config(supernet, 4, 4)), list(x.shape[1:]))
        # the float reference: the same architecture with every layer at 32 bits (BN folded as well)
        flt = mpq.quantize_model(copy.deepcopy(float_net), w_bits=(32,), a_bits=(32,), keep_8bit=())
        flt.eval()
        fproto, _ = build_onnx(fixed_model(flt), list(x.shape[1:]))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        sq = ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sf = ort.InferenceSession(fproto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy().astype(np.float32)}
        tf1 = median_time(lambda: sf.run(None, feed))
        tq = median_time(lambda: sq.run(None, feed))
        tf2 = median_time(lambda: sf.run(None, feed))
        tf = min(tf1, tf2)
        qb, fb = len(qdq.SerializeToString()), len(fproto.SerializeToString())
        rows.append({"model": name, "batch": int(x.shape[0]), "qdq_bytes": qb, "float_bytes": fb,
                     "bytes_ratio": qb / fb, "ort_float_ms": tf * 1e3, "ort_qdq_ms": tq * 1e3,
                     "ort_ratio": tq / tf})
    return rows


def bench_search(calib_batches: int = 2, batch_size: int = 16) -> List[Dict]:
    """Greedy search of a ResNet-18 supernet (10 classes, 32x32 inputs, BitOPs at 224x224) down to
    the uniform W3A3 BitOPs on a small random calibration set: fast strategy vs naive greedy."""
    import torchvision
    from search.evaluator import Evaluator
    from search.greedy import CostModel, search_supernet
    torch.manual_seed(0)
    net = mpq.quantize_model(torchvision.models.resnet18(num_classes=10))
    n = calib_batches * batch_size
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    mpq.calibrate_activations(net, x[:batch_size])
    net.eval()
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
    cost = CostModel(net, (1, 3, 224, 224))
    budget = cost.bitops(mpq.uniform_config(net, 3, 3))
    rows = []
    for strategy in ("naive", "fast"):
        ev = Evaluator(net, batches, batches, batch_size=batch_size, bn_batches=calib_batches)
        t = time.perf_counter()
        res = search_supernet(net, ev, cost, max_bitops=budget, strategy=strategy)
        wall = time.perf_counter() - t
        final = res.final
        rows.append({"strategy": strategy, "budget_G": budget / 1e9, "steps": len(res.path) - 1,
                     "forward_passes": ev.counter.forwards, "wall_s": wall,
                     "final_bitops_G": final.bitops / 1e9, "final_calib_loss": float(final.result["loss"])})
    rows[1]["passes_vs_naive"] = rows[1]["forward_passes"] / rows[0]["forward_passes"]
    rows[0]["passes_vs_naive"] = 1.0
    return rows


CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.speed import make_pair, train_step_fn

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))  # KiB

float_net, supernet, x, y = make_pair({name!r})
net = supernet if {quant!r} else float_net
del float_net, supernet
step = train_step_fn(net, x, y)
step()  # first step allocates gradients and optimizer state
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
for _ in range(3):
    step()
print(base, status("VmHWM"))
"""


def bench_memory(models: Sequence[str]) -> List[Dict]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for name in models:
        peak = {}
        for quant in (False, True):
            code = CHILD.format(root=root, name=name, quant=quant)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            base, high = map(int, out.stdout.strip().splitlines()[-1].split())
            peak[quant] = (base / 1024.0, high / 1024.0)  # KiB -> MiB
        rows.append({"model": name, "float_rss_mib": peak[False][0], "float_peak_mib": peak[False][1],
                     "supernet_rss_mib": peak[True][0], "supernet_peak_mib": peak[True][1],
                     "step_memory_ratio": (peak[True][1] - peak[True][0] + 1e-9) / (peak[False][1] - peak[False][0] + 1e-9),
                     "peak_ratio": peak[True][1] / peak[False][1]})
    return rows


def print_table(title: str, rows: List[Dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r.get(k):.3f}" if isinstance(r.get(k), float) else str(r.get(k))
                                for k in keys) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    ap.add_argument("--kernel", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: train,export,search,memory,onnx")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="models of the train/export/memory sections (comma list of " + ", ".join(MODELS) + ")")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="train section: also time the peers (naive LSQ, torch LSQ ops, torch.ao QAT, "
                         "Brevitas) beside float and mpq (default: on; --no-peers: float and mpq only)")
    ap.add_argument("--repeats", type=int, default=15,
                    help="train section: interleaved rounds (one timed step per row each) (default 15)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="train section: untimed steps per row before the rounds (default 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"torch intra-op threads of this process (default: torch's, here {torch.get_num_threads()})")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models: expected a comma list of {', '.join(MODELS)}, got {args.models!r}")
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        ap.error("--repeats and --threads must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = ["eager", "compiled"] if args.kernel == "both" else [args.kernel]
    machine = {"cpu_model": cpu_model(), "platform": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    for mod in ("torchvision", "brevitas"):
        try:
            machine[mod] = __import__(mod).__version__
        except ImportError:
            machine[mod] = None
    result = {"machine": machine}
    print(f"machine: {machine['cpu_model']}, {machine['cpus']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), torchvision {machine['torchvision']}, "
          f"brevitas {machine['brevitas'] or 'not installed'}")
    sections = [("train", "1. training step: supernet / float",
                 lambda: bench_train_step(kernels, models, args.peers, args.repeats, args.warmup)),
                ("export", "2. inference: exported fixed-precision / float", lambda: bench_export(models)),
                ("search", "3. greedy search on ResNet-18", bench_search),
                ("memory", "4. peak memory of training: supernet / float", lambda: bench_memory(models)),
                ("onnx", "5. ONNX (onnxruntime): QDQ W4A4 / float", lambda: bench_onnx(models))]
    for key, title, fn in sections:
        if key in skip:
            continue
        rows = fn()
        result[key] = rows
        if key == "train":
            print_train_table(rows)
        else:
            print_table(title, rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
