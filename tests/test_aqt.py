"""AQT activation clip calibration (mpq.aqt), checked against independent NumPy computations."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import mpq
import mpq.aqt as aqt_mod
from mpq.aqt import ActivationClipCalibrator
from mpq.models import SmallCNN
from mpq.supernet import quant_layers

BITS = (2, 3, 4, 5, 6)


class ConvLinear(nn.Module):
    """conv (input = the batch itself) -> ReLU -> pool -> linear (input >= 0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.mean(dim=(2, 3)))


class TokenLinear(nn.Module):
    """one linear layer on (N, T, C) inputs."""

    def __init__(self, c=6):
        super().__init__()
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(x)


def qmodel(module, a_bits=BITS):
    return mpq.quantize_model(module, w_bits=BITS, a_bits=a_bits, keep_8bit=())


def batches(n, shape, seed, scale=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(*shape, generator=g)
        if scale is not None:  # per-channel scales along dim 1, to make channels differ
            x = x * torch.tensor(scale).view(1, -1, *([1] * (x.dim() - 2)))
        out.append(x * (1.0 + 0.5 * i))
    return out


def np_ema(values, decay):
    m = None
    for v in values:
        m = v if m is None else decay * m + (1 - decay) * v
    return m


def qp_of(bits, signed):
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def np_fake_quant(x, s, bits, signed):
    qn = 2 ** (bits - 1) if signed else 0
    return np.round(np.clip(x / s, -qn, qp_of(bits, signed))) * s


def record_inputs(model):
    """{layer name: [input arrays]} via independent forward pre-hooks."""
    seen, handles = {}, []
    for name, layer in quant_layers(model).items():
        def hook(m, inp, name=name):
            seen.setdefault(name, []).append(inp[0].detach().double().numpy().copy())
        handles.append(layer.register_forward_pre_hook(hook))
    return seen, handles


# ---------------------------------------------------------------------- float warm-up
def test_float_warmup_output_equals_float_activation_model():
    torch.manual_seed(0)
    base = SmallCNN()
    q = qmodel(copy.deepcopy(base))
    ref = qmodel(copy.deepcopy(base), a_bits=(32,))  # same quantized weights, float activations
    lsq = qmodel(copy.deepcopy(base))  # no calibrator: LSQ-quantized activations
    calib = ActivationClipCalibrator(q, warmup_steps=3)
    assert all(layer.a_float for layer in quant_layers(q).values())
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for mode in ("train", "eval"):
        for m in (q, ref, lsq):
            m.train(mode == "train")
        with torch.no_grad():
            out, want, quant = q(x), ref(x), lsq(x)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        assert not torch.allclose(quant, want)  # the activations do matter at 6 bits
    assert not calib.done


def test_float_warmup_layer_inputs_pass_through_and_false_keeps_quantizing():
    torch.manual_seed(0)
    m = qmodel(ConvLinear()).train()
    ActivationClipCalibrator(m, warmup_steps=2)
    x = torch.randn(4, 3, 5, 5)
    conv = quant_layers(m)["conv"]
    assert torch.equal(conv.quantized_input(x), x)

    m2 = qmodel(ConvLinear()).train()
    ActivationClipCalibrator(m2, warmup_steps=2, float_warmup=False)
    conv2 = quant_layers(m2)["conv"]
    assert not conv2.a_float
    assert not torch.equal(conv2.quantized_input(x), x)
    assert bool(conv2.a_quant.initialized)  # LSQ-initialised from the first batch, as before


# ---------------------------------------------------------------------- statistics
def test_per_channel_ema_matches_numpy():
    torch.manual_seed(0)
    m = qmodel(ConvLinear()).train()
    calib = ActivationClipCalibrator(m, warmup_steps=10, ema=0.8)
    seen, handles = record_inputs(m)
    data = batches(4, (6, 3, 5, 5), seed=2, scale=[1.0, 3.0, 0.2])
    for x in data:
        m(x)
    m.eval()
    m(data[0])  # eval forwards are not recorded
    for h in handles:
        h.remove()
    # the conv's input is the batch itself: fully independent of the model
    conv_in = [x.double().numpy() for x in data]
    assert all(np.array_equal(a, b) for a, b in zip(seen["conv"], conv_in))
    want_max = np_ema([a.max(axis=(0, 2, 3)) for a in conv_in], 0.8)
    want_min = np_ema([a.min(axis=(0, 2, 3)) for a in conv_in], 0.8)
    np.testing.assert_allclose(calib.ema_max["conv"].numpy(), want_max, rtol=1e-6)
    np.testing.assert_allclose(calib.ema_min["conv"].numpy(), want_min, rtol=1e-6)
    # (N, C) linear input: channel dim 1
    fc_in = seen["fc"][:4]
    np.testing.assert_allclose(calib.ema_max["fc"].numpy(), np_ema([a.max(0) for a in fc_in], 0.8),
                               rtol=1e-5)
    np.testing.assert_allclose(calib.ema_min["fc"].numpy(), np_ema([a.min(0) for a in fc_in], 0.8),
                               rtol=1e-5, atol=1e-7)
    assert calib.ema_max["conv"].shape == (3,) and calib.ema_max["fc"].shape == (4,)


def test_token_linear_uses_last_dim():
    m = qmodel(TokenLinear(6)).train()
    calib = ActivationClipCalibrator(m, warmup_steps=5)
    data = batches(3, (2, 7, 6), seed=3)
    for x in data:
        m(x)
    arr = [x.double().numpy() for x in data]
    np.testing.assert_allclose(calib.ema_max["fc"].numpy(), np_ema([a.max((0, 1)) for a in arr], 0.9),
                               rtol=1e-6)
    np.testing.assert_allclose(calib.ema_min["fc"].numpy(), np_ema([a.min((0, 1)) for a in arr], 0.9),
                               rtol=1e-6)


def test_per_tensor_ema_of_max_abs():
    m = qmodel(ConvLinear()).train()
    calib = ActivationClipCalibrator(m, warmup_steps=3, per_channel=False)
    data = batches(3, (4, 3, 5, 5), seed=4)
    for x in data:
        m(x)
    arr = [x.double().numpy() for x in data]
    want = np_ema([np.abs(a).max() for a in arr], 0.9)
    np.testing.assert_allclose(calib.ema_max["conv"].numpy(), [want], rtol=1e-6)
    assert calib.step(3)
    conv = quant_layers(m)["conv"]
    for b in BITS:
        assert float(conv.a_quant.step[str(b)]) == pytest.approx(want / qp_of(b, True), rel=1e-6)


def test_non_finite_batch_leaves_ema_unchanged():
    m = qmodel(TokenLinear(2)).train()
    calib = ActivationClipCalibrator(m, warmup_steps=5)
    m(torch.tensor([[1.0, -2.0]]))
    m(torch.tensor([[float("inf"), 3.0]]))
    np.testing.assert_allclose(calib.ema_max["fc"].numpy(), [1.0, 0.9 * -2.0 + 0.1 * 3.0], rtol=1e-6)


# ---------------------------------------------------------------------- calibration
def test_calibration_sets_steps_from_bound_and_quantizes_again():
    torch.manual_seed(0)
    m = qmodel(ConvLinear()).train()
    calib = ActivationClipCalibrator(m, warmup_steps=4)
    seen, handles = record_inputs(m)
    data = batches(4, (6, 3, 5, 5), seed=5, scale=[0.5, 2.0, 1.0])
    for t, x in enumerate(data, start=1):
        m(x)
        assert calib.step(t) == (t == 4)
    for h in handles:
        h.remove()
    assert calib.done and not calib.step(5)
    layers = quant_layers(m)
    expect_signed = {"conv": True, "fc": False}  # fc's input follows a ReLU
    for name, layer in layers.items():
        arr = seen[name]
        ema_max = np_ema([a.max(axis=tuple(d for d in range(a.ndim) if d != 1)) for a in arr], 0.9)
        ema_min = np_ema([a.min(axis=tuple(d for d in range(a.ndim) if d != 1)) for a in arr], 0.9)
        bound = np.maximum(np.abs(ema_max), np.abs(ema_min)).max()
        signed = expect_signed[name]
        assert bool(layer.a_quant.signed) == signed
        assert bool(layer.a_quant.initialized)
        assert layer.a_float is False
        for b in BITS:
            assert float(layer.a_quant.step[str(b)]) == pytest.approx(bound / qp_of(b, signed), rel=1e-5)
    # the conv quantizes again: its input goes through the b-bit grid of the calibrated step
    conv = layers["conv"]
    x = data[0]
    for b in (2, 6):
        conv.a_bits = b
        s = float(conv.a_quant.step[str(b)])
        got = conv.quantized_input(x).double().numpy()
        np.testing.assert_allclose(got, np_fake_quant(x.double().numpy(), s, b, True), rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, x.numpy())
    # no more statistics after the calibration
    before = calib.ema_max["conv"].clone()
    m(data[1] * 10)
    assert torch.equal(calib.ema_max["conv"], before)


@pytest.mark.parametrize("positive", [True, False])
def test_sign_detection(positive):
    m = qmodel(TokenLinear(3)).train()
    calib = ActivationClipCalibrator(m, warmup_steps=2)
    data = batches(2, (5, 3), seed=6)
    if positive:
        data = [x.abs() + 0.01 for x in data]
    for x in data:
        m(x)
    calib.calibrate()
    aq = quant_layers(m)["fc"].a_quant
    assert bool(aq.signed) == (not positive)
    arr = [x.double().numpy() for x in data]
    bound = np.maximum(np.abs(np_ema([a.max(0) for a in arr], 0.9)),
                       np.abs(np_ema([a.min(0) for a in arr], 0.9))).max()
    for b in BITS:
        assert float(aq.step[str(b)]) == pytest.approx(bound / qp_of(b, not positive), rel=1e-6)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze(freeze):
    m = qmodel(ConvLinear()).train()
    calib = ActivationClipCalibrator(m, warmup_steps=1, freeze=freeze)
    x = torch.randn(4, 3, 5, 5)
    m(x)
    for layer in quant_layers(m).values():
        for p in layer.a_quant.step.values():
            p.grad = torch.ones_like(p)
    assert calib.step(1)
    for layer in quant_layers(m).values():
        for p in layer.a_quant.step.values():
            assert p.requires_grad == (not freeze)
            assert (p.grad is None) == freeze
    m.zero_grad(set_to_none=True)
    m(x).sum().backward()
    conv = quant_layers(m)["conv"]
    g = conv.a_quant.step[str(conv.a_bits)].grad
    assert (g is None) == freeze


def test_distributed_average_over_ranks(monkeypatch):
    """With world size 2 the statistics are the mean of both ranks' (all_reduce SUM / 2)."""
    torch.manual_seed(0)
    m0 = qmodel(TokenLinear(4)).train()
    m1 = copy.deepcopy(m0)
    c0 = ActivationClipCalibrator(m0, warmup_steps=2)
    c1 = ActivationClipCalibrator(m1, warmup_steps=2)
    d0, d1 = batches(2, (3, 4), seed=7), batches(2, (3, 4), seed=8)
    for a, b in zip(d0, d1):
        m0(a)
        m1(b * 3)
    other = c1._pack()
    calls = []

    def fake_all_reduce(t, op=None):
        calls.append(op)
        t.add_(other)

    monkeypatch.setattr(aqt_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(aqt_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(aqt_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(aqt_mod.dist, "all_reduce", fake_all_reduce)
    c0.calibrate()
    assert calls == [aqt_mod.dist.ReduceOp.SUM]
    r0 = [a.double().numpy() for a in d0]
    r1 = [(b * 3).double().numpy() for b in d1]
    mx = (np_ema([a.max(0) for a in r0], 0.9) + np_ema([a.max(0) for a in r1], 0.9)) / 2
    mn = (np_ema([a.min(0) for a in r0], 0.9) + np_ema([a.min(0) for a in r1], 0.9)) / 2
    bound = np.maximum(np.abs(mx), np.abs(mn)).max()
    aq = quant_layers(m0)["fc"].a_quant
    for b in BITS:
        assert float(aq.step[str(b)]) == pytest.approx(bound / qp_of(b, True), rel=1e-6)


# ---------------------------------------------------------------------- state
def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    base = qmodel(ConvLinear()).train()
    m = copy.deepcopy(base)
    calib = ActivationClipCalibrator(m, warmup_steps=3)
    data = batches(3, (4, 3, 5, 5), seed=9)
    m(data[0])
    m(data[1])
    path = tmp_path / "aqt.pt"
    torch.save(calib.state_dict(), path)
    state = torch.load(path, weights_only=True)

    # not done: a fresh calibrator continues exactly, in float warm-up
    m2 = copy.deepcopy(base)
    for layer in quant_layers(m2).values():
        layer.a_float = False
    c2 = ActivationClipCalibrator(m2, warmup_steps=3)
    for layer in quant_layers(m2).values():
        layer.a_float = False
    c2.load_state_dict(state)
    assert not c2.done and all(layer.a_float for layer in quant_layers(m2).values())
    for n in calib.ema_max:
        assert torch.equal(c2.ema_max[n], calib.ema_max[n]) and torch.equal(c2.ema_min[n], calib.ema_min[n])
    m(data[2])
    m2(data[2])
    assert calib.step(3) and c2.step(3)
    for n in calib.ema_max:
        assert torch.equal(c2.ema_max[n], calib.ema_max[n])
    for (n, a), (_, b) in zip(quant_layers(m).items(), quant_layers(m2).items()):
        for k in a.a_quant.step:
            assert torch.equal(a.a_quant.step[k], b.a_quant.step[k]), n

    # done: re-applies the end of the warm-up, the freeze, and removes the hooks
    torch.save(calib.state_dict(), path)
    done_state = torch.load(path, weights_only=True)
    m3 = copy.deepcopy(base)
    c3 = ActivationClipCalibrator(m3, warmup_steps=3)
    c3.load_state_dict(done_state)
    assert c3.done and not c3._handles
    for layer in quant_layers(m3).values():
        assert layer.a_float is False
        assert all(not p.requires_grad for p in layer.a_quant.step.values())
    m3(data[0] * 100)
    assert torch.equal(c3.ema_max["conv"], calib.ema_max["conv"])
    assert not c3.step(10)


def test_state_dict_rejects_mismatch():
    m = qmodel(ConvLinear()).train()
    calib = ActivationClipCalibrator(m, warmup_steps=3)
    m(torch.randn(2, 3, 5, 5))
    state = calib.state_dict()
    other = ActivationClipCalibrator(qmodel(ConvLinear()), warmup_steps=3, per_channel=False)
    with pytest.raises(ValueError, match="per_channel"):
        other.load_state_dict(state)
    bad = dict(state, ema_max=dict(state["ema_max"], conv=[1.0]))
    with pytest.raises(ValueError, match="expected 3"):
        ActivationClipCalibrator(qmodel(ConvLinear()), warmup_steps=3).load_state_dict(bad)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_steps": 0}, "warmup_steps"),
    ({"warmup_steps": -2}, "warmup_steps"),
    ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"warmup_steps": True}, "warmup_steps"),
    ({"warmup_steps": 2, "ema": 1.0}, "ema"),
    ({"warmup_steps": 2, "ema": -0.1}, "ema"),
    ({"warmup_steps": 2, "ema": float("nan")}, "ema"),
    ({"warmup_steps": 2, "ema": "0.9"}, "ema"),
    ({"warmup_steps": 2, "freeze": "yes"}, "freeze"),
    ({"warmup_steps": 2, "float_warmup": 1}, "float_warmup"),
    ({"warmup_steps": 2, "per_channel": None}, "per_channel"),
])
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationClipCalibrator(qmodel(ConvLinear()), **kwargs)


def test_model_without_quant_layers_rejected():
    with pytest.raises(ValueError, match="no quantized layer"):
        ActivationClipCalibrator(nn.Sequential(nn.Linear(2, 2)), warmup_steps=2)
