"""Supernet conversion, the configuration API and its errors."""
import pytest
import torch
import torchvision
from torch import nn

import mpq
from mpq.supernet import bn_after_conv


def _float_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("factory, size", [
    (torchvision.models.resnet18, 32), (torchvision.models.resnet50, 32),
    (torchvision.models.mobilenet_v2, 32), (mpq.resnet20, 32),
])
def test_quantize_model_converts_every_layer_and_pins_first_last(factory, size):
    torch.manual_seed(0)
    model = factory()
    names = _float_layers(model)
    net = mpq.quantize_model(model)
    layers = mpq.quant_layers(net)
    assert list(layers) == names
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules())
    first, last = names[0], names[-1]
    assert layers[first].w_candidates == (8,) and layers[last].a_candidates == (8,)
    assert layers[names[1]].w_candidates == (2, 3, 4, 5, 6)
    cfg = mpq.uniform_config(net, 3, 2)
    mpq.set_bits(net, cfg)
    assert mpq.get_bits(net) == cfg and cfg[first] == (8, 8) and cfg[names[1]] == (3, 2)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10 if factory is mpq.resnet20 else 1000) and torch.isfinite(out).all()


def test_vit_converts_at_small_input():
    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    net = mpq.quantize_model(vit)
    layers = mpq.quant_layers(net)
    assert "conv_proj" in layers and "heads.head" in layers
    assert layers["conv_proj"].w_candidates == (8,) and layers["heads.head"].w_candidates == (8,)
    assert "encoder.layers.encoder_layer_0.mlp.0" in layers
    mpq.set_bits(net, mpq.uniform_config(net, 4, 4))
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_all_32_bit_resnet18_equals_float_model():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = ref(x)
    bits = (2, 4, 32)
    net = mpq.quantize_model(ref, w_bits=bits, a_bits=bits, keep_8bit=())
    mpq.set_bits(net, mpq.uniform_config(net, 32, 32))
    with torch.no_grad():
        got = net.eval()(x)
    assert torch.equal(got, expect)


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return mpq.quantize_model(mpq.models.SmallCNN())


def test_set_bits_unknown_layer(small_net):
    with pytest.raises(ValueError, match=r"unknown layer 'features\.9\.0'.*features\.1\.0"):
        mpq.set_bits(small_net, {"features.9.0": (4, 4)})


def test_set_bits_bit_not_among_candidates(small_net):
    with pytest.raises(ValueError, match=r"'features\.1\.0'.*w=7.*\[2, 3, 4, 5, 6\]"):
        mpq.set_bits(small_net, {"features.1.0": (7, 4)})
    with pytest.raises(ValueError, match=r"'fc'.*\[8\]"):
        mpq.set_bits(small_net, {"fc": (4, 4)})


@pytest.mark.parametrize("value", [4, (4,), (4, 4, 4), ("4", 4), (4.0, 4), None, (True, 4)])
def test_set_bits_malformed_value(small_net, value):
    with pytest.raises(ValueError, match=r"layer 'features\.1\.0': malformed.*allowed w_bits \[2, 3, 4, 5, 6\]"):
        mpq.set_bits(small_net, {"features.1.0": value})


def test_set_bits_is_all_or_nothing(small_net):
    before = mpq.get_bits(small_net)
    with pytest.raises(ValueError):
        mpq.set_bits(small_net, {"features.1.0": (2, 2), "features.2.0": (9, 9)})
    assert mpq.get_bits(small_net) == before


def test_min_max_random_configs(small_net):
    layers = mpq.quant_layers(small_net)
    mx, mn = mpq.max_config(small_net), mpq.min_config(small_net)
    assert mx["features.1.0"] == (6, 6) and mn["features.1.0"] == (2, 2) and mn["fc"] == (8, 8)
    a = mpq.random_config(small_net, torch.Generator().manual_seed(3))
    b = mpq.random_config(small_net, torch.Generator().manual_seed(3))
    assert a == b
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        cfg = mpq.random_config(small_net, gen)
        seen.add(cfg["features.2.0"])
        for name, (w, a_) in cfg.items():
            assert w in layers[name].w_candidates and a_ in layers[name].a_candidates
    assert len(seen) == 25  # every (w, a) pair of the 5x5 candidates is reachable
    layers["features.2.0"].w_allowed = (3, 4, 5, 6)
    assert mpq.min_config(small_net)["features.2.0"] == (3, 2)
    assert all(mpq.random_config(small_net, gen)["features.2.0"][0] != 2 for _ in range(100))


def test_switchable_bn_follows_the_config():
    torch.manual_seed(0)
    net = mpq.quantize_model(mpq.models.SmallCNN(), bn="switchable")
    assert bn_after_conv(net)["features.1.0"] == "features.1.1"
    sbn = net.get_submodule("features.1.1")
    assert isinstance(sbn, mpq.SwitchableBatchNorm2d) and len(sbn.bns) == 25
    mpq.set_bits(net, {"features.1.0": (3, 5)})
    assert sbn.active == "w3a5"
    net.train()
    before = {k: bn.running_mean.clone() for k, bn in sbn.bns.items()}
    net(torch.randn(4, 1, 28, 28))
    changed = [k for k, bn in sbn.bns.items() if not torch.equal(bn.running_mean, before[k])]
    assert changed == ["w3a5"]


def test_keep_8bit_by_name_and_none():
    net = mpq.quantize_model(mpq.models.SmallCNN(), keep_8bit=("features.2.0",))
    layers = mpq.quant_layers(net)
    assert layers["features.2.0"].w_candidates == (8,) and layers["fc"].w_candidates == (2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="keep_8bit: 'nope'"):
        mpq.quantize_model(mpq.models.SmallCNN(), keep_8bit=("nope",))
    with pytest.raises(ValueError, match=r"w_bits: bit-width 0"):
        mpq.quantize_model(mpq.models.SmallCNN(), w_bits=(0, 4))
    with pytest.raises(ValueError, match="empty"):
        mpq.quantize_model(mpq.models.SmallCNN(), a_bits=())
