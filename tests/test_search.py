"""Greedy search on constructed cost/accuracy tables, and the evaluator on a tiny supernet."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpq
from search.evaluator import (Evaluator, ForwardCounter, batch_stat_bn, bn_modules_in_use, evaluate,
                              recalibrate_bn, shard)
from search.greedy import (CostModel, Move, Swap, down_moves, greedy_search, refine_search, search_supernet,
                           up_moves)

BITS = (2, 3, 4, 5, 6)




# ------------------------------------------------------------------------------ constructed tables
def _table(seed=0, layers=5):
    """Bilinear BitOPs cost (macs * w * a) and an additive penalty per layer and bit-width."""
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(layers)]
    macs = {n: rng.randint(1, 20) * 100 for n in names}
    pw = {n: {b: rng.random() * (6 - b) ** 2 for b in BITS} for n in names}
    pa = {n: {b: rng.random() * (6 - b) ** 2 for b in BITS} for n in names}

    def cost(c):
        return float(sum(macs[n] * c[n][0] * c[n][1] for n in names))

    def metric(c):
        return sum(pw[n][c[n][0]] + pa[n][c[n][1]] for n in names)

    start = {n: (6, 6) for n in names}
    choices = {n: (BITS, BITS) for n in names}
    return names, cost, metric, start, choices


def _brute_force_best(base, choices, cost, metric):
    c0, m0 = cost(base), metric(base)
    best = []
    for mv in down_moves(base, choices):
        cfg = mv.apply(base)
        saved = c0 - cost(cfg)
        best.append((mv, cfg, saved, metric(cfg) - m0))
    return best, c0


def test_naive_picks_the_cheapest_move_per_bitops_at_every_step():
    names, cost, metric, start, choices = _table(0)
    res = greedy_search(start, choices, cost, metric, strategy="naive", to_min=True)
    c_start = cost(start)
    for prev, step in zip(res.path, res.path[1:]):
        cands, c0 = _brute_force_best(prev.config, choices, cost, metric)
        ratios = [d / (s / c_start) for _, _, s, d in cands if s > 0]
        chosen = [d / (s / c_start) for mv, _, s, d in cands if mv == step.move][0]
        assert chosen == pytest.approx(min(ratios))
        assert step.score == pytest.approx(chosen)
        assert step.cost < prev.cost
        assert step.metric == pytest.approx(metric(step.config))
    # to the lowest configuration: every layer at 2/2, one bit step per path step
    assert res.final.config == {n: (2, 2) for n in names}
    assert len(res.path) - 1 == len(names) * 2 * (len(BITS) - 1)
    # the naive strategy evaluates every move of every iteration exactly once (plus the start)
    moves_per_iteration = [len(down_moves(s.config, choices)) for s in res.path[:-1]]
    assert res.exact_calls == 1 + sum(moves_per_iteration)


def test_budget_stops_at_the_first_point_under_it_and_select_picks_the_best():
    names, cost, metric, start, choices = _table(1)
    budget = 0.3 * cost(start)
    res = greedy_search(start, choices, cost, metric, strategy="naive", budget=budget)
    assert res.final.cost <= budget
    assert all(s.cost > budget for s in res.path[:-1])
    full = greedy_search(start, choices, cost, metric, strategy="naive", to_min=True)
    assert [s.config for s in full.path[:len(res.path)]] == [s.config for s in res.path]
    sel = full.select(lambda c: cost(c) <= budget)
    assert cost(sel.config) <= budget
    assert sel.metric == min(s.metric for s in full.path if s.cost <= budget)
    assert full.select(lambda c: False) is None
    # a budget above the start cost needs no move
    assert len(greedy_search(start, choices, cost, metric, budget=cost(start) * 2).path) == 1


def test_fast_with_an_exact_proxy_follows_the_naive_path_with_fewer_evaluations():
    names, cost, metric, start, choices = _table(2, layers=8)
    naive = greedy_search(start, choices, cost, metric, strategy="naive", to_min=True)
    fast = greedy_search(start, choices, cost, metric, proxy_fn=metric, strategy="fast", to_min=True,
                         top_k=2)
    assert [s.config for s in fast.path] == [s.config for s in naive.path]
    # one proxy per new move (lazy), top_k exact per step
    assert fast.exact_calls <= 1 + 2 * (len(fast.path) - 1)
    assert fast.exact_calls * 5 <= naive.exact_calls
    # without a proxy the fast strategy is lazy exact greedy: same path, still fewer evaluations
    lazy = greedy_search(start, choices, cost, metric, strategy="fast", to_min=True)
    assert [s.config for s in lazy.path] == [s.config for s in naive.path]
    assert lazy.exact_calls < naive.exact_calls / 2


def test_fast_with_a_noisy_proxy_still_makes_legal_moves_and_checks_exactly():
    names, cost, metric, start, choices = _table(3, layers=6)
    rng = random.Random(0)
    noisy = lambda c: metric(c) + rng.gauss(0, 0.3)
    res = greedy_search(start, choices, cost, metric, proxy_fn=noisy, strategy="fast", to_min=True,
                        top_k=3, refresh=4)
    for prev, step in zip(res.path, res.path[1:]):
        assert step.move in down_moves(prev.config, choices)
        assert step.config == step.move.apply(prev.config)
        assert step.metric == pytest.approx(metric(step.config))   # path metrics are exact
    assert res.final.config == {n: (2, 2) for n in names}


def test_reference_score_and_err_metric():
    names, cost, metric, start, choices = _table(4)
    evaluate_fn = lambda c: {"acc": 1.0 - metric(c) / 100.0, "loss": metric(c)}
    res = greedy_search(start, choices, cost, evaluate_fn, strategy="naive", score="reference",
                        metric="err", budget=0.5 * cost(start))
    c_start = cost(start)
    for prev, step in zip(res.path, res.path[1:]):
        cands = [(mv, mv.apply(prev.config)) for mv in down_moves(prev.config, choices)]
        errs = [metric(c) / 100.0 for _, c in cands]
        ref = max(errs)
        scores = [1.5 * e / ref - (1 - cost(c) / c_start) for e, (_, c) in zip(errs, cands)]
        assert step.score == pytest.approx(min(scores))
        assert "acc" in step.result and "err" in step.result


def test_weight_only_moves_and_bad_arguments():
    names, cost, metric, start, choices = _table(5)
    res = greedy_search(start, choices, cost, metric, strategy="naive", to_min=True, kinds=("w",))
    assert res.final.config == {n: (2, 6) for n in names}
    with pytest.raises(ValueError, match="strategy"):
        greedy_search(start, choices, cost, metric, strategy="smart")
    with pytest.raises(ValueError, match="score"):
        greedy_search(start, choices, cost, metric, score="x")
    assert str(Move("a.b", "w", 6, 5)) == "a.b.w6->5"


def test_moves_follow_the_candidate_lists():
    choices = {"x": ((2, 4, 8), (3, 6)), "y": ((8,), (8,))}
    moves = down_moves({"x": (8, 6), "y": (8, 8)}, choices)
    assert moves == [Move("x", "w", 8, 4), Move("x", "a", 6, 3)]
    assert down_moves({"x": (2, 3), "y": (8, 8)}, choices) == []


# ------------------------------------------------------------------------------------ refinement
def _neighbours(config, names, bits=BITS):
    """Every configuration one step up in one bit-width, optionally one step down in another,
    enumerated independently of the search code."""
    items = [(n, k) for n in names for k in (0, 1)]

    def shifted(cfg, item, d):
        n, k = item
        i = bits.index(cfg[n][k]) + d
        if not 0 <= i < len(bits):
            return None
        v = list(cfg[n])
        v[k] = bits[i]
        out = dict(cfg)
        out[n] = tuple(v)
        return out

    out = []
    for up in items:
        c1 = shifted(config, up, +1)
        if c1 is None:
            continue
        out.append(c1)
        for dn in items:
            if dn != up:
                c2 = shifted(c1, dn, -1)
                if c2 is not None:
                    out.append(c2)
    return out


def test_refine_moves_bits_to_the_sensitive_layer_within_the_budget():
    # layer "a" barely cares about its bits, layer "b" cares a lot; equal MACs: the uniform 3/3
    # start is beaten by trading a's bits for b's
    names = ["a", "b"]
    cost = lambda c: float(sum(c[n][0] * c[n][1] for n in names))
    sens = {"a": 0.1, "b": 1.0}
    metric = lambda c: sum(sens[n] * (2.0 ** -c[n][0] + 2.0 ** -c[n][1]) for n in names)
    choices = {n: (BITS, BITS) for n in names}
    start = {"a": (3, 3), "b": (3, 3)}
    budget = cost(start)
    fits = lambda c: cost(c) <= budget
    res = refine_search(start, choices, cost, metric, fits, top_k=1000)
    assert len(res.path) > 1 and res.final.metric < metric(start)
    assert res.final.config["b"][0] + res.final.config["b"][1] > 6 > sum(res.final.config["a"])
    for prev, step in zip(res.path, res.path[1:]):
        assert fits(step.config) and step.metric < prev.metric
        assert step.config == step.move.apply(prev.config)
        assert step.metric == pytest.approx(metric(step.config))
        # with every candidate checked exactly, each step takes the best fitting neighbour
        best = min(metric(c) for c in _neighbours(prev.config, names) if fits(c))
        assert step.metric == pytest.approx(best)
    # it stops at a local optimum: no fitting neighbour is better
    assert all(metric(c) >= res.final.metric for c in _neighbours(res.final.config, names) if fits(c))
    assert res.stats["stopped"] == "no improvement"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refine_from_the_greedy_end_never_gets_worse_and_stays_within_the_budget(seed):
    names, cost, metric, start, choices = _table(seed, layers=4)
    budget = 0.35 * cost(start)
    fits = lambda c: cost(c) <= budget
    walk = greedy_search(start, choices, cost, metric, strategy="naive", budget=budget)
    rng = random.Random(seed)
    noisy = lambda c: metric(c) + rng.gauss(0, 0.05)
    res = refine_search(walk.final.config, choices, cost, metric, fits, proxy_fn=noisy, top_k=4)
    assert res.path[0].config == walk.final.config
    assert all(fits(s.config) for s in res.path)
    assert all(b.metric < a.metric for a, b in zip(res.path, res.path[1:]))
    assert all(b.move.moves[0].new > b.move.moves[0].old for b in res.path[1:])   # up first
    assert res.exact_calls <= 1 + 4 * (len(res.path))
    assert res.proxy_calls > 0


def test_refine_accept_test_start_check_and_moves():
    names = ["a", "b"]
    cost = lambda c: float(sum(c[n][0] * c[n][1] for n in names))
    metric = lambda c: 2.0 ** -c["b"][0] + 0.01 * 2.0 ** -c["a"][0]
    choices = {n: (BITS, BITS) for n in names}
    start = {"a": (3, 3), "b": (3, 3)}
    fits = lambda c: cost(c) <= 18
    refused = refine_search(start, choices, cost, metric, fits, accept=lambda new, cur: False)
    assert len(refused.path) == 1 and refused.stats["stopped"] == "not accepted"
    assert len(refine_search(start, choices, cost, metric, fits, max_iters=1).path) == 2
    with pytest.raises(ValueError, match="does not fit"):
        refine_search(start, choices, cost, metric, lambda c: False)
    assert up_moves({"a": (6, 2), "b": (3, 6)}, choices) == [Move("a", "a", 2, 3), Move("b", "w", 3, 4)]
    assert str(Swap((Move("a", "w", 3, 4), Move("b", "a", 3, 2)))) == "a.w3->4+b.a3->2"


# --------------------------------------------------------------------------------------- evaluator
def _tiny_supernet(bn="shared", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    net = mpq.quantize_model(model, w_bits=(2, 4, 6), a_bits=(2, 4, 6), bn=bn)
    x = torch.randn(64, 1, 8, 8)
    mpq.calibrate_activations(net, x)
    return net.eval()


def _data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return torch.utils.data.TensorDataset(x, y)


def test_recalibrate_bn_is_the_cumulative_average_of_batch_statistics():
    net = _tiny_supernet()
    cfg = mpq.uniform_config(net, 4, 2)
    mpq.set_bits(net, cfg)
    ds = _data()
    batches = [ds.tensors[0][i:i + 32] for i in range(0, 96, 32)]
    feats = []
    hook = net[1].register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    counter = ForwardCounter()
    used = recalibrate_bn(net, torch.utils.data.DataLoader(ds, batch_size=32), 3, counter=counter)
    hook.remove()
    assert used == 3 and counter.bn_forwards == 3 and not net[1].training
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    vars_ = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(net[1].running_mean, means, atol=1e-5)
    assert torch.allclose(net[1].running_var, vars_, atol=1e-5)
    assert net[1].momentum == 0.1   # restored


def test_evaluate_matches_a_manual_computation_and_is_deterministic():
    net = _tiny_supernet()
    ds = _data()
    cfg = mpq.uniform_config(net, 2, 4)
    counter = ForwardCounter()
    r1 = evaluate(net, cfg, ds, bn_batches=2, batch_size=32, counter=counter)
    assert counter.eval_forwards == 3 and counter.bn_forwards == 2 and counter.evaluations == 1
    with torch.no_grad():
        logits = net(ds.tensors[0])
    assert r1["n"] == 96
    assert r1["acc"] == pytest.approx(float((logits.argmax(1) == ds.tensors[1]).float().mean()))
    assert r1["loss"] == pytest.approx(float(F.cross_entropy(logits, ds.tensors[1])), rel=1e-5)
    # another config in between, then the same again: identical (BN re-calibrated each time)
    evaluate(net, mpq.uniform_config(net, 6, 6), ds, bn_batches=2, batch_size=32)
    assert evaluate(net, cfg, ds, bn_batches=2, batch_size=32) == r1
    assert mpq.get_bits(net) == cfg


def test_batch_stat_bn_leaves_running_statistics_untouched():
    net = _tiny_supernet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with batch_stat_bn(net):
        with torch.no_grad():
            net(torch.randn(16, 1, 8, 8))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not bn.training and bn.track_running_stats for bn in bn_modules_in_use(net))


def test_switchable_bn_needs_no_recalibration_unless_forced():
    net = _tiny_supernet(bn="switchable")
    ds = _data()
    counter = ForwardCounter()
    evaluate(net, mpq.uniform_config(net, 2, 2), ds, batch_size=32, counter=counter)
    assert counter.bn_forwards == 0
    used = bn_modules_in_use(net)
    assert len(used) == 3 and all(isinstance(b, nn.BatchNorm2d) for b in used)
    active = net[1].current()
    others = [b for k, b in net[1].bns.items() if b is not active]
    saved = [b.running_mean.clone() for b in others]
    evaluate(net, None, ds, batch_size=32, counter=counter, recalibrate=True, bn_batches=1)
    assert counter.bn_forwards == 1
    assert all(torch.equal(s, b.running_mean) for s, b in zip(saved, others))  # only the active one


def test_shard_covers_every_sample_once():
    ds = _data(10)
    parts = [shard(ds, r, 3) for r in range(3)]
    idx = sorted(i for p in parts for i in p.indices)
    assert idx == list(range(10))
    assert shard(ds, 0, 1) is ds


def test_evaluator_proxy_and_exact_counts():
    net = _tiny_supernet()
    ds = _data()
    ev = Evaluator(net, ds, _data(64, seed=2), batch_size=32, bn_batches=2, proxy_batches=1)
    r = ev.exact(mpq.uniform_config(net, 4, 4))
    p = ev.proxy(mpq.uniform_config(net, 4, 4))
    c = ev.counter
    assert (c.eval_forwards, c.bn_forwards, c.proxy_forwards) == (3, 2, 1)
    assert (c.evaluations, c.proxy_evaluations, c.forwards) == (1, 1, 6)
    assert r["n"] == 96 and p["n"] == 32


def test_paired_z_compares_configs_on_the_same_samples():
    net = _tiny_supernet()
    ds = _data()
    ev = Evaluator(net, ds, batch_size=32, bn_batches=1)
    a, b = mpq.uniform_config(net, 6, 6), mpq.uniform_config(net, 2, 2)
    ra, rb = ev.exact(a), ev.exact(b)
    assert ev.paired_z(a, a) == 0.0
    za = ev.paired_z(a, b)
    assert za == pytest.approx(-ev.paired_z(b, a))
    d = (ev.samples[tuple(sorted((k, *v) for k, v in a.items()))]["correct"].double()
         - ev.samples[tuple(sorted((k, *v) for k, v in b.items()))]["correct"].double())
    assert d.numel() == 96 and float(d.mean()) == pytest.approx(ra["acc"] - rb["acc"])
    if float(d.std()) > 0:
        assert za == pytest.approx(float(d.mean() / (d.std() / math.sqrt(96))))
    zl = ev.paired_z(a, b, "loss")
    assert (zl > 0) == (ra["loss"] < rb["loss"])
    with pytest.raises(KeyError):
        ev.paired_z(a, mpq.uniform_config(net, 4, 4))


def test_search_supernet_meets_the_budget_and_fast_costs_fewer_forwards():
    net = _tiny_supernet()
    ds = _data()
    cost = CostModel(net, (1, 1, 8, 8))
    assert cost.bitops(mpq.max_config(net)) == pytest.approx(
        __import__("search").bitops(net, mpq.max_config(net), (1, 1, 8, 8)))
    assert cost.size_bytes(mpq.min_config(net)) == pytest.approx(
        __import__("search").model_size_bytes(net, mpq.min_config(net)))
    budget = cost.bitops(mpq.uniform_config(net, 4, 4))
    out = {}
    for strategy in ("naive", "fast"):
        ev = Evaluator(net, ds, batch_size=32, bn_batches=1, proxy_batches=1)
        res = search_supernet(net, ev, cost, max_bitops=budget, strategy=strategy)
        assert res.final.bitops <= budget
        assert all(s.bitops > budget for s in res.path[:-1])
        assert res.final.size_bytes == cost.size_bytes(res.final.config)
        out[strategy] = ev.counter.forwards
    assert out["fast"] < out["naive"]
    # a size budget moves weights only
    ev = Evaluator(net, ds, batch_size=32, bn_batches=1)
    size_budget = cost.size_bytes(mpq.uniform_config(net, 4, 4)) - 1
    res = search_supernet(net, ev, cost, max_size=size_budget, strategy="naive")
    assert res.final.size_bytes <= size_budget
    assert all(a == max(mpq.quant_layers(net)[n].a_candidates) for n, (w, a) in res.final.config.items())


def _dist_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        net = _tiny_supernet()
        cfg = mpq.uniform_config(net, 4, 2)
        ds = _data(90)
        r = evaluate(net, cfg, ds, bn_loader=_data(64, seed=5), bn_batches=2, batch_size=16)
        ev = Evaluator(net, ds, _data(64, seed=5), batch_size=16, bn_batches=2)
        e = ev.exact(cfg)
        if rank == 0:
            torch.save({"evaluate": r, "exact": e, "calib_batches": len(ev.calib)}, out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_evaluation_shards_and_all_reduces(tmp_path):
    import torch.multiprocessing as tmp_mp
    out = str(tmp_path / "r.pt")
    tmp_mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    net = _tiny_supernet()
    cfg = mpq.uniform_config(net, 4, 2)
    ref = evaluate(net, cfg, _data(90), bn_loader=_data(64, seed=5), bn_batches=2, batch_size=16)
    ref_exported = evaluate(net, cfg, _data(90), bn_loader=_data(64, seed=5), bn_batches=2,
                            batch_size=16, form="exported")   # Evaluator.exact's arithmetic
    for k, ref in (("evaluate", ref), ("exact", ref_exported)):
        assert got[k]["n"] == ref["n"] == 90
        assert got[k]["acc"] == ref["acc"]
        assert got[k]["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["calib_batches"] == 3   # 45 of the 90 samples on rank 0, batches of 16
