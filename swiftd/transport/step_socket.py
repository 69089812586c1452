"""The per-step messages of a residual stream whose ring both workers mapped, over a Unix socket.

Python gRPC takes 0.35 ms to deliver a small stream message from the UNet worker to the
ControlNet worker and 0.15 ms back on idle cores, and about 0.85 and 0.6 ms while the UNet
worker's core runs its encoder half (a sender thread has to get the core and the GIL). Two such
messages per step are most of what a shared-memory ring leaves of the transport. On one host the
same messages (StepInput one way, ResidualsResponse the other, unchanged protobuf) go instead over
a Unix stream socket beside the ring, length-prefixed and sent by the thread that has them:
tens of microseconds each way.

The gRPC stream stays the session's control plane: it opens the session, negotiates the ring,
carries errors and the deadline, and its end closes the socket. A socket gives the rest for free:
a worker that dies closes its end, so the peer's read ends at once (EOF), and the kernel orders
the ring's writes before the message that announces them.

The listening socket lives beside the ring in SHM_DIR, under the ring's prefix (so a worker killed
before its peer connected leaves it to `shm.remove_abandoned` like a ring); the reader removes its
name as soon as it has connected.
"""

from __future__ import annotations

import os
import select
import socket
import struct

from swiftd.transport import SHM_DIR
from swiftd.transport.shm import check_name, fresh_name

_LENGTH = struct.Struct("<I")
MAX_MESSAGE_BYTES = 256 << 20  # a step input is a latent (an SDXL 1024² CFG batch: 0.5 MB); more is garbage
# Longest a send, or the rest of a message begun, may take: a peer that stalls that long is taken
# as gone. One fixed timeout on the socket: the two directions run on different threads, and a
# socket has one timeout (a receive's wait for a message is a select, not the socket's timeout).
IO_TIMEOUT_S = 30.0


class StepSocket:
    """One end of a connected session socket: whole protobuf messages in and out."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(IO_TIMEOUT_S)
        self._sock = sock

    @classmethod
    def connect(cls, name: str, timeout: float = 5.0) -> StepSocket:
        """The reader's end; OSError or ValueError when it cannot connect (another host, bad name)."""
        check_name(name, "step socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(SHM_DIR / name))
        except BaseException:
            sock.close()
            raise
        (SHM_DIR / name).unlink(missing_ok=True)  # connected: the name is not needed any more
        return cls(sock)

    def send(self, message) -> None:
        """OSError (TimeoutError included) when the peer is gone or stalled IO_TIMEOUT_S."""
        payload = message.SerializeToString()
        self._sock.sendall(_LENGTH.pack(len(payload)) + payload)

    def receive(self, message_type, timeout: float | None):
        """The next message, or None when the peer closed its end (it ended the session or died).
        TimeoutError when none began within `timeout` seconds (None: wait for one).

        The timeout is for a message to begin only: once it has, the rest is read to the end (the
        peer sends each message whole), so a timeout never drops part of one and leaves the
        stream out of step. A peer that stalls mid-message for IO_TIMEOUT_S is taken as gone."""
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            raise TimeoutError(f"no step message within {timeout} s")
        try:
            header = self._exactly(_LENGTH.size)
            if header is None:
                return None
            (length,) = _LENGTH.unpack(header)
            if length > MAX_MESSAGE_BYTES:
                raise ValueError(f"step socket message of {length} bytes")
            payload = self._exactly(length) if length else b""
        except TimeoutError:
            return None
        if payload is None:
            return None
        return message_type.FromString(payload)

    def _exactly(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            try:
                chunk = self._sock.recv(left)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def shutdown(self) -> None:
        """End both directions: the peer reads EOF, and a read blocked in another thread returns."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more
            pass

    def close(self) -> None:
        self.shutdown()
        self._sock.close()


class StepListener:
    """The writer's side until its peer connects: a listening socket under a fresh name."""

    def __init__(self):
        self.name = fresh_name(".sock")
        self._path = SHM_DIR / self.name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self._path))  # OSError: path too long, no such folder, read-only
            os.chmod(self._path, 0o600)
            self._sock.listen(1)
        except BaseException:
            self.close()
            raise

    def accept(self, timeout: float) -> StepSocket:
        """The peer's connection (made before it answered the ring offer); TimeoutError if none."""
        self._sock.settimeout(timeout)
        conn, _ = self._sock.accept()
        return StepSocket(conn)

    def close(self) -> None:
        self._sock.close()
        self._path.unlink(missing_ok=True)
