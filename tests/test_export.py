"""Export round-trip: packed integer codes, BN folding, logits/accuracy equal to the supernet's,
weights_only loading and the size ratio."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq
from mpq.checkpoint import atomic_save, build_supernet, load_supernet
from support import make_checkpoint
from mpq.errors import UserError
from mpq.layers import SwitchableBatchNorm2d
from mpq.quantizer import LsqQuantizer, integer_codes
from search.evaluator import evaluate, recalibrate_bn
from mpq.export import (fixed_model, FixedConv2d, FixedLinear, export, fixed_payload, float_model_bytes,
                           load_fixed, pack_codes, unpack_codes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    from mpq.data import build_datasets
    info = build_datasets("fashion_mnist", seed=0)
    val = torch.utils.data.Subset(info.val, list(range(512)))
    bn = torch.utils.data.Subset(info.train, list(range(512)))
    return val, bn


@pytest.fixture(scope="module", params=["shared", "switchable"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "supernet.pt"), bn=request.param)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (n,), generator=g)
    codes[0] = -2 ** (bits - 1)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4]), 3)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0]), 9)


def _mixed_config(net):
    g = torch.Generator().manual_seed(3)
    return mpq.random_config(net, g, respect_frozen=False)


def test_export_round_trip_equals_the_supernet(checkpoint, data, tmp_path):
    val, bn_data = data
    net, ckpt = load_supernet(checkpoint)
    cfg = _mixed_config(net)
    mpq.set_bits(net, cfg)
    shared = ckpt["spec"]["quant"]["bn"] == "shared"
    path = str(tmp_path / "model_fixed.pt")
    info = export(net, cfg, path, spec=ckpt["spec"], bn_data=bn_data if shared else None, bn_batches=2)
    # the supernet's accuracy of that config, BN as export saw it
    ref = evaluate(net, None, val, recalibrate=False, batch_size=128)

    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "mpq-fixed"
    assert payload["config"] == {n: [w, a] for n, (w, a) in cfg.items()}
    layers = mpq.quant_layers(net)
    for name, entry in payload["layers"].items():
        layer = layers[name]
        w_bits = cfg[name][0]
        assert entry["w_bits"] == w_bits and entry["packed"].dtype == torch.uint8
        assert entry["packed"].numel() == (layer.weight.numel() * w_bits + 7) // 8
        qn, qp = layer.w_quant.grid(w_bits)
        expect = integer_codes(layer.weight.detach(), layer.w_quant.step[str(w_bits)].detach(), qn, qp)
        got = unpack_codes(entry["packed"], w_bits, layer.weight.numel()).view_as(expect)
        assert torch.equal(got.float(), expect)
    assert set(payload["folded"].values()) == {f"features.{i}.1" for i in range(5)}

    fixed = load_fixed(path)
    kinds = {type(m) for m in fixed.modules()}
    assert not kinds & {LsqQuantizer, nn.ParameterDict, SwitchableBatchNorm2d, nn.BatchNorm2d,
                        mpq.QuantConv2d, mpq.QuantLinear}
    assert FixedConv2d in kinds and FixedLinear in kinds
    assert fixed.mpq_fixed_config == cfg
    x = torch.stack([val[i][0] for i in range(256)])
    with torch.no_grad():
        a, b = fixed_model(net)(x), fixed(x)
        sup = net(x)
    assert torch.equal(a, b)                      # the search's exported form == the file
    assert (sup - b).abs().max() < 0.5            # the int32 bias moves the logits a little
    ref = evaluate(net, None, val, recalibrate=False, batch_size=128, form="exported")
    got = evaluate(fixed, None, val, recalibrate=False, batch_size=128)
    assert got["acc"] == ref["acc"] and got["n"] == ref["n"] == 512
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)

    # size: about the bit ratio of the float model (plus per-tensor overhead of a small model)
    numel = {n: m.weight.numel() for n, m in layers.items()}
    ratio = sum(numel[n] * cfg[n][0] for n in numel) / (32.0 * sum(numel.values()))
    assert info["float_bytes"] == float_model_bytes(net)
    assert info["bytes"] == os.path.getsize(path)
    assert info["float_bytes"] * ratio * 0.9 < info["bytes"] < info["float_bytes"] * ratio + 12_000
    assert info["bytes"] < os.path.getsize(checkpoint) / 4


def test_export_conv_bias_per_tensor_steps_float_layer_and_unfolded_bn(tmp_path):
    torch.manual_seed(0)

    def arch():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect"),
                             nn.ReLU(), nn.BatchNorm2d(8),                     # BN not after a conv
                             nn.Conv2d(8, 4, 1, groups=2, bias=False), nn.BatchNorm2d(4),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    net = mpq.quantize_model(arch(), w_bits=(2, 3, 32), a_bits=(4, 8, 32), keep_8bit=(), per_channel=False)
    x = torch.randn(32, 3, 12, 12)
    mpq.calibrate_activations(net, x)
    cfg = {"0": (3, 8), "3": (32, 4), "6": (2, 32), "10": (3, 4)}
    mpq.set_bits(net, cfg)
    recalibrate_bn(net, [x], 1)
    with torch.no_grad():
        ref = net(x)
    path = str(tmp_path / "fixed.pt")
    export(net, cfg, path)
    with pytest.raises(UserError, match="no model spec"):
        load_fixed(path)
    fixed = load_fixed(path, model=arch())
    assert isinstance(fixed[5], nn.BatchNorm2d)          # kept, not folded
    assert isinstance(fixed[1], nn.Identity) and isinstance(fixed[7], nn.Identity)
    assert fixed[3].weight_codes.dtype == torch.float32   # 32-bit weights stay float
    assert fixed[0].weight_codes.dtype == torch.int8
    assert fixed[6].act_step is None
    with torch.no_grad():
        out = fixed(x)
        assert torch.equal(out, fixed_model(net)(x))
    assert (out - ref).abs().max() < 0.5
    # the int32 bias of layer "0", from the BN statistics by hand: bias * g + beta - mean * g with
    # g = gamma / sqrt(var + eps), rounded at s_a * s_w (per tensor here)
    bn, conv = net[1], net[0]
    g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    folded = conv.bias.double() * g + bn.bias.double() - bn.running_mean.double() * g
    s_w = conv.w_quant.step["3"].double() * g
    s_a = conv.a_quant.step["8"].double()
    scale = (s_a * s_w).float()
    expect_q = torch.round(folded.float() / scale)
    assert torch.equal(fixed[0].bias_q.long(), expect_q.long())
    assert torch.allclose(fixed[0].bias_dq, expect_q * scale)


def test_load_fixed_errors(tmp_path, checkpoint):
    with pytest.raises(UserError, match="no such file"):
        load_fixed(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="not an mpq fixed-precision model"):
        load_fixed(checkpoint)
    net, ckpt = load_supernet(checkpoint)
    payload = fixed_payload(net, mpq.uniform_config(net, 4, 4), ckpt["spec"])
    payload["state"]["bogus.weight"] = torch.zeros(1)
    atomic_save(payload, str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="does not fit"):
        load_fixed(str(tmp_path / "bad.pt"))


def test_mpq_export_imports_lazily(tmp_path):
    target = str(tmp_path / "f.pt")
    code = "\n".join([
        "import sys, mpq",
        "assert 'search' not in sys.modules",
        "from mpq.export import export, load_fixed",
        "assert 'search' not in sys.modules",
        "import torch, mpq.models",
        "net = mpq.quantize_model(mpq.models.SmallCNN())",
        "mpq.calibrate_activations(net, torch.randn(2, 1, 28, 28))",
        "net.eval()",
        f"export(net, None, {target!r}, spec={{'model': {{'name': 'small_cnn', 'num_classes': 10, 'in_channels': 1}}}})",
        f"m = load_fixed({target!r})",
        "x = torch.randn(3, 1, 28, 28)",
        "import mpq.export",
        "assert torch.equal(m(x), mpq.export.fixed_model(net)(x))",
        "print('ok')"])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_search_export_is_a_deprecated_alias_of_mpq_export():
    """The export moved to mpq.export (mpq never imports search); the old import still works for one
    release and says where to go."""
    import importlib
    import sys
    import warnings
    import mpq.export
    sys.modules.pop("search.export", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("search.export")
    assert any(issubclass(w.category, DeprecationWarning) and "mpq.export" in str(w.message) for w in caught)
    assert old.load_fixed is mpq.export.load_fixed and old.fixed_model is mpq.export.fixed_model
