"""search.py --strategy reference | evolution | random end to end on a tiny supernet checkpoint,
the sensitivity report every search writes, and the one-batch error the reference greedy scores by."""
import copy
import csv
import json
import os

import pytest
import torch
from torch import nn

import mpq
from mpq.checkpoint import load_supernet
from search.cli import main
from search.evaluator import Evaluator
from search.greedy import CostModel
from support import make_checkpoint

FAST = ["--calib-size", "128", "--eval-size", "256", "--bn-batches", "1", "--batch-size", "64", "--quiet"]
SMALL = ["--population", "6", "--generations", "3", "--random-samples", "8"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("run") / "supernet.pt"))


@pytest.fixture(scope="module")
def net_cost(ckpt):
    net, _ = load_supernet(ckpt)
    return net, CostModel(net, (1, 1, 28, 28))


def _doc(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def _cfg(doc):
    return {n: (v["w_bits"], v["a_bits"]) for n, v in doc["layers"].items()}


@pytest.mark.parametrize("strategy", ["reference", "evolution", "random"])
def test_each_strategy_answers_the_budget_and_says_which_it_is(strategy, ckpt, net_cost, tmp_path):
    net, cost = net_cost
    budget = cost.bitops(mpq.uniform_config(net, 4, 4))
    out = str(tmp_path / strategy)
    assert main(["--checkpoint", ckpt, "--budget", f"{budget:.6g}", "--out", out, "--strategy", strategy,
                 *SMALL, *FAST]) == 0
    doc = _doc(out)
    assert doc["strategy"] == strategy == doc["search"]["strategy"]
    cfg = _cfg(doc)
    assert cost.bitops(cfg) == doc["bitops"] <= float(f"{budget:.6g}")
    # pinned layers keep their 8 bits
    for name, layer in mpq.quant_layers(net).items():
        if mpq.supernet.is_pinned(layer):
            assert cfg[name] == (8, 8)
    for f in ("pareto.csv", "pareto.png", "sensitivity.csv", "sensitivity.png", "model_fixed.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert doc["search"]["per_budget"][0]["budget"] == doc["budget"]["text"]
    with open(os.path.join(out, "pareto.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and json.loads(rows[-1]["config"]) == {n: list(v) for n, v in cfg.items()}
    if strategy == "reference":
        # the paper's walk: it starts at uniform W5A5 and, with a target above uniform W3A3's
        # BitOPs, never takes a searched layer below 3 bits
        start = json.loads(rows[0]["config"])
        free = [n for n, m in mpq.quant_layers(net).items() if not mpq.supernet.is_pinned(m)]
        assert all(start[n] == [5, 5] for n in free)
        assert all(min(cfg[n]) >= 3 for n in free)
        assert doc["source"].startswith("reference greedy:")
    else:
        # the trace is the best so far (per generation / per sample): its calibration loss never rises
        losses = [float(r["loss"]) for r in rows]
        assert all(a >= b for a, b in zip(losses, losses[1:])), losses
        assert doc["search"]["forwards"]["evaluations"] >= (8 if strategy == "random" else 6)
    if strategy == "evolution":
        assert os.path.isfile(os.path.join(out, "evolution_state.json"))
        assert doc["search"]["population"] == 6 and doc["search"]["generations"] == 3


def test_evolution_resumes_from_its_state_file_and_not_for_other_data(ckpt, tmp_path):
    out = str(tmp_path / "evo")
    args = ["--checkpoint", ckpt, "--out", out, "--strategy", "evolution", *SMALL, *FAST, "--no-sensitivity"]
    assert main(args) == 0
    first = _doc(out)
    assert "resumed" not in first["source"]
    # the same search again: the finished state is resumed, nothing is re-evaluated
    assert main(args) == 0
    second = _doc(out)
    assert "resumed after generation 3" in second["source"]
    assert second["layers"] == first["layers"]
    assert second["search"]["forwards"]["evaluations"] == 0   # every fitness comes from the state
    # other calibration data: a fresh search
    assert main(args[:-1] + ["--calib-size", "64", "--no-sensitivity"]) == 0
    assert "resumed" not in _doc(out)["source"]


def test_reference_refuses_a_size_budget_in_one_line(ckpt, tmp_path, capsys):
    out = str(tmp_path / "ref")
    assert main(["--checkpoint", ckpt, "--budget-size", "8KB", "--out", out, "--strategy", "reference",
                 *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strategy reference" in err[0] and "size" in err[0]
    assert not os.path.exists(os.path.join(out, "config.json"))


@pytest.mark.parametrize("flag, value", [("--population", "1"), ("--generations", "0"),
                                         ("--random-samples", "0"), ("--strategy", "genetic")])
def test_strategy_settings_are_checked(flag, value, ckpt, tmp_path, capsys):
    assert main(["--checkpoint", ckpt, "--out", str(tmp_path / "x"), flag, value, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_sensitivity_only_and_no_sensitivity(ckpt, net_cost, tmp_path):
    net, _ = net_cost
    out = str(tmp_path / "sens")
    assert main(["--checkpoint", ckpt, "--out", out, "--sensitivity-only", *FAST]) == 0
    names = set(os.listdir(out)) - {"search.log"}
    assert names == {"sensitivity.csv", "sensitivity.png"}
    with open(os.path.join(out, "sensitivity.csv")) as f:
        rows = list(csv.DictReader(f))
    free = [n for n, m in mpq.quant_layers(net).items() if not mpq.supernet.is_pinned(m)]
    # every searched layer, weights and activations, every bit-width below the highest (6)
    assert {(r["layer"], r["kind"], int(r["bits"])) for r in rows} == {
        (n, k, b) for n in free for k in ("weight", "activation") for b in (2, 3, 4, 5)}
    out2 = str(tmp_path / "nosens")
    assert main(["--checkpoint", ckpt, "--out", out2, "--no-sensitivity", "--no-export", *FAST]) == 0
    assert not os.path.exists(os.path.join(out2, "sensitivity.csv"))
    assert _doc(out2)["search"]["sensitivity_forwards"] is None


def test_batch_error_is_the_error_on_one_batch_with_its_own_bn_statistics(ckpt):
    net, _ = load_supernet(ckpt)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
               for _ in range(3)]
    ev = Evaluator(net, batches, batches, batch_size=32, bn_batches=1)
    cfg = mpq.uniform_config(net, 3, 4)
    for i in (1, 4):   # batch 4 is batch 1 again (cycled)
        # independently: a copy whose BatchNorm layers normalise with the batch's statistics
        ref = copy.deepcopy(net)
        mpq.set_bits(ref, cfg)
        ref.eval()
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        x, y = batches[i % 3]
        with torch.no_grad():
            expected = (ref(x).argmax(1) != y).float().mean().item()
        assert ev.batch_error(cfg, i) == pytest.approx(expected, abs=1e-9)
    assert ev.counter.proxy_evaluations == 2 and ev.counter.evaluations == 0


def test_greedy_start_from_the_sensitivity_report(ckpt, net_cost, tmp_path):
    from search.sensitivity import read_csv, tolerant_start
    net, cost = net_cost
    out = str(tmp_path / "seeded")
    tol = 0.02
    assert main(["--checkpoint", ckpt, "--out", out, "--greedy-start", "sensitivity", "--start-tolerance",
                 str(tol), "--no-export", *FAST]) == 0
    rows = read_csv(os.path.join(out, "sensitivity.csv"))
    with open(os.path.join(out, "pareto.csv")) as f:
        start = {n: tuple(v) for n, v in json.loads(next(csv.DictReader(f))["config"]).items()}
    # independently: each layer's weight / activation at its lowest bits costing <= tol alone
    for name, layer in mpq.quant_layers(net).items():
        if mpq.supernet.is_pinned(layer):
            assert start[name] == (8, 8)
            continue
        for k, kind in ((0, "weight"), (1, "activation")):
            ok = [r["bits"] for r in rows if r["layer"] == name and r["kind"] == kind
                  and r["loss_increase"] <= tol]
            assert start[name][k] == min(ok + [6]), (name, kind)
    assert start == tolerant_start(net, rows, tol)
    assert _doc(out)["search"]["greedy_start"] == "sensitivity"
    assert main(["--checkpoint", ckpt, "--out", str(tmp_path / "x"), "--greedy-start", "sensitivity",
                 "--no-sensitivity", *FAST]) == 2
