"""BitOPs and size against hand-computed figures."""
import pytest
import torch
import torchvision
from torch import nn

import mpq
import search

ALL_BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def resnet18():
    return mpq.quantize_model(torchvision.models.resnet18(), w_bits=ALL_BITS, a_bits=ALL_BITS)


@pytest.mark.parametrize("bits, expect_g, tol", [(4, 34.71, 0.05), (3, 22.85, 0.05), (8, 116.1, 0.05), (2, 14.4, 0.05)])
def test_resnet18_bitops_reference_points(resnet18, bits, expect_g, tol):
    cfg = mpq.uniform_config(resnet18, bits, bits)
    assert search.bitops(resnet18, cfg, input_size=(1, 3, 224, 224)) / 1e9 == pytest.approx(expect_g, abs=tol)


def test_mobilenet_v2_bitops_w4a4():
    net = mpq.quantize_model(torchvision.models.mobilenet_v2())
    cfg = mpq.uniform_config(net, 4, 4)
    assert search.bitops(net, cfg, input_size=(1, 3, 224, 224)) / 1e9 == pytest.approx(5.39, abs=0.05)


def test_hand_computed_conv_grouped_conv_and_linear():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=1, padding=1),         # 10x10 out: 3*3*3*8*100 = 21600 MACs
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise, 5x5 out: 3*3*1*8*25 = 1800
        nn.Conv2d(8, 16, 1, groups=2),                    # 1*1*4*16*25 = 1600
        nn.Flatten(), nn.Linear(16 * 25, 7))              # 400*7 = 2800
    net = mpq.quantize_model(model, keep_8bit=())
    cfg = {"0": (2, 3), "1": (4, 5), "2": (6, 2), "4": (3, 3)}
    expect = 21600 * 6 + 1800 * 20 + 1600 * 12 + 2800 * 9
    assert search.bitops(net, cfg, input_size=(1, 3, 10, 10)) == expect
    counter = search.BitOpsCounter(net, (1, 3, 10, 10))
    assert counter.macs == {"0": 21600, "1": 1800, "2": 1600, "4": 2800}
    # Batch size of the probe input does not change the per-sample count.
    assert search.BitOpsCounter(net, (4, 3, 10, 10)).macs == counter.macs


def test_linear_on_tokens_counts_every_token():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):  # x: (B, T=7, 6)
            return self.head(self.proj(x).mean(1))

    net = mpq.quantize_model(Tokens(), keep_8bit=())
    cfg = {"proj": (4, 4), "head": (2, 2)}
    assert search.bitops(net, cfg, input_size=(1, 7, 6)) == 6 * 5 * 7 * 16 + 5 * 2 * 4


def test_model_size_bytes_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    net = mpq.quantize_model(model, keep_8bit=())
    cfg = {"0": (4, 4), "3": (2, 2)}
    # conv 108 weights * 4 bits, linear 8 weights * 2 bits, float: linear bias 2 + BN weight/bias 8.
    expect = (108 * 4 + 8 * 2 + (2 + 8) * 32) / 8
    assert search.model_size_bytes(net, cfg) == expect


def test_small_mobilenet_layers_and_bitops_by_hand():
    """The embedded default's model: stem + 4 depthwise-separable blocks + fc at 28x28, width 16."""
    net = mpq.quantize_model(mpq.models.SmallMobileNet())   # stem and fc pinned at 8/8
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # depthwise convs: one group per channel, 3x3; pointwise: 1x1
    assert [(m.groups == m.in_channels, m.kernel_size) for m in convs[1:]] == \
        [(True, (3, 3)), (False, (1, 1))] * 4
    # MACs per layer: (output H*W) * C_out * 9 * C_in/groups
    dw = 14 * 14 * 16 * 9 + 14 * 14 * 32 * 9 + 7 * 7 * 32 * 9 + 7 * 7 * 64 * 9
    pw = 14 * 14 * 16 * 32 + 14 * 14 * 32 * 32 + 7 * 7 * 32 * 64 + 7 * 7 * 64 * 64
    pinned = 28 * 28 * 16 * 9 + 64 * 10
    for b in (2, 3, 4):
        cfg = mpq.uniform_config(net, b, b)
        assert search.bitops(net, cfg, (1, 1, 28, 28)) == (dw + pw) * b * b + pinned * 64
    # 6-bit depthwise, 2-bit pointwise: each layer at its own bits
    mixed = {}
    for n, m in mpq.quant_layers(net).items():
        pinned_layer = m.w_candidates == (8,)
        mixed[n] = (8, 8) if pinned_layer else (6, 6) if m.groups > 1 else (2, 2)
    assert search.bitops(net, mixed, (1, 1, 28, 28)) == dw * 36 + pw * 4 + pinned * 64
    assert sum(p.numel() for p in mpq.models.SmallMobileNet().parameters()) < 12000
