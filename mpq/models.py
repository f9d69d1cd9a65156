"""Models: any torchvision classifier by name, a CIFAR ResNet-20, EfficientNet-Lite0 and the small
embedded-default CNNs (small_cnn, small_mobilenet)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn
import torch.nn.functional as F

from .errors import UserError


class BasicBlockCifar(nn.Module):
    """ResNet basic block (He et al., 2016, CIFAR variant) with a 1x1-conv projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3 stages of ``n`` basic blocks with ``widths`` channels (ResNet-20: n=3)."""

    def __init__(self, n: int = 3, widths=(16, 32, 64), num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlockCifar(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(3, (16, 32, 64), num_classes, in_channels)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm2d [-> ReLU6]: the conv is registered right before its BN."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted-residual block without squeeze-and-excitation: [1x1 expand] -> kxk depthwise ->
    1x1 linear projection, with an identity shortcut when ``stride == 1`` and ``cin == cout``."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        layers = [_conv_bn(cin, mid)] if expand != 1 else []
        layers += [_conv_bn(mid, mid, k, stride, groups=mid), _conv_bn(mid, cout, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (Tan & Le, 2019; the Lite variant drops squeeze-and-excitation, uses ReLU6 and
    does not scale stem and head). ``stages`` rows are (expand t, kernel k, first stride s, channels c,
    repeats n); the default is Lite0: 4,652,008 parameters at 1000 classes (~4.65 M, the size
    published for timm's efficientnet_lite0, the one-shot paper's reference model)."""

    LITE0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, stages=LITE0,
                 stem: int = 32, head: int = 1280, dropout: float = 0.2) -> None:
        super().__init__()
        blocks, cin = [_conv_bn(in_channels, stem, 3, 2)], stem
        for t, k, s, c, n in stages:
            for i in range(n):
                blocks.append(MBConv(cin, c, t, k, s if i == 0 else 1))
                cin = c
        blocks.append(_conv_bn(cin, head))
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(self.dropout(x))


def efficientnet_lite0(num_classes: int = 1000, in_channels: int = 3) -> EfficientNetLite:
    return EfficientNetLite(num_classes, in_channels)


class SmallCNN(nn.Module):
    """A plain 6-layer CNN for 28x28 grey images (~19k parameters at the default width 8; channels
    w, 2w, 2w, 4w, 4w); the embedded default's model before :class:`SmallMobileNet`.

    At 2 bits it loses about 2 points against 6 bits on Fashion-MNIST, but its layers are alike, so
    per-layer bit-widths only tie one bit-width for all at equal BitOPs (see the README).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.width = w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(in_channels, w, 1), block(w, 2 * w, 2),
                                      block(2 * w, 2 * w, 1), block(2 * w, 4 * w, 2),
                                      block(4 * w, 4 * w, 1))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallMobileNet(nn.Module):
    """A MobileNet-style CNN for 28x28 grey images: a 3x3 stem conv, four depthwise-separable blocks
    (3x3 depthwise conv + 1x1 pointwise conv, each with BN and ReLU; channels w, 2w, 2w, 4w, 4w) and a
    linear classifier (10,474 parameters at the default width 16).

    The layers differ the way edge CNNs do: a depthwise conv costs 9 MACs per output value and is
    sensitive to low bit-widths, a pointwise conv costs ``C_in`` MACs per output value and is robust.
    That is where per-layer bit-widths beat a uniform bit-width at the same BitOPs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.width = w = width

        def bn_relu(c: int) -> list:
            return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]

        def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), *bn_relu(cin),
                                 nn.Conv2d(cin, cout, 1, bias=False), *bn_relu(cout))

        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), *bn_relu(w)),
            separable(w, 2 * w, 2), separable(2 * w, 2 * w, 1),
            separable(2 * w, 4 * w, 2), separable(4 * w, 4 * w, 1))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


LOCAL_MODELS: Dict[str, Callable[..., nn.Module]] = {"resnet20": resnet20,
                                                     "efficientnet_lite0": efficientnet_lite0,
                                                     "small_cnn": SmallCNN,
                                                     "small_mobilenet": SmallMobileNet}
WIDTH_MODELS = ("small_cnn", "small_mobilenet")


def check_model_name(name: str) -> None:
    """Raise :class:`UserError` unless ``name`` is a local model or a torchvision classifier."""
    if name in LOCAL_MODELS:
        return
    import torchvision
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib
        close = difflib.get_close_matches(str(name), list(LOCAL_MODELS) + available, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"model.name: unknown model {name!r}; {hint}choose 'resnet20', 'efficientnet_lite0', "
                        f"'small_cnn', 'small_mobilenet' or a torchvision classifier such as resnet18, "
                        f"resnet50, mobilenet_v2")


def build_model(name: str, num_classes: int = 1000, in_channels: int = 3,
                pretrained: Optional[str] = None, width: Optional[int] = None) -> nn.Module:
    """Build a float model: ``resnet20``, ``efficientnet_lite0``, ``small_cnn``, ``small_mobilenet`` or
    any torchvision classifier by name.

    ``pretrained`` is a local file with a float ``state_dict`` (loaded with ``weights_only=True``);
    nothing is downloaded. ``width`` sets the base channel count of ``small_cnn`` / ``small_mobilenet`` (None: its default).
    """
    check_model_name(name)
    if width is not None and name not in WIDTH_MODELS:
        raise UserError(f"model.width: only {' and '.join(WIDTH_MODELS)} have a width setting, not "
                        f"{name!r}; set it to null")
    if name in LOCAL_MODELS:
        kwargs = {"width": int(width)} if width is not None else {}
        model = LOCAL_MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    else:
        import torchvision
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            raise UserError(f"model.in_channels: torchvision models take 3 channels, got {in_channels}")
    if pretrained:
        from .checkpoint import load_state_or_explain, safe_load  # one loader: one clear error each
        state = safe_load(pretrained, "model.pretrained")  # missing, folder, empty, damaged, pickle payload
        if state.get("format") == "mpq-supernet":
            raise UserError(f"model.pretrained: {pretrained!r} is an mpq supernet checkpoint, not a float "
                            f"state_dict; continue a run with train.resume=<file> (or --resume) instead")
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        elif isinstance(state.get("model"), dict):
            state = state["model"]
        load_state_or_explain(model, state, f"model.pretrained: {pretrained!r} does not fit model {name!r}",
                              "give a float state_dict of that model (torch.save(model.state_dict(), path))")
    return model


def build_model_from_spec(spec_model: Dict) -> nn.Module:
    """The float model described by a checkpoint spec's ``model`` entry (name, num_classes,
    in_channels and, for small_cnn / small_mobilenet, an optional width)."""
    return build_model(spec_model["name"], num_classes=int(spec_model["num_classes"]),
                       in_channels=int(spec_model["in_channels"]), width=spec_model.get("width"))
