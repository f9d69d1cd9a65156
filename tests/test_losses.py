"""Tests of mpq.losses: in-place distillation, IDM (feature tap, feature loss, lowest-bit layers), R2."""
import math

import pytest
import torch
from torch import nn

import mpq
from mpq.losses import FeatureTap, R2Loss, idm_feature_loss, kd_loss, lowest_bit_layers
from mpq.models import SmallCNN


# ----------------------------------------------------------------------------- kd_loss
def _kl_reference(s, t, temp):
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over rows, by explicit loops."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [math.exp(v / temp) for v in srow]
        zt = [math.exp(v / temp) for v in trow]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return total / len(s) * temp ** 2


def test_kd_loss_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g)
    assert float(kd_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(kd_loss(logits, logits.clone(), temperature=4.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_written_kl(temp):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    value = float(kd_loss(s, t, temperature=temp))
    assert value > 0
    assert value == pytest.approx(_kl_reference(s, t, temp), rel=1e-9, abs=1e-12)


def test_kd_loss_gradient_only_to_student():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    kd_loss(s, t, temperature=2.0).backward()
    assert t.grad is None
    # hand-derived: d/ds [T^2 KL] = T * (softmax(s/T) - softmax(t/T)) / N
    expected = 2.0 * (torch.softmax(s.detach() / 2, 1) - torch.softmax(t.detach() / 2, 1)) / 4
    torch.testing.assert_close(s.grad, expected)


def test_kd_loss_half_precision_and_bad_temperature():
    s = torch.randn(3, 5).half()
    t = torch.randn(3, 5).half()
    assert kd_loss(s, t).dtype == torch.float32
    with pytest.raises(ValueError):
        kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(3, 5), torch.zeros(3, 4))


# ----------------------------------------------------------------------------- IDM
def test_idm_feature_loss_zero_equal_positive_otherwise():
    g = torch.Generator().manual_seed(3)
    a = {"x": torch.randn(2, 3, 4, 4, generator=g), "y": torch.randn(2, 5, generator=g)}
    b = {k: v.clone() for k, v in a.items()}
    assert float(idm_feature_loss(a, b, ["x", "y"])) == 0.0
    b["y"] = b["y"] + 1.0
    # mean over the two layers of the per-layer MSE: (0 + 1) / 2
    assert float(idm_feature_loss(a, b, ["x", "y"])) == pytest.approx(0.5)
    assert float(idm_feature_loss(a, b, ["x"])) == 0.0
    # names missing from one dict are ignored
    assert float(idm_feature_loss(a, b, ["y", "missing"])) == pytest.approx(1.0)


def test_idm_feature_loss_empty_and_detached_teacher():
    s = {"x": torch.randn(2, 3, requires_grad=True)}
    t = {"x": torch.randn(2, 3, requires_grad=True)}
    zero = idm_feature_loss(s, t, [])
    assert zero.dim() == 0 and float(zero) == 0.0 and zero.is_floating_point()
    assert float(idm_feature_loss({}, {}, ["x"])) == 0.0
    loss = idm_feature_loss(s, t, ["x"])
    loss.backward()
    assert t["x"].grad is None
    torch.testing.assert_close(s["x"].grad, 2 * (s["x"] - t["x"]).detach() / 6)


def _post_bn_reference(net, x):
    """Post-BN output of each conv of SmallCNN, computed by walking the blocks by hand."""
    out = {}
    h = x
    for i, block in enumerate(net.features):
        conv, bn, _ = block
        y = bn(conv(h))
        out[f"features.{i}.0"] = y.detach().clone()
        h = torch.relu(y)
    return out


@pytest.mark.parametrize("bn", ["shared", "switchable"])
def test_feature_tap_records_post_bn_features(bn):
    torch.manual_seed(0)
    net = mpq.quantize_model(SmallCNN(), bn=bn)
    net.eval()
    x = torch.randn(2, 1, 28, 28)
    convs = [f"features.{i}.0" for i in range(5)]
    with FeatureTap(net) as tap:
        assert sorted(tap.layers) == sorted(convs)
        net(x)
        assert tap.features == {}          # disabled by default
        tap.enabled = True
        net(x)
        assert sorted(tap.features) == sorted(convs)
        ref = _post_bn_reference(net, x)
        for name in convs:
            torch.testing.assert_close(tap.features[name], ref[name])
        # post-BN, not post-ReLU (SmallCNN's ReLU is in place)
        assert any((tap.features[n] < 0).any() for n in convs)
        tap.clear()
        assert tap.features == {}
    # hooks removed on exit
    tap.enabled = True
    net(x)
    assert tap.features == {}


def test_feature_tap_layer_subset_grad_and_wrapper():
    torch.manual_seed(0)
    net = mpq.quantize_model(SmallCNN())

    class Wrapper(nn.Module):  # stands in for DDP: the model lives in .module
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, x):
            return self.module(x)

    wrapped = Wrapper(net)
    tap = FeatureTap(wrapped, layers=["features.1.0", "fc"])   # fc has no BN: skipped
    assert tap.layers == ["features.1.0"]
    tap.enabled = True
    wrapped(torch.randn(2, 1, 28, 28))
    assert list(tap.features) == ["features.1.0"]
    tap.features["features.1.0"].pow(2).mean().backward()
    assert net.features[1][0].weight.grad is not None
    tap.remove()
    with pytest.raises(ValueError):
        FeatureTap(net, layers=["nope"])


def test_feature_tap_under_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = mpq.quantize_model(SmallCNN())
        ddp = DDP(net)
        with FeatureTap(ddp) as tap:
            tap.enabled = True
            ddp(torch.randn(2, 1, 28, 28))
            assert len(tap.features) == 5
        r2 = R2Loss(ddp, "linf")
        assert float(r2(ddp).detach()) == pytest.approx(float(r2(net).detach()))
    finally:
        dist.destroy_process_group()


def test_lowest_bit_layers():
    net = mpq.quantize_model(SmallCNN(), w_bits=(2, 3, 4), a_bits=(2, 4))  # first/last pinned 8/8
    layers = mpq.quant_layers(net)
    names = list(layers)
    assert names[0] == "features.0.0" and names[-1] == "fc"
    cfg = {names[0]: (8, 8), names[1]: (2, 4), names[2]: (3, 2), names[3]: (2, 2),
           names[4]: (4, 4), names[5]: (8, 8)}
    assert lowest_bit_layers(net, cfg) == [names[1], names[3]]
    layers[names[1]].w_allowed = (3, 4)       # bit 2 frozen: 3 is now the lowest allowed
    layers[names[2]].w_allowed = (3, 4)
    assert lowest_bit_layers(net, cfg) == [names[2], names[3]]
    assert lowest_bit_layers(net, mpq.min_config(net)) == names[1:5]
    assert lowest_bit_layers(net, mpq.max_config(net)) == []


# ----------------------------------------------------------------------------- R2
def _small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    return mpq.quantize_model(net, keep_8bit=())


def _weights(net):
    return [net[0].weight, net[3].weight]


def test_r2_bad_kind():
    with pytest.raises(ValueError, match="linf.*margin.*softminmax"):
        R2Loss(_small_net(), "l2")


def test_r2_linf_value_and_gradient():
    net = _small_net()
    r2 = R2Loss(net, "linf")
    assert len(list(r2.parameters())) == 0
    loss = r2(net)
    ws = _weights(net)
    expected = sum(max(abs(v) for v in w.detach().flatten().tolist()) for w in ws)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    for w in ws:
        flat = w.detach().flatten()
        i = int(flat.abs().argmax())
        g = torch.zeros_like(flat)
        g[i] = 1.0 if flat[i] > 0 else -1.0
        torch.testing.assert_close(w.grad.flatten(), g)


def test_r2_margin_value_and_gradient():
    net = _small_net()
    r2 = R2Loss(net, "margin")
    keys = sorted(r2.params.keys())
    assert keys == ["0", "3"]
    ws = _weights(net)
    # default init: max|W_l|, so the penalty term starts at zero
    for key, w in zip(["0", "3"], ws):
        assert float(r2.params[key].detach()) == pytest.approx(float(w.detach().abs().max()))
    # move the margins inside the weight range so both terms are active (one negative: |M| is used)
    with torch.no_grad():
        r2.params["0"].fill_(0.1)
        r2.params["3"].fill_(-0.15)
    loss = r2(net)
    loss.backward()
    expected = 0.0
    for m, w in zip([0.1, -0.15], ws):
        excess = [max(abs(v) - abs(m), 0.0) for v in w.detach().flatten().tolist()]
        expected += sum(e * e for e in excess) + abs(m)
        assert sum(e > 0 for e in excess) > 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    for key, m, w in zip(["0", "3"], [0.1, -0.15], ws):
        wd = w.detach()
        relu = (wd.abs() - abs(m)).clamp_min(0)
        # hand-derived gradients
        torch.testing.assert_close(w.grad, 2 * relu * wd.sign())
        dm = math.copysign(1.0, m) * (1.0 - 2.0 * float(relu.sum()))
        assert float(r2.params[key].grad) == pytest.approx(dm, rel=1e-5)


def test_r2_margin_init_margin():
    net = _small_net()
    r2 = R2Loss(net, "margin", init_margin=0.05)
    assert all(float(p.detach()) == pytest.approx(0.05) for p in r2.params.values())


def test_r2_softminmax_value_and_gradient():
    net = _small_net()
    eta = 0.3
    r2 = R2Loss(net, "softminmax", eta=eta, init_temperature=2.0)
    with torch.no_grad():
        r2.params["3"].fill_(5.0)
    loss = r2(net)
    loss.backward()
    ws = _weights(net)
    temps = {"0": 2.0, "3": 5.0}
    expected = 0.0
    for key, w in zip(["0", "3"], ws):
        # independent float64 formula, without the softmax stabilisation
        wd = w.detach().double().flatten().requires_grad_(True)
        a = torch.tensor(temps[key], dtype=torch.float64, requires_grad=True)
        ep, en = torch.exp(a * wd), torch.exp(-a * wd)
        smax = (wd * ep).sum() / ep.sum()
        smin = (wd * en).sum() / en.sum()
        term = smax - smin + eta * torch.exp(-a)
        term.backward()
        expected += float(term.detach())
        torch.testing.assert_close(w.grad.double().flatten(), wd.grad, rtol=1e-4, atol=1e-6)
        assert float(r2.params[key].grad) == pytest.approx(float(a.grad), rel=1e-4, abs=1e-7)
        # hand-derived: d/da = Var_p(w) + Var_q(w) - eta e^-a, p = softmax(a w), q = softmax(-a w)
        p = torch.softmax(temps[key] * wd.detach(), 0)
        q = torch.softmax(-temps[key] * wd.detach(), 0)
        w0 = wd.detach()
        var_p = (p * w0 ** 2).sum() - (p * w0).sum() ** 2
        var_q = (q * w0 ** 2).sum() - (q * w0).sum() ** 2
        hand = float(var_p + var_q - eta * math.exp(-temps[key]))
        assert float(r2.params[key].grad) == pytest.approx(hand, rel=1e-4, abs=1e-7)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_r2_softminmax_stable_for_large_temperature():
    net = _small_net()
    r2 = R2Loss(net, "softminmax", init_temperature=1e4)
    loss = r2(net)
    assert torch.isfinite(loss.detach())
    # at a huge temperature the soft extremes are the hard ones
    expected = sum(float(w.detach().max() - w.detach().min()) for w in _weights(net))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)


def test_r2_state_dict_keys_and_round_trip(tmp_path):
    torch.manual_seed(0)
    net = mpq.quantize_model(SmallCNN())
    r2 = R2Loss(net, "softminmax")
    keys = set(r2.state_dict())
    assert keys == {"params." + n.replace(".", "__") for n in mpq.quant_layers(net)}
    with torch.no_grad():
        r2.params["features__2__0"].fill_(3.0)
    torch.save(r2.state_dict(), tmp_path / "r2.pt")
    other = R2Loss(net, "softminmax")
    other.load_state_dict(torch.load(tmp_path / "r2.pt", weights_only=True))
    assert float(other.params["features__2__0"].detach()) == 3.0
    # the model's own parameters are not R2's parameters
    assert len(list(r2.parameters())) == len(mpq.quant_layers(net))
