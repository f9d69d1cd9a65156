"""Smoke test of benchmarks/quality.py with toy sizes (a few training steps, tiny data)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import quality as qb  # noqa: E402
from mpq.data import FASHION_MNIST_DIR  # noqa: E402
from mpq.quantizer import fake_quant, qrange  # noqa: E402

needs_data = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                reason="Fashion-MNIST (dataset-fashion-mnist) not installed")


def toy_settings():
    s = qb.default_settings()
    s.update({"epochs": 1, "max_steps": 2, "train_subset": 256, "val_subset": 200, "repeats": 1,
              "calib_size": 128, "bn_batches": 1, "path_points": 3, "ptq_calib_batches": 1,
              "r2_weights": [1e-2], "jobs": 1})
    return s


def test_mse_weight_step_beats_max_scaling():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    w[0, 0, 0, 0] = 8.0  # an outlier: the MSE-optimal 2-bit step clips it
    for bits in (2, 4):
        step = qb.mse_weight_step(w, bits, 8).view(8, 1, 1, 1)
        qn, qp = qrange(bits, True)
        naive = (w.abs().flatten(1).amax(1) / qp).view(8, 1, 1, 1)
        err = (fake_quant(w, step, qn, qp) - w).pow(2).flatten(1).sum(1)
        err_naive = (fake_quant(w, naive, qn, qp) - w).pow(2).flatten(1).sum(1)
        assert bool((err <= err_naive + 1e-6).all())
    assert qb.mse_act_step(torch.rand(1000), 8, False) > 0


def test_verdict_and_format():
    assert qb.verdict([1.0, 1.1, 0.9]) == "better"
    assert qb.verdict([-1.0, -1.1, -0.9]) == "worse"
    assert qb.verdict([1.0, -1.0, 0.1]) == "within noise"
    assert qb.verdict([0.5]).endswith("(1 repeat)")
    assert qb.fmt([1.0, 3.0]) == "2.00 ± 1.41"
    assert qb.fmt([]) == "n/a"


def test_parse_args():
    s, _ = qb.parse_args(["--quick", "--sections", "4", "--r2-weights", "0.001,0.1", "--train-subset", "all"])
    assert s["sections"] == [4] and s["r2_weights"] == [0.001, 0.1] and s["train_subset"] is None
    with pytest.raises(SystemExit):
        qb.parse_args(["--sections", "5"])


@needs_data
def test_tasks_and_report(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the benchmark's workers
    try:
        s = toy_settings()
        sup = qb.task_supernet(s, qb.FULL, 0, True)
        assert set(sup["uniform"]) == {str(b) for b in qb.UNIFORM_BITS}
        assert all(0 <= u["acc"] <= 100 for u in sup["uniform"].values())
        assert sup["path"][0]["bitops"] > sup["path"][-1]["bitops"]
        for b in qb.BUDGET_BITS:
            info = sup["budgets"][str(b)]
            assert info["bitops"] <= info["budget"] * (1 + 1e-9)
        assert sup["budgets"]["2"]["same_as_uniform"]  # W2A2 is the lowest config
        qat = qb.task_qat(s, 0, "uniform3", None, 3)
        assert qat["bitops"] == pytest.approx(sup["uniform"]["3"]["bitops"])
        r2 = [qb.task_r2(s, 0, "margin", 1e-2)]
        assert set(r2[0]["ptq"]) == {str(b) for b in qb.PTQ_BITS}
        result = {"settings": s, "runtime_s": 1.0, "runs": {"supernet": [sup], "qat": [qat], "r2": r2}}
        result["summary"] = qb.summarize(s, result["runs"], {1, 2, 3, 4})
        md = qb.markdown(result)
        for title in ("### 1.", "### 2.", "### 3.", "### 4."):
            assert title in md
        assert qb.plot(result, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    finally:
        torch.set_num_threads(threads)
