"""Tests of mpq.scheduler: the turbulence measure and the bit-width freezing schedule."""
import io
import math

import pytest
import torch
from torch import nn

import mpq
from mpq.models import SmallCNN
from mpq.scheduler import BitWidthFreezingScheduler, layer_turbulence

STEPS = {2: 0.2, 3: 0.1, 4: 0.05, 5: 0.025}


def _net(w_bits=(2, 3, 4)):
    """Three schedulable layers ("0", "2", "5") and a pinned 8-bit last layer ("7")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    return mpq.quantize_model(net, w_bits=w_bits, a_bits=(2, 4), keep_8bit=("last",))


@torch.no_grad()
def _set(layer, turbulent_bit=None):
    """Fix the step sizes to STEPS; weights all 0 (calm at every bit-width) or at the midpoints
    (k + 0.5) * s_b of the ``turbulent_bit`` grid. With s_b halving per bit, those midpoints are
    exact levels of the finer grids and a quarter step from the coarser grid's levels: turbulent
    at ``turbulent_bit`` only."""
    for key, step in layer.w_quant.step.items():
        step.fill_(STEPS[int(key)])
    if turbulent_bit is None:
        layer.weight.zero_()
        return
    qn, qp = layer.w_quant.grid(turbulent_bit)
    ks = torch.arange(-qn, qp)                  # k + 0.5 stays inside [-Q_N, Q_P]
    flat = (ks[torch.arange(layer.weight.numel()) % len(ks)] + 0.5) * STEPS[turbulent_bit]
    layer.weight.copy_(flat.view_as(layer.weight))


def _configure(net, turbulent):
    layers = mpq.quant_layers(net)
    for name in ("0", "2", "5"):
        _set(layers[name], turbulent.get(name))


def _reference_turbulence(weight, steps, qn, qp, bits, threshold):
    """Loop over every weight: inside the grid and farther than threshold from the nearest level."""
    count = 0
    w = weight.detach().reshape(weight.shape[0], -1).tolist()
    s = steps.detach().flatten().tolist()
    s = s * len(w) if len(s) == 1 else s
    for row, sc in zip(w, s):
        for value in row:
            v = value / sc
            dist = min(v - math.floor(v), math.ceil(v) - v)
            if -qn <= v <= qp and dist > threshold:
                count += 1
    return count / (weight.numel() * bits)


@pytest.mark.parametrize("per_channel", [True, False])
def test_layer_turbulence_matches_reference(per_channel):
    torch.manual_seed(1)
    net = mpq.quantize_model(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(6, 2)),
                             w_bits=(2, 3, 4, 32), keep_8bit=(), per_channel=per_channel)
    layer = net[0]
    with torch.no_grad():
        layer.weight.mul_(3.0)   # push some weights outside the 2-bit grid (clipped: not counted)
        for step in layer.w_quant.step.values():
            step.mul_(torch.rand(step.shape) + 0.5)
    for threshold in (0.375, 0.25):
        got = layer_turbulence(layer, threshold)
        assert sorted(got) == [2, 3, 4]       # 32 (float) has no grid
        for b, value in got.items():
            qn, qp = 2 ** (b - 1), 2 ** (b - 1) - 1
            ref = _reference_turbulence(layer.weight, layer.w_quant.step[str(b)], qn, qp, b, threshold)
            assert value == pytest.approx(ref, abs=1e-12)
    assert layer_turbulence(layer)[2] > 0


def test_layer_turbulence_clipped_not_counted_and_pinned_skipped():
    net = _net()
    layer = mpq.quant_layers(net)["2"]
    _set(layer, 3)
    assert layer_turbulence(layer) == pytest.approx({2: 0.0, 3: 1 / 3, 4: 0.0})
    with torch.no_grad():
        layer.weight.add_(10.0)                 # far outside every grid: all clipped
    assert layer_turbulence(layer) == {2: 0.0, 3: 0.0, 4: 0.0}
    assert layer_turbulence(mpq.quant_layers(net)["7"]) == {}


def test_freezes_the_turbulent_layer_and_bit():
    net = _net()
    _configure(net, {"2": 3})
    sched = BitWidthFreezingScheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.0)
    sched.observe()
    assert sched.turbulence()["2"] == pytest.approx({2: 0.0, 3: 1 / 3, 4: 0.0})
    assert "7" not in sched.turbulence()
    assert not sched.step(9)                    # warm-up: 0.1 * 100 steps
    assert sched.frozen() == {} and sched.num_frozen() == 0
    assert sched.step(10)
    assert sched.frozen() == {"2": [3]}
    assert sched.num_frozen() == 1
    layers = mpq.quant_layers(net)
    assert tuple(layers["2"].w_allowed) == (2, 4)
    assert tuple(layers["0"].w_allowed) == (2, 3, 4)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        cfg = mpq.random_config(net, g)
        assert cfg["2"][0] != 3
        seen.add(cfg["2"][0])
    assert seen == {2, 4}
    assert mpq.min_config(net)["2"][0] == 2
    assert not sched.step(15)                   # next update one period later
    assert sched.state_dict()["next_update"] == 20


def test_which_lowest_freezes_lowest_bit():
    net = _net()
    _configure(net, {"5": 3})
    sched = BitWidthFreezingScheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3,
                                      which="lowest")
    sched.observe()
    assert sched.step(10)
    assert sched.frozen() == {"5": [2]}
    assert mpq.min_config(net)["5"][0] == 3
    g = torch.Generator().manual_seed(0)
    assert all(mpq.random_config(net, g)["5"][0] != 2 for _ in range(200))


def test_other_layers_get_full_list_back_next_period():
    net = _net()
    _configure(net, {"2": 3})
    sched = BitWidthFreezingScheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.0)
    sched.observe()
    sched.step(10)
    assert sched.frozen() == {"2": [3]}
    _configure(net, {"0": 3})                   # now "0" is the turbulent one
    sched.observe()
    assert not sched.step(19)
    assert sched.step(20)
    assert sched.frozen() == {"0": [3]}
    layers = mpq.quant_layers(net)
    assert tuple(layers["2"].w_allowed) == (2, 3, 4)   # full list back
    assert tuple(layers["5"].w_allowed) == (2, 3, 4)


def test_never_removes_max_and_keeps_two_bits():
    net = _net(w_bits=(2, 3, 4, 5))
    _configure(net, {"2": 3})
    sched = BitWidthFreezingScheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3)
    layers = mpq.quant_layers(net)
    history = []
    for step in range(0, 101):
        sched.observe()
        if sched.step(step):
            history.append(tuple(layers["2"].w_allowed))
    # chosen every period: loses 3 (most turbulent), then 2 (ties at 0 -> lower bit), then stops
    assert history == [(2, 4, 5), (4, 5)]
    assert tuple(layers["2"].w_allowed) == (4, 5)
    assert sched.frozen() == {"2": [2, 3]}


def test_ratio_cosine_and_ties_in_layer_order():
    net = _net(w_bits=(2, 3, 4, 5))
    _configure(net, {"0": 3, "2": 3, "5": 3})   # identical turbulence everywhere
    sched = BitWidthFreezingScheduler(net, total_steps=100, ratio_start=0.9, ratio_end=0.1)
    assert sched.ratio(0) == pytest.approx(0.9)
    assert sched.ratio(50) == pytest.approx(0.5)
    assert sched.ratio(100) == pytest.approx(0.1)
    assert sched.ratio(1000) == pytest.approx(0.1)
    sched.observe()
    sched.step(10)        # ratio 0.880 -> ceil(2.64) = 3 layers
    assert sched.frozen() == {"0": [3], "2": [3], "5": [3]}
    sched.next_update = 50
    sched.step(50)        # ratio 0.5 -> ceil(1.5) = 2: the first two in layer order lose one more
                          # (2 and 4 tie at 0 turbulence: the lower goes), "5" gets 3 back
    assert sched.frozen() == {"0": [2, 3], "2": [2, 3]}
    sched.next_update = 90
    sched.step(90)        # ratio 0.120 -> ceil(0.36) = 1: "0" is already at two bits, unchanged
    assert sched.frozen() == {"0": [2, 3]}


def test_late_period():
    net = _net()
    _configure(net, {"2": 3})
    sched = BitWidthFreezingScheduler(net, total_steps=100, warmup=0.1, period=0.1,
                                      late_period=0.25, late_start=0.5)
    updates = []
    for step in range(0, 120):
        before = sched.num_updates
        sched.step(step)
        if sched.num_updates != before:
            updates.append(step)
    assert updates == [10, 20, 30, 40, 50, 75, 100]


def test_bad_arguments():
    net = _net()
    with pytest.raises(ValueError, match="most_turbulent"):
        BitWidthFreezingScheduler(net, total_steps=10, which="highest")
    with pytest.raises(ValueError):
        BitWidthFreezingScheduler(net, total_steps=0)
    with pytest.raises(ValueError):
        BitWidthFreezingScheduler(net, total_steps=10, ema=1.0)


def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor))


def test_state_dict_round_trip_restores_allowed():
    net = _net()
    _configure(net, {"2": 3})
    sched = BitWidthFreezingScheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.5)
    sched.observe()
    sched.step(10)
    state = sched.state_dict()
    assert _plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = _net()
    assert tuple(mpq.quant_layers(fresh)["2"].w_allowed) == (2, 3, 4)
    other = BitWidthFreezingScheduler(fresh, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.5)
    other.load_state_dict(loaded)
    assert tuple(mpq.quant_layers(fresh)["2"].w_allowed) == (2, 4)
    assert other.frozen() == {"2": [3]}
    assert other.turbulence() == sched.turbulence()
    assert other.next_update == 20 and other.num_updates == 1
    g = torch.Generator().manual_seed(0)
    assert all(mpq.random_config(fresh, g)["2"][0] != 3 for _ in range(200))

    bad = dict(loaded, allowed={"nope": [2, 4]})
    with pytest.raises(ValueError, match="nope"):
        other.load_state_dict(bad)
    bad = dict(loaded, allowed={"2": [7]})
    with pytest.raises(ValueError):
        other.load_state_dict(bad)


def test_real_model_and_wrapped():
    torch.manual_seed(0)
    net = mpq.quantize_model(SmallCNN())

    class Wrapper(nn.Module):  # stands in for DDP
        def __init__(self, m):
            super().__init__()
            self.module = m

    sched = BitWidthFreezingScheduler(Wrapper(net), total_steps=10, warmup=0.0)
    sched.observe()
    turb = sched.turbulence()
    assert sorted(turb) == [f"features.{i}.0" for i in range(1, 5)]   # first/last pinned
    assert all(0.0 <= v <= 0.5 for t in turb.values() for v in t.values())
    assert sched.step(0)
    assert sched.num_frozen() == 2               # ceil(0.5 * 4) layers lose one bit each
