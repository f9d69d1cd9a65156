"""Supernet training: one step's effect on weights/step sizes, the training options, and a tiny
end-to-end run producing the run folder."""
import json
import os

import pytest
import torch

import mpq
from mpq.checkpoint import load_supernet
from mpq.errors import UserError
from mpq.config import load_config
from mpq.supernet import quant_layers
from mpq.optim import lr_at
from mpq.trainer import Trainer

import support


def tiny_config(tmp_path, *extra, name="tiny"):
    """A seconds-long config: 256 Fashion-MNIST samples, batch 32, small held-out set."""
    return support.tiny_config(tmp_path, "data.train_subset=256", "data.val_subset=128",
                               "data.eval_batch_size=128", "train.lr=0.05", "output.log_every=1",
                               "eval.bn_recalib_batches=2", "eval.random_configs=1",
                               "eval.uniform_bits=[2,4]", *extra, name=name)


def first_batch(trainer):
    trainer.sampler.set_epoch(0)
    x, y = next(iter(trainer.train_loader))
    return x, y


def snapshot(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_one_step_updates_shared_weights_and_only_sampled_step_sizes(tmp_path):
    # num_random=0: only the max (6-bit) and min (2-bit) subnets are sampled, so the 3/4/5-bit step
    # sizes must not move; the scheduler is off so nothing else is frozen.
    cfg = tiny_config(tmp_path, "train.num_random=0", "scheduler.enabled=false", "train.weight_decay=0.001")
    tr = Trainer(cfg)
    before = snapshot(tr.net)
    x, y = first_batch(tr)
    losses = tr.train_step(x, y)
    assert set(losses) == {"max", "min"}
    after = dict(tr.net.named_parameters())
    for name, layer in quant_layers(tr.net).items():
        assert not torch.equal(before[f"{name}.weight"], after[f"{name}.weight"]), name
        if layer.w_candidates == (8,):
            assert not torch.equal(before[f"{name}.w_quant.step.8"], after[f"{name}.w_quant.step.8"])
            continue
        for q in ("w_quant", "a_quant"):
            for b in (2, 6):
                key = f"{name}.{q}.step.{b}"
                assert not torch.equal(before[key], after[key]), f"{key} should have been trained"
            for b in (3, 4, 5):
                key = f"{name}.{q}.step.{b}"
                assert torch.equal(before[key], after[key]), f"{key} was not sampled but changed"
                assert after[key].grad is None
    from mpq.distributed import cleanup
    cleanup(tr.env)


def test_random_configs_follow_the_shared_generator(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "train.num_random=3", "train.order=[min, max, random]",
                             "distill.enabled=false", "idm.enabled=false"))
    kinds = [k for k, _ in tr.sample_configs()]
    assert kinds == ["min", "max", "random", "random", "random"]
    g_state = tr.config_gen.get_state()
    a = [c for _, c in tr.sample_configs()]
    tr.config_gen.set_state(g_state)
    b = [c for _, c in tr.sample_configs()]
    assert a == b


@pytest.mark.parametrize("extra", [
    ["r2.enabled=true", "r2.kind=margin"],
    ["r2.enabled=true", "r2.kind=softminmax"],
    ["r2.enabled=true", "r2.kind=linf"],
    ["quant_noise.enabled=true", "quant_noise.p=0.5"],
    ["quant.bn=switchable"],
    ["train.optimizer=adamw", "train.lr=0.001", "train.grad_clip=1.0", "train.micro_batches=2"],
    ["distill.enabled=false", "idm.enabled=false", "train.label_smoothing=0.1"],
])
def test_training_options_run_a_step(tmp_path, extra):
    tr = Trainer(tiny_config(tmp_path, *extra))
    x, y = first_batch(tr)
    w0 = snapshot(tr.net)
    losses = tr.train_step(x, y)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(not torch.equal(w0[n], p) for n, p in tr.net.named_parameters())
    if tr.r2 is not None and tr.r2.kind != "linf":
        assert all(p.grad is not None for p in tr.r2.parameters())


def test_aqt_calibrates_activation_steps_once(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "aqt.enabled=true", "aqt.warmup_steps=2", "aqt.freeze=true",
                             "train.max_steps=3", "eval.uniform_bits=[]", "eval.random_configs=0"))
    tr.fit()
    assert tr.aqt.done
    layer = next(m for m in quant_layers(tr.net).values() if len(m.a_candidates) > 1)
    s2, s6 = layer.a_quant.step["2"], layer.a_quant.step["6"]
    _, qp2 = layer.a_quant.grid(2)
    _, qp6 = layer.a_quant.grid(6)
    assert not s2.requires_grad
    assert float(s2 * qp2) == pytest.approx(float(s6 * qp6), rel=1e-5)  # same clip bound


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_evaluation_restores_training_state(tmp_path):
    tr = Trainer(tiny_config(tmp_path))
    x, y = first_batch(tr)
    tr.train_step(x, y)
    bufs = {n: b.clone() for n, b in tr.net.named_buffers()}
    bits = mpq.get_bits(tr.net)
    res = tr.evaluate()
    assert {"max", "min", "w2a2", "w4a4", "random0"} <= set(res)
    assert res["min"] == res["w2a2"]  # identical configs are evaluated once
    assert all(torch.equal(b, bufs[n]) for n, b in tr.net.named_buffers())
    assert mpq.get_bits(tr.net) == bits and tr.net.training


def test_end_to_end_run_folder(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=2", "scheduler.warmup=0.0", "scheduler.period=0.25",
                      "scheduler.observe_every=1", "output.checkpoint_every=5", "output.keep_last=2")
    metrics = Trainer(cfg).fit()
    run = tmp_path / "tiny"
    assert (run / "config.yaml").is_file() and (run / "supernet.pt").is_file()
    assert load_config(str(run / "config.yaml")) == cfg
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for key in ("max", "min", "w2a2", "w4a4", "random0"):
        assert 0.0 <= lines[-1]["acc"][key] <= 100.0
    assert "frozen" in lines[-1] and "num_frozen" in lines[-1]
    measured = lines[-1]["acc_measured"]   # each figure says how it was measured
    assert "re-calibrated" in measured["bn"] and measured["eval"].endswith("held-out samples (val split)")
    assert lines[-1]["acc"]["max"] > 25.0  # 16 steps on 256 images: well above chance (10%)
    assert metrics == lines[-1]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tb"))
    steps = sorted(f for f in os.listdir(run) if f.startswith("ckpt-step"))
    assert steps == ["ckpt-step00000015.pt", "ckpt-step00000016.pt"]  # keep_last=2
    net, ckpt = load_supernet(str(run / "supernet.pt"))
    assert ckpt["format"] == "mpq-supernet" and ckpt["train_state"]["global_step"] == 16
    assert ckpt["config"]["data"]["name"] == "fashion_mnist" and ckpt["config"]["data"]["seed"] == 0
    assert ckpt["spec"]["model"] == {"name": "small_mobilenet", "num_classes": 10, "in_channels": 1,
                                    "width": 16}
    assert ckpt["spec"]["input_size"] == [1, 1, 28, 28]
    assert set(ckpt["allowed"]) == set(quant_layers(net))
    # the loaded supernet answers like the trained one at the max config
    mpq.set_bits(net, mpq.max_config(net))
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    Trainer(tiny_config(tmp_path, "train.max_steps=3", "scheduler.warmup=0.0")).fit()
    acc = EventAccumulator(str(tmp_path / "tiny" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/max", "loss/min", "loss/random", "lr", "sched/frozen", "acc/max", "acc/min"} <= tags


def test_activation_calibration_matches_the_training_forward(tmp_path):
    # From scratch, BN running stats are mean 0 / var 1; the activation calibration normalises with
    # batch statistics, so the train-mode activations mostly fall inside the clip range.
    tr = Trainer(tiny_config(tmp_path))
    net = tr.net
    mpq.set_bits(net, mpq.max_config(net))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.__setitem__(n, inp[0].detach()))
             for n, m in quant_layers(net).items()]
    net.train()
    with torch.no_grad():
        net(first_batch(tr)[0])
    for h in hooks:
        h.remove()
    for name, layer in quant_layers(net).items():
        b = max(layer.a_candidates)
        _, qp = layer.a_quant.grid(b)
        clip = float(layer.a_quant.step[str(b)].detach().abs().max()) * qp
        clipped = float((seen[name].abs() > clip).float().mean())
        assert clipped < 0.2, (name, clipped)


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_a_fresh_run_refuses_an_earlier_run_and_replaces_it_only_with_overwrite(tmp_path):
    Trainer(tiny_config(tmp_path, "train.epochs=2", "output.checkpoint_every=0")).fit()
    run = tmp_path / "tiny"
    assert (run / "ckpt-step00000016.pt").exists()
    assert (run / "train.log").read_text().count("epoch 2/2") == 1   # what was printed
    assert not (run / ".mpq.lock").exists()                            # released at the end
    before = _snapshot(run)
    with pytest.raises(UserError, match="earlier run.*--resume.*--overwrite"):
        Trainer(tiny_config(tmp_path, "train.max_steps=3", "output.checkpoint_every=0"))
    assert _snapshot(run) == before                                    # nothing written or deleted
    Trainer(tiny_config(tmp_path, "train.max_steps=3", "output.checkpoint_every=0"), overwrite=True).fit()
    assert sorted(f for f in os.listdir(run) if f.startswith("ckpt-step")) == ["ckpt-step00000003.pt"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(os.listdir(run / "tb")) == 1
    assert "epoch 2/2" not in (run / "train.log").read_text()
    assert load_supernet(str(run / "supernet.pt"))[1]["train_state"]["global_step"] == 3
