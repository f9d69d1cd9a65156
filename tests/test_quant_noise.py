"""Quant-Noise: p=0 leaves the float weights, p=1 is full quantization, blocks in between."""
import torch
import torch.nn.functional as F

import mpq
from mpq.quant_noise import quant_noise_mask, quant_noise_mix


def _layer():
    torch.manual_seed(0)
    conv = mpq.QuantConv2d(4, 6, 3, padding=1, w_bits=(2, 3), a_bits=(8,))
    conv.set_active(2, 8)
    conv.train()
    return conv


def _reference_weight_q(conv):
    # Independent LSQ weight fake-quant at 2 bits (signed grid -2..1), per-channel step.
    s = conv.w_quant.step["2"].detach()
    return torch.clamp(torch.round(conv.weight.detach() / s), -2, 1) * s


def test_p0_uses_the_float_weights_and_p1_the_quantized_ones():
    conv = _layer()
    x = torch.rand(2, 4, 5, 5)
    xq = conv.a_quant(x, 8).detach()
    for p, weight in ((0.0, conv.weight.detach()), (1.0, _reference_weight_q(conv))):
        conv.quant_noise_p = p
        expect = F.conv2d(xq, weight, conv.bias, padding=1)
        torch.testing.assert_close(conv(x).detach(), expect, rtol=1e-5, atol=1e-6)


def test_eval_mode_always_quantizes_fully():
    conv = _layer()
    conv.quant_noise_p = 0.0
    conv.eval()
    torch.testing.assert_close(conv.quantized_weight().detach(), _reference_weight_q(conv))


def test_partial_noise_quantizes_whole_blocks_and_keeps_float_gradients_elsewhere():
    torch.manual_seed(1)
    w = torch.randn(64, 32, requires_grad=True)
    wq = torch.round(w.detach() * 2) / 2
    gen = torch.Generator().manual_seed(0)
    mask = quant_noise_mask(w, 0.3, 8, generator=torch.Generator().manual_seed(0))
    out = quant_noise_mix(w, wq, 0.3, 8, generator=gen)
    blocks = mask.view(64, 4, 8)
    assert torch.equal(blocks.all(-1), blocks.any(-1))          # a block is all-or-nothing
    assert 0.2 < mask.float().mean().item() < 0.4               # about p of the blocks
    assert torch.equal(out.detach()[mask], wq[mask]) and torch.equal(out.detach()[~mask], w.detach()[~mask])
    out.sum().backward()
    assert torch.equal(w.grad[~mask], torch.ones_like(w.grad[~mask]))  # exact float gradient
    assert torch.equal(w.grad[mask], torch.zeros_like(w.grad[mask]))   # wq is a constant here
