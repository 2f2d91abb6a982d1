"""The engine process: ``python -m server.engine_core``, started by ``loraserve serve``.

It owns the :class:`~engine.LLMEngine` (scheduler, runner, pool, adapters) and does nothing
but step it and answer the API process's commands over one Unix socket
(:mod:`server.engine_protocol`):

1. :class:`EngineSocketServer` binds the socket path it is given (in the API process's
   private 0700 directory; the socket itself 0600), accepts connections from the API
   process until one sends a :class:`Hello` carrying the token that came through an
   inherited pipe (never argv), then stops listening and removes the path: one client only.
   A connection that sends anything else (a pickle, a wrong token) is closed unread.
2. It builds the engine the :class:`EngineSpec` describes (the serve command's engine
   flags) and loads the startup adapters, then sends :class:`Ready`, or
   :class:`StartupFailed` with the error's message.
3. :class:`EngineCore` loops: drain every pending message without blocking, step, send
   the step's outputs in one frame; block on the socket when there is no work. Slow calls
   (loads, merges, exports) run in worker threads and their replies go out between steps;
   compositions run in their own threads and score through this same loop.

The process ignores SIGINT and SIGTERM (the API process drains, then closes the socket);
it exits when the socket closes, and with 1 when the engine cannot step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import hmac
import itertools
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapters.errors import AdapterError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.parallel.executor import WorkerDied
from engine.plan import served_plan
from engine.scoring import SCORING_PARAMS
from server.adapter_ops import (
    ComposeJobs,
    adapter_infos,
    export_adapter,
    load_adapter,
    merge_adapter,
)
from server.engine_protocol import (
    Abort,
    AddRequests,
    CheckIntegrity,
    Compose,
    ComposeStatus,
    EngineInfo,
    EngineSpec,
    Export,
    FrameDecoder,
    GetStats,
    Heartbeat,
    Hello,
    ListAdapters,
    ListCompositions,
    LoadLora,
    Merge,
    NewRequest,
    ProtocolError,
    Ready,
    RegisterMixture,
    RemoteError,
    Reply,
    StartupFailed,
    StepFailed,
    StepOutputs,
    ToEngine,
    UnloadLora,
    decode_to_engine,
    encode_value,
    frame,
)
from server.errors import APIError
from server.request_group import final_output

logger = logging.getLogger("server.engine_core")

ENV_SOCKET = "LORASERVE_ENGINE_SOCKET"  # the path to bind
ENV_TOKEN_FD = "LORASERVE_ENGINE_TOKEN_FD"  # an inherited pipe holding the token

HEARTBEAT_S = 1.0  # the longest silence while the loop runs
_ACCEPT_S = 60.0  # for the API process to connect and authenticate
_HANDSHAKE_S = 10.0  # for one connection's Hello
_MAX_HELLO_BYTES = 1 << 20
_STALL_WAIT_S = 0.002  # after a step that ran nothing, before trying again
_MAX_STEP_FAILURES = 3  # consecutive unhandled step failures before the process exits
_SCORING_TIMEOUT_S = 600.0  # one composition batch, at most
_RECV_BYTES = 1 << 20


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


def remote_error(error: BaseException) -> RemoteError:
    """A call's exception as a reply field (``internal`` ones are logged here)."""
    if isinstance(error, APIError):
        return RemoteError(
            "api", error.message, error.code, error.status, error.param, dict(error.headers)
        )
    if isinstance(error, AdapterError):
        return RemoteError("adapter", error.message, error.code)
    if isinstance(error, ValueError):
        return RemoteError("value", str(error))
    logger.error("engine call failed", exc_info=error)
    return RemoteError("internal", f"{type(error).__name__}: {error}")


class _Disconnected(Exception):
    """The API process has gone."""


class _Scoring:
    """One batch of a composition's scoring requests, waited for by its thread."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.finals: dict[str, RequestOutput] = {}
        self.done = threading.Event()


class EngineCore:
    """Steps the engine and serves the connection until the API process goes.

    Threads: the loop (:meth:`run`) alone reads and writes the socket and steps the
    engine; worker threads hand their replies over through ``_outbox`` and wake the loop;
    composition threads add requests to the engine (thread-safe) and wait on ``_Scoring``.
    """

    def __init__(
        self, engine: LLMEngine, conn: socket.socket, decoder: FrameDecoder | None = None
    ) -> None:
        self.engine = engine
        self.conn = conn
        self.decoder = decoder or FrameDecoder()
        self.jobs = ComposeJobs()
        self._workers = concurrent.futures.ThreadPoolExecutor(2, "engine-call")
        self._outbox: list[bytes] = []
        self._outbox_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._scoring: dict[str, _Scoring] = {}
        self._scoring_lock = threading.Lock()
        self._scoring_ids = itertools.count()
        self._stopping = False
        self._last_sent = time.monotonic()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the connection closes (0) or the engine cannot step (1)."""
        try:
            return self._loop()
        except _Disconnected:
            return 0
        except ProtocolError as e:
            logger.error("closing the engine connection: %s", e)
            return 1
        finally:
            with self._scoring_lock:
                self._stopping = True
            self._fail_scoring("the engine has stopped")
            self._workers.shutdown(wait=False, cancel_futures=True)
            self.conn.close()

    def _loop(self) -> int:
        failures = 0
        stalled = False
        while True:
            try:
                self.engine.check_workers()
            except WorkerDied as e:
                logger.error("the model's workers are gone (%s); the engine stops", e)
                return 1
            if self.engine.has_unfinished():
                timeout = _STALL_WAIT_S if stalled else 0.0
            else:
                timeout = HEARTBEAT_S
            readable, _, _ = select.select([self.conn, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                self._drain_wakeups()
            if self.conn in readable:
                self._receive()
            self._flush_outbox()
            stalled = False
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                    failures = 0
                except WorkerDied as e:
                    logger.error("the model's workers are gone (%s); the engine stops", e)
                    return 1
                except Exception:
                    # The engine contains batch failures itself; reaching here is a bug in it.
                    failures += 1
                    logger.exception("engine step failed (%d in a row)", failures)
                    self._fail_scoring("the engine failed to run a step")
                    self._send(StepFailed("the engine failed to run a step"))
                    if failures >= _MAX_STEP_FAILURES:
                        return 1
                    continue
                remote = self._route(outputs)
                if remote:
                    self._send(StepOutputs(remote))
                elif not outputs and self.engine.num_running == 0:
                    # Only waiting requests (an adapter still loading, or no room yet).
                    stalled = True
            if time.monotonic() - self._last_sent >= HEARTBEAT_S:
                self._send(Heartbeat(self.engine.num_steps))

    def _receive(self) -> None:
        """Handle every message that has arrived, without blocking."""
        while True:
            try:
                data = self.conn.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise _Disconnected from e
            if not data:
                raise _Disconnected
            for payload in self.decoder.feed(data):
                self._handle(decode_to_engine(payload))

    def _send(self, message: Any) -> None:
        self._send_frame(frame(message))

    def _send_frame(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError as e:
            raise _Disconnected from e
        self._last_sent = time.monotonic()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe: the loop is awake
            self._wake_w.send(b"\0")

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _flush_outbox(self) -> None:
        with self._outbox_lock:
            frames, self._outbox = self._outbox, []
        for data in frames:
            self._send_frame(data)

    # -- commands -------------------------------------------------------------------------

    def _handle(self, message: ToEngine) -> None:
        engine = self.engine
        if isinstance(message, Abort):
            for rid in message.request_ids:
                engine.abort(rid)
        elif isinstance(message, AddRequests):
            self._answer(message.call_id, lambda: self._add(message.requests))
        elif isinstance(message, LoadLora):
            self._in_worker(
                message.call_id,
                lambda: load_adapter(
                    engine, message.name, Path(message.path), message.replace, message.pinned
                ),
            )
        elif isinstance(message, UnloadLora):
            self._answer(message.call_id, lambda: engine.unload_lora(message.name))
        elif isinstance(message, Merge):
            save_to = None if message.save_to is None else Path(message.save_to)
            self._in_worker(
                message.call_id, lambda: merge_adapter(engine, message.name, message.spec, save_to)
            )
        elif isinstance(message, RegisterMixture):
            self._answer(
                message.call_id,
                lambda: engine.register_mixture(
                    message.name, list(message.components), message.replace
                ),
            )
        elif isinstance(message, Compose):
            self._answer(message.call_id, lambda: self._compose(message))
        elif isinstance(message, ComposeStatus):
            job = self.jobs.get(message.job_id)
            self._answer(message.call_id, lambda: None if job is None else job.snapshot())
        elif isinstance(message, ListCompositions):
            self._answer(message.call_id, lambda: [job.snapshot() for job in self.jobs.all()])
        elif isinstance(message, Export):
            self._in_worker(
                message.call_id,
                lambda: export_adapter(
                    engine, message.name, Path(message.out), message.dtype, message.quantization
                ),
            )
        elif isinstance(message, ListAdapters):
            self._answer(message.call_id, lambda: adapter_infos(engine))
        elif isinstance(message, GetStats):
            self._answer(message.call_id, engine.stats)
        elif isinstance(message, CheckIntegrity):
            self._answer(message.call_id, engine.check_integrity)
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} message")

    def _reply(self, call_id: int, fn: Callable[[], Any]) -> bytes:
        try:
            value = fn()
        except Exception as e:  # handed to the caller, who raises it again
            return frame(Reply(call_id, error=remote_error(e)))
        return frame(Reply(call_id, encode_value(value)))

    def _answer(self, call_id: int, fn: Callable[[], Any]) -> None:
        """Run a quick call here, between two steps, and reply at once."""
        self._send_frame(self._reply(call_id, fn))

    def _in_worker(self, call_id: int, fn: Callable[[], Any]) -> None:
        """Run a slow call in a worker thread; the loop sends its reply."""

        def work() -> None:
            data = self._reply(call_id, fn)
            with self._outbox_lock:
                self._outbox.append(data)
            self._wake()

        self._workers.submit(work)

    def _add(self, requests: list[NewRequest]) -> None:
        added: list[str] = []
        try:
            for r in requests:
                # The API process renders the text (and applies stop strings).
                self.engine.add_request(
                    r.prompt_token_ids,
                    r.params,
                    request_id=r.request_id,
                    lora=r.lora,
                    detokenize=False,
                    priority=r.priority,
                    user=r.user,
                )
                added.append(r.request_id)
        except Exception:
            for rid in added:
                self.engine.abort(rid)
            raise

    def _compose(self, message: Compose) -> dict[str, Any]:
        job = self.jobs.start(
            self.engine,
            message.spec,
            message.default_candidates,
            self._run_batch,
            None if message.save_dir is None else Path(message.save_dir),
            message.max_candidates,
            message.max_steps,
            message.max_jobs,
        )
        return job.snapshot()

    # -- compositions' scoring requests ---------------------------------------------------

    def _run_batch(self, batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        """A composition's ``run_batch`` (its own thread): the requests run in this loop's
        steps, next to the API's, in chunks of at most ``max_num_seqs``."""
        chunk = max(1, self.engine.config.scheduler.max_num_seqs)
        finals: list[RequestOutput] = []
        for lo in range(0, len(batch), chunk):
            part = batch[lo : lo + chunk]
            scoring = _Scoring([f"score-{next(self._scoring_ids)}" for _ in part])
            with self._scoring_lock:
                if self._stopping:
                    raise RuntimeError("the engine has stopped")
                for rid in scoring.request_ids:
                    self._scoring[rid] = scoring
            try:
                for rid, (ids, adapter) in zip(scoring.request_ids, part, strict=True):
                    self.engine.add_request(ids, SCORING_PARAMS, request_id=rid, lora=adapter)
                self._wake()
                if not scoring.done.wait(_SCORING_TIMEOUT_S):
                    raise TimeoutError("the scoring requests did not finish in time")
            except BaseException:
                with self._scoring_lock:
                    for rid in scoring.request_ids:
                        self._scoring.pop(rid, None)
                for rid in scoring.request_ids:
                    self.engine.abort(rid)
                self._wake()
                raise
            finals.extend(scoring.finals[rid] for rid in scoring.request_ids)
        return finals

    def _route(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Hand scoring outputs to their compositions; returns the API's."""
        if not self._scoring:
            return outputs
        remote = []
        with self._scoring_lock:
            for output in outputs:
                scoring = self._scoring.get(output.request_id)
                if scoring is None:
                    remote.append(output)
                elif output.finished:
                    del self._scoring[output.request_id]
                    self._finish(scoring, output)
        return remote

    @staticmethod
    def _finish(scoring: _Scoring, output: RequestOutput) -> None:
        scoring.finals[output.request_id] = output
        if len(scoring.finals) == len(scoring.request_ids):
            scoring.done.set()

    def _fail_scoring(self, error: str) -> None:
        with self._scoring_lock:
            pending, self._scoring = self._scoring, {}
        for rid, scoring in pending.items():
            self.engine.abort(rid)
            self._finish(scoring, final_output(rid, "abort", error, "engine_error"))


# -- the process ----------------------------------------------------------------------


def build_from_spec(spec: EngineSpec) -> LLMEngine:
    """The engine ``loraserve serve``'s flags describe, startup adapters loaded."""
    from server.serve import build_engine  # the API process's modules, only once needed

    args = argparse.Namespace(**spec.engine_args, model_dir=spec.model_dir, seed=spec.seed)
    adapters = [(name, Path(path)) for name, path in spec.lora_modules]
    return build_engine(args, adapters, pinned=spec.pinned_lora_modules)


def engine_info(engine: LLMEngine) -> EngineInfo:
    mc = engine.config.model
    return EngineInfo(
        pid=os.getpid(),
        model_dir=str(mc.model_dir),
        load_format=mc.load_format,
        max_model_len=mc.max_model_len,
        max_num_seqs=engine.config.scheduler.max_num_seqs,
        adapters=list(engine.adapters.registry.names()),
        scheduling_policy=engine.config.scheduler.policy,
        plan=served_plan(engine.config),
    )


def size_cpu_threads() -> int:
    """Leave one core to the API process: torch's intra-op threads (OpenMP) spin at their
    barriers, and with as many threads as cores a busy event loop next door preempts one
    of them at every barrier (on 2 cores, steps then take 10x longer). ``OMP_NUM_THREADS``
    set by the operator wins. Returns the number of threads."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    threads = max(1, cores - 1)
    torch.set_num_threads(threads)
    return threads


def read_token(fd: int) -> str:
    """The token from the pipe the API process wrote it into (never argv nor the
    environment, which other processes of the user can read)."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    token = b"".join(chunks).decode()
    if len(token) < 32:
        raise ValueError("no token")
    return token


def main() -> int:
    try:
        path = Path(os.environ.pop(ENV_SOCKET))
        token = read_token(int(os.environ.pop(ENV_TOKEN_FD)))
    except (KeyError, ValueError, OSError):
        sys.stderr.write("server.engine_core is started by `loraserve serve`\n")
        return 2
    # Ctrl-C and SIGTERM reach the whole process group: the API process drains, then
    # closes the socket, which ends this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level="WARNING", format="%(levelname)s engine %(name)s: %(message)s")
    server = EngineSocketServer(path, token, peer_pid=os.getppid())
    conn, hello, decoder = server.accept(_ACCEPT_S)
    logging.getLogger().setLevel(hello.spec.log_level.upper())
    logger.info("%d CPU threads for torch", size_cpu_threads())
    try:
        engine = build_from_spec(hello.spec)
    except Exception as e:
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        logger.debug("engine startup failed", exc_info=e)
        conn.sendall(frame(StartupFailed(message)))
        conn.close()
        return 2
    gc.collect()  # start-up's objects live until exit: out of the collector's sight
    gc.freeze()
    conn.sendall(frame(Ready(engine_info(engine))))
    return EngineCore(engine, conn, decoder).run()


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # worker and composition threads end with the process
