"""search.py / search.cli end to end on a tiny supernet checkpoint, and its user errors; the data
split (search.data) and the pick rule (search.select) it uses."""
import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mpq
from mpq.checkpoint import atomic_save, build_supernet, load_supernet
from support import make_checkpoint, tiny_spec as _spec
from search.cli import main
from search.data import heldout_split
from search.evaluator import evaluate
from mpq.export import load_fixed
from search.greedy import CostModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--calib-size", "128", "--eval-size", "256", "--bn-batches", "1", "--batch-size", "128", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("run") / "supernet.pt"))


@pytest.fixture(scope="module")
def w3a3_bitops(ckpt):
    net, _ = load_supernet(ckpt)
    return CostModel(net, (1, 1, 28, 28)).bitops(mpq.uniform_config(net, 3, 3))


@pytest.fixture(scope="module")
def searched(ckpt, w3a3_bitops, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("search"))
    rc = main(["--checkpoint", ckpt, "--budget", f"{w3a3_bitops:.6g}", "--out", out, *FAST])
    assert rc == 0
    return out


def test_help_runs_as_a_script_from_the_repo_root():
    # from the repo root, where the script search.py sits next to the package search/ (the script
    # imports search.cli from the package); the exit-status test runs it from another folder
    out = subprocess.run([sys.executable, "search.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    import re
    shown = set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))
    for opt in ("--checkpoint", "--budget", "--budget-size", "--budget-ratio", "--budgets",
                "--calib-size", "--bn-batches", "--strategy", "--export", "--no-export", "--device",
                "--refine", "--no-refine", "--refine-top-k", "--refine-steps", "--refine-margin",
                "--margin", "--select"):
        assert opt in shown, opt


def test_search_outputs_budget_and_exported_accuracy(searched, ckpt, w3a3_bitops):
    names = {f: os.path.isfile(os.path.join(searched, f))
             for f in ("config.json", "pareto.csv", "pareto.png", "model_fixed.pt")}
    assert all(names.values()), names
    with open(os.path.join(searched, "config.json")) as f:
        doc = json.load(f)
    net, _ = load_supernet(ckpt)
    assert set(doc["layers"]) == set(mpq.quant_layers(net))
    cfg = {n: (v["w_bits"], v["a_bits"]) for n, v in doc["layers"].items()}
    cost = CostModel(net, (1, 1, 28, 28))
    assert doc["bitops"] == cost.bitops(cfg) <= float(f"{w3a3_bitops:.6g}")
    assert doc["size_bytes"] == cost.size_bytes(cfg)
    with open(ckpt, "rb") as f:
        assert doc["checkpoint_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert doc["model"] == "small_cnn" and doc["eval_samples"] == 256
    assert doc["search"]["forwards"]["forwards"] > 0 and doc["search"]["strategy"] == "fast"
    # the refinement ran (its forward passes are counted) and kept the pick within the budget
    assert doc["search"]["refine"] is True and doc["search"]["refine_forwards"]["forwards"] > 0

    # the reported accuracy is the exported model's on the held-out evaluation samples, exactly
    from mpq.data import build_datasets
    info = build_datasets("fashion_mnist", seed=0)
    calib_idx, eval_idx = heldout_split(len(info.val), 128, 256, 0)
    assert not set(calib_idx) & set(eval_idx)
    eval_set = torch.utils.data.Subset(info.val, eval_idx)
    fixed = load_fixed(os.path.join(searched, "model_fixed.pt"))
    assert fixed.mpq_fixed_config == cfg
    r = evaluate(fixed, None, eval_set, recalibrate=False, batch_size=128)
    assert r["acc"] == doc["accuracy"] and r["n"] == 256
    # the search scores the exported arithmetic: the searched figure is the exported model's
    assert doc["supernet_accuracy"] == doc["accuracy"]
    # model.onnx (QDQ) runs in onnxruntime with the same accuracy; preprocess travels with it
    import onnx
    from search.onnx_export import ort_accuracy
    onnx_path = os.path.join(searched, doc["onnx_model"])
    proto = onnx.load(onnx_path)
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    types = {t.data_type for t in proto.graph.initializer}
    assert onnx.TensorProto.INT4 in types or onnx.TensorProto.INT8 in types
    assert doc["preprocess"] == {"mean": [0.286], "std": [0.353], "input_size": [1, 28, 28]}
    assert json.loads({p.key: p.value for p in proto.metadata_props}["preprocess"]) == doc["preprocess"]
    assert abs(ort_accuracy(onnx_path, eval_set)["acc"] - doc["accuracy"]) <= 0.0005
    assert doc["onnx_accuracy"] == ort_accuracy(onnx_path, eval_set)["acc"]
    assert os.path.isfile(os.path.join(searched, doc["encodings"]))
    assert fixed.mpq_fixed_meta["preprocess"] == doc["preprocess"]
    assert os.path.getsize(os.path.join(searched, "model_fixed.pt")) == doc["fixed_model_bytes"]
    assert doc["fixed_model_bytes"] < doc["float_model_bytes"] / 4

    # uniform configurations are reported next to the searched ones at their BitOPs
    assert [u["bits"] for u in doc["uniform"]] == [2, 3, 4, 5, 6]
    for u in doc["uniform"]:
        assert 0 <= u["accuracy"] <= 1 and u["searched_bitops"] <= u["bitops"]


def test_pareto_csv_is_the_search_path(searched, ckpt):
    with open(os.path.join(searched, "pareto.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "bitops", "size_bytes", "acc", "loss", "score", "move", "config"]
    net, _ = load_supernet(ckpt)
    assert json.loads(rows[0]["config"]) == {n: list(v) for n, v in mpq.max_config(net).items()}
    bitops = [float(r["bitops"]) for r in rows]
    assert all(a > b for a, b in zip(bitops, bitops[1:]))
    assert [int(r["step"]) for r in rows] == list(range(len(rows)))
    assert rows[0]["move"] == "" and all(r["move"] for r in rows[1:])
    with open(os.path.join(searched, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_several_budgets_from_one_path(ckpt, tmp_path):
    out = str(tmp_path / "s")
    rc = main(["--checkpoint", ckpt, "--budgets", "0.5,50KB,0.45", "--out", out, "--strategy", "naive",
               "--no-compare-uniform", *FAST])
    assert rc == 0
    with open(os.path.join(out, "config.json")) as f:
        doc = json.load(f)
    assert len(doc["results"]) == 3 and doc["uniform"] == []
    for r in doc["results"]:
        if r["budget"]["bitops"] is not None:
            assert r["bitops"] <= r["budget"]["bitops"]
        if r["budget"]["size_bytes"] is not None:
            assert r["size_bytes"] <= r["budget"]["size_bytes"]
    assert [r["fixed_model"] for r in doc["results"]] == ["model_fixed.pt", "model_fixed_2.pt",
                                                          "model_fixed_3.pt"]
    assert all(os.path.isfile(os.path.join(out, r["fixed_model"])) for r in doc["results"])
    assert doc["budget"] == doc["results"][0]["budget"]
    assert doc["search"]["strategy"] == "naive"


def _other_checkpoints(tmp_path, ckpt):
    plain = str(tmp_path / "plain.pt")
    torch.save({"weight": torch.zeros(3)}, plain)
    net, ck = load_supernet(ckpt)
    wrong_weights = str(tmp_path / "wrong_weights.pt")
    atomic_save({**ck, "spec": _spec("resnet20", in_channels=1)}, wrong_weights)
    other_model = str(tmp_path / "other_model.pt")
    rn = build_supernet(_spec("resnet20", in_channels=3))
    atomic_save({**ck, "spec": _spec("resnet20", in_channels=3), "model": rn.state_dict()}, other_model)
    return plain, wrong_weights, other_model


@pytest.mark.parametrize("case, expect", [
    ("missing", "no such file"),
    ("plain", "not an mpq supernet checkpoint"),
    ("wrong_weights", "does not match its model spec"),
    ("other_model", "3 channels"),
    ("3 GB", "accepted formats"), ("-1", "accepted formats"), ("abc", "accepted formats"),
    ("0", "accepted formats"),
    ("below_min", "minimum achievable"), ("size_below_min", "minimum achievable size"),
    ("size_kind", "size budget is expected"), ("mixed_lists", "cannot be combined"),
    ("calib_too_big", "leaves no held-out samples"),
    ("refine_top_k", "--refine-top-k: must be at least 1"), ("refine_steps", "--refine-steps: must be a finite number >= 0"),
])
def test_user_errors_exit_2_with_one_line(case, expect, ckpt, tmp_path, capsys):
    plain, wrong_weights, other_model = _other_checkpoints(tmp_path, ckpt) if case in (
        "plain", "wrong_weights", "other_model") else (None, None, None)
    out = ["--out", str(tmp_path / "o"), "--quiet"]
    args = {
        "missing": ["--checkpoint", str(tmp_path / "nope.pt")],
        "plain": ["--checkpoint", plain],
        "wrong_weights": ["--checkpoint", wrong_weights],
        "other_model": ["--checkpoint", other_model],
        "below_min": ["--checkpoint", ckpt, "--budget", "1K"],
        "size_below_min": ["--checkpoint", ckpt, "--budget-size", "100B"],
        "size_kind": ["--checkpoint", ckpt, "--budget-size", "22.8G"],
        "mixed_lists": ["--checkpoint", ckpt, "--budget", "1G", "--budgets", "1G,2G"],
        "calib_too_big": ["--checkpoint", ckpt, "--calib-size", "10000"],
        "refine_top_k": ["--checkpoint", ckpt, "--refine-top-k", "0"],
        "refine_steps": ["--checkpoint", ckpt, "--refine-steps", "-1"],
    }.get(case, ["--checkpoint", ckpt, "--budget", case])
    rc = main(args + out)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not os.path.exists(str(tmp_path / "o" / "config.json"))
    if case == "below_min":
        net, _ = load_supernet(ckpt)
        min_bitops = CostModel(net, (1, 1, 28, 28)).bitops(mpq.min_config(net, respect_frozen=False))
        assert f"{min_bitops:.6g}" in err[0]


def test_default_checkpoint_missing_and_script_exit_status(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "runs/default/supernet.pt" in err and "python train.py" in err
    out = subprocess.run([sys.executable, os.path.join(ROOT, "search.py"), "--budget", "3 GB"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: budget: '3 GB'") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_split_data_calibrates_on_training_images_left_out_of_training():
    from mpq.data import build_datasets
    from mpq.errors import UserError
    from search.data import split_data
    info = build_datasets("fashion_mnist", train_subset=1000, seed=0)
    sp = split_data(info, 300, 0, 256, seed=0)
    assert sp.calib_split == "train" and len(sp.calib_indices) == 300
    assert not set(info.train.indices) & set(sp.calib_indices)
    assert sp.eval_indices == list(range(len(info.val))) and len(sp.bn) == 256
    assert split_data(info, 300, 0, 256, seed=0).calib_indices == sp.calib_indices   # seeded
    assert split_data(info, 300, 0, 256, seed=1).calib_indices != sp.calib_indices
    assert len(split_data(info, 300, 500, 256, seed=0).eval_indices) == 500
    sv = split_data(info, 300, 0, 256, seed=0, calib_split="val")
    assert sv.calib_split == "val" and len(sv.calib_indices) == 300
    assert not set(sv.calib_indices) & set(sv.eval_indices)
    assert len(sv.calib_indices) + len(sv.eval_indices) == len(info.val)
    whole = build_datasets("fashion_mnist", seed=0)
    assert split_data(whole, 300, 0, 256, seed=0).calib_split == "val"
    with pytest.raises(UserError, match="left out of training"):
        split_data(whole, 300, 0, 256, seed=0, calib_split="train")


def test_pick_config_keeps_the_uniform_config_unless_a_mixed_one_is_clearly_better():
    from search.select import pick_config
    from search.greedy import Step

    class FakeEvaluator:
        def __init__(self, z):
            self.z = z

        def paired_z(self, a, b, what):
            return self.z

    u = lambda b, acc, bitops: {"bits": b, "label": f"W{b}A{b}", "config": {"l": (b, b)},
                                "bitops": bitops, "acc": acc, "loss": 1 - acc}
    uniform = [u(2, 0.80, 4.0), u(3, 0.85, 9.0), u(4, 0.86, 16.0)]
    path = [Step(0, {"l": (4, 4)}, 16.0, 0.1, {"acc": 0.86, "loss": 0.14}, bitops=16.0),
            Step(1, {"l": (4, 2)}, 8.0, 0.1, {"acc": 0.87, "loss": 0.13}, bitops=8.0),
            Step(2, {"l": (2, 2)}, 4.0, 0.1, {"acc": 0.80, "loss": 0.2}, bitops=4.0)]
    fit9 = lambda c: c["l"][0] * c["l"][1] <= 9
    clear = pick_config(path, uniform, fit9, FakeEvaluator(3.0), margin=2.0)
    assert clear["source"] == "path step 1" and clear["z_vs_uniform"] == 3.0
    assert clear["uniform_ref"] == "W3A3"
    unclear = pick_config(path, uniform, fit9, FakeEvaluator(1.0), margin=2.0)
    assert unclear["config"] == {"l": (3, 3)} and unclear["source"].startswith("uniform W3A3")
    at0 = pick_config(path, uniform, fit9, FakeEvaluator(1.0), margin=0)
    assert at0["source"] == "path step 1" and at0["z_vs_uniform"] == 1.0   # a number, never inf
    # the best is the uniform config itself: no test needed
    fit16 = lambda c: c["l"][0] * c["l"][1] <= 16
    worse_path = [Step(0, {"l": (4, 4)}, 16.0, 0.1, {"acc": 0.80, "loss": 0.3}, bitops=16.0)]
    assert pick_config(worse_path, uniform, fit16, None)["source"] == "uniform W4A4"
    assert pick_config(path, uniform, lambda c: False, None) == {}
    assert pick_config(path, [], fit9, None)["source"] == "path step 1"


def test_pick_config_refines_and_a_refined_mixed_config_must_beat_the_uniform_one():
    from search.select import pick_config
    from search.greedy import Move, SearchResult, Step, Swap

    class ZByConfig:   # paired z of a configuration against the uniform W3A3 one
        def __init__(self, z):
            self.z = z

        def paired_z(self, a, b, what):
            assert b == {"l": (3, 3)}
            return self.z[a["l"]]

    uniform = [{"bits": b, "label": f"W{b}A{b}", "config": {"l": (b, b)}, "bitops": b * b * 1.0,
                "acc": 0.75 + 0.05 * (b - 1), "loss": 0.35 - 0.1 * (b - 1)} for b in (2, 3)]
    path = [Step(0, {"l": (3, 2)}, 6.0, 0.2, {"acc": 0.80, "loss": 0.2}, bitops=6.0)]
    fit9 = lambda c: c["l"][0] * c["l"][1] <= 9
    starts = []

    def refine(cfg):   # moves W3A3 to W4A2 (within 9 BitOPs), anything else nowhere
        starts.append(cfg)
        first = Step(0, cfg, 9.0, 0.15, {"acc": 0.85, "loss": 0.15}, bitops=9.0)
        if cfg != {"l": (3, 3)}:
            return SearchResult([first], "refine", "delta", "loss")
        mv = Swap((Move("l", "w", 3, 4), Move("l", "a", 3, 2)))
        return SearchResult([first, Step(1, {"l": (4, 2)}, 8.0, 0.12, {"acc": 0.87, "loss": 0.12}, mv,
                                         bitops=8.0)], "refine", "delta", "loss")
    # the uniform W3A3 is the best start: refined, the result beats it by 2.5 >= 2 s.e.
    got = pick_config(path, uniform, fit9, ZByConfig({(4, 2): 2.5}), margin=2.0, refine=refine)
    assert starts == [{"l": (3, 3)}]
    assert got["config"] == {"l": (4, 2)} and got["loss"] == 0.12 and got["z_vs_uniform"] == 2.5
    assert got["source"] == "uniform W3A3 refined by 1 move(s): l.w3->4+l.a3->2"
    # not by enough: the uniform configuration is kept, and says why
    kept = pick_config(path, uniform, fit9, ZByConfig({(4, 2): 1.5}), margin=2.0, refine=refine)
    assert kept["config"] == {"l": (3, 3)} and "1.50 s.e. < margin 2" in kept["source"]
    # a path point that is best but not clearly better than uniform: refined from it (no move), it
    # fails the margin, so the refinement starts again from the uniform configuration and passes
    starts.clear()
    better_path = [Step(0, {"l": (3, 2)}, 6.0, 0.1, {"acc": 0.86, "loss": 0.1}, bitops=6.0)]
    got = pick_config(better_path, uniform, fit9, ZByConfig({(3, 2): 1.0, (4, 2): 3.0}), margin=2.0,
                      refine=refine)
    assert starts == [{"l": (3, 2)}, {"l": (3, 3)}] and got["config"] == {"l": (4, 2)}
    # a refinement that finds nothing leaves the uniform pick alone
    still = lambda cfg: SearchResult([Step(0, cfg, 9.0, 0.15, {"acc": 0.85, "loss": 0.15})],
                                     "refine", "delta", "loss")
    assert pick_config(path, uniform, fit9, ZByConfig({}), margin=2.0, refine=still)["config"] == {"l": (3, 3)}
    # a path point not clearly better, and no refinement from either start: uniform, with the reason
    back = pick_config(better_path, uniform, fit9, ZByConfig({(3, 2): 1.0}), margin=2.0, refine=still)
    assert back["config"] == {"l": (3, 3)} and "(path step 0) beats it by only 1.00 s.e." in back["source"]


def test_no_refine_and_refinement_under_a_size_budget(ckpt, tmp_path):
    out = str(tmp_path / "n")
    assert main(["--checkpoint", ckpt, "--budget-ratio", "0.3", "--out", out, "--no-refine",
                 "--no-compare-uniform", "--no-export", *FAST]) == 0
    with open(os.path.join(out, "config.json")) as f:
        doc = json.load(f)
    assert doc["search"]["refine"] is False and doc["search"]["refine_forwards"]["forwards"] == 0
    assert "refined" not in doc["source"]
    # a size budget: every refinement step stays within it
    from search.greedy import refine_supernet, search_supernet
    from search.evaluator import Evaluator
    net, _ = load_supernet(ckpt)
    from mpq.data import build_datasets
    val = build_datasets("fashion_mnist", seed=0).val
    ev = Evaluator(net, torch.utils.data.Subset(val, range(256)), bn_batches=1, batch_size=128)
    cost = CostModel(net, (1, 1, 28, 28))
    limit = cost.size_bytes(mpq.uniform_config(net, 3, 3))
    start = mpq.uniform_config(net, 2, 2)
    res = refine_supernet(net, ev, cost, start, lambda c: cost.size_bytes(c) <= limit, cost_kind="size",
                          margin=0.0)
    assert len(res.path) > 1   # it moved
    for step in res.path:
        assert cost.size_bytes(step.config) <= limit   # every step within the size budget


def test_without_the_onnx_extra_the_torch_export_still_works(ckpt, tmp_path, monkeypatch, capsys):
    import search.onnx_export as onnx_export
    monkeypatch.setattr(onnx_export, "onnx_available", lambda: False)
    out = str(tmp_path / "s")
    assert main(["--checkpoint", ckpt, "--budget-ratio", "0.3", "--out", out, "--no-refine",
                 "--no-compare-uniform", *FAST]) == 0
    assert os.path.isfile(os.path.join(out, "model_fixed.pt"))
    assert not os.path.exists(os.path.join(out, "model.onnx"))
    said = capsys.readouterr()
    assert 'pip install -e ".[onnx]"' in said.out + said.err
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["onnx_model"] is None


def test_budget_above_the_largest_config_warns_and_returns_it(ckpt, tmp_path, capsys):
    net, _ = load_supernet(ckpt)
    cost = CostModel(net, (1, 1, 28, 28))
    top = cost.bitops(mpq.max_config(net))
    out = str(tmp_path / "s")
    rc = main(["--checkpoint", ckpt, "--budget", f"{10 * top:.6g}", "--out", out, "--no-onnx",
               "--no-compare-uniform", *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    warns = [line for line in printed.splitlines() if line.startswith("warning: budget")]
    assert len(warns) == 1 and "largest configuration is returned" in warns[0]
    with open(os.path.join(out, "config.json")) as f:
        doc = json.load(f)
    assert doc["bitops"] == top
    assert {"accuracy", "supernet_accuracy", "calib_accuracy"} <= set(doc["measured"])
    assert "exported" in doc["measured"]["accuracy"] and "BN" in doc["measured"]["supernet_accuracy"]
    log = open(os.path.join(out, "search.log")).read()
    assert warns[0] in log and not os.path.exists(os.path.join(out, ".mpq.lock"))
