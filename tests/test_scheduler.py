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

# mpq's rules before the paper's became the defaults (periodic timing, cumulative, EMA, all bits,
# ceil): these tests keep them working as options
LEGACY = dict(schedule="periodic", which="most_turbulent", cumulative=True, ema=0.9, measure="all",
              round="ceil")


def legacy_scheduler(model, **kw):
    return BitWidthFreezingScheduler(model, **{**LEGACY, **kw})


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
    sched = legacy_scheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.0)
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
    sched = legacy_scheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3,
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
    sched = legacy_scheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.0)
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
    sched = legacy_scheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3)
    layers = mpq.quant_layers(net)
    history = []
    for step in range(0, 101):
        sched.observe()
        if sched.step(step) and sched.last_update["changed"]:
            history.append(tuple(layers["2"].w_allowed))
    # chosen every period: loses 3 (most turbulent), then 2 (ties at 0 -> lower bit), then stops
    assert history == [(2, 4, 5), (4, 5)]
    assert tuple(layers["2"].w_allowed) == (4, 5)
    assert sched.frozen() == {"2": [2, 3]}


def test_ratio_cosine_and_ties_in_layer_order():
    net = _net(w_bits=(2, 3, 4, 5))
    _configure(net, {"0": 3, "2": 3, "5": 3})   # identical turbulence everywhere
    sched = legacy_scheduler(net, total_steps=100, ratio_start=0.9, ratio_end=0.1)
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
    sched = legacy_scheduler(net, total_steps=100, warmup=0.1, period=0.1,
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
        legacy_scheduler(net, total_steps=10, which="highest")
    with pytest.raises(ValueError):
        legacy_scheduler(net, total_steps=0)
    with pytest.raises(ValueError):
        legacy_scheduler(net, total_steps=10, ema=1.0)


def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor))


def test_state_dict_round_trip_restores_allowed():
    net = _net()
    _configure(net, {"2": 3})
    sched = legacy_scheduler(net, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.5)
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
    other = legacy_scheduler(fresh, total_steps=100, ratio_start=0.3, ratio_end=0.3, ema=0.5)
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

    sched = legacy_scheduler(Wrapper(net), total_steps=10, warmup=0.0)
    sched.observe()
    turb = sched.turbulence()
    assert sorted(turb) == [f"features.{i}.0" for i in range(1, 5)]   # first/last pinned
    assert all(0.0 <= v <= 0.5 for t in turb.values() for v in t.values())
    assert sched.step(0)
    assert sched.num_frozen() == 2               # ceil(0.5 * 4) layers lose one bit each


# ----------------------------------------------------------------------------- the paper's rules
def _expected_update_epochs():
    """Written out from the reference's description: every 2 epochs from 7 to 107, then 119, 134, 149."""
    return list(range(7, 108, 2)) + [119, 134, 149]


def _paper_ratio(e):
    return 0.2 + 0.15 * (1 + math.cos(math.pi * ((e - 5) // 2) / 75))


def _nineteen_layer_net():
    torch.manual_seed(3)
    layers = []
    for _ in range(19):
        layers += [nn.Conv2d(4, 4, 1), nn.ReLU()]
    return mpq.quantize_model(nn.Sequential(*layers), w_bits=(2, 3, 4, 5, 6), a_bits=(2, 3, 4, 5, 6),
                              keep_8bit=())


def test_reference_update_epochs_are_the_papers_54():
    from mpq.scheduler import reference_update_epochs
    assert reference_update_epochs() == _expected_update_epochs()
    assert len(reference_update_epochs()) == 54


def test_reference_schedule_on_a_simulated_150_epoch_run():
    """19 mixed layers (ResNet-18's count), 150 epochs of 10 steps: updates fire exactly at the start
    of the reference epochs; after each, floor(19 r(e)) layers lack exactly their lowest candidate."""
    net = _nineteen_layer_net()
    steps_per_epoch = 10
    sched = BitWidthFreezingScheduler(net, total_steps=150 * steps_per_epoch)
    layers = mpq.quant_layers(net)
    fired = []
    with torch.no_grad():
        for step in range(0, 150 * steps_per_epoch + 1):
            for layer in layers.values():   # the weights move between updates (training stand-in)
                layer.weight.add_(0.01 * torch.randn_like(layer.weight))
            if sched.step(step):
                fired.append(step)
                e = step // steps_per_epoch
                k = math.floor(19 * _paper_ratio(e))
                lacking = {n: sorted(set(m.w_candidates) - set(m.w_allowed)) for n, m in layers.items()}
                assert sum(1 for v in lacking.values() if v) == k, (e, lacking)
                assert all(v in ([], [2]) for v in lacking.values())          # only the lowest, once
                assert all(tuple(m.a_allowed) == m.a_candidates for m in layers.values())
    assert fired == [e * steps_per_epoch for e in _expected_update_epochs()]
    assert math.floor(19 * _paper_ratio(7)) == 9 and math.floor(19 * _paper_ratio(149)) == 3


def test_reference_schedule_scales_to_a_short_run():
    net = _nineteen_layer_net()
    sched = BitWidthFreezingScheduler(net, total_steps=429)     # one embedded-default epoch
    fired = [s for s in range(430) if sched.step(s)]
    assert len(fired) == 54 and sched.num_planned_updates() == 54
    assert fired[0] == math.ceil(7 / 150 * 429) and fired[-1] == math.ceil(149 / 150 * 429)


def test_snapshot_scores_are_repeatable_and_use_the_allowed_bits():
    net = _nineteen_layer_net()
    sched = BitWidthFreezingScheduler(net, total_steps=100)
    name, layer = next(iter(mpq.quant_layers(net).items()))
    layer.w_allowed = (3, 4, 5, 6)
    sched.observe()
    first = sched.scores()
    sched.observe()
    assert sched.scores() == first
    turb = layer_turbulence(layer)                       # every candidate, independently
    assert first[name] == pytest.approx(sum(turb[b] for b in (3, 4, 5, 6)) / 4)
    assert sorted(sched.turbulence()[name]) == [3, 4, 5, 6]


def test_freeze_acts_removes_the_lowest_activation_bit_too():
    net = _nineteen_layer_net()
    sched = BitWidthFreezingScheduler(net, total_steps=150, freeze_acts=True)
    assert sched.step(7)
    for name, layer in mpq.quant_layers(net).items():
        if 2 in layer.w_allowed:
            assert 2 in layer.a_allowed
        else:
            assert tuple(layer.a_allowed) == (3, 4, 5, 6) and tuple(layer.w_allowed) == (3, 4, 5, 6)
    for _ in range(50):       # random configs never draw a frozen activation bit
        cfg = mpq.random_config(net, torch.Generator().manual_seed(_))
        for name, (w, a) in cfg.items():
            layer = mpq.quant_layers(net)[name]
            assert w in layer.w_allowed and a in layer.a_allowed


def test_training_writes_scheduler_jsonl(tmp_path):
    """A short run with the (default) paper schedule logs >= 40 updates; every record holds the full
    frozen state: each layer lacks at most its lowest candidate, and the count never grows."""
    import json
    import support
    from mpq.trainer import Trainer
    cfg = support.tiny_config(tmp_path, "data.train_subset=2400", "data.batch_size=16", "train.epochs=1",
                              "model.width=4", "scheduler.enabled=true", "idm.enabled=false",
                              "train.num_random=1", "train.order=[max,random]")
    Trainer(cfg).fit()
    with open(tmp_path / "tiny" / "scheduler.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) >= 40
    net = mpq.checkpoint.load_supernet(str(tmp_path / "tiny" / "supernet.pt"))[0]
    lowest = {n: min(m.w_candidates) for n, m in mpq.quant_layers(net).items()}
    counts = []
    for r in records:
        assert set(r) >= {"step", "epoch", "ratio", "frozen"}
        for name, bits in r["frozen"].items():
            assert bits == [lowest[name]]
        counts.append(len(r["frozen"]))
    assert counts == sorted(counts, reverse=True)
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})
