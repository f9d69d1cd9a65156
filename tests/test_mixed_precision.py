"""Mixed precision on CPU: the quantizer's codes stay those of fp32 arithmetic when its input or
its step sizes are bf16, and a bf16-autocast training step of a quantized supernet is finite and
close to the fp32 one at 8 bits."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.checkpoint import build_supernet
from mpq.quantizer import LsqQuantizer, qrange


def _reference_codes(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """round(clip(x / s, -Q_N, Q_P)) in float64: the formula, independently of the quantizer."""
    qn, qp = qrange(bits, signed)
    return torch.clamp(x.double() / step.double(), -qn, qp).round()


@pytest.mark.parametrize("where", ["autocast", "bf16 model"])
def test_codes_are_computed_in_fp32_when_input_or_step_is_bf16(where):
    torch.manual_seed(0)
    q = LsqQuantizer([4, 8], signed=None)
    x32 = (torch.randn(64, 512) * 2.0).relu()
    q(x32, 8)   # initialises the step sizes (unsigned: no negative input)
    if where == "bf16 model":
        q = copy.deepcopy(q).bfloat16()
    x = x32.bfloat16()
    for bits in (4, 8):
        step = q.step_for(bits).detach()
        if where == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = q(x, bits)
        else:
            y = q(x, bits)
        assert y.dtype == torch.bfloat16
        expected = _reference_codes(x, step, bits, signed=False)
        # the codes of y: y / s lands within half a code of an integer (y is rounded to bf16)
        codes = (y.double() / step.double()).round()
        assert torch.equal(codes, expected)
        if bits == 8:
            # the same formula evaluated in bf16 changes codes: the test would see it
            naive = torch.clamp(x / step.bfloat16(), 0, 255).round().double()
            assert (naive != expected).sum() > 0


def _supernet():
    spec = {"model": {"name": "small_cnn", "num_classes": 10, "in_channels": 1},
            "quant": {"w_bits": [4, 8], "a_bits": [4, 8], "keep_8bit": ["first", "last"],
                      "per_channel": True, "bn": "shared"},
            "input_size": [1, 1, 28, 28]}
    torch.manual_seed(0)
    net = build_supernet(spec)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    mpq.calibrate_activations(net, x)
    return net, x, y


def _step(net, x, y, autocast: bool):
    net.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = net(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    return logits.float().detach(), float(loss.detach()), grads


def test_bf16_autocast_training_step_is_finite_and_close_to_fp32_at_8_bits():
    net, x, y = _supernet()
    net.train()
    mpq.set_bits(net, mpq.uniform_config(net, 8, 8))
    ref_logits, ref_loss, ref_grads = _step(copy.deepcopy(net), x, y, autocast=False)
    logits, loss, grads = _step(net, x, y, autocast=True)
    assert torch.isfinite(logits).all() and torch.isfinite(grads).all()
    # bf16 keeps ~3 significant digits per op, and an 8-bit activation code flips where a conv
    # output moves across a rounding boundary: close, not equal (measured: loss 0.08 %, logits
    # 6 % of their largest value, gradient cosine 0.98)
    assert abs(loss - ref_loss) < 0.01 * abs(ref_loss)
    assert (logits - ref_logits).abs().max() < 0.15 * ref_logits.abs().max()
    cos = F.cosine_similarity(grads, ref_grads, dim=0)
    assert cos > 0.95, float(cos)
    # and every step size that took part got a finite gradient
    for name, q in mpq.quant_layers(net).items():
        for quant in (q.w_quant, q.a_quant):
            g = quant.step_for(8).grad
            assert g is not None and torch.isfinite(g).all(), name


def test_training_with_train_amp_on_cpu_runs_in_bf16(tmp_path):
    from support import tiny_config

    from mpq.trainer import Trainer
    cfg = tiny_config(tmp_path, "train.amp=true", "train.amp_dtype=bfloat16", "train.max_steps=2")
    tr = Trainer(cfg)
    assert tr.use_amp and tr.amp_dtype == torch.bfloat16
    conv = next(m for m in mpq.quant_layers(tr.net).values() if isinstance(m, torch.nn.Conv2d))
    seen = []
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    tr.fit()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}   # the training forwards ran under bf16 autocast
    import json
    with open(tmp_path / "tiny" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    losses = [v for r in rows for v in r["train_loss"].values()]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
