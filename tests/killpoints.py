"""Kill a process with SIGKILL just before its N-th filesystem change, for fault-injection tests.

A change is a call of os.rename / replace / link / unlink / rmdir / mkdir / write / fsync, shutil.rmtree, an
open() for writing, or lorakit's atomic exchange of two folders (counted before and after it). SIGKILL runs
no handler and flushes nothing, like a power cut of the process: what is on disk is what had been written.

`killed(n, work)` forks, arms the child to die at its n-th change and runs `work()` there; `changes(work)`
runs it to the end and lists every change as (operation, path). Fork from a fresh interpreter that has not
run torch's thread pool yet (a driver started by the test), never from the pytest process.
"""

import builtins
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback

_state = {"count": 0, "target": None, "log": None}


def _change(op: str, path: object = "") -> None:
    _state["count"] += 1
    if _state["log"] is not None:
        _state["log"].append([op, os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""])
    if _state["count"] == _state["target"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, name: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        _change(name, args[1] if name in ("rename", "replace", "link") and len(args) > 1 else args[0] if args else "")
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def arm(target: int | None, log: bool = False) -> None:
    _state.update(target=target, log=[] if log else None)
    for name in ("rename", "replace", "link", "unlink", "rmdir", "mkdir", "write", "fsync"):
        _wrap(os, name)
    _wrap(shutil, "rmtree")
    plain_open = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _change("open", file)
        return plain_open(file, mode, *args, **kwargs)

    builtins.open = io.open = opening
    from lorakit import atomic

    exchange = atomic._exchange

    def exchanging(a, b):
        _change("exchange", b)
        done = exchange(a, b)
        _change("exchanged", b)
        return done

    atomic._exchange = exchanging


def _fork(target: int | None, work, log_path: str | None = None) -> int:
    """Run work() in a forked child armed at `target`; its exit code, or -9 when SIGKILL ended it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            arm(target, log=log_path is not None)
            result = work()
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        if log_path is not None:
            with io.FileIO(log_path, "w") as f:
                f.write(json.dumps(_state["log"]).encode())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def killed(target: int, work) -> int:
    return _fork(target, work)


def run(work) -> int:
    """work() in a forked child, not armed: its exit code."""
    return _fork(None, work)


def changes(work) -> tuple[int, list[tuple[str, str]]]:
    """(exit code, every change work() made in a forked child, in order)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        code = _fork(None, work, path)
        with io.FileIO(path, "r") as f:
            return code, [tuple(x) for x in json.loads(f.read().decode())]
    finally:
        os.unlink(path)
