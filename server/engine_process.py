"""The API process's handle on the engine process: starting it, and ending it.

:meth:`EngineProcess.spawn` starts ``python -m server.engine_core`` (a fresh interpreter,
never a fork), in a private directory made for its socket, with the token's pipe in its
environment; it connects, authenticates (the token goes through that inherited pipe, never
argv) and waits for :class:`~server.engine_protocol.Ready` (a startup error in the engine
process ends here as a ``ValueError`` with its message). From then on the connection is
read by :class:`server.engine_client.ProcessBridge`; :meth:`EngineProcess.close` ends the
process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.engine_core import ENV_SOCKET, ENV_TOKEN_FD
from server.engine_protocol import (
    EngineInfo,
    EngineSpec,
    FrameDecoder,
    Hello,
    ProtocolError,
    Ready,
    StartupFailed,
    decode_to_api,
    frame,
)

logger = logging.getLogger(__name__)

_CONNECT_S = 120.0  # for the engine process to start listening (imports torch first)
_CLOSE_S = 10.0  # for the engine process to exit once its socket is closed


class EngineProcess:
    """A started, authenticated and ready engine process, and its connection.

    Use :meth:`spawn`; :meth:`close` ends the process (closing the socket ends it; past
    ``_CLOSE_S`` it is killed) and removes the private directory.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        directory: Path,
        info: EngineInfo,
    ) -> None:
        self.proc = proc
        self.sock = sock
        self.directory = directory
        self.info = info

    @classmethod
    def spawn(cls, spec: EngineSpec, startup_timeout_s: float = 1800.0) -> EngineProcess:
        """Start the engine process and wait until its engine is built.

        Raises:
            ValueError: the engine process could not build the engine (its message), or it
                exited or timed out while starting.
        """
        directory = Path(tempfile.mkdtemp(prefix="loraserve-engine-"))  # 0700
        path = directory / "engine.sock"
        token = secrets.token_urlsafe(32)
        token_r, token_w = os.pipe()
        env = dict(os.environ)
        env[ENV_SOCKET] = str(path)
        env[ENV_TOKEN_FD] = str(token_r)
        root = str(Path(__file__).resolve().parents[1])  # this checkout, importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "server.engine_core"],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(token_r,),
            )
        except BaseException:
            os.close(token_w)
            raise
        finally:
            os.close(token_r)
        with os.fdopen(token_w, "w") as pipe:  # a token fits the pipe's buffer
            pipe.write(token)
        deadline = time.monotonic() + startup_timeout_s
        try:
            sock = _connect(path, proc, min(deadline, time.monotonic() + _CONNECT_S))
            try:
                sock.sendall(frame(Hello(token, spec)))
                info = _await_ready(sock, proc, deadline)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            _end(proc, 5.0)  # it exits by itself after a startup error
            shutil.rmtree(directory, ignore_errors=True)
            raise
        logger.info("engine process %d is ready", proc.pid)
        return cls(proc, sock, directory, info)

    def close(self, timeout: float = _CLOSE_S) -> int | None:
        """Close the connection, wait for the process (kill it past ``timeout``); returns
        its exit code."""
        with contextlib.suppress(OSError):
            self.sock.close()
        code = _end(self.proc, timeout)
        shutil.rmtree(self.directory, ignore_errors=True)
        return code


def _end(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("engine process %d did not exit; killing it", proc.pid)
        proc.kill()
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            return None


def _connect(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    while True:
        code = proc.poll()
        if code is not None:
            raise ValueError(f"the engine process exited with code {code} while starting")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if time.monotonic() > deadline:
            raise ValueError("the engine process did not start listening in time")
        time.sleep(0.05)


def _await_ready(sock: socket.socket, proc: subprocess.Popen[bytes], deadline: float) -> EngineInfo:
    decoder = FrameDecoder()
    sock.settimeout(0.5)
    while True:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            if proc.poll() is not None:
                raise ValueError(
                    f"the engine process exited with code {proc.returncode} while starting"
                ) from None
            if time.monotonic() > deadline:
                raise ValueError("the engine process did not become ready in time") from None
            continue
        if not data:
            code = _end(proc, 5.0)
            raise ValueError(f"the engine process exited with code {code} while starting")
        for payload in decoder.feed(data):
            message = decode_to_api(payload)
            if isinstance(message, StartupFailed):
                raise ValueError(message.message)
            if not isinstance(message, Ready):
                raise ProtocolError(f"unexpected {type(message).__name__} before Ready")
            sock.settimeout(None)
            return message.info
