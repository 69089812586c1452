"""Loopback addresses for tests that start a server on a port of their choosing, or need one
where calls fail."""

from __future__ import annotations

import contextlib
import socket

import grpc


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


#: Peers a call can fail on, with the status each call there ends with.
FAILING_PEERS = {"refuses": grpc.StatusCode.UNAVAILABLE, "never answers": grpc.StatusCode.DEADLINE_EXCEEDED}


@contextlib.contextmanager
def failing_peer(kind: str):
    """A loopback address where calls fail as FAILING_PEERS[kind] says: nothing listens there
    ("refuses"), or a socket listens and never accepts, so no HTTP/2 handshake ever completes
    ("never answers": the call waits for its deadline)."""
    if kind == "refuses":
        yield f"127.0.0.1:{free_port()}"
        return
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
