"""Child processes that must not outlive the process that started them, however it ends.

An engine such as vLLM runs its model in processes of its own (vLLM: `EngineCore`, which starts
a `Worker`). Stopped cleanly (the engine's `close`, at exit, on Ctrl-C) they shut down with it.
Killed (SIGKILL, the OOM killer, a SIGTERM that Python does not turn into an exit), the parent
runs no code, and those processes would live on holding their memory: vLLM's `Worker` watches
its `EngineCore`, but nothing watches the parent.

`guard(pids)` starts a small watchdog process that holds the read end of a pipe whose write end
only this process has. When this process ends, however it ends, the kernel closes that write
end; the watchdog reads end-of-file and stops the guarded processes: SIGTERM, then SIGKILL after
a grace period. `release(pids)` drops them once they were shut down cleanly. The watchdog is a
plain `python -c` child (no fork of a threaded process, no import of this project), and it
exits once it has nothing left to guard and its parent is gone.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

_WATCHDOG = r"""
import os, signal, sys, time
pids, grace = set(), float(sys.argv[1])
for line in sys.stdin:                       # EOF: the parent is gone
    op, _, rest = line.strip().partition(" ")
    ids = {int(x) for x in rest.split()}
    pids = pids | ids if op == "add" else pids - ids
def alive(p):
    try:
        os.kill(p, 0)
        return True
    except OSError:
        return False
for sig in (signal.SIGTERM, signal.SIGKILL):
    for p in list(pids):
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
"""

_LOCK = threading.Lock()
_PROC: subprocess.Popen | None = None


def _watchdog() -> subprocess.Popen:
    global _PROC
    if _PROC is None or _PROC.poll() is not None:
        # start_new_session: a Ctrl-C to the terminal's process group does not stop the watchdog
        # before it has done its work (the guarded processes get the Ctrl-C themselves).
        _PROC = subprocess.Popen([sys.executable, "-c", _WATCHDOG, "5"], stdin=subprocess.PIPE,
                                 text=True, start_new_session=True, close_fds=True)
        os.set_inheritable(_PROC.stdin.fileno(), False)
    return _PROC


def _send(op: str, pids) -> None:
    """Tell the watchdog (started on first use); an empty list only starts it."""
    pids = [int(p) for p in pids]
    with _LOCK:
        proc = _watchdog()
        if pids:
            proc.stdin.write(f"{op} {' '.join(map(str, pids))}\n")
            proc.stdin.flush()


def guard(pids) -> None:
    """Stop these processes when this process ends, however it ends."""
    _send("add", pids)


def release(pids) -> None:
    """No longer guard these processes (they were shut down cleanly)."""
    _send("del", pids)


@contextlib.contextmanager
def new_children(every: float = 0.1):
    """Guard every process this process comes to have while the block runs (an engine starting
    its processes), from the moment it is seen: a kill during a minute-long start leaves none.
    Yields the set of them, complete once the block has ended."""
    _send("add", [])                                  # the watchdog runs before any child
    before = children() | {watchdog_pid()}
    found: set[int] = set()
    done = threading.Event()

    def take():
        new = children() - before - found
        if new:
            guard(new)
            found.update(new)

    def watch():
        while not done.wait(every):
            take()

    t = threading.Thread(target=watch, name="guard-new-children", daemon=True)
    t.start()
    try:
        yield found
    finally:
        done.set()
        t.join()
        take()


def stop(pids, grace: float = 5.0) -> None:
    """Stop these processes now: SIGTERM, then SIGKILL after `grace` seconds; reap our own
    children so none is left a zombie (e.g. an engine whose start failed half-way)."""
    pids = {int(p) for p in pids}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while pids and time.time() < deadline:
            pids = {p for p in pids if _alive(p)}
            time.sleep(0.05)
    release(pids)


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:       # our child, now reaped
            return False
    except ChildProcessError:                           # not our child
        pass
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def children() -> set[int]:
    """This process's descendants now (psutil: vLLM depends on it), less multiprocessing's
    resource tracker: it ignores SIGTERM by design, ends by itself with its owner, and is shared
    by everything in the process that uses multiprocessing."""
    import psutil

    out = set()
    for c in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if any("resource_tracker" in part for part in c.cmdline()):
                continue
        except psutil.Error:          # gone already, or not ours to read
            pass
        out.add(c.pid)
    return out


def watchdog_pid() -> int | None:
    return _PROC.pid if _PROC is not None and _PROC.poll() is None else None


class StderrTail:
    """Tee this process's standard error (fd 2, which child processes inherit) through a pipe
    while the block runs, keeping its last lines: a child's error is then readable here (vLLM's
    engine process logs why it failed to start on its stderr, and tells its parent only "see
    root cause above"). Children started inside the block keep writing through the pipe, and
    the forwarding thread keeps copying to the real stderr until the last of them is gone."""

    def __init__(self, keep: int = 200):
        self.lines: collections.deque = collections.deque(maxlen=keep)

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._copy, args=(read, self._saved), daemon=True,
                                        name="stderr-tail")
        self._thread.start()
        return self

    def _copy(self, read: int, out: int):
        buf = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                try:
                    os.write(out, chunk)
                except OSError:
                    pass
                buf += chunk
                *done, buf = buf.split(b"\n")
                self.lines.extend(x.decode(errors="replace") for x in done)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)          # this process writes to the real stderr again

    def root_cause(self) -> str | None:
        """The last exception line ("SomethingError: ...") seen, if any."""
        for line in reversed(self.lines):
            m = re.search(r"\b([A-Z]\w*(?:Error|Exception)): (.+)$", line)
            if m and "initialization failed" not in m.group(2):
                return f"{m.group(1)}: {m.group(2).strip()}"
        return None
