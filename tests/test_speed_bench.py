"""Smoke test of benchmarks/speed.py's training-step rows: every peer builds on a tiny model, passes
the quantization check and trains one step (no timing assertions)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpq  # noqa: E402
from benchmarks import speed  # noqa: E402

PEERS = ["naive LSQ (plain torch ops)", "torch LSQ ops (_fake_quantize_learnable_*)",
         "torch.ao QAT (prepare_qat, x86 qconfig)", "Brevitas QuantConv2d/QuantLinear"]


def _has_brevitas() -> bool:
    try:
        import brevitas.nn  # noqa: F401
    except ImportError:
        return False
    return True


def tiny(name: str):
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision
        net, x = torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 16, 16)
    else:
        net, x = mpq.build_model(name, num_classes=10, in_channels=1, width=4), torch.randn(8, 1, 16, 16)
    return net, speed.supernet_of(net, x), x, torch.randint(0, 10, (x.shape[0],))


@pytest.mark.parametrize("name", ["small_mobilenet", "resnet18"])
def test_every_row_builds_quantizes_and_steps(name):
    float_net, supernet, x, y = tiny(name)
    cands = speed.build_candidates(float_net, supernet, x, ["eager"], peers=True)
    names = [c.name for c in cands]
    assert names == ["float", "mpq eager"] + PEERS
    by_name = {c.name: c for c in cands}
    for peer in PEERS[:3]:
        assert not by_name[peer].skipped, by_name[peer].skipped
    brev = by_name[PEERS[3]]
    assert bool(brev.skipped) != _has_brevitas(), brev.skipped
    speed.check_candidates(cands, x)
    live = [c for c in cands if not c.skipped]
    for c in live[1:]:
        assert 1 < c.checks["weight_levels"] <= c.checks["weight_levels_max"]
        assert c.checks["out_rel_diff_vs_float"] > 1e-4
    times = speed.interleaved_times(live, x, y, warmup=0, repeats=1)
    assert all(len(times[c.name]) == 1 for c in live)
    for c in live:  # one SGD step left every parameter finite
        assert all(bool(torch.isfinite(p).all()) for p in c.net.parameters()), c.name
    rows = speed.train_rows(name, x, cands, times)
    assert [r["row"] for r in rows] == names
    assert rows[0]["ratio"] == 1.0
    assert mpq.quantizer.get_kernel() == "eager"


def test_lsq_peers_use_w4a4_and_pinned_8bit_layers():
    float_net, _, x, _ = tiny("small_cnn")
    signs = speed.input_signs(float_net, x)
    net = speed.build_lsq_peer(float_net, x, signs, "naive").net
    wraps = [m for m in net.modules() if isinstance(m, speed.QuantWrap)]
    assert len(wraps) == len(speed.weight_layers(float_net))
    assert [w.w_quant.qp for w in wraps] == [127] + [7] * (len(wraps) - 2) + [127]
    assert wraps[0].a_quant.qn == 128             # the image input is signed, 8-bit
    assert wraps[1].a_quant.qn == 0 and wraps[1].a_quant.qp == 15   # after a ReLU: unsigned 4-bit


def test_missing_brevitas_is_a_skipped_row(monkeypatch):
    for mod in [m for m in list(sys.modules) if m == "brevitas" or m.startswith("brevitas.")] + ["brevitas"]:
        monkeypatch.setitem(sys.modules, mod, None)
    float_net, supernet, x, y = tiny("small_cnn")
    c = speed.build_brevitas_peer(float_net, x, speed.input_signs(float_net, x))
    assert c.net is None and c.skipped.startswith("brevitas not installed")
    row = speed.train_rows("small_cnn", x, [speed.Candidate("float", "fp32", "", net=float_net, peer=False), c],
                           {"float": [1.0]})[1]
    assert row["status"].startswith("skipped: brevitas not installed") and "step_ms" not in row
