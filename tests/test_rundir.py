"""Run-folder lock, writability check and log (mpq.rundir)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from mpq.errors import UserError
from mpq.rundir import LOCK_NAME, RunFolder, RunLock, check_writable_dir


def _plant(folder, host, pid):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_NAME), "w") as f:
        json.dump({"host": host, "pid": pid, "command": "train.py"}, f)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_held_lock_is_refused_with_folder_host_and_pid(tmp_path):
    run = str(tmp_path / "x")
    first = RunLock(run, "train.py")
    os.makedirs(run)
    first.acquire()
    with pytest.raises(UserError) as e:
        RunLock(run, "search.py").acquire()
    msg = str(e.value)
    assert run in msg and socket.gethostname() in msg and str(os.getpid()) in msg and "in use" in msg
    first.release()
    assert not os.path.exists(os.path.join(run, LOCK_NAME))
    RunLock(run, "search.py").acquire().release()   # free again


def test_a_dead_process_lock_is_taken_over_and_another_host_lock_is_held(tmp_path):
    run = str(tmp_path / "x")
    dead = _dead_pid()
    _plant(run, socket.gethostname(), dead)
    lock = RunLock(run, "train.py").acquire()
    assert lock.warning and str(dead) in lock.warning and "taking the lock over" in lock.warning
    with open(os.path.join(run, LOCK_NAME)) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()
    _plant(run, "elsewhere.example", 1)
    with pytest.raises(UserError, match=r"host elsewhere.example, pid 1\); if no job runs there any more, delete"):
        RunLock(run, "train.py").acquire()
    assert os.path.exists(os.path.join(run, LOCK_NAME))   # not removed


def test_output_paths_are_checked_before_work(tmp_path):
    afile = tmp_path / "f.txt"
    afile.write_text("keep")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_writable_dir(str(afile), "--out")
    with pytest.raises(UserError, match="cannot write the folder"):
        check_writable_dir(str(afile / "sub"), "--out")
    assert afile.read_text() == "keep"
    check_writable_dir(str(tmp_path / "new" / "deeper"), "--out")
    assert os.listdir(tmp_path / "new" / "deeper") == []


def test_the_log_is_written_only_once_kept_and_a_refused_job_leaves_no_folder(tmp_path, capsys):
    run = str(tmp_path / "x")
    folder = RunFolder(run, "train.py", log_name="train.log").open()
    folder.start_log()
    print("before the inputs were checked")
    folder.close(UserError("bad value"))
    assert not os.path.exists(run)   # created by open(), removed again: nothing of the job is left
    folder = RunFolder(run, "train.py", log_name="train.log").open()
    folder.start_log()
    print("line one")
    folder.keep_log()
    print("line two")
    sys.stderr.write("progress 10%\r")
    sys.stderr.write("warning: something\n")
    folder.close(UserError("stopped"))
    text = open(os.path.join(run, "train.log")).read()
    assert "line one\n" in text and "line two\n" in text and "warning: something\n" in text
    assert "progress" not in text and text.rstrip().endswith("error: stopped")
    assert not os.path.exists(os.path.join(run, LOCK_NAME))
    assert "line two" in capsys.readouterr().out   # still printed
