"""The one-shot paper's reference recipe (``../shared/REFERENCE_RECIPE.md`` items 2-7, 11): each option
checked against a hand formula or a NumPy computation, never against mpq's own code path.

Tiny CPU models only (a single conv / linear, the embedded small_mobilenet at width 8 on 64
Fashion-MNIST images, an untrained torchvision MobileNetV2 for layer bookkeeping and BitOPs)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import mpq
from mpq.checkpoint import load_supernet
from mpq.config import load_config
from mpq.distributed import cleanup
from mpq.ema import ModelEma, ema_decay_for
from mpq.losses import (FeatureTap, R2Loss, idm_feature_loss, lowest_bit_layers, qe_weight_at,
                        quantization_error_loss)
from mpq.supernet import is_depthwise, is_pinned, quant_layers
from mpq.optim import lr_at
from mpq.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "recipe_paper.yaml")
IR18 = os.path.join(ROOT, "configs", "imagenet_resnet18.yaml")
IMB2 = os.path.join(ROOT, "configs", "imagenet_mobilenetv2.yaml")


# ----------------------------------------------------------------------------- helpers
def recipe_config(tmp_path, *extra, name="recipe"):
    """configs/recipe_paper.yaml over the embedded default, shrunk to a seconds-long run: 64
    Fashion-MNIST images, batch 16 (4 steps an epoch), small_mobilenet at width 8."""
    return load_config([RECIPE], [
        "data.train_subset=64", "data.val_subset=32", "data.batch_size=16", "data.eval_batch_size=32",
        "model.width=8", "train.epochs=1", "train.warmup_epochs=0", f"output.dir={tmp_path}",
        f"output.name={name}", "output.progress=false", "output.log_every=1",
        "eval.bn_recalib_batches=1", "eval.random_configs=0", "eval.uniform_bits=[]", *extra])


@pytest.fixture
def make_trainer():
    made = []

    def build(cfg, **kw):
        tr = Trainer(cfg, **kw)
        made.append(tr)
        return tr

    yield build
    for tr in made:
        if tr.tap is not None:
            tr.tap.remove()
        cleanup(tr.env)


def batches(trainer, n):
    trainer.sampler.set_epoch(0)
    it = iter(trainer.train_loader)
    return [next(it) for _ in range(n)]


def single_layer(layer, **kw):
    """A one-layer supernet whose only layer is mixed precision (not pinned to 8 bits)."""
    return mpq.quantize_model(nn.Sequential(layer), keep_8bit=(), **kw)


def hand_max_config(net):
    return {n: (max(m.w_candidates), max(m.a_candidates)) for n, m in quant_layers(net).items()}


def hand_min_config(net):
    return {n: (min(m.w_allowed), min(m.a_allowed)) for n, m in quant_layers(net).items()}


# ----------------------------------------------------------------------------- 1. step-size init
def _gaussian_conv(seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(64, 64, 3, bias=False)
    with torch.no_grad():
        conv.weight.normal_(0.0, 1.0)
    return conv


def test_three_sigma_weight_step_init_per_tensor():
    conv = _gaussian_conv()
    w = conv.weight.detach().double().numpy().ravel()
    net = single_layer(conv, per_channel=False, w_init="three_sigma")
    layer = net[0]
    mu, sigma = w.mean(), w.std(ddof=1)   # Bessel-corrected, as the reference's torch.std
    spread = max(abs(mu - 3 * sigma), abs(mu + 3 * sigma))
    for b in (2, 3, 4, 5, 6):
        s = layer.w_quant.step[str(b)].detach()
        assert s.shape == (1,)
        assert float(s) == pytest.approx(spread / 2 ** (b - 1), rel=1e-4), b
        assert float(s) == pytest.approx(3.0 / 2 ** (b - 1), rel=0.02), b   # mu ~ 0, sigma ~ 1
    assert float(layer.w_quant.step["6"].detach()) == pytest.approx(0.09375, abs=2e-3)


def test_three_sigma_weight_step_init_per_channel():
    conv = _gaussian_conv(seed=1)
    with torch.no_grad():   # give the rows different means and scales
        conv.weight.mul_(torch.linspace(0.5, 2.0, 64).view(-1, 1, 1, 1)).add_(
            torch.linspace(-0.5, 0.5, 64).view(-1, 1, 1, 1))
    rows = conv.weight.detach().double().numpy().reshape(64, -1)
    net = single_layer(conv, per_channel=True, w_init="three_sigma")
    mu, sigma = rows.mean(1), rows.std(1, ddof=1)
    spread = np.maximum(np.abs(mu - 3 * sigma), np.abs(mu + 3 * sigma))
    for b in (2, 3, 4, 5, 6):
        s = net[0].w_quant.step[str(b)].detach()
        assert s.shape == (64, 1, 1, 1)
        np.testing.assert_allclose(s.double().numpy().ravel(), spread / 2 ** (b - 1), rtol=1e-5)


# ----------------------------------------------------------------------------- 2. gradient scaling
def _lsq_step_grad_numpy(x, g, s, qn, qp):
    """Unscaled LSQ step gradient sum(g * (round(clip(v)) - v * inside)), v = x / s."""
    v = x / s
    inside = (v >= -qn) & (v <= qp)
    return float(np.sum(g * (np.round(np.clip(v, -qn, qp)) - v * inside)))


@pytest.mark.parametrize("grad_scale", [False, True])
def test_weight_step_gradient_with_and_without_lsq_scale(grad_scale):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, bias=False)
    net = single_layer(conv, per_channel=False, grad_scale=grad_scale)
    layer = net[0]
    b, s = 4, 0.015   # clip at 7 s = 0.105 inside the default init's +-0.167
    qn, qp = 8, 7
    with torch.no_grad():
        layer.w_quant.step[str(b)].fill_(s)
    g = torch.randn_like(layer.weight)
    (layer.w_quant(layer.weight, b) * g).sum().backward()
    got = float(layer.w_quant.step[str(b)].grad)
    w = layer.weight.detach().double().numpy()
    expected = _lsq_step_grad_numpy(w, g.double().numpy(), s, qn, qp)
    assert 0.1 < np.mean(np.abs(w / s) > 7) < 0.9   # clipped and unclipped weights both occur
    if grad_scale:
        expected /= math.sqrt(w.size * qp)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("grad_scale", [False, True])
def test_activation_step_gradient_with_and_without_lsq_scale(grad_scale):
    torch.manual_seed(3)
    net = single_layer(nn.Conv2d(4, 8, 3, bias=False), per_channel=False, grad_scale=grad_scale)
    aq = net[0].a_quant
    x = torch.rand(5, 4, 6, 6) * 2.0           # non-negative: unsigned grid [0, 15] at 4 bits
    aq.init_from(x)
    b, s = 4, 0.1
    with torch.no_grad():
        aq.step[str(b)].fill_(s)
    x.requires_grad_(True)
    g = torch.randn_like(x)
    (aq(x, b) * g).sum().backward()
    got = float(aq.step[str(b)].grad)
    expected = _lsq_step_grad_numpy(x.detach().double().numpy(), g.double().numpy(), s, 0, 15)
    if grad_scale:   # N: the elements of one sample
        expected /= math.sqrt(x[0].numel() * 15)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)


# ----------------------------------------------------------------------------- 3. optimizers
def test_recipe_optimizers_param_groups(tmp_path, make_trainer):
    tr = make_trainer(recipe_config(tmp_path))
    named = dict(tr.net.named_parameters())
    steps = {id(p) for n, p in named.items() if ".w_quant." in n or ".a_quant." in n}
    assert steps
    # the step sizes: exactly the parameters of a separate Adam, lr 1e-5, betas (0.9, 0.999), no decay
    assert type(tr.step_opt) is torch.optim.Adam
    step_params = [p for g in tr.step_opt.param_groups for p in g["params"]]
    assert len(step_params) == len(steps) and {id(p) for p in step_params} == steps
    for g in tr.step_opt.param_groups:
        assert g["lr"] == pytest.approx(1e-5) and g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0
    # the main SGD: every other parameter, none of the step sizes, nesterov, decay on 4-D weights only
    assert type(tr.opt) is torch.optim.SGD
    main = [p for g in tr.opt.param_groups for p in g["params"]]
    assert not ({id(p) for p in main} & steps)
    others = {id(p) for n, p in named.items() if id(p) not in steps}
    assert {id(p) for p in main} == others
    four_d = {id(p) for n, p in named.items() if id(p) not in steps and p.ndim == 4}
    assert any(p.ndim == 2 for p in main)   # the fc weight exists and must not be decayed
    decayed = set()
    for g in tr.opt.param_groups:
        assert g["nesterov"] is True and g["momentum"] == pytest.approx(0.9)
        if g["weight_decay"] > 0:
            decayed |= {id(p) for p in g["params"]}
    assert decayed == four_d
    # the model follows quant.w_init=three_sigma / per_channel=false: s_b = spread / 2^(b-1)
    for name, layer in quant_layers(tr.net).items():
        if is_pinned(layer):
            continue
        w = layer.weight.detach().double().numpy().ravel()
        spread = max(abs(w.mean() - 3 * w.std(ddof=1)), abs(w.mean() + 3 * w.std(ddof=1)))
        for b in layer.w_candidates:
            assert float(layer.w_quant.step[str(b)].detach()) == pytest.approx(spread / 2 ** (b - 1), rel=1e-4)


def test_recipe_clips_every_gradient_element_to_one(tmp_path, make_trainer):
    tr = make_trainer(recipe_config(tmp_path))
    # blow up one conv weight's and one step size's gradients far beyond 1 (grad_clip_value 1.0)
    conv_name = next(n for n, m in quant_layers(tr.net).items() if not is_pinned(m))
    conv = quant_layers(tr.net)[conv_name]
    big_w, big_s = conv.weight, conv.w_quant.step[str(max(conv.w_candidates))]   # max bits: always run
    for p in (big_w, big_s):
        p.register_hook(lambda g: g * 1e6)
    (x, y), = batches(tr, 1)
    tr.train_step(x, y)
    with_grad = [(n, p) for n, p in tr.net.named_parameters() if p.grad is not None]
    assert len(with_grad) > 10
    for n, p in with_grad:
        assert float(p.grad.abs().max()) <= 1.0, n
    assert float(big_w.grad.abs().max()) == 1.0 and float(big_s.grad.abs().max()) == 1.0


def test_step_size_lr_cosine_to_zero():
    total = 150 * 2502
    assert lr_at(total // 2, total, 0, 1e-5, 0.0) == pytest.approx(5e-6, rel=1e-9)
    assert lr_at(0, total, 0, 1e-5, 0.0) == pytest.approx(1e-5)
    assert lr_at(total - 1, total, 0, 1e-5, 0.0) < 1e-15
    assert lr_at(total, total, 0, 1e-5, 0.0) == pytest.approx(0.0, abs=1e-20)


def test_separate_step_optimizer_uses_only_this_steps_gradients(tmp_path, make_trainer):
    tr = make_trainer(recipe_config(tmp_path))
    seen = []
    tr.net.register_forward_hook(lambda m, i, o: seen.append(mpq.get_bits(tr.net)))
    (x1, y1), (x2, y2) = batches(tr, 2)
    tr.train_step(x1, y1)
    used1, seen[:] = list(seen), []
    before = {n: p.detach().clone() for n, p in tr.net.named_parameters()}
    tr.train_step(x2, y2)
    used2 = list(seen)
    stale = []   # step sizes sampled in step 1 but not in step 2
    for name, layer in quant_layers(tr.net).items():
        for q, i in (("w_quant", 0), ("a_quant", 1)):
            for b in getattr(layer, q).step:
                if int(b) in {c[name][i] for c in used1} and int(b) not in {c[name][i] for c in used2}:
                    stale.append(f"{name}.{q}.step.{b}")
    assert stale, "precondition: some step size must be sampled in step 1 only"
    params = dict(tr.net.named_parameters())
    moved = [n for n in stale if not torch.equal(before[n], params[n])]
    kept_grad = [n for n in stale if params[n].grad is not None and bool(params[n].grad.ne(0).any())]
    assert not moved and not kept_grad, (moved, kept_grad)


# ----------------------------------------------------------------------------- 4. EMA
def test_ema_decay_for_the_paper_run_length():
    assert ema_decay_for(150 * 2502) == pytest.approx(0.9997, abs=1e-9)


def test_model_ema_update_is_a_hand_computed_lerp():
    torch.manual_seed(4)
    lin = nn.Linear(3, 2)
    old_w, old_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    ema = ModelEma(lin, 0.9)
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin.bias.mul_(-2.0)
    ema.update(lin)
    np.testing.assert_allclose(ema.module.weight.numpy(), 0.9 * old_w.numpy() + 0.1 * (old_w.numpy() + 1.0),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ema.module.bias.numpy(), 0.9 * old_b.numpy() + 0.1 * (-2.0 * old_b.numpy()),
                               rtol=1e-6, atol=1e-7)
    assert not ema.module.weight.requires_grad and not ema.module.training


def test_recipe_run_keeps_an_ema_and_search_loads_it(tmp_path, make_trainer):
    decay = 0.9
    record = {}

    def callback(tr, step):
        record.setdefault("step_lr", []).append(tr.step_opt.param_groups[0]["lr"])
        if step == 1:   # EMA after one update = decay * initial + (1 - decay) * trained
            now = tr.net.state_dict()
            ema = tr.ema.state_dict()
            bad = []
            for k, v0 in record["initial"].items():
                if v0.is_floating_point():
                    want = decay * v0.double() + (1 - decay) * now[k].double()
                    if not torch.allclose(ema[k].double(), want, rtol=1e-5, atol=1e-7):
                        bad.append(k)
                elif not torch.equal(ema[k], now[k]):
                    bad.append(k)
            record["bad"] = bad

    tr = make_trainer(recipe_config(tmp_path, "train.max_steps=3", f"train.ema_decay={decay}"),
                      step_callback=callback)
    record["initial"] = {k: v.detach().clone() for k, v in tr.net.state_dict().items()}
    assert tr.ema is not None and tr.ema.decay == decay
    tr.fit()
    assert record["bad"] == []
    # step-size Adam lr: cosine from 1e-5 to 0 over the 3 steps, no warm-up (hand formula)
    want = [0.5 * 1e-5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)]
    assert record["step_lr"] == pytest.approx(want, rel=1e-9)
    path = os.path.join(str(tmp_path), "recipe", "supernet.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model, model_ema = ckpt["model"], ckpt["model_ema"]
    assert isinstance(model_ema, dict) and set(model_ema) == set(model)
    assert any(v.is_floating_point() and not torch.equal(v, model_ema[k]) for k, v in model.items())
    net, _ = load_supernet(path)
    loaded = net.state_dict()
    assert set(loaded) == set(model_ema)
    for k, v in model_ema.items():
        assert torch.equal(loaded[k], v), k


# ----------------------------------------------------------------------------- 5. QE loss
def test_qe_weight_cosine_ramp():
    start = 40 / 150
    assert qe_weight_at(start, 0.1, start) == 0.0
    assert qe_weight_at(0.1, 0.1, start) == 0.0
    assert qe_weight_at(95 / 150, 0.1, start) == pytest.approx(0.05, rel=1e-9)
    assert qe_weight_at(1.0, 0.1, start) == pytest.approx(0.1, rel=1e-9)


def _qe_numpy(w, s, b, b_min):
    """The reference's auxiliary_quantized_loss (util/qat.py:177-197) in NumPy, for one layer:
    sum over output channels of the mean over that channel's weights of (clip(w) - q~)^2, where
    q~ = q_b(w) if q_b(w) is one of the values k * 2^(b - b_min) * s (k in b_min's integer range),
    else clip(w)."""
    qn, qp = 2 ** (b - 1), 2 ** (b - 1) - 1
    clipped = np.clip(w, -qn * s, qp * s)
    q = np.round(np.clip(w / s, -qn, qp)) * s
    if b != b_min:
        ratio = 2 ** (b - b_min)
        grid = [k * ratio * s for k in range(-(2 ** (b_min - 1)), 2 ** (b_min - 1))]
        on_grid = np.zeros(w.shape, dtype=bool)
        for v in grid:
            on_grid |= np.isclose(q, v, rtol=0, atol=1e-9)
        q = np.where(on_grid, q, clipped)
    per_channel = ((clipped - q) ** 2).reshape(w.shape[0], -1).mean(1)
    return float(per_channel.sum()), clipped, q


@pytest.mark.parametrize("b, allowed", [(4, (2, 3, 4, 5, 6)), (6, (3, 4, 5, 6)),
                                        (2, (2, 3, 4, 5, 6)), (3, (3, 4, 5, 6))])
def test_quantization_error_loss_matches_numpy(b, allowed):
    torch.manual_seed(5)
    net = single_layer(nn.Conv2d(2, 3, 3, bias=False), per_channel=False)
    layer = net[0]
    s = {2: 0.6, 3: 0.4, 4: 0.3, 5: 0.12, 6: 0.05}[b]
    with torch.no_grad():
        layer.weight.normal_(0.0, 1.0)
        layer.w_quant.step[str(b)].fill_(s)
    layer.w_allowed = allowed
    mpq.set_bits(net, {"0": (b, 6)})
    loss = quantization_error_loss(net)
    w = layer.weight.detach().double().numpy()
    want, clipped, q = _qe_numpy(w, s, b, min(allowed))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    if b == min(allowed):   # every weight counts: the plain clip-vs-quantized error
        plain = ((clipped - np.round(np.clip(w / s, -2 ** (b - 1), 2 ** (b - 1) - 1)) * s) ** 2)
        assert float(loss.detach()) == pytest.approx(float(plain.reshape(3, -1).mean(1).sum()), rel=1e-5)
        assert want > 0
    else:
        assert 0 < want < float(((clipped - np.round(clipped / s) * s) ** 2).reshape(3, -1).mean(1).sum())
    loss.backward()
    step = layer.w_quant.step[str(b)]
    assert step.grad is None or float(step.grad.abs().max()) == 0.0   # q~ and s are detached
    inside = (w >= -(2 ** (b - 1)) * s) & (w <= (2 ** (b - 1) - 1) * s)
    k = w[0].size   # weights per output channel
    np.testing.assert_allclose(layer.weight.grad.double().numpy(), 2 * (clipped - q) / k * inside,
                               rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- 6. IDM
def test_idm_sum_and_mean_over_layers():
    student = {"a": torch.zeros(2, 3, 4, 4), "b": torch.zeros(2, 3, 4, 4), "c": torch.zeros(2, 3)}
    teacher = {"a": torch.ones(2, 3, 4, 4), "b": torch.full((2, 3, 4, 4), math.sqrt(3.0)),
               "c": torch.full((2, 3), 10.0)}
    assert float(idm_feature_loss(student, teacher, ["a", "b"], reduction="sum")) == pytest.approx(4.0)
    assert float(idm_feature_loss(student, teacher, ["a", "b"], reduction="mean")) == pytest.approx(2.0)
    assert float(idm_feature_loss(student, teacher, [], reduction="sum")) == 0.0


def _conv_bn_relu_net():
    torch.manual_seed(6)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 4, 1))
    return mpq.quantize_model(body, keep_8bit=())


@pytest.mark.parametrize("copy", [False, True])
def test_feature_tap_reference_features_are_post_relu(copy):
    net = _conv_bn_relu_net()
    net.train()
    post_relu = {}
    net[2].register_forward_hook(lambda m, i, o: post_relu.__setitem__("out", o.detach().clone()))
    x = torch.randn(4, 3, 6, 6)
    with FeatureTap(net, copy=copy) as tap:
        assert tap.layers == ["0"]
        tap.enabled = True
        net(x)
        f = tap.features["0"].detach()
    if copy:   # the BatchNorm output itself: batch-normalised, so about half of it is negative
        assert float(f.min()) < 0
        assert torch.equal(torch.relu(f), post_relu["out"])
    else:      # the tensor the hook saw was then overwritten by ReLU(inplace=True)
        assert float(f.min()) >= 0
        assert torch.equal(f, post_relu["out"])


def test_idm_layers_are_those_at_their_lowest_allowed_weight_bit():
    net = mpq.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                                           nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)), keep_8bit=("first",))
    quant_layers(net)["4"].w_allowed = (3, 4, 5, 6)   # frozen: its lowest allowed bit is 3
    cfg = {"0": (8, 8), "2": (2, 6), "4": (3, 2)}
    assert lowest_bit_layers(net, cfg) == ["2", "4"]
    assert lowest_bit_layers(net, {"0": (8, 8), "2": (3, 2), "4": (4, 3)}) == []


# ----------------------------------------------------------------------------- 7. sampling
def test_order_without_min_validates(tmp_path):
    cfg = load_config(None, ["train.order=[max, random]", "train.num_random=3"])
    assert cfg["train"]["order"] == ["max", "random"]
    p = tmp_path / "nomin.yaml"
    p.write_text("train:\n  order: [max, random]\n  num_random: 3\n")
    assert load_config(str(p))["train"]["order"] == ["max", "random"]
    assert load_config(RECIPE)["train"]["order"] == ["max", "random"]


def test_sample_configs_max_then_three_random_never_forced_min(tmp_path, make_trainer):
    tr = make_trainer(recipe_config(tmp_path, "train.order=[max, random]", "train.num_random=3"))
    net = tr.net
    lowest, highest = hand_min_config(net), hand_max_config(net)
    mixed = [n for n, m in quant_layers(net).items() if not is_pinned(m)]
    at_lowest = 0
    draws = []
    for _ in range(10):
        out = tr.sample_configs()
        assert [k for k, _ in out] == ["max", "random", "random", "random"]
        assert out[0][1] == highest
        for _, c in out[1:]:
            assert c != lowest
            for n, m in quant_layers(net).items():
                assert c[n][0] in m.w_allowed and c[n][1] in m.a_allowed
            at_lowest += sum(c[n][0] == lowest[n][0] for n in mixed)
            draws.append(c)
    # uniform per layer: about 1/|allowed| of the weight draws sit at the lowest bit, not all of them
    frac = at_lowest / (len(draws) * len(mixed))
    assert 0.05 < frac < 0.5
    assert len({tuple(sorted(c.items())) for c in draws}) == len(draws)


def test_train_step_runs_max_then_three_random_forwards(tmp_path, make_trainer):
    tr = make_trainer(recipe_config(tmp_path, "train.order=[max, random]", "train.num_random=3"))
    seen = []
    tr.net.register_forward_hook(lambda m, i, o: seen.append(mpq.get_bits(tr.net)))
    g_state = tr.config_gen.get_state()
    (x, y), = batches(tr, 1)
    losses = tr.train_step(x, y)
    assert set(losses) == {"max", "random"}
    assert len(seen) == 4
    assert seen[0] == hand_max_config(tr.net)
    tr.config_gen.set_state(g_state)
    expected = [c for _, c in tr.sample_configs()]
    assert seen == expected
    assert all(c != hand_min_config(tr.net) and c != hand_max_config(tr.net) for c in seen[1:])


# ----------------------------------------------------------------------------- 8. MobileNetV2
@pytest.fixture(scope="module")
def mbv2():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    return mpq.quantize_model(torchvision.models.mobilenet_v2(), depthwise_bits=(3, 4, 5, 6),
                              first_input_bits=32)


def test_mobilenetv2_reference_candidates(mbv2):
    layers = quant_layers(mbv2)
    dw = [n for n, m in layers.items() if m.w_candidates == (3, 4, 5, 6) and m.a_candidates == (3, 4, 5, 6)]
    full = [n for n, m in layers.items()
            if m.w_candidates == (2, 3, 4, 5, 6) and m.a_candidates == (2, 3, 4, 5, 6)]
    assert len(dw) == 17 and len(full) == 34 and len(layers) == 53
    for n in dw:   # by hand: one input channel per group, as many groups as channels
        m = layers[n]
        assert m.groups == m.in_channels == m.out_channels and m.weight.shape[1] == 1
        assert is_depthwise(m)
    assert not any(is_depthwise(layers[n]) for n in full)
    assert "features.18.0" in full
    first, last = layers["features.0.0"], layers["classifier.1"]
    assert first.w_candidates == (8,) and first.a_candidates == (32,) and is_pinned(first)
    assert last.w_candidates == (8,) and last.a_candidates == (8,) and is_pinned(last)


def test_mobilenetv2_first_layer_sees_the_unquantized_image(mbv2):
    layer = quant_layers(mbv2)["features.0.0"]
    assert len(layer.a_quant.step) == 0   # no input step size at all
    torch.manual_seed(8)
    x = torch.randn(2, 3, 32, 32) * 2.0
    w = layer.weight.detach().double().numpy()
    s = layer.w_quant.step["8"].detach().double().numpy()
    wq = np.round(np.clip(w / s, -128, 127)) * s
    with torch.no_grad():
        layer.eval()
        got = layer(x)
        want = F.conv2d(x.double(), torch.from_numpy(wq), stride=2, padding=1)
        coarse = F.conv2d(torch.round(x.double() * 10) / 10, torch.from_numpy(wq), stride=2, padding=1)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert float((want - coarse).abs().max()) > 1e-3   # the comparison does see input rounding


def test_mobilenetv2_bitops_count_first_and_last_at_8x8(mbv2):
    from search.cost import BitOpsCounter
    counter = BitOpsCounter(mbv2, (1, 3, 224, 224))
    macs_first = 3 * 3 * 3 * 32 * 112 * 112   # 3 -> 32, 3x3, stride 2: 112 x 112 outputs
    macs_last = 1280 * 1000
    for cfg in (mpq.max_config(mbv2), mpq.min_config(mbv2)):
        assert cfg["features.0.0"] == (8, 32)
        per = counter.layer_bitops(cfg)
        assert per["features.0.0"] == macs_first * 64
        assert per["classifier.1"] == macs_last * 64
    dw = quant_layers(mbv2)["features.1.conv.0.0"]   # 32 channels, 3x3 depthwise, 112 x 112
    assert dw.groups == 32 and dw.kernel_size == (3, 3) and dw.stride == (1, 1)
    assert counter.layer_bitops(mpq.max_config(mbv2))["features.1.conv.0.0"] == 3 * 3 * 32 * 112 * 112 * 36


# ----------------------------------------------------------------------------- 9. configs
def test_print_config_resnet18_reference_keys(capsys):
    from mpq.cli import main
    assert main(["--print-config", "--config", IR18]) == 0
    out = capsys.readouterr().out
    for line in ("  bn: switchable", "  order: [max, random]", "  step_optimizer: adam", "  ema: true",
                 "  nesterov: true", "  grad_clip_value: 1.0", "  freeze_acts: true"):
        assert line in out.splitlines(), line
    cfg = yaml.safe_load(out)
    assert cfg["quant"]["bn"] == "switchable" and cfg["train"]["order"] == ["max", "random"]
    assert cfg["train"]["step_optimizer"] == "adam" and cfg["train"]["ema"] is True
    assert cfg["train"]["nesterov"] is True and cfg["train"]["grad_clip_value"] == 1.0
    assert cfg["scheduler"]["freeze_acts"] is True


def test_two_config_files_merge_in_order(tmp_path, capsys):
    from mpq.cli import main
    later = tmp_path / "later.yaml"
    later.write_text("train:\n  lr: 0.123\nscheduler:\n  freeze_acts: false\n")
    assert main(["--print-config", "--config", IR18, "--config", str(later)]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.123 and cfg["scheduler"]["freeze_acts"] is False
    assert cfg["train"]["epochs"] == 150 and cfg["quant"]["bn"] == "switchable"   # from the first file
    assert main(["--print-config", "--config", str(later), "--config", IR18]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.04 and cfg["scheduler"]["freeze_acts"] is True
    # the recipe preset over a model config keeps what the preset does not set
    both = load_config([IMB2, RECIPE])
    assert both["quant"]["first_input_bits"] == 32 and both["train"]["label_smoothing"] == 0.1
    assert both["quant"]["depthwise_bits"] == [3, 4, 5, 6] and both["train"]["ema"] is True


# ----------------------------------------------------------------------------- 10. R2
def _r2_net():
    torch.manual_seed(9)
    lin = nn.Linear(1000, 100, bias=False)   # 1e5 weights ~ N(0, 0.01^2)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.01)
    return single_layer(lin)


def _soft_min_max_numpy(w, a):
    def soft(t):
        e = np.exp(t - t.max())
        return float(np.sum(w * e) / np.sum(e))
    return soft(a * w) - soft(-a * w)


def test_r2_soft_min_max_at_unit_temperature_is_a_variance_penalty():
    net = _r2_net()
    w = net[0].weight.detach().double().numpy().ravel()
    r2 = R2Loss(net, "softminmax", eta=0.0, init_temperature=1.0)
    got = float(r2(net).detach())
    assert got == pytest.approx(_soft_min_max_numpy(w, 1.0), rel=1e-3)
    assert got == pytest.approx(2 * w.var(), rel=0.2)              # ~2e-4
    assert got < 0.01 * (w.max() - w.min())                        # nowhere near the range (~0.09)


def test_r2_default_temperature_is_scale_aware():
    net = _r2_net()
    w = net[0].weight.detach().double().numpy().ravel()
    r2 = R2Loss(net, "softminmax", eta=0.0)   # init_temperature=None
    (alpha,) = [float(p.detach()) for p in r2.parameters()]
    assert alpha == pytest.approx(10.0 / w.std(), rel=1e-3)       # ~1000
    got = float(r2(net).detach())
    assert got == pytest.approx(_soft_min_max_numpy(w, alpha), rel=1e-3)
    # measured: 0.99 of max - min for 1e5 Gaussian weights (0.002 at alpha = 1)
    assert got > 0.9 * (w.max() - w.min())
    eta = 0.01
    r2e = R2Loss(net, "softminmax", eta=eta)
    assert float(r2e(net).detach()) == pytest.approx(got + eta * math.exp(-alpha), rel=1e-6)
