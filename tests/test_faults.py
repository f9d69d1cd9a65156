"""Fault injection for train.py / search.py: a second job on a busy folder, kill -9 (during training
and in the middle of a checkpoint write), SIGTERM, a full disk, a corrupted newest checkpoint, a lock
from another host, a fresh run over a finished one, and bad ``--out`` paths.

Every case ends either in a resume that finishes (nothing lost) or in a clear refusal: exit status 2,
exactly one ``error:`` line on stderr, no traceback, and the folder untouched.

Subprocesses run ``mpq.cli.main`` (what ``train.py`` runs) through a small wrapper that can pause the
trainer after a given step until a "go" file appears, so every interleaving is deterministic (no fixed
sleeps: the test polls for a "ready" file with a deadline).
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from mpq.checkpoint import safe_load
from mpq.cli import main as train_main
from mpq.rundir import LOCK_NAME
from search.cli import main as search_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 8  # 128 samples, batch 32: 4 steps an epoch, 2 epochs

# ``python -c WRAPPER args...``: train.py's main with two optional hooks (environment variables):
#   FT_PAUSE_AT=k  after step k (its checkpoint written, if one is due) write FT_READY and wait until
#                  FT_GO exists or a signal arrived (at most 60 s)
#   FT_HALF_KILL_AT=n  the n-th torch.save writes half the checkpoint's bytes, then SIGKILLs itself
WRAPPER = r"""
import io, os, signal, sys, time
import torch
import mpq.checkpoint as C
import mpq.trainer as T

pause_at = int(os.environ.get("FT_PAUSE_AT", "0"))
half_kill_at = int(os.environ.get("FT_HALF_KILL_AT", "0"))

def pause(trainer, step):
    if step != pause_at:
        return
    with open(os.environ["FT_READY"] + ".tmp", "w") as f:
        f.write(str(step))
    os.replace(os.environ["FT_READY"] + ".tmp", os.environ["FT_READY"])
    deadline = time.time() + 60
    while (not os.path.exists(os.environ["FT_GO"]) and trainer._stop_signal is None
           and time.time() < deadline):
        time.sleep(0.02)

if pause_at:
    _init = T.Trainer.__init__
    def init(self, cfg, step_callback=None, **kw):
        _init(self, cfg, step_callback=pause, **kw)
    T.Trainer.__init__ = init

if half_kill_at:
    _save, calls = torch.save, [0]
    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] < half_kill_at:
            return _save(obj, f, *a, **k)
        buf = io.BytesIO()
        _save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    C.torch.save = save

from mpq.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def overrides(out_dir, name, *extra):
    return ["model.name=small_cnn", "data.train_subset=128", "data.val_subset=64", "data.batch_size=32",
            "data.eval_batch_size=64", "train.epochs=2", "train.warmup_epochs=0", "train.num_random=1",
            "output.progress=false", "output.checkpoint_every=2", "eval.bn_recalib_batches=1",
            "eval.random_configs=0", "eval.uniform_bits=[]", f"output.dir={out_dir}",
            f"output.name={name}", *extra]


def ckpt_name(step):
    return f"ckpt-step{step:08d}.pt"


def wait_for(predicate, what, proc=None, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


class Job:
    """A training subprocess (the wrapper above); killed in ``close`` if still running."""

    def __init__(self, tmp_path, args, pause_at=0, half_kill_at=0):
        self.ready = str(tmp_path / "ready")
        self.go = str(tmp_path / "go")
        env = dict(os.environ, OMP_NUM_THREADS="1", FT_READY=self.ready, FT_GO=self.go,
                   FT_PAUSE_AT=str(pause_at), FT_HALF_KILL_AT=str(half_kill_at))
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def wait_ready(self):
        wait_for(lambda: os.path.exists(self.ready), "the job to reach its pause step", self.proc)

    def resume(self):
        open(self.go, "w").close()

    def finish(self, timeout=60):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass


@pytest.fixture
def job(tmp_path):
    jobs = []

    def start(args, **kw):
        j = Job(tmp_path, args, **kw)
        jobs.append(j)
        return j

    yield start
    for j in jobs:
        j.close()


def snapshot(folder, skip_tb_bytes=False):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, folder)
            if skip_tb_bytes and rel.startswith("tb" + os.sep):
                out[rel] = None
                continue
            with open(p, "rb") as fh:
                out[rel] = fh.read()
    return out


def assert_refusal(err, *needles):
    """Exactly one line on stderr, an ``error:`` line naming every needle; no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_finished(run_dir, epochs=2):
    ckpt = safe_load(os.path.join(run_dir, "supernet.pt"))
    ts = ckpt["train_state"]
    assert ts["global_step"] == TOTAL_STEPS and ts["complete"] is True
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))
    assert [n for n in os.listdir(run_dir) if n.startswith(".mpq.lock")] == []


def metric_epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


def train_in_process(capsys, args):
    capsys.readouterr()
    rc = train_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 4, 6, 8), trained once; tests copy it."""
    base = tmp_path_factory.mktemp("finished")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(overrides(base, "done")) == 0
    finally:
        torch.set_num_threads(n)
    run_dir = base / "done"
    assert sorted(os.listdir(run_dir)) >= [ckpt_name(4), ckpt_name(6), ckpt_name(8)]
    return run_dir


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / "runs" / name
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ 1. two jobs on one folder
def test_second_job_on_a_busy_folder_is_refused_and_the_first_finishes(tmp_path, job, capsys):
    args = overrides(tmp_path / "runs", "busy")
    run_dir = tmp_path / "runs" / "busy"
    a = job(args, pause_at=2)
    a.wait_ready()  # A holds the lock and sits after step 2 (checkpoint written)
    lock = json.loads((run_dir / LOCK_NAME).read_text())
    assert lock["pid"] == a.pid and lock["host"] == socket.gethostname()
    before = snapshot(run_dir, skip_tb_bytes=True)

    rc, out, err = train_in_process(capsys, args)  # B: same command, while A runs
    assert rc == 2
    line = assert_refusal(err, str(run_dir), "in use", f"host {socket.gethostname()}", f"pid {a.pid}")
    assert "train.py" in line
    assert a.proc.poll() is None  # B's refusal came while A was running
    assert snapshot(run_dir, skip_tb_bytes=True) == before  # B changed nothing

    a.resume()
    rc, out, err = a.finish()
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert metric_epochs(run_dir) == [1, 2]  # one line per epoch, none repeated
    assert_finished(run_dir)
    log = (run_dir / "train.log").read_text()
    assert "error:" not in log and "epoch 2/2" in log


def test_second_search_on_a_busy_out_folder_is_refused(tmp_path, finished, capsys):
    out_dir = tmp_path / "search"
    out_dir.mkdir()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "command": "search.py"}
    (out_dir / LOCK_NAME).write_text(json.dumps(lock))
    before = snapshot(out_dir)
    capsys.readouterr()
    rc = search_main(["--checkpoint", str(finished / "supernet.pt"), "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert rc == 2
    assert_refusal(err, str(out_dir), "in use by search.py", f"pid {os.getpid()}")
    assert snapshot(out_dir) == before


# ------------------------------------------------------------------ 2. kill -9 during training
def test_kill_9_during_training_then_resume_takes_the_stale_lock_over(tmp_path, job, capsys):
    args = overrides(tmp_path / "runs", "killed")
    run_dir = tmp_path / "runs" / "killed"
    a = job(args, pause_at=2)
    a.wait_ready()
    assert (run_dir / ckpt_name(2)).is_file()
    a.proc.send_signal(signal.SIGKILL)
    rc, _, _ = a.finish()
    assert rc == -signal.SIGKILL
    stale = json.loads((run_dir / LOCK_NAME).read_text())  # the dead job's lock is left behind
    assert stale["pid"] == a.pid

    rc, out, err = train_in_process(capsys, args + ["--resume"])
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "taking the lock over" in warnings[0] and str(a.pid) in warnings[0]
    assert f"resumed from {run_dir / ckpt_name(2)} at step 2" in out
    assert_finished(run_dir)
    assert metric_epochs(run_dir) == [1, 2]


# ------------------------------------------------------------------ 3. kill -9 inside a checkpoint write
def test_kill_9_while_writing_a_checkpoint_resumes_from_the_intact_one(tmp_path, job, capsys):
    args = overrides(tmp_path / "runs", "halfwritten")
    run_dir = tmp_path / "runs" / "halfwritten"
    a = job(args, half_kill_at=2)  # 1st save (step 2) whole, 2nd (step 4) cut in half, then SIGKILL
    rc, _, err = a.finish()
    assert rc == -signal.SIGKILL, err
    names = os.listdir(run_dir)
    assert ckpt_name(2) in names and ckpt_name(4) not in names
    stray = [n for n in names if n.startswith(".tmp-")]
    assert len(stray) == 1  # the half-written temporary file
    assert safe_load(str(run_dir / "supernet.pt"))["train_state"]["global_step"] == 2

    rc, out, err = train_in_process(capsys, args + ["--resume"])
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert "taking the lock over" in err
    assert f"resumed from {run_dir / ckpt_name(2)} at step 2" in out
    assert_finished(run_dir)
    assert metric_epochs(run_dir) == [1, 2]


# ------------------------------------------------------------------ 4. SIGTERM
def test_sigterm_checkpoints_releases_the_lock_and_resume_finishes(tmp_path, job, capsys):
    args = overrides(tmp_path / "runs", "termed", "output.checkpoint_every=0")
    run_dir = tmp_path / "runs" / "termed"
    a = job(args, pause_at=3)  # no checkpoint is due at step 3: the one found is SIGTERM's
    a.wait_ready()
    assert not (run_dir / ckpt_name(3)).exists()
    a.proc.send_signal(signal.SIGTERM)
    rc, out, err = a.finish()
    assert rc == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "error:" not in err
    assert f"checkpoint written: {run_dir / ckpt_name(3)}" in err
    assert not (run_dir / LOCK_NAME).exists()
    assert safe_load(str(run_dir / ckpt_name(3)))["train_state"]["global_step"] == 3

    rc, out, err = train_in_process(capsys, args + ["--resume"])
    assert rc == 0, err
    assert "warning:" not in err  # the lock was released, nothing to take over
    assert f"resumed from {run_dir / ckpt_name(3)} at step 3" in out
    assert_finished(run_dir)
    assert metric_epochs(run_dir) == [1, 2]


# ------------------------------------------------------------------ 5. full disk while saving
def test_full_disk_while_saving_is_one_error_line_and_resume_finishes(tmp_path, capsys, monkeypatch):
    import mpq.checkpoint as ckpt_mod
    args = overrides(tmp_path / "runs", "full")
    run_dir = tmp_path / "runs" / "full"
    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    rc, out, err = train_in_process(capsys, args)
    monkeypatch.undo()
    assert rc == 2
    assert_refusal(err, "No space left on device", "intact", "step-4", ckpt_name(2), "--resume")
    names = os.listdir(run_dir)
    assert [n for n in names if n.startswith(".tmp-")] == []  # the failed write left no debris
    assert LOCK_NAME not in names
    assert safe_load(str(run_dir / ckpt_name(2)))["train_state"]["global_step"] == 2
    assert "error:" in (run_dir / "train.log").read_text()

    rc, out, err = train_in_process(capsys, args + ["--resume"])
    assert rc == 0, err
    assert f"resumed from {run_dir / ckpt_name(2)} at step 2" in out
    assert_finished(run_dir)


# ------------------------------------------------------------------ 6. corrupted newest checkpoint
def _truncate_newest(run_dir):
    newest = run_dir / ckpt_name(8)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # a new inode: the copy's supernet.pt is not touched
    return newest


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, finished, capsys):
    run_dir = copy_run(finished, tmp_path)
    newest = _truncate_newest(run_dir)
    args = overrides(tmp_path / "runs", "run")
    rc, out, err = train_in_process(capsys, args + ["--resume"])
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    skip = [ln for ln in out.splitlines() if ln.startswith("resume: skipping")]
    assert len(skip) == 1 and str(newest) in skip[0] and "truncated or corrupted" in skip[0]
    assert f"resumed from {run_dir / ckpt_name(6)} at step 6" in out
    assert_finished(run_dir)
    assert safe_load(str(newest))["train_state"]["global_step"] == TOTAL_STEPS  # rewritten whole


def test_resume_from_an_older_checkpoint_keeps_metrics_one_line_per_epoch(tmp_path, finished, capsys):
    run_dir = copy_run(finished, tmp_path)
    _truncate_newest(run_dir)
    rc, out, err = train_in_process(capsys, overrides(tmp_path / "runs", "run") + ["--resume"])
    assert rc == 0, err
    assert metric_epochs(run_dir) == [1, 2]


# ------------------------------------------------------------------ 7. a lock from another host
@pytest.mark.parametrize("resume", [False, True])
def test_lock_from_another_host_counts_as_held(tmp_path, finished, capsys, resume):
    run_dir = copy_run(finished, tmp_path)
    lock_path = run_dir / LOCK_NAME
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0.0,
                                     "command": "train.py"}))
    before = snapshot(run_dir)
    args = overrides(tmp_path / "runs", "run") + (["--resume"] if resume else [])
    rc, out, err = train_in_process(capsys, args)
    assert rc == 2
    assert_refusal(err, str(run_dir), "host elsewhere", "pid 1", f"delete {lock_path}")
    assert snapshot(run_dir) == before


def test_search_lock_from_another_host_counts_as_held(tmp_path, finished, capsys):
    out_dir = tmp_path / "search"
    out_dir.mkdir()
    lock_path = out_dir / LOCK_NAME
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0.0,
                                     "command": "search.py"}))
    before = snapshot(out_dir)
    capsys.readouterr()
    rc = search_main(["--checkpoint", str(finished / "supernet.pt"), "--out", str(out_dir)])
    assert rc == 2
    assert_refusal(capsys.readouterr().err, "host elsewhere", f"delete {lock_path}")
    assert snapshot(out_dir) == before


# ------------------------------------------------------------------ 8. a fresh run over a finished one
def test_fresh_run_over_a_finished_run_is_refused_then_overwrite_replaces_it(tmp_path, finished, capsys):
    run_dir = copy_run(finished, tmp_path)
    before = snapshot(run_dir)
    args = overrides(tmp_path / "runs", "run")
    rc, out, err = train_in_process(capsys, args)
    assert rc == 2
    assert_refusal(err, str(run_dir), "--resume", "--overwrite")
    assert snapshot(run_dir) == before  # every file unchanged, nothing added

    (run_dir / "metrics.jsonl").write_text('{"epoch": 99, "step": 999}\n')  # marks the old run
    rc, out, err = train_in_process(capsys, args + ["--overwrite"])
    assert rc == 0, err
    assert "note: --overwrite" in out
    assert metric_epochs(run_dir) == [1, 2]  # the old run's lines are gone
    assert_finished(run_dir)
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt-step")) == \
        [ckpt_name(4), ckpt_name(6), ckpt_name(8)]
    log = (run_dir / "train.log").read_text()
    assert log.count("\n# ") + log.startswith("# ") == 1  # one job's log, not the earlier one's
    assert len(os.listdir(run_dir / "tb")) == 1  # the earlier run's events were removed


# ------------------------------------------------------------------ 9. search.py --out checks
def test_search_out_is_an_existing_file(tmp_path, finished, capsys, monkeypatch):
    import mpq.checkpoint as ckpt_mod

    def must_not_load(*a, **k):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(ckpt_mod, "load_supernet", must_not_load)
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    capsys.readouterr()
    rc = search_main(["--checkpoint", str(finished / "supernet.pt"), "--out", str(target)])
    assert rc == 2
    assert_refusal(capsys.readouterr().err, str(target), "not a folder")
    assert target.read_text() == "keep me\n"
    written = [os.path.join(r, f) for base in (tmp_path, finished) for r, _, fs in os.walk(base)
               for f in fs if f in ("search.log", "config.json", "pareto.csv")]
    assert written == []


def test_search_out_under_a_file_is_one_error_line(tmp_path, finished, capsys, monkeypatch):
    import mpq.checkpoint as ckpt_mod
    monkeypatch.setattr(ckpt_mod, "load_supernet",
                        lambda *a, **k: pytest.fail("checkpoint loaded before --out was checked"))
    parent = tmp_path / "afile"
    parent.write_text("x")
    out_dir = parent / "search"
    capsys.readouterr()
    rc = search_main(["--checkpoint", str(finished / "supernet.pt"), "--out", str(out_dir)])
    assert rc == 2
    assert_refusal(capsys.readouterr().err, str(out_dir), "cannot write")
    assert parent.read_text() == "x"
