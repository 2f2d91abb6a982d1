"""The engine process's loop: messages in, engine calls, steps, outputs out.

:class:`EngineCore` serves the one authenticated connection
(:class:`~server.engine_socket.EngineSocketServer`) once the engine is built
(:mod:`server.engine_core`): it drains every pending message without blocking, steps, and
sends the step's outputs in one frame; it blocks on the socket when there is no work, with
a heartbeat every second. Quick calls are answered between two steps; slow ones (loads,
merges, exports) run in worker threads and their replies go out between steps;
compositions run in their own threads and score through this same loop
(:mod:`server.engine_scoring`). A call's exception crosses back as a
:class:`~server.engine_protocol.RemoteError` (:func:`remote_error`), raised again in the API
process by :func:`server.engine_client.raise_remote`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.errors import AdapterError
from engine.llm_engine import LLMEngine
from engine.parallel.executor import WorkerDied
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
    Export,
    FrameDecoder,
    GetStats,
    Heartbeat,
    ListAdapters,
    ListCompositions,
    LoadLora,
    Merge,
    NewRequest,
    ProtocolError,
    RegisterMixture,
    RemoteError,
    Reply,
    StepFailed,
    StepOutputs,
    ToEngine,
    UnloadLora,
    decode_to_engine,
    encode_value,
    frame,
)
from server.engine_scoring import ScoringRequests
from server.errors import APIError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # the longest silence while the loop runs
_STALL_WAIT_S = 0.002  # after a step that ran nothing, before trying again
_MAX_STEP_FAILURES = 3  # consecutive unhandled step failures before the process exits
_RECV_BYTES = 1 << 20


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


class EngineCore:
    """Steps the engine and serves the connection until the API process goes.

    Threads: the loop (:meth:`run`) alone reads and writes the socket and steps the
    engine; worker threads hand their replies over through ``_outbox`` and wake the loop;
    composition threads add requests to the engine (thread-safe) and wait in ``scoring``.
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
        self.scoring = ScoringRequests(engine, self._wake)
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
            self.scoring.stop("the engine has stopped")
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
                    self.scoring.fail("the engine failed to run a step")
                    self._send(StepFailed("the engine failed to run a step"))
                    if failures >= _MAX_STEP_FAILURES:
                        return 1
                    continue
                remote = self.scoring.route(outputs)
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
            self.scoring.run_batch,
            None if message.save_dir is None else Path(message.save_dir),
            message.max_candidates,
            message.max_steps,
            message.max_jobs,
        )
        return job.snapshot()
