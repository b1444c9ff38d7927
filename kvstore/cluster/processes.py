"""The processes of a local cluster: free ports for them, and whether one is alive, ours, stopped.

Linux only (/proc): a zombie whose threads still hold its ports is not yet gone."""

from __future__ import annotations

import contextlib
import os
import socket
import time


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free right now (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone, but only once every thread
    # has exited: a killed node's leader thread turns zombie first, and its sockets (its ports)
    # stay open until the last of its threads is gone.
    if state(f"/proc/{pid}/stat") not in ("Z", "X", ""):
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(state(f"/proc/{pid}/task/{task}/stat") not in ("Z", "X", "") for task in tasks)


def state(stat_path: str) -> str:
    """A process's or thread's state letter from its /proc stat file ("" if it is gone)."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def is_kvstore_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kvstore" in f.read()
    except OSError:
        return False


def is_stopped(pid: int) -> bool:
    return state(f"/proc/{pid}/stat") == "T"


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        time.sleep(0.02)
