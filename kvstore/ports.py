"""Can this node listen where its config says? Checked at start, before anything binds.

A node listens on three addresses: `listen` (gRPC), `health_listen` (the probe port) and
`raft_bind` (pysyncobj). Left to themselves, grpc fails a taken port deep inside its server with a
traceback, and pysyncobj retries a taken Raft port forever while the node looks alive (`follower
term=0`, nothing in its log). So the node binds each address once itself, with SO_REUSEADDR as
both servers set it (a port held only by TIME_WAIT connections of a previous run is free; one a
process listens on is not), and stops with one line naming the setting and the address.

A check-then-bind leaves a window in which another process can take the port; the servers' own
bind failures are therefore turned into the same `ListenError` where they happen
(kvstore/server/node.py for gRPC, kvstore/replication/state_machine.py for pysyncobj).
"""

from __future__ import annotations

import errno
import socket
import time


class ListenError(RuntimeError):
    """A node cannot listen on an address of its config (taken, not local, not permitted)."""

    def __init__(self, setting: str, address: str, reason: str) -> None:
        self.setting, self.address, self.reason = setting, address, reason
        super().__init__(f"cannot listen on {address} (setting {setting!r}): {reason}")


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); an empty host means every interface."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def check_can_listen(setting: str, address: str, patience: float = 0.0) -> None:
    """Raise `ListenError` unless a TCP server could bind `address` (see module doc), trying for up
    to `patience` seconds: the previous instance of a node restarted at once may still be exiting
    (a killed multi-threaded process closes its sockets only when its last thread is gone)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return _check_once(setting, address)
        except ListenError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


def _check_once(setting: str, address: str) -> None:
    host, port = split_address(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ListenError(setting, address, f"cannot resolve {host!r} ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise ListenError(setting, address, describe(exc, port)) from None


def describe(exc: OSError, port: int) -> str:
    """Why a bind failed, and for a taken port how to see who holds it."""
    if exc.errno == errno.EADDRINUSE:
        return f"the port is in use by another process (see it with: ss -ltnp 'sport = :{port}')"
    return exc.strerror or str(exc)
