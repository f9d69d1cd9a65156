"""EfficientNet-Lite0 (model.name=efficientnet_lite0): shape, size, layer counts and conversion."""
import copy

import pytest
import torch
from torch import nn

import mpq
from mpq.models import LOCAL_MODELS, MBConv, build_model, build_model_from_spec
from mpq.supernet import bn_after_conv

# The architecture table, written out here independently of the model code:
# (expand t, kernel k, stride of the first block s, output channels c, repeats n).
TABLE = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
         (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
STEM, HEAD = 32, 1280


def _blocks():
    """(cin, cout, t, k, stride) of each MBConv block from the table."""
    out, cin = [], STEM
    for t, k, s, c, n in TABLE:
        for i in range(n):
            out.append((cin, c, t, k, s if i == 0 else 1))
            cin = c
    return out


def _hand_param_count(num_classes, in_channels=3):
    bn = lambda c: 2 * c  # noqa: E731  (BN weight + bias; convs have no bias)
    total = in_channels * STEM * 3 * 3 + bn(STEM)  # stem 3x3 conv + BN
    for cin, cout, t, k, _ in _blocks():
        mid = cin * t
        if t != 1:
            total += cin * mid + bn(mid)  # 1x1 expand
        total += mid * k * k + bn(mid)  # kxk depthwise
        total += mid * cout + bn(cout)  # 1x1 project
    total += 320 * HEAD + bn(HEAD)  # 1x1 head conv
    total += HEAD * num_classes + num_classes  # classifier
    return total


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def lite0_1000():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", num_classes=1000, in_channels=3)


def test_registered_and_output_shape(lite0_1000):
    assert "efficientnet_lite0" in LOCAL_MODELS
    lite0_1000.eval()
    with torch.no_grad():
        out = lite0_1000(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_parameter_count_matches_hand_count(lite0_1000):
    assert _hand_param_count(1000) == 4_652_008  # ~4.65 M, EfficientNet-Lite0's published size
    assert _n_params(lite0_1000) == _hand_param_count(1000)
    torch.manual_seed(0)
    grey = build_model("efficientnet_lite0", num_classes=10, in_channels=1)
    assert _n_params(grey) == _hand_param_count(10, in_channels=1)


def test_layer_counts(lite0_1000):
    blocks = _blocks()
    assert len(blocks) == 16
    n_convs = 1 + sum(3 if t != 1 else 2 for _, _, t, _, _ in blocks) + 1  # stem + blocks + head
    convs = [m for m in lite0_1000.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 16
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [m.kernel_size[0] for m in depthwise] == [k for _, _, _, k, _ in blocks]
    assert [m.stride[0] for m in depthwise] == [s for _, _, _, _, s in blocks]
    assert len(convs) == n_convs == 49
    layers = [m for m in lite0_1000.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == n_convs + 1 == 50
    assert all(m.bias is None for m in convs)
    acts = [m for m in lite0_1000.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU))]
    assert acts and all(type(m) is nn.ReLU6 for m in acts)


def test_residual_blocks_where_stride_1_and_same_channels(lite0_1000):
    expect = [s == 1 and cin == cout for cin, cout, _, _, s in _blocks()]
    assert sum(expect) == 9
    mbconvs = [m for m in lite0_1000.modules() if isinstance(m, MBConv)]
    assert [m.residual for m in mbconvs] == expect
    # functionally: with the projection BN zeroed, a residual block is the identity, others give 0
    torch.manual_seed(0)
    for blk, res in zip(mbconvs, expect):
        blk = copy.deepcopy(blk).eval()
        proj_bn = blk.block[-1][1]
        assert isinstance(proj_bn, nn.BatchNorm2d) and len(blk.block[-1]) == 2  # no activation
        nn.init.zeros_(proj_bn.weight)
        nn.init.zeros_(proj_bn.bias)
        x = torch.randn(1, blk.block[0][0].in_channels, 8, 8)
        with torch.no_grad():
            y = blk(x)
        assert torch.equal(y, x) if res else not y.abs().sum()


def test_quantize_model_converts_and_links_every_bn():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=10, in_channels=3)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    net = mpq.quantize_model(model, keep_8bit=("first", "last"))
    layers = mpq.quant_layers(net)
    assert list(layers) == names and len(layers) == 50
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules())
    assert names[0] == "features.0.0" and names[-1] == "classifier"
    pinned = [n for n, m in layers.items() if m.w_candidates == (8,) and m.a_candidates == (8,)]
    assert pinned == ["features.0.0", "classifier"]
    assert net.mpq_spec["pinned"] == ["classifier", "features.0.0"]
    links = bn_after_conv(net)
    assert list(links) == conv_names
    for conv, bn in links.items():
        assert bn.rpartition(".")[0] == conv.rpartition(".")[0]  # the BN next to it in its Sequential
        assert net.get_submodule(bn).num_features == layers[conv].out_channels


def test_switchable_bn_replaces_every_bn():
    torch.manual_seed(0)
    net = mpq.quantize_model(build_model("efficientnet_lite0", num_classes=10), w_bits=(2, 4),
                             a_bits=(2, 4), bn="switchable")
    plain = [n for n, m in net.named_modules() if type(m) is nn.BatchNorm2d and ".bns." not in n]
    assert plain == []  # every BN (each follows a conv) became switchable
    sbns = {n: m for n, m in net.named_modules() if isinstance(m, mpq.SwitchableBatchNorm2d)}
    assert len(sbns) == 49
    # 2 x 2 (w, a) keys each, but the BN after the pinned 8/8 stem conv has one
    assert {n: len(m.bns) for n, m in sbns.items()} == {n: 1 if n == "features.0.1" else 4 for n in sbns}


@pytest.mark.parametrize("in_channels, size", [(3, 64), (1, 28)])
def test_forward_at_random_config_is_finite(in_channels, size):
    torch.manual_seed(0)
    spec = {"name": "efficientnet_lite0", "num_classes": 10, "in_channels": in_channels}
    net = mpq.quantize_model(build_model_from_spec(spec))
    x = torch.randn(2, in_channels, size, size)
    mpq.calibrate_activations(net, x)
    cfg = mpq.random_config(net, torch.Generator().manual_seed(0))
    mpq.set_bits(net, cfg)
    assert mpq.get_bits(net) == cfg
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    net.train()
    out = net(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_width_is_rejected():
    with pytest.raises(mpq.UserError, match="width"):
        build_model("efficientnet_lite0", num_classes=10, width=8)
