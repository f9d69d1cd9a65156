"""Checkpoint safety: weights_only loading, corrupted/truncated/foreign files, atomic writes,
rotation and the newest-valid-checkpoint lookup."""
import os

import pytest
import torch

import mpq.checkpoint as ckpt_io
from mpq import UserError
from mpq.checkpoint import atomic_save, find_latest, load_supernet, safe_load, save_rotating
from mpq.cli import main
from mpq.config import load_config
from mpq.trainer import Trainer
from support import tiny_config


class MakesMarker:
    """Unpickling this calls ``open(marker, "w")``: code execution on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_code_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "mpq-supernet", "spec": {}, "model": {}, "payload": MakesMarker(str(marker))},
               str(path))
    assert not marker.exists()
    with pytest.raises(UserError, match="unpickling arbitrary objects"):
        safe_load(str(path))
    with pytest.raises(UserError, match="unpickling arbitrary objects"):
        load_supernet(str(path))
    assert main([f"output.dir={tmp_path}", f"train.resume={path}", "output.progress=false",
                 "data.train_subset=256"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.resume:") and err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists()


def test_truncated_and_garbage_files_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": "mpq-supernet", "w": torch.randn(1000)}, str(good))
    data = good.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        safe_load(str(bad))
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="truncated or corrupted"):
        safe_load(str(bad))
    with pytest.raises(UserError, match="no such file"):
        safe_load(str(tmp_path / "missing.pt"))
    torch.save([1, 2, 3], str(bad))
    with pytest.raises(UserError, match="does not hold a dict"):
        safe_load(str(bad))
    torch.save({"something": 1}, str(bad))
    with pytest.raises(UserError, match="not an mpq supernet checkpoint"):
        load_supernet(str(bad))


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(tiny_config(tmp_path))
    tr.fit()
    run = tmp_path / "tiny"
    latest = run / "supernet.pt"
    before = latest.read_bytes()
    step = safe_load(str(latest))["train_state"]["global_step"]

    real_save = torch.save

    def half_then_crash(obj, f, *a, **k):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_io.torch, "save", half_then_crash)
    tr.global_step += 1
    with pytest.raises(UserError, match="simulated.*previous checkpoint .*intact.*--resume"):
        tr.save_checkpoint()   # one clear line, not a traceback
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    assert latest.read_bytes() == before
    assert not [f for f in os.listdir(run) if f.startswith(".tmp-")]
    net, ckpt = load_supernet(str(latest))
    assert ckpt["train_state"]["global_step"] == step
    with pytest.raises(OSError):
        monkeypatch.setattr(ckpt_io.torch, "save", half_then_crash)
        atomic_save({"a": 1}, str(latest))
    assert latest.read_bytes() == before


def test_checkpoint_of_another_model_or_bit_set_is_refused(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, "quant.w_bits=[2,4]", "train.max_steps=1")).fit()
    path = tmp_path / "tiny" / "supernet.pt"
    with pytest.raises(UserError, match=r"different supernet \(quant\.w_bits: checkpoint has \[2, 4\]"):
        Trainer(tiny_config(tmp_path, f"train.resume={path}", name="other")).fit()
    with pytest.raises(UserError, match=r"different supernet \(model\.name: checkpoint has 'small_mobilenet'"):
        Trainer(tiny_config(tmp_path, f"train.resume={path}", "model.name=resnet20",
                            "quant.w_bits=[2,4]", name="other2")).fit()
    # auto-resume into a run folder that holds another supernet is refused too, via the CLI: exit 2
    rc = main([f"output.dir={tmp_path}", "output.name=tiny", "--resume", "output.progress=false",
               "data.train_subset=128", "data.batch_size=32"])
    assert rc == 2
    assert "belongs to a different supernet" in capsys.readouterr().err


def test_rotation_and_newest_valid_lookup(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2, 3, 4):
        save_rotating({"format": "mpq-supernet", "spec": {}, "model": {}, "train_state": {"global_step": s}},
                      str(run), s, keep_last=2)
    assert sorted(os.listdir(run)) == ["ckpt-step00000003.pt", "ckpt-step00000004.pt", "supernet.pt"]
    assert safe_load(str(run / "supernet.pt"))["train_state"]["global_step"] == 4
    # corrupt the newest (supernet.pt shares its content): the lookup falls back to step 3
    newest = run / "ckpt-step00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    msgs = []
    path, ckpt = find_latest(str(run), log=msgs.append)
    assert path.endswith("ckpt-step00000003.pt") and ckpt["train_state"]["global_step"] == 3
    assert any("skipping" in m and "ckpt-step00000004.pt" in m for m in msgs)
    assert find_latest(str(tmp_path / "nothing")) is None
