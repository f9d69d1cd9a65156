"""quantize_model's per-layer report: every layer reported quantized runs its weight and input
quantizers and costs BitOPs (one model per torchvision family here, every classifier with
MPQ_SLOW=1); Swin's window attention is quantized for real and exports to a working fixed model."""
import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import swin_transformer as swin
from torchvision.models.vision_transformer import VisionTransformer

import mpq
from mpq.layers import QUANT_LAYERS, SwinWindowAttention, SwinWindowAttentionV2, reroute_functional_layers
from mpq.quantizer import LsqQuantizer
from mpq.supernet import LEFT_FLOAT, PINNED, QUANTIZED, quantization_report
from search.cost import BitOpsCounter
from mpq.export import FixedLinear, fixed_from_payload, fixed_model, fixed_payload

NUM_CLASSES = 5
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)


def _run_quantizers(net: nn.Module, x: torch.Tensor) -> set:
    """``{(layer_name, "w" | "a")}`` of the quantizers that ran during one eval forward of ``x``."""
    ran = set()
    handles = []
    for name, layer in mpq.quant_layers(net).items():
        for tag, q in (("w", layer.w_quant), ("a", layer.a_quant)):
            assert isinstance(q, LsqQuantizer)
            handles.append(q.register_forward_hook(lambda m, i, o, key=(name, tag): ran.add(key)))
    net.eval()
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def check_report(net: nn.Module, x: torch.Tensor) -> None:
    """The report covers every weight layer once; the layers it calls quantized or pinned are
    exactly the switchable layers, each runs both quantizers and costs > 0 BitOPs at x's size;
    the layers left float are plain float modules with a reason."""
    report = quantization_report(net)
    names = [r.name for r in report]
    assert len(names) == len(set(names))
    assert {r.status for r in report} <= {QUANTIZED, PINNED, LEFT_FLOAT}
    quantized = [r.name for r in report if r.status in (QUANTIZED, PINNED)]
    assert quantized == list(mpq.quant_layers(net))
    weight_layers = {n for n, m in net.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    reported_layers = {r.name for r in report if r.kind != "MultiheadAttention"}
    assert reported_layers == weight_layers
    for r in report:
        if r.status == LEFT_FLOAT:
            assert r.reason and not isinstance(net.get_submodule(r.name), QUANT_LAYERS)
        if r.status == PINNED:
            assert "keep_8bit" in r.reason
    mpq.set_bits(net, mpq.max_config(net))
    ran = _run_quantizers(net, x)
    missing = [(n, t) for n in quantized for t in ("w", "a") if (n, t) not in ran]
    assert not missing, f"reported quantized but the quantizer never ran: {missing[:5]}"
    cost = BitOpsCounter(net, tuple(x.shape)).layer_bitops()
    free = [n for n in quantized if not cost[n] > 0]
    assert not free, f"reported quantized but 0 BitOPs: {free[:5]}"


def _small_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=NUM_CLASSES)


# One model per torchvision family (input side chosen small but valid for each).
FAMILIES = [
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES), 32),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=NUM_CLASSES), 32),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES), 32),
    ("efficientnet_b0", lambda: torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES), 32),
    ("regnet_x_400mf", lambda: torchvision.models.regnet_x_400mf(num_classes=NUM_CLASSES), 32),
    ("convnext_tiny", lambda: torchvision.models.convnext_tiny(num_classes=NUM_CLASSES), 32),
    ("shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=NUM_CLASSES), 32),
    ("squeezenet1_1", lambda: torchvision.models.squeezenet1_1(num_classes=NUM_CLASSES), 64),
    ("mnasnet0_5", lambda: torchvision.models.mnasnet0_5(num_classes=NUM_CLASSES), 32),
    ("densenet121", lambda: torchvision.models.densenet121(num_classes=NUM_CLASSES), 32),
    ("googlenet", lambda: torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=False,
                                                      init_weights=False), 32),
    ("vit", _small_vit, 32),
    ("swin_t", lambda: torchvision.models.swin_t(num_classes=NUM_CLASSES), 32),
]


@pytest.mark.parametrize("name, factory, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_reported_quantized_layers_run_their_quantizers_and_cost_bitops(name, factory, size):
    torch.manual_seed(0)
    net = mpq.quantize_model(factory())
    assert net.mpq_report == quantization_report(net)
    check_report(net, torch.randn(1, 3, size, size))


def test_report_statuses_and_reasons():
    torch.manual_seed(0)
    net = mpq.quantize_model(_small_vit(), first_input_bits=32)
    by_name = {r.name: r for r in quantization_report(net)}
    assert by_name["conv_proj"].status == PINNED and "first layer" in by_name["conv_proj"].reason
    assert "first_input_bits=32" in by_name["conv_proj"].reason
    assert by_name["heads.head"].status == PINNED and "last layer" in by_name["heads.head"].reason
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert by_name[attn].status == LEFT_FLOAT and "in_proj_weight" in by_name[attn].reason
    assert by_name[attn + ".out_proj"].status == LEFT_FLOAT
    assert by_name["encoder.layers.encoder_layer_0.mlp.0"] == (
        "encoder.layers.encoder_layer_0.mlp.0", "Linear", QUANTIZED, "")
    with pytest.raises(ValueError, match="not converted by mpq.quantize_model"):
        quantization_report(_small_vit())


class _Functional(nn.Module):
    """A module that hands its child's weight to a functional call (the layer's forward never runs)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return nn.functional.linear(x, self.lin.weight, self.lin.bias)


def test_unsupported_and_bypassed_layers_are_left_float():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 4), _Functional(), nn.Linear(4, 2))
    net = mpq.quantize_model(model, keep_8bit=())
    by_name = {r.name: r for r in quantization_report(net)}
    assert by_name["1"].status == LEFT_FLOAT and "ConvTranspose2d is not supported" in by_name["1"].reason
    assert by_name["4.lin"].status == LEFT_FLOAT and "_Functional.forward reads" in by_name["4.lin"].reason
    assert type(net.get_submodule("4.lin")) is nn.Linear
    assert [n for n, r in by_name.items() if r.status == QUANTIZED] == ["0", "3", "5"]
    check_report(net, torch.randn(1, 3, 3, 3))


# ---------------------------------------------------------------------------------------- Swin
def _tiny_swin(v2: bool) -> nn.Module:
    """A two-stage torchvision Swin (V1 or V2 blocks): at 56x56 the first stage is 14x14 tokens,
    two 7x7 windows a side, so the shifted blocks use the shift mask."""
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=[7, 7], stochastic_depth_prob=0.0, num_classes=NUM_CLASSES,
                                **extra)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_rerouted_swin_attention_equals_torchvision(v2):
    torch.manual_seed(0)
    ref = _tiny_swin(v2).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expect = ref(x)
    keys = set(ref.state_dict())
    rerouted = reroute_functional_layers(ref)
    cls = SwinWindowAttentionV2 if v2 else SwinWindowAttention
    assert len(rerouted) == 4 and all(isinstance(ref.get_submodule(n), cls) for n in rerouted)
    assert set(ref.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(ref(x), expect, atol=1e-6)


def test_swin_v2_key_bias_stays_zero():
    """Swin V2 has no key bias (torchvision zeroes it each forward): the re-routed attention keeps
    it at zero, so its gradient is zero and the exported bias is zero too."""
    torch.manual_seed(0)
    net = mpq.quantize_model(_tiny_swin(v2=True))
    qkv = net.get_submodule("features.1.0.attn.qkv")
    n = qkv.out_features // 3
    assert torch.equal(qkv.bias[n:2 * n], torch.zeros(n))
    net.train()
    net(torch.randn(2, 3, 56, 56)).sum().backward()
    assert torch.equal(qkv.bias.grad[n:2 * n], torch.zeros(n))
    assert qkv.bias.grad[:n].abs().sum() > 0


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_attention_quantized_costed_and_exported(v2):
    torch.manual_seed(0)
    net = mpq.quantize_model(_tiny_swin(v2), w_bits=(4, 32), a_bits=(4, 32), keep_8bit=())
    x = torch.randn(2, 3, 56, 56)
    mpq.calibrate_activations(net, x)
    by_name = {r.name: r for r in quantization_report(net)}
    attn = ["features.1.0.attn.qkv", "features.1.0.attn.proj", "features.3.1.attn.qkv"]
    for name in attn:
        assert by_name[name].status == QUANTIZED and "re-routed" in by_name[name].reason
    check_report(net, x[:1])
    # qkv sees every token of every window: 14x14 tokens, 16 -> 48 channels
    assert BitOpsCounter(net, (1, 3, 56, 56)).macs["features.1.0.attn.qkv"] == 14 * 14 * 16 * 48

    # Biases at zero: the fixed model's int32 bias rounding is then exact, and the fixed model
    # computes the supernet's numbers (same codes x scale, same activation fake-quant).
    with torch.no_grad():
        for layer in mpq.quant_layers(net).values():
            if layer.bias is not None:
                layer.bias.zero_()
    net.eval()
    for cfg in (mpq.uniform_config(net, 4, 4), mpq.uniform_config(net, 32, 32)):
        mpq.set_bits(net, cfg)
        with torch.no_grad():
            expect = net(x)
        fixed = fixed_model(net, cfg)
        assert isinstance(fixed.get_submodule("features.1.0.attn.qkv"), FixedLinear)
        with torch.no_grad():
            assert torch.allclose(fixed(x), expect, atol=1e-5, rtol=1e-4)
        # from the exported payload into a freshly built float architecture (load_fixed's path)
        loaded = fixed_from_payload(fixed_payload(net, cfg), _tiny_swin(v2))
        with torch.no_grad():
            assert torch.allclose(loaded(x), expect, atol=1e-5, rtol=1e-4)
    # at 4 bits the attention really is quantized: the output differs from the float one
    mpq.set_bits(net, mpq.uniform_config(net, 4, 4))
    with torch.no_grad():
        assert not torch.allclose(net(x), expect, atol=1e-3)


# ------------------------------------------------------------------------------ every classifier
def _input_side(name: str) -> int:
    return {"inception_v3": 80, "maxvit_t": 224, "vit_h_14": 56}.get(name, 64)


def _build_classifier(name: str) -> nn.Module:
    kwargs = {"weights": None, "num_classes": NUM_CLASSES}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False   # the auxiliary heads only run in training mode
        kwargs["init_weights"] = False
    if name.startswith("vit_"):
        kwargs["image_size"] = _input_side(name)
    return torchvision.models.get_model(name, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier(name):
    torch.manual_seed(0)
    net = mpq.quantize_model(_build_classifier(name))
    side = _input_side(name)
    check_report(net, torch.randn(1, 3, side, side))


def test_swin_onnx_export_fails_with_a_clear_error():
    """ONNX export covers CNN operations only; a Swin fixed model is refused with a ValueError
    (as any unsupported model is), not an fx tracing error."""
    pytest.importorskip("onnx")
    from search.onnx_export import build_onnx
    torch.manual_seed(0)
    net = mpq.quantize_model(_tiny_swin(v2=False)).eval()
    with torch.no_grad():
        net(torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="ONNX export"):
        build_onnx(fixed_model(net), [3, 56, 56])
