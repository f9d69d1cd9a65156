"""--strategy reference: the paper's greedy rule by rule, on a lookup-table "supernet" whose error
and BitOPs are known functions of the configuration, and the reference's own choices on its own
models (ResNet-18 and MobileNetV2 at 224x224: start W5A5, weight phase to 0.95 x BitOPs(W4A5), floor
3 bits)."""
import math

import pytest

from search.reference_greedy import reference_greedy, reference_plan, reference_score, uniform

BITS = (2, 3, 4, 5, 6)
MACS = {"first": 100, "l1": 10, "l2": 20, "l3": 30, "l4": 40, "last": 5}
CHOICES = {n: ((8,), (8,)) if n in ("first", "last") else (BITS, BITS) for n in MACS}
BASE = {n: (8, 8) if n in ("first", "last") else (6, 6) for n in MACS}
FIXED = (100 + 5) * 64
SENS = {"l1": 0.004, "l2": 0.002, "l3": 0.001, "l4": 0.0005}   # top-1 error per squared bit


def bitops(c):
    return sum(MACS[n] * w * a for n, (w, a) in c.items())


class Table:
    """err(config, batch) = base + sum_l SENS[l] * ((6 - w)^2 + 0.5 (6 - a)^2) * (1 + 0.01 batch), like a
    supernet's top-1 error on one batch (0.3 at W6A6); records its calls."""

    def __init__(self, sens=SENS, base=0.3):
        self.sens, self.base, self.calls = sens, base, []

    def __call__(self, c, batch):
        self.calls.append((dict(c), batch))
        return min(1.0, self.base + sum(s * ((6 - c[n][0]) ** 2 + 0.5 * (6 - c[n][1]) ** 2)
                                        for n, s in self.sens.items()) * (1 + 0.01 * batch))


def searched(c):
    return bitops(c) - FIXED


def test_start_first_iteration_moves_and_score():
    table = Table()
    target = bitops(uniform(CHOICES, BASE, 4, 4))
    res = reference_greedy(CHOICES, BASE, table, bitops, target, fixed_cost=FIXED)
    start = res.path[0].config
    assert start == {**BASE, **{n: (5, 5) for n in SENS}}               # uniform W5A5, pinned kept
    first = [c for c, b in table.calls if b == 0]
    assert len(first) == 2 * len(SENS)                                    # 5->4 and 5->6 per layer
    assert sorted((n, c[n][0]) for c in first for n in SENS if c[n] != start[n]) == sorted(
        [(n, 4) for n in SENS] + [(n, 6) for n in SENS])
    # the winner by the formula, computed here: 1.5 e / max e - (1 - b / B_max) (searched layers' BitOPs)
    errs = [table(c, 0) for c in first]
    costs = [searched(c) for c in first]
    scores = [1.5 * e / max(errs) - (1 - b / max(costs)) for e, b in zip(errs, costs)]
    assert res.path[1].config == first[scores.index(min(scores))]
    assert res.path[1].score == pytest.approx(min(scores))
    # one fresh batch per iteration, every move of an iteration on the same one
    batches = [b for _, b in table.calls if b < 10 ** 6]
    assert sorted(set(batches)) == list(range(res.stats["iterations"]))
    assert res.stats["reached"] and bitops(res.final.config) <= target
    assert bitops(res.path[-2].config) > target                           # stops at the first that fits


def test_phases_weights_then_activations_and_floor():
    table = Table()
    target = bitops(uniform(CHOICES, BASE, 3, 3)) * 1.02              # above W3A3: floor 3
    res = reference_greedy(CHOICES, BASE, table, bitops, target, fixed_cost=FIXED)
    plan = res.stats
    assert (plan["start_bits"], plan["phase_bits"], plan["floor"]) == (5, 4, 3)
    assert plan["phase_cost"] == pytest.approx(0.95 * searched(uniform(CHOICES, BASE, 4, 5)))
    kinds = [s.move.kind for s in res.path[1:]]
    switch = next(i for i, s in enumerate(res.path) if searched(s.config) <= plan["phase_cost"])
    assert set(kinds[:switch]) == {"w"} and kinds[switch] == "a"
    for i in range(switch, len(kinds)):   # weights again only once every activation is at the floor
        if kinds[i] == "w":
            assert all(res.path[i].config[n][1] == 3 for n in SENS), i
    assert all(min(c[n]) >= 3 for s in res.path for c in [s.config] for n in SENS)
    low = reference_plan(CHOICES, BASE, searched, searched(uniform(CHOICES, BASE, 3, 3)) - 1)
    assert low["floor"] == 2                                            # below W3A3: the lowest candidate


def test_weights_continue_when_activations_are_at_the_floor():
    table = Table()
    target = bitops(uniform(CHOICES, BASE, 3, 3)) + 1                  # floor 3, needs W3 and A3 nearly everywhere
    res = reference_greedy(CHOICES, BASE, table, bitops, target, fixed_cost=FIXED)
    assert res.stats["reached"]
    kinds = [s.move.kind for s in res.path[1:]]
    last_a = max(i for i, k in enumerate(kinds) if k == "a")
    assert "w" in kinds[:last_a] and ("w" in kinds[last_a:] or all(c[1] == 3 for n, c in res.final.config.items() if n in SENS))


def test_a_plus_move_wins_when_it_scores_lowest_and_the_search_terminates():
    # l1 is very sensitive: at W5 its error dominates; raising it to 6 removes most of the error
    table = Table({"l1": 0.3, "l2": 0.0001, "l3": 0.0001, "l4": 0.0001}, base=0.0)
    target = bitops(uniform(CHOICES, BASE, 4, 4))
    res = reference_greedy(CHOICES, BASE, table, bitops, target, fixed_cost=FIXED, max_iters=40)
    first = res.path[1].move
    assert (first.layer, first.old, first.new) == ("l1", 5, 6)          # a '+' move, applied
    assert res.stats["iterations"] <= 40 and res.stats["stopped"] in ("target", "max_iters")


def test_all_errors_zero_scores_by_bitops_only():
    scores = reference_score([0.0, 0.0, 0.0], [10.0, 8.0, 9.0])
    assert scores == pytest.approx([0.0, -0.2, -0.1]) and not any(math.isnan(s) for s in scores)
    res = reference_greedy(CHOICES, BASE, lambda c, b: 0.0, bitops, bitops(uniform(CHOICES, BASE, 4, 4)),
                           fixed_cost=FIXED)
    assert res.path[1].move.layer == "l4" and res.path[1].move.new == 4   # the largest BitOPs saving


@pytest.mark.parametrize("name, target_g, depthwise", [("resnet18", 33.9, None), ("mobilenet_v2", 5.58, [3, 4, 5, 6])])
def test_reference_choices_on_its_own_models(name, target_g, depthwise):
    """The reference's configs: ResNet-18 at 33.9 G and MobileNetV2 at 5.58 G (its BitOPs: the searched
    layers only) start at W5A5, switch to activations at 0.95 x BitOPs(W4A5) and floor at 3 bits."""
    import mpq
    from mpq.supernet import quant_layers
    from search.cost import BitOpsCounter
    net = mpq.quantize_model(mpq.build_model(name, num_classes=1000), w_bits=list(BITS), a_bits=list(BITS),
                             **({"depthwise_bits": depthwise} if depthwise else {}))
    macs = BitOpsCounter(net, (1, 3, 224, 224)).macs
    choices = {n: (m.w_candidates, m.a_candidates) for n, m in quant_layers(net).items()}
    base = mpq.max_config(net)
    pinned = {n for n, (w, a) in choices.items() if len(w) == 1 and len(a) == 1}

    def searched_bitops(c):
        return sum(macs[n] * c[n][0] * c[n][1] for n in c if n not in pinned)

    w4a5 = searched_bitops(uniform(choices, base, 4, 5))
    plan = reference_plan(choices, base, searched_bitops, target_g * 1e9)
    assert (plan["start_bits"], plan["phase_bits"], plan["floor"]) == (5, 4, 3)
    assert plan["phase_cost"] == pytest.approx(0.95 * w4a5)
    if name == "resnet18":   # the reference's ResNet-18 target is uniform W4A5 in its count
        assert w4a5 / 1e9 == pytest.approx(33.9, abs=0.05)
