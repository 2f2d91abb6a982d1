"""The engine process's end of the Unix socket: binding it, admitting its one client.

:class:`EngineSocketServer` binds the path it is given (in the API process's private 0700
directory; the socket itself 0600) and accepts connections until one sends a
:class:`~server.engine_protocol.Hello` carrying the token that came through an inherited
pipe (never argv); then it stops listening and removes the path: one client only. A
connection that sends anything else (a pickle, a wrong token, a peer of another user or
process) is closed unread. What follows the handshake is :mod:`server.engine_loop`'s.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import struct
import time
from pathlib import Path

from server.engine_protocol import FrameDecoder, Hello, ProtocolError, decode_to_engine

logger = logging.getLogger(__name__)

_HANDSHAKE_S = 10.0  # for one connection's Hello
_MAX_HELLO_BYTES = 1 << 20


class EngineSocketServer:
    """The listening socket; :meth:`accept` returns the one authenticated connection.

    Args:
        path: where to bind (its directory should be private to the user).
        token: what the client's :class:`Hello` must carry.
        peer_pid: when set, only this process may connect (the API process); peers of
            another user are always refused.
    """

    def __init__(self, path: Path, token: str, peer_pid: int | None = None) -> None:
        self.path = path
        self._token = token.encode()
        self._peer_pid = peer_pid
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600
        try:
            self._listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listener.listen(1)

    def accept(self, timeout: float) -> tuple[socket.socket, Hello, FrameDecoder]:
        """The first connection that authenticates; stops listening either way.

        Returns the connection (blocking), its Hello, and the decoder holding whatever
        followed the Hello.

        Raises:
            TimeoutError: no client authenticated within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no client authenticated on the engine socket")
                self._listener.settimeout(remaining)
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                accepted = self._authenticate(conn)
                if accepted is not None:
                    return conn, *accepted
        finally:
            self.close()

    def close(self) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _authenticate(self, conn: socket.socket) -> tuple[Hello, FrameDecoder] | None:
        try:
            self._check_peer(conn)
            conn.settimeout(_HANDSHAKE_S)
            decoder = FrameDecoder(max_bytes=_MAX_HELLO_BYTES)
            payloads: list[bytes] = []
            while not payloads:
                data = conn.recv(65536)
                if not data:
                    raise ProtocolError("closed before the handshake")
                payloads = decoder.feed(data)  # refuses a bad stream on its first byte
            hello = decode_to_engine(payloads[0])
            if not isinstance(hello, Hello) or not hmac.compare_digest(
                hello.token.encode(), self._token
            ):
                raise ProtocolError("no valid token")
            if len(payloads) > 1:
                raise ProtocolError("messages before Ready")
            decoder.max_bytes = FrameDecoder().max_bytes
            conn.settimeout(None)
            return hello, decoder
        except (ProtocolError, OSError) as e:
            logger.warning("refused a connection to the engine socket: %s", e)
            conn.close()
            return None

    def _check_peer(self, conn: socket.socket) -> None:
        if not hasattr(socket, "SO_PEERCRED"):  # not Linux: the directory's mode guards
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            raise ProtocolError(f"peer uid {uid} is not ours")
        if self._peer_pid is not None and pid != self._peer_pid:
            raise ProtocolError(f"peer pid {pid} is not the API process's")
