"""Per-layer sensitivity against a lookup-table "supernet": the loss is a known sum of per-layer
penalties, so every row's loss increase, accuracy drop and cost share can be computed by hand."""
import torch
from torch import nn

import mpq
from search.cost import BitOpsCounter
from search.greedy import CostModel
from search.sensitivity import layer_sensitivity, most_sensitive, plot, read_csv, write_csv


def tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return mpq.quantize_model(net, w_bits=[2, 4, 6], a_bits=[3, 6])


class TableEvaluator:
    """loss(config) = sum of PENALTY[layer][kind] * (top - bits); acc = 0.9 - loss / 10."""

    PENALTY = {"2": {"weight": 0.5, "activation": 0.05}, "4": {"weight": 0.01, "activation": 0.2}}

    def __init__(self):
        self.calls = 0

    def exact(self, config):
        self.calls += 1
        loss = 0.1
        for name, (w, a) in config.items():
            p = self.PENALTY.get(name)
            if p:
                loss += p["weight"] * (6 - w) + p["activation"] * (6 - a)
        return {"loss": loss, "acc": 0.9 - loss / 10, "n": 100}

    proxy = exact


def test_rows_match_the_known_penalties_and_cost_shares(tmp_path):
    net = tiny_net()
    cost = CostModel(net, (1, 1, 6, 6))
    ev = TableEvaluator()
    rows = layer_sensitivity(net, ev, cost)
    # pinned first (0) and last (8) layers are skipped; layers 2 and 4: weights 2, 4 and activation 3
    assert [(r["layer"], r["kind"], r["bits"]) for r in rows] == [
        ("2", "weight", 2), ("2", "weight", 4), ("2", "activation", 3),
        ("4", "weight", 2), ("4", "weight", 4), ("4", "activation", 3)]
    assert ev.calls == 1 + len(rows)
    for r in rows:
        p = TableEvaluator.PENALTY[r["layer"]][r["kind"]]
        assert abs(r["loss_increase"] - p * (6 - r["bits"])) < 1e-12
        assert abs(r["acc_drop"] - p * (6 - r["bits"]) / 10) < 1e-12
    # shares of the max config, by hand: MACs x w x a of the layer over the total (pinned at 8/8)
    macs = BitOpsCounter(net, (1, 1, 6, 6)).macs
    top = mpq.max_config(net)
    total = sum(macs[n] * w * a for n, (w, a) in top.items())
    layer2 = next(r for r in rows if r["layer"] == "2")
    assert abs(layer2["bitops_share"] - macs["2"] * 6 * 6 / total) < 1e-12
    w2 = net[2].weight.numel() * 6 / 8
    assert abs(layer2["size_share"] - w2 / cost.size_bytes(top)) < 1e-12
    assert most_sensitive(rows, "weight", 1) == ["2"] and most_sensitive(rows, "activation", 1) == ["4"]
    write_csv(str(tmp_path / "s.csv"), rows)
    back = read_csv(str(tmp_path / "s.csv"))
    assert [(r["layer"], r["kind"], r["bits"]) for r in back] == [(r["layer"], r["kind"], r["bits"]) for r in rows]
    assert all(abs(a["loss_increase"] - b["loss_increase"]) < 1e-5 for a, b in zip(rows, back))
    plot(str(tmp_path / "s.png"), rows)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_stays_readable_with_many_layers(tmp_path):
    rows = [{"layer": f"features.{i}", "kind": k, "bits": b, "loss_increase": (i % 7) * 0.01 * (6 - b),
             "acc_drop": 0.0, "loss": 0.0, "acc": 0.0, "bitops_share": 0.01, "size_share": 0.01}
            for i in range(60) for k in ("weight", "activation") for b in (2, 3, 4, 5)]
    plot(str(tmp_path / "many.png"), rows)
    assert (tmp_path / "many.png").stat().st_size > 10_000
