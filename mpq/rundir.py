"""Run folders: one job per folder (a lock), checked for writability before any work, and a plain-text
log of what the job printed.

``train.py`` and ``search.py`` both hold their output folder for the whole job::

    with RunFolder(path, "train.py", log_name="train.log") as run:
        ...            # everything printed (not progress bars) is also appended to train.log

The lock is a file ``.mpq.lock`` holding ``{"host", "pid", "started", "command"}``, created
atomically (``os.link`` of a private temporary file, which fails if the lock exists, also on NFS). A
lock whose process is gone (same host, pid not alive) is taken over with a one-line warning; a lock
from another host always counts as held, because its process cannot be checked from here.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, TextIO

from .errors import UserError

LOCK_NAME = ".mpq.lock"


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block SIGTERM raises ``SystemExit(143)``, so ``finally`` blocks run and the run
    folder's lock is released (the trainer installs its own checkpoint-then-stop handler while it
    trains)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check_writable_dir(path: str, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written there; ``UserError`` otherwise.

    Called before any data is loaded, so a bad output path fails within seconds."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what}: {path!r} exists and is not a folder; give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write the folder {path!r} ({e.strerror or type(e).__name__})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or damaged: treated as held by an unknown owner


class RunLock:
    """An exclusive lock on a folder; see the module docstring. ``acquire`` raises ``UserError``
    naming the folder, host and pid that hold it."""

    def __init__(self, folder: str, command: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.command = command
        self.held = False
        self.warning: Optional[str] = None  # set when a stale lock was taken over

    def _create(self) -> bool:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "command": self.command}
        tmp = os.path.join(self.folder, f".mpq.lock.{socket.gethostname()}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
            return True
        finally:
            os.unlink(tmp)

    def acquire(self) -> "RunLock":
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            owner = _read_lock(self.path)
            if owner is None:
                continue  # released meanwhile
            host, pid = owner.get("host", "?"), owner.get("pid", "?")
            here = host == socket.gethostname()
            if here and isinstance(pid, int) and not _pid_alive(pid):
                if _read_lock(self.path) == owner:  # still the same stale lock
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                self.warning = (f"warning: {self.folder} was locked by process {pid} on {host}, which "
                                f"is gone; taking the lock over")
                continue
            how = ("it is still running" if here else
                   f"if no job runs there any more, delete {self.path}")
            raise UserError(f"{self.folder} is in use by {owner.get('command', 'another job')} "
                            f"(host {host}, pid {pid}); {how}")
        raise UserError(f"{self.folder}: could not take the lock {self.path} (contended)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = _read_lock(self.path)
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and appends complete lines to ``log``; of a line redrawn with
    carriage returns (a progress bar) only the part after the last one is logged."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log, self._buf = stream, log, ""

    def write(self, s: str) -> int:
        n = self.stream.write(s)
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if "\r" in line:  # a redrawn progress bar: keep only what is left visible, if anything
                line = line.rsplit("\r", 1)[-1]
                if not line.strip():
                    continue
            if "\x1b" not in line:
                self.log.write(line + "\n")
        if lines:
            self.log.flush()
        if "\r" in self._buf:  # a bar being redrawn: only its latest state matters
            self._buf = self._buf.rsplit("\r", 1)[-1]
        if len(self._buf) > 65536:
            self._buf = ""
        return n if n is not None else len(s)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ... of the real stream
        return getattr(self.stream, name)


class RunFolder:
    """Holds a run folder for one job: writability check, lock, and a log of what was printed.

    ``enabled=False`` (the non-zero ranks under torchrun) makes every method a no-op, so a job takes
    one lock. Exiting the context releases the lock, also on errors and signals that unwind the
    stack; an error is written to the log as ``error: ...`` before the lock goes."""

    def __init__(self, folder: str, command: str, log_name: Optional[str] = None, what: str = "output",
                 enabled: bool = True) -> None:
        self.folder, self.command, self.log_name, self.what = folder, command, log_name, what
        self.enabled = enabled
        self.lock = RunLock(folder, command)
        self._log: Optional[TextIO] = None   # StringIO until keep_log(), then the file
        self._saved: List[TextIO] = []

    def open(self) -> "RunFolder":
        if not self.enabled:
            return self
        self._created = not os.path.isdir(self.folder)
        check_writable_dir(self.folder, self.what)
        try:
            self.lock.acquire()
        except UserError:
            self._remove_if_created()
            raise
        if self.lock.warning:
            print(self.lock.warning, file=sys.stderr, flush=True)
        return self

    def start_log(self) -> None:
        """Tee what is printed from now on. It is held in memory until :meth:`keep_log`, so a job
        that stops on a user error before writing its outputs leaves nothing in the folder."""
        if not self.enabled or self.log_name is None or self._log is not None:
            return
        self._log = io.StringIO()
        self._log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {self.command} "
                        f"(host {socket.gethostname()}, pid {os.getpid()})\n")
        self._saved = [sys.stdout, sys.stderr]
        sys.stdout = _Tee(sys.stdout, self._log)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self._log)  # type: ignore[assignment]

    def keep_log(self) -> None:
        """From now on the log goes to ``<folder>/<log_name>`` (appended: a resumed run keeps the
        earlier part), starting with what was printed so far."""
        if not isinstance(self._log, io.StringIO):
            return
        held = self._log.getvalue()
        f = open(os.path.join(self.folder, self.log_name), "a", encoding="utf-8")
        f.write(held)
        f.flush()
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.log is self._log:
                tee.log = f
        self._log = f

    def _remove_if_created(self) -> None:
        if getattr(self, "_created", False):
            try:
                os.rmdir(self.folder)  # only if empty
            except OSError:
                pass

    def close(self, error: Optional[BaseException] = None) -> None:
        if self._log is not None:
            if isinstance(error, UserError):
                self._log.write(f"error: {' '.join(str(error).split())}\n")
            elif error is not None and not isinstance(error, (SystemExit, KeyboardInterrupt)):
                self._log.write(f"error: {type(error).__name__}: {error}\n")
            for saved, name in zip(self._saved, ("stdout", "stderr")):
                if isinstance(getattr(sys, name), _Tee):
                    setattr(sys, name, saved)
            kept = not isinstance(self._log, io.StringIO)
            self._log.close()
            self._log = None
            if not kept:
                self.lock.release()
                self._remove_if_created()
                return
        self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)
