"""LSQ fake-quantizer against an independent NumPy reference of the formula and its gradients."""
import math

import numpy as np
import pytest
import torch

import mpq
from mpq.quantizer import LsqQuantizer, lsq_fake_quant

BITS = [2, 3, 4, 5, 6, 8]


def reference_grid(bits, signed):
    # Written out independently of mpq.qrange.
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def reference_fake_quant(x, s, bits, signed):
    qn, qp = reference_grid(bits, signed)
    return np.clip(np.rint(x / s), -qn, qp) * s


def reference_grads(x, s, bits, signed, upstream, g):
    """LSQ: dq/dx = 1 inside the grid; dq/ds = round(v)-v inside, -Q_N below, Q_P above, times g."""
    qn, qp = reference_grid(bits, signed)
    v = x / s
    gx = upstream * ((v >= -qn) & (v <= qp))
    ds = np.where(v < -qn, -qn, np.where(v > qp, qp, np.rint(v) - v))
    return gx, upstream * ds * g


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_and_grads_match_reference(bits, signed, per_channel):
    gen = torch.Generator().manual_seed(bits * 10 + signed * 2 + per_channel)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2
    if not signed:
        x = x.abs()
    step_shape = (4, 1, 1, 1) if per_channel else (1,)
    s = (torch.rand(step_shape, generator=gen, dtype=torch.float64) * 0.3 + 0.05)
    up = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    g = 0.37
    xt, st = x.clone().requires_grad_(), s.clone().requires_grad_()
    out = lsq_fake_quant(xt, st, bits, signed, grad_scale=g)
    out.backward(up)
    xn, sn, un = x.numpy(), s.numpy(), up.numpy()
    np.testing.assert_allclose(out.detach().numpy(), reference_fake_quant(xn, sn, bits, signed), rtol=0, atol=1e-12)
    gx, gs_elem = reference_grads(xn, sn, bits, signed, un, g)
    np.testing.assert_allclose(xt.grad.numpy(), gx, atol=1e-12)
    gs = gs_elem.sum(axis=(1, 2, 3), keepdims=True) if per_channel else np.array([gs_elem.sum()])
    np.testing.assert_allclose(st.grad.numpy(), gs, rtol=1e-9, atol=1e-12)


def test_values_land_on_the_grid_and_clip():
    x = torch.tensor([-10.0, -0.26, 0.0, 0.24, 0.26, 10.0])
    out = lsq_fake_quant(x, torch.tensor([0.5]), 3, True)  # grid -4..3 times 0.5
    assert out.tolist() == [-2.0, -0.5, 0.0, 0.0, 0.5, 1.5]
    out = lsq_fake_quant(x.abs(), torch.tensor([0.5]), 2, False)  # grid 0..3
    assert out.tolist() == [1.5, 0.5, 0.0, 0.0, 0.5, 1.5]


def test_only_the_active_bitwidth_step_gets_gradient():
    torch.manual_seed(0)
    q = LsqQuantizer((2, 3, 4), signed=True)
    w = torch.randn(8, 4, requires_grad=True)
    q.init_from(w.detach())
    q(w, 3).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert q.step["3"].grad is not None and q.step["3"].grad.abs().sum() > 0
    assert q.step["2"].grad is None and q.step["4"].grad is None


def test_lsq_step_init_formula_and_float_passthrough():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    q = LsqQuantizer((2, 4, 32), signed=True, channels=6, ndim=4)
    q.init_from(w)
    for b in (2, 4):
        qp = 2 ** (b - 1) - 1
        expect = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(qp)
        torch.testing.assert_close(q.step[str(b)].detach().flatten(), expect)
    assert "32" not in q.step
    assert torch.equal(q(w, 32), w)


def test_activation_sign_is_detected_from_first_batch():
    q_relu = LsqQuantizer((4,), signed=None)
    q_relu(torch.rand(2, 5), 4)
    assert not bool(q_relu.signed)
    q_any = LsqQuantizer((4,), signed=None)
    q_any(torch.randn(2, 5), 4)
    assert bool(q_any.signed)


def test_quant_layer_weight_gradient_flows_through_ste():
    torch.manual_seed(0)
    conv = mpq.QuantConv2d(3, 4, 3, w_bits=(2, 4), a_bits=(2, 4))
    conv.set_active(2, 4)
    x = torch.randn(2, 3, 6, 6)
    conv(x).square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0
    assert conv.w_quant.step["2"].grad is not None and conv.w_quant.step["4"].grad is None
    assert conv.a_quant.step["4"].grad is not None and conv.a_quant.step["2"].grad is None


def test_compiled_kernel_matches_eager():
    from mpq.quantizer import get_kernel, set_kernel
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    up = torch.randn_like(x)
    results = {}
    try:
        for kernel in ("eager", "compiled"):
            set_kernel(kernel)
            for shape in [(1,), (6, 1, 1, 1)]:
                xt = x.clone().requires_grad_()
                st = torch.full(shape, 0.3).requires_grad_()
                out = lsq_fake_quant(xt, st, 3, True, grad_scale=0.5)
                out.backward(up)
                results[kernel, shape] = (out.detach(), xt.grad, st.grad)
    finally:
        set_kernel("eager")
    assert get_kernel() == "eager"
    for shape in [(1,), (6, 1, 1, 1)]:
        for e, c in zip(results["eager", shape], results["compiled", shape]):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quant.kernel"):
        set_kernel("fast")


def test_step_api_reads_and_sets_one_bit_width():
    """step_for / set_step / step_sizes are the quantizer's step-size API (no reaching into the dict):
    setting the 3-bit step changes only it, marks the quantizer initialised (so the first forward
    keeps it) and the forward then uses it: x = 0.26 at step 0.1 -> 0.3."""
    q = LsqQuantizer([2, 3, 32], signed=True)
    assert sorted(q.step_sizes()) == [2, 3]
    before2 = q.step_for(2).detach().clone()
    q.set_step(3, 0.1)
    assert float(q.step_for(3).detach()) == pytest.approx(0.1)
    assert torch.equal(q.step_for(2).detach(), before2)
    out = q(torch.tensor([0.26]), 3)
    assert float(out.detach()) == pytest.approx(0.3)
    with pytest.raises(KeyError, match="candidates"):
        q.step_for(4)
    per_channel = LsqQuantizer([4], signed=True, channels=3, ndim=4)
    per_channel.set_step(4, torch.tensor([0.1, 0.2, 0.3]))
    assert per_channel.step_for(4).detach().flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
