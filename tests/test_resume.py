"""Exact resume: a run interrupted after step k and resumed ends bit-identical to an uninterrupted
one; SIGTERM writes a checkpoint before exiting."""
import os
import signal

import pytest
import torch

from mpq.checkpoint import safe_load
from mpq.cli import main
from mpq.config import load_config
from mpq.trainer import Trainer, TrainingInterrupted


def config(tmp_path, name, *extra):
    # every stateful feature on: distillation, IDM, bit-width scheduler (the reference timing: its 54
    # updates merge into the 12 steps),
    # Quant-Noise (global RNG), AQT (calibrates at step 5), SGD momentum, warm-up + cosine LR
    return load_config(None, [
        "data.train_subset=192", "data.val_subset=64", "data.batch_size=32", "data.eval_batch_size=64",
        "train.epochs=2", "train.warmup_epochs=0.5", "train.num_random=1", "output.checkpoint_every=4",
        f"output.dir={tmp_path}", f"output.name={name}", "output.progress=false",
        "scheduler.warmup=0.0", "scheduler.period=0.17", "scheduler.observe_every=1",
        "quant_noise.enabled=true", "quant_noise.p=0.7", "aqt.enabled=true", "aqt.warmup_steps=5",
        "aqt.freeze=false", "eval.bn_recalib_batches=1", "eval.random_configs=1",
        "eval.uniform_bits=[3]", *extra])


class Crash(RuntimeError):
    pass


def crash_at(k):
    def cb(trainer, step):
        if step == k:
            raise Crash(f"simulated crash after step {k}")
    return cb


def final_state(tr):
    return tr.net.state_dict(), tr.opt.state_dict()


def assert_identical(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][pid][k]) if torch.is_tensor(v) else v == ob["state"][pid][k]


@pytest.mark.parametrize("crash_step", [7, 8])  # mid-epoch (last checkpoint: step 4); at the epoch end
def test_interrupt_and_resume_is_bit_identical(tmp_path, crash_step):
    ref = Trainer(config(tmp_path, "ref"))
    ref_metrics = ref.fit()
    expected = final_state(ref)
    assert ref.global_step == 12

    tr = Trainer(config(tmp_path, "crashy"), step_callback=crash_at(crash_step))
    with pytest.raises(Crash):
        tr.fit()
    resumed = Trainer(config(tmp_path, "crashy", "train.resume=auto"))
    metrics = resumed.fit()
    assert resumed.global_step == 12
    assert_identical(final_state(resumed), expected)
    assert metrics["acc"] == ref_metrics["acc"]
    # the resumed epoch's loss covers the whole epoch (its partial sums travel in the checkpoint)
    assert metrics["train_loss"] == ref_metrics["train_loss"]
    assert [f for f in resumed.bit_sched.frozen()] == [f for f in ref.bit_sched.frozen()]
    lines = (tmp_path / "crashy" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one entry per epoch, none repeated


def test_sigterm_writes_a_checkpoint_then_stops(tmp_path):
    def send_sigterm(trainer, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    tr = Trainer(config(tmp_path, "sig", "output.checkpoint_every=0"), step_callback=send_sigterm)
    with pytest.raises(TrainingInterrupted) as e:
        tr.fit()
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    ckpt = safe_load(str(tmp_path / "sig" / "supernet.pt"))
    assert ckpt["train_state"]["global_step"] == 3 and ckpt["train_state"]["step_in_epoch"] == 3
    # --resume continues to the end; a second --resume finds the run complete
    args = [f"output.dir={tmp_path}", "output.name=sig", "--resume"]
    overrides = ["data.train_subset=192", "data.val_subset=64", "data.batch_size=32",
                 "data.eval_batch_size=64", "train.epochs=2", "train.warmup_epochs=0.5",
                 "train.num_random=1", "output.progress=false", "output.checkpoint_every=0",
                 "scheduler.warmup=0.0", "scheduler.period=0.17", "scheduler.observe_every=1",
                 "quant_noise.enabled=true", "quant_noise.p=0.7", "aqt.enabled=true",
                 "aqt.warmup_steps=5", "aqt.freeze=false", "eval.bn_recalib_batches=1",
                 "eval.random_configs=1", "eval.uniform_bits=[3]"]
    assert main(args + overrides) == 0
    assert safe_load(str(tmp_path / "sig" / "supernet.pt"))["train_state"]["global_step"] == 12
    assert main(args + overrides) == 0


def test_paper_recipe_resume_is_bit_identical(tmp_path):
    """configs/recipe_paper.yaml adds state of its own: the step sizes' Adam, the model EMA, the
    frozen activation lists (freeze_acts), the QE-loss ramp; a crash and resume ends identical."""
    import os
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "recipe_paper.yaml")

    def cfg(name, *extra):
        return load_config(recipe, [
            "data.train_subset=192", "data.val_subset=64", "data.batch_size=32", "data.eval_batch_size=64",
            "train.epochs=2", "train.warmup_epochs=0.5", "output.checkpoint_every=4", "train.qe_start=0.3",
            f"output.dir={tmp_path}", f"output.name={name}", "output.progress=false",
            "scheduler.freeze_acts=true", "eval.bn_recalib_batches=1", "eval.random_configs=0",
            "eval.uniform_bits=[3]", *extra])

    ref = Trainer(cfg("ref"))
    ref_metrics = ref.fit()
    tr = Trainer(cfg("crashy"), step_callback=crash_at(7))
    with pytest.raises(Crash):
        tr.fit()
    resumed = Trainer(cfg("crashy", "train.resume=auto"))
    metrics = resumed.fit()
    assert_identical(final_state(resumed), final_state(ref))
    for k, v in ref.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k
    so_ref, so_res = ref.step_opt.state_dict()["state"], resumed.step_opt.state_dict()["state"]
    assert so_ref.keys() == so_res.keys() and so_ref
    for pid in so_ref:
        for k, v in so_ref[pid].items():
            assert torch.equal(v, so_res[pid][k]), (pid, k)
    assert metrics["acc"] == ref_metrics["acc"]
    assert resumed.bit_sched.frozen_acts() == ref.bit_sched.frozen_acts()
    log = (tmp_path / "crashy" / "scheduler.jsonl").read_text().splitlines()
    assert log == (tmp_path / "ref" / "scheduler.jsonl").read_text().splitlines()
