"""LSQ fake-quantizer with one learnable step size per candidate bit-width.

The weights (or activations) are shared by every bit-width; each bit-width ``b`` has its own step
size ``s_b``. Quantization follows LSQ (Esser et al., 2020):

    q(v; s, b) = round(clip(v / s, -Q_N, Q_P)) * s

    signed:   Q_N = 2^(b-1),  Q_P = 2^(b-1) - 1
    unsigned: Q_N = 0,        Q_P = 2^b - 1

with a straight-through estimator for ``round``. The gradients are

    dq/dv = 1 inside [-Q_N, Q_P], 0 outside
    dq/ds = round(v/s) - v/s inside, -Q_N below, Q_P above   (times the LSQ scale g = 1/sqrt(N*Q_P))

and are computed by one fused autograd function (:class:`LsqFakeQuantFn`) so the quantizer costs
one elementwise pass forward and one backward instead of a chain of autograd nodes.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

FLOAT_BITS = 32
STEP_INITS = ("mean_abs", "three_sigma")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)


LOW_PRECISION = (torch.bfloat16, torch.float16)   # dtypes the quantizer computes its codes above


def _needs_fp32(x: torch.Tensor, step: torch.Tensor) -> bool:
    """Whether the codes must be computed above the tensors' dtype: bf16 keeps 8 significant bits,
    so ``x / s`` in bf16 moves values across rounding boundaries and changes codes
    (tests/test_mixed_precision.py). Under autocast ``x`` arrives in bf16/fp16; in a model cast to
    bf16 the step is bf16 too. The quantizer then works in fp32 and returns ``x``'s dtype."""
    return x.dtype in LOW_PRECISION or step.dtype in LOW_PRECISION


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Return ``(Q_N, Q_P)``: the integer grid is ``[-Q_N, Q_P]``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quant(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Forward-only fake quantization ``round(clip(x / s, -Q_N, Q_P)) * s``.

    The one place the forward formula lives: the trainable quantizer and the exported fixed-precision
    model both call it, so the searched accuracy and the exported accuracy are computed the same way.
    (In-place ops after the division: one allocation instead of four.)
    """
    return (x / step).clamp_(-qn, qp).round_().mul_(step)


def integer_codes(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Integer codes ``round(clip(x / s, -Q_N, Q_P))`` (as a float tensor)."""
    return (x / step).clamp_(-qn, qp).round_()


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum(a * b)`` reduced to ``shape`` (the step size's shape: (1,) or (C, 1, ...))."""
    if len(shape) == 1 and shape[0] == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    c = shape[0]
    return torch.linalg.vecdot(a.reshape(c, -1), b.reshape(c, -1)).reshape(shape)


def _lsq_backward_2d(x: torch.Tensor, step: torch.Tensor, grad: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward on 2-D views ``x: (C, K)``, ``step: (C, 1)``; returns ``(grad_x, grad_step (C, 1))``.

    Written as plain elementwise math + one reduction so that ``torch.compile`` fuses it into a single
    pass (the "compiled" kernel); the eager kernel is :meth:`LsqFakeQuantFn.backward`."""
    v = x / step
    q = torch.clamp(v, lo, hi)
    grad_x = torch.where(q == v, grad, 0.0)
    grad_step = (grad * torch.round(q) - grad_x * v).sum(dim=1, keepdim=True)
    return grad_x, grad_step


def _lsq_forward_2d(x: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.clamp(x / step, lo, hi)) * step


_KERNEL = "eager"
_COMPILED: dict = {}
_BOUNDS: dict = {}


def set_kernel(kind: str) -> None:
    """Choose how the training-time quantizer runs: ``"eager"`` (default; PyTorch ops, fused into
    one autograd node) or ``"compiled"`` (``torch.compile`` fuses forward and backward into one
    pass each: about 5x faster on the weights of a ResNet-18, at a one-off compile cost of ~20 s).
    Evaluation always uses the eager :func:`fake_quant`, so searched and exported accuracies agree."""
    global _KERNEL
    if kind not in ("eager", "compiled"):
        raise ValueError(f"quant.kernel: {kind!r} is not allowed; allowed: ['eager', 'compiled']")
    _KERNEL = kind


def get_kernel() -> str:
    return _KERNEL


def _compiled(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        fn = torch.compile({"fwd": _lsq_forward_2d, "bwd": _lsq_backward_2d}[name], dynamic=True)
        _COMPILED[name] = fn
    return fn


def _bounds(qn: int, qp: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # Bounds as tensors, so the compiled graph is not specialised (and recompiled) per bit-width.
    key = (qn, qp, like.device, like.dtype)
    b = _BOUNDS.get(key)
    if b is None:
        b = (torch.tensor(-float(qn), device=like.device, dtype=like.dtype),
             torch.tensor(float(qp), device=like.device, dtype=like.dtype))
        _BOUNDS[key] = b
    return b


class LsqFakeQuantFn(torch.autograd.Function):
    """Fused LSQ fake-quant: straight-through rounding, LSQ step-size gradient.

    Only ``x`` and ``s`` are saved (``x`` is kept alive by the graph anyway); the backward recomputes
    ``v = x/s`` and uses ``dq/ds = round(clip(v)) - v * inside`` so that the step gradient is two dot
    products: ``sum(g * round(clip(v))) - sum(g_x * v)`` with ``g_x = g * inside`` (the STE input
    gradient, which is needed anyway).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float):
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        ctx.kernel = _KERNEL
        if _KERNEL == "compiled":
            c = step.numel()
            lo, hi = _bounds(qn, qp, x)
            return _compiled("fwd")(x.reshape(c, -1), step.reshape(c, 1), lo, hi).view(x.shape)
        return fake_quant(x, step, qn, qp)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, step = ctx.saved_tensors
        if ctx.kernel == "compiled":
            c = step.numel()
            lo, hi = _bounds(ctx.qn, ctx.qp, x)
            gx, gs = _compiled("bwd")(x.reshape(c, -1), step.reshape(c, 1), grad_out.reshape(c, -1), lo, hi)
            return gx.view(x.shape), gs.view(step.shape) * ctx.grad_scale, None, None, None
        v = x / step
        q = v.clamp(-ctx.qn, ctx.qp)
        grad_x = grad_out.masked_fill(q != v, 0.0)  # zero where v was clipped
        grad_step = None
        if ctx.needs_input_grad[1]:
            q.round_()
            grad_step = (_rowwise_dot(grad_out, q, step.shape)
                         - _rowwise_dot(grad_x, v, step.shape)) * ctx.grad_scale
        return grad_x, grad_step, None, None, None


class LsqFakeQuantTensorFn(torch.autograd.Function):
    """:class:`LsqFakeQuantFn` with the grid bounds and the gradient scale as tensors, so a graph
    traced by ``torch.compile`` is the same for every bit-width (:meth:`LsqQuantizer.forward_selected`).
    Forward ``round(clip(x / s, lo, hi)) * s``; backward: the STE input gradient and the LSQ step
    gradient ``sum(g * round(clip(v))) - sum(g_x * v)``, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                grad_scale: torch.Tensor):
        ctx.save_for_backward(x, step, lo, hi, grad_scale)
        return torch.round(torch.clamp(x / step, lo, hi)) * step

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, step, lo, hi, grad_scale = ctx.saved_tensors
        v = x / step
        q = torch.clamp(v, lo, hi)
        grad_x = torch.where(q == v, grad_out, 0.0)
        grad_step = None
        if ctx.needs_input_grad[1]:
            grad_step = (_rowwise_dot(grad_out, torch.round(q), step.shape)
                         - _rowwise_dot(grad_x, v, step.shape)) * grad_scale
        return grad_x, grad_step, None, None, None


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool,
                   grad_scale: float = 1.0) -> torch.Tensor:
    """Differentiable LSQ fake quantization of ``x`` at ``bits`` with step size ``step``."""
    qn, qp = qrange(bits, signed)
    return LsqFakeQuantFn.apply(x, step, qn, qp, grad_scale)


class LsqQuantizer(nn.Module):
    """Fake-quantizer for one tensor with a separate learnable LSQ step size per candidate bit-width.

    Args:
        bits: candidate bit-widths; ``32`` means "no quantization" and has no step size.
        signed: integer grid sign; ``None`` decides from the first tensor seen (unsigned when it has
            no negative value, i.e. after a ReLU). Weights are always signed.
        channels: number of output channels for per-channel step sizes (``1`` = per tensor).
        channel_dim_count: number of dims of the quantized tensor, for the step-size shape.
        use_grad_scale: multiply the step-size gradient by ``g = 1/sqrt(N * Q_P)`` (LSQ).
        per_sample: ``N`` counts the elements of one sample (activations) rather than the whole
            tensor (weights).
        init: step-size init of :meth:`init_from`: ``"mean_abs"`` (LSQ) or ``"three_sigma"`` (the
            one-shot paper's weight init).

    The flags ``initialized`` and ``signed`` are buffers (they are in every checkpoint) *and* Python
    bools ``_initialized`` / ``_signed`` that the forward reads: reading a device tensor on the host
    is a sync per quantizer per forward on a GPU and a graph break under ``torch.compile``. The
    methods here write both; :meth:`set_signed` is the public setter. A buffer written from outside
    (a state_dict load, ``initialized.fill_(False)`` before a re-calibration, the ``copy_`` of a model
    EMA) is noticed by its version counter, a host-side integer, and re-read once by the next eager
    forward; a compiled forward trusts the bools (torch.compile guards on them), so code that writes
    the buffers of a compiled model calls :meth:`sync_flags`.
    """

    def __init__(self, bits: Sequence[int], signed: Optional[bool] = True, channels: int = 1,
                 ndim: int = 1, use_grad_scale: bool = True, per_sample: bool = False,
                 init: str = "mean_abs") -> None:
        super().__init__()
        if init not in STEP_INITS:
            raise ValueError(f"w_init: {init!r} is not allowed; allowed: {list(STEP_INITS)}")
        self.init = init
        self.bits = tuple(sorted(set(int(b) for b in bits)))
        shape = (channels,) + (1,) * (ndim - 1) if channels > 1 else (1,)
        self.step = nn.ParameterDict(
            {str(b): nn.Parameter(torch.ones(shape)) for b in self.bits if b != FLOAT_BITS})
        self.register_buffer("signed", torch.tensor(True if signed is None else signed))
        self.register_buffer("initialized", torch.tensor(False))
        self._signed = True if signed is None else bool(signed)
        self._initialized = False
        self._seen = self._buffer_versions()
        self.auto_sign = signed is None
        self.use_grad_scale = use_grad_scale
        self.per_sample = per_sample
        self._init_selection()

    # ------------------------------------------------------------------ flags: buffers + Python mirrors
    def _buffer_versions(self) -> Optional[Tuple[int, ...]]:
        """Which buffer tensors, at which version (bumped by every in-place write): host-side
        integers, reading them is no sync. A tensor made under ``torch.inference_mode`` has no
        version counter: ``None`` never matches, so such buffers are re-read every time."""
        a, b = self.initialized, self.signed
        if a.is_inference() or b.is_inference():
            return None
        return id(a), a._version, id(b), b._version

    @torch.no_grad()
    def sync_flags(self) -> None:
        """Re-read ``_initialized`` / ``_signed`` from the buffers: a device-to-host copy each, so it
        runs only after the buffers were written from outside (never in the steady state)."""
        self._initialized = bool(self.initialized)
        self._signed = bool(self.signed)
        self._seen = self._buffer_versions()

    def _refresh(self) -> None:
        # Inside torch.compile the bools are guarded and the version counters of fake tensors mean
        # nothing, so the check runs in eager mode only.
        if not torch.compiler.is_compiling() and self._buffer_versions() != self._seen:
            self.sync_flags()

    @torch.no_grad()
    def _write_flags(self, initialized: Optional[bool] = None, signed: Optional[bool] = None) -> None:
        """Set flags in the buffer and the Python bool alike (``fill_`` with a Python value: no sync)."""
        self._refresh()  # first take in any outside write, which recording the versions would hide
        if initialized is not None:
            self.initialized.fill_(bool(initialized))
            self._initialized = bool(initialized)
        if signed is not None:
            self.signed.fill_(bool(signed))
            self._signed = bool(signed)
        self._seen = self._buffer_versions()

    def set_signed(self, signed: bool) -> None:
        """Use the signed (``True``) or unsigned grid from now on (the step sizes are left as they are)."""
        self._write_flags(signed=signed)

    def mark_uncalibrated(self) -> None:
        """Make the next forward initialise the step sizes (and, with ``auto_sign``, the sign) from its input."""
        self._write_flags(initialized=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_flags()  # the checkpoint's flags, also for a compiled forward

    # ------------------------------------------------------------------ step sizes
    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Step-size init for every bit-width ``b`` (per channel if the step is per channel):

        * ``mean_abs`` (LSQ): ``s_b = 2 * mean|x| / sqrt(Q_P)``
        * ``three_sigma`` (the one-shot paper's weights): ``s_b = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``
          with ``mu``, ``sigma`` the mean and standard deviation of ``x`` (of each channel).

        With ``auto_sign`` the grid becomes unsigned when ``x`` has no negative value: one sync (this
        runs once, on the first forward of an uncalibrated quantizer).
        """
        if self.auto_sign:
            self._write_flags(signed=bool((x < 0).any()))
        signed = self.is_signed()
        rows = x.flatten(1) if self.step_numel() > 1 else x.reshape(1, -1)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        if self.init == "three_sigma":
            # torch.std (Bessel-corrected) as the paper's code; a single value has spread |mu|
            mu = rows.mean(1)
            sigma = rows.std(1) if rows.shape[1] > 1 else torch.zeros_like(mu)
            spread = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs())
        else:
            mean_abs = rows.abs().mean(1)
        for key, step in self.step.items():
            b = int(key)
            if self.init == "three_sigma":
                value = spread / 2 ** (b - 1)
            else:
                value = 2 * mean_abs / math.sqrt(qrange(b, signed)[1])
            step.copy_(value.view_as(step).clamp_min(1e-8))
        self._write_flags(initialized=True)

    def step_for(self, bits: int) -> nn.Parameter:
        """The learnable step size of ``bits`` (a KeyError names the candidates otherwise)."""
        key = str(int(bits))
        if key not in self.step:
            raise KeyError(f"no step size for {bits} bits; candidates: {list(self.bits)}")
        return self.step[key]

    def step_sizes(self) -> Dict[int, nn.Parameter]:
        """``{bits: step size}`` of every quantized candidate (32-bit "float" has none)."""
        return {int(k): p for k, p in self.step.items()}

    @torch.no_grad()
    def set_step(self, bits: int, value: Union[float, torch.Tensor], initialized: bool = True) -> None:
        """Set the step size of ``bits`` (a scalar, or a tensor broadcast to its shape) and, with
        ``initialized``, mark the quantizer calibrated so its first forward keeps the value."""
        step = self.step_for(bits)
        if torch.is_tensor(value):
            step.copy_(value.detach().to(step.dtype).view_as(step) if value.numel() == step.numel()
                       else value.detach().to(step.dtype).expand_as(step))
        else:
            step.fill_(float(value))
        if initialized:
            self._write_flags(initialized=True)

    def step_numel(self) -> int:
        """Number of step-size entries per bit-width (1: per tensor, C: per channel)."""
        return next(iter(self.step.values())).numel() if len(self.step) else 1

    def is_signed(self) -> bool:
        """Whether the integer grid is signed (a Python bool: no sync)."""
        self._refresh()
        return self._signed

    def is_initialized(self) -> bool:
        """Whether the step sizes are calibrated (else the next forward initialises them)."""
        self._refresh()
        return self._initialized

    def grid(self, bits: int) -> tuple[int, int]:
        return qrange(bits, self.is_signed())

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FLOAT_BITS:
            return x
        if not self.is_initialized():
            self.init_from(x.detach())
        step = self.step[str(bits)]
        if _needs_fp32(x, step):
            return self._quantize(x.float(), step.float(), bits).to(x.dtype)
        return self._quantize(x, step, bits)

    # ------------------------------------------------------------------ bits as a tensor
    def _init_selection(self) -> None:
        """The bit-width chosen by :meth:`select` as a tensor (index into the quantized candidates),
        read by :meth:`forward_selected`; not saved in checkpoints."""
        self._qbits = tuple(b for b in self.bits if b != FLOAT_BITS)
        self.register_buffer("_bits_table", torch.tensor([float(b) for b in self._qbits] or [8.0]),
                             persistent=False)
        # a 1-element index for index_select: a 0-dim index tensor makes inductor read it on the
        # host (item(): a graph break and a sync)
        self.register_buffer("_selected", torch.tensor([max(len(self._qbits) - 1, 0)]), persistent=False)
        self._selected_float = bool(self.bits) and max(self.bits) == FLOAT_BITS

    def select(self, bits: int) -> None:
        """Choose the bit-width :meth:`forward_selected` runs at (``fill_`` with a Python value: a
        device write, no sync, and no new graph under ``torch.compile``)."""
        bits = int(bits)
        self._selected_float = bits == FLOAT_BITS
        if not self._selected_float:
            self._selected.fill_(self._qbits.index(bits))

    def forward_selected(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x, bits)`` at the bit-width of :meth:`select`, with the step size, the grid
        bounds and the gradient scale picked by a tensor index: one traced graph serves every
        bit-width, so a compiled supernet does not recompile when the configuration changes. All
        step sizes get a gradient (zeros for the unselected ones); the trainer drops the zeros of
        step sizes no subnet of the step used (:func:`mpq.supernet.drop_unused_step_grads`)."""
        if self._selected_float:
            return x
        if not self.is_initialized():
            self.init_from(x.detach())
        i = self._selected
        step = torch.stack([self.step[str(b)] for b in self._qbits]).index_select(0, i).squeeze(0)
        b = self._bits_table.index_select(0, i).squeeze(0)
        if self.is_signed():
            lo, hi = -torch.exp2(b - 1), torch.exp2(b - 1) - 1
        else:
            lo, hi = torch.zeros_like(b), torch.exp2(b) - 1
        dtype = x.dtype
        if _needs_fp32(x, step):
            x, step = x.float(), step.float()
        if not (torch.is_grad_enabled() and (x.requires_grad or step.requires_grad)):
            return (torch.round(torch.clamp(x / step, lo, hi)) * step).to(dtype)
        if self.use_grad_scale:
            n = x[0].numel() if self.per_sample else x.numel() // step.numel()
            g = torch.rsqrt(max(n, 1) * hi)
        else:
            g = torch.ones_like(hi)
        return LsqFakeQuantTensorFn.apply(x, step, lo, hi, g).to(dtype)

    def _quantize(self, x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
        qn, qp = self.grid(bits)
        if not (torch.is_grad_enabled() and (x.requires_grad or step.requires_grad)):
            return fake_quant(x, step, qn, qp)
        g = 1.0
        if self.use_grad_scale:
            n = x[0].numel() if self.per_sample else x.numel() // step.numel()
            g = 1.0 / math.sqrt(max(n, 1) * qp)
        return LsqFakeQuantFn.apply(x, step, qn, qp, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.is_signed()}, per_channel={self.step_numel() > 1}"


def check_bits(bits: Iterable[int], what: str) -> tuple[int, ...]:
    """Validate a candidate bit-width list; returns it sorted."""
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or b not in SUPPORTED_BITS:
            raise ValueError(f"{what}: bit-width {b!r} is not supported; allowed: {list(SUPPORTED_BITS)}")
        out.append(b)
    if not out:
        raise ValueError(f"{what}: the candidate bit-width list is empty")
    return tuple(sorted(set(out)))
