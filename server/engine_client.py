"""The API process's side of the engine process's channel: the bridge.

:class:`ProcessBridge` owns a ready :class:`~server.engine_process.EngineProcess` and reads
its socket on the event loop: each step's outputs go to the request groups as with the
in-process bridge, replies complete the calls awaiting them; a call's failure in the engine
process is raised here again (:func:`raise_remote`). The routes reach it through
:class:`~server.remote_engine.RemoteEngine`.

When the engine process dies, every wait ends: pending calls and new requests get 503
``engine_unavailable``, requests in flight get a final output carrying that error, health
fails, and ``on_dead`` lets ``loraserve serve`` exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from adapters.errors import AdapterError
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.bridge import BridgeBase, Health
from server.engine_process import EngineProcess
from server.engine_protocol import (
    HEADER_BYTES,
    Abort,
    AddRequests,
    Call,
    Heartbeat,
    NewRequest,
    ProtocolError,
    RemoteError,
    Reply,
    StepFailed,
    StepOutputs,
    decode_to_api,
    decode_value,
    frame,
    parse_header,
)
from server.errors import ENGINE_UNAVAILABLE, APIError
from server.metrics import ServerMetrics
from server.request_group import RequestGroup

logger = logging.getLogger(__name__)

T = TypeVar("T")

QUICK_CALL_S = 30.0  # calls answered between two steps
SLOW_CALL_S = 1800.0  # loads, merges and exports (worker threads of the engine process)


class EngineCallError(RuntimeError):
    """A call failed in the engine process for an unexpected reason (a bug there)."""


def raise_remote(error: RemoteError) -> None:
    """Raise the exception a call's :class:`RemoteError` stands for."""
    if error.kind == "api":
        raise APIError(error.status, error.code, error.message, error.param, error.headers)
    if error.kind == "adapter":
        raise AdapterError(error.code, error.message)
    if error.kind == "value":
        raise ValueError(error.message)
    raise EngineCallError(error.message)


class ProcessBridge(BridgeBase):
    """The bridge over an engine process: requests and aborts go out as frames; each
    step's outputs come back in one frame, read on the event loop.

    Args:
        process: the ready engine process (this bridge owns it from :meth:`start`).
        tokenizer: for text prompts (the routes send token ids).
        on_dead: called once on the event loop if the engine process dies.
    """

    def __init__(
        self,
        process: EngineProcess,
        tokenizer: PreTrainedTokenizerBase,
        max_pending: int,
        watchdog_s: float,
        metrics: ServerMetrics,
        on_dead: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(max_pending, watchdog_s, metrics)
        self.process = process
        self.tokenizer = tokenizer
        self.on_dead = on_dead
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[Reply]] = {}
        self._call_ids = itertools.count(1)
        self._dead: str | None = None  # why, once the engine process is gone
        self._stopping = False
        self._last_frame = time.monotonic()
        # The text of each request in flight, rendered here (the engine sends token ids).
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    @property
    def dead(self) -> bool:
        """Whether the engine process died (rather than being stopped)."""
        return self._dead is not None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reading the engine's frames; call on the event loop that serves."""
        self._loop = asyncio.get_running_loop()
        self.process.sock.setblocking(False)
        reader, self._writer = await asyncio.open_unix_connection(sock=self.process.sock)
        self._last_frame = time.monotonic()
        self._reader = self._loop.create_task(self._read(reader))

    async def stop(self) -> None:
        """Close the connection (the engine process then exits) and wait for the process."""
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._writer is not None:
            self._writer.close()
        self._fail_calls("the server is stopping")
        code = await asyncio.to_thread(self.process.close)
        logger.info("engine process exited with code %s", code)

    def health(self) -> Health:
        if self._draining:
            return Health(False, "shutting down")
        if self._dead is not None:
            return Health(False, self._dead)
        if self._writer is None:
            return Health(False, "the engine process is not connected")
        if time.monotonic() - self._last_frame > self.watchdog_s:
            return Health(False, f"the engine has made no progress for {self.watchdog_s:.0f} s")
        return Health(True)

    # -- frames ---------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "the engine process has stopped"
        try:
            while True:
                length = parse_header(await reader.readexactly(HEADER_BYTES))
                message = decode_to_api(await reader.readexactly(length))
                self._last_frame = time.monotonic()
                self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError:
            pass  # the connection closed: the process exited or was killed
        except (ProtocolError, OSError) as e:
            logger.error("engine connection failed: %s", e)
        except Exception:
            logger.exception("engine connection failed")
        if not self._stopping:
            self._die(reason)

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, StepOutputs):
            self._deliver(message.outputs)
        elif isinstance(message, Reply):
            future = self._calls.pop(message.call_id, None)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, StepFailed):
            self._finish_stragglers("abort", message.message)
        elif isinstance(message, Heartbeat):
            pass
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} message")

    def _die(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        logger.error("%s: failing %d requests", reason, len(self._routes))
        self._fail_calls(reason)
        self._finish_stragglers("abort", reason, ENGINE_UNAVAILABLE)
        if self.on_dead is not None:
            self.on_dead()

    def _fail_calls(self, reason: str) -> None:
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(APIError(503, ENGINE_UNAVAILABLE, reason))

    def _write(self, message: Any) -> None:
        if self._dead is not None:
            raise APIError(503, ENGINE_UNAVAILABLE, self._dead)
        if self._writer is None or self._writer.is_closing():
            raise APIError(503, ENGINE_UNAVAILABLE, "the engine process is not connected")
        self._writer.write(frame(message))

    # -- calls ----------------------------------------------------------------------------

    async def call(self, make: Callable[[int], Call], result: type[T], timeout: float) -> T:
        """Send the call ``make(call_id)`` and wait for its reply (at most ``timeout``).

        Raises:
            APIError: 503 ``engine_unavailable`` when the engine process is gone or does
                not answer in time; or the call's own refusal.
            AdapterError, ValueError, EngineCallError: the call's failure.
        """
        assert self._loop is not None, "the bridge has not started"
        call_id = next(self._call_ids)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._calls[call_id] = future
        writer = self._writer

        async def exchange() -> Reply:
            assert writer is not None
            await writer.drain()  # bounded too: an engine that stops reading
            return await future

        try:
            self._write(make(call_id))
            reply = await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:
            raise APIError(
                503, ENGINE_UNAVAILABLE, f"the engine did not answer within {timeout:.0f} s"
            ) from None
        except (ConnectionError, RuntimeError) as e:  # the transport closed under us
            raise APIError(503, ENGINE_UNAVAILABLE, "the engine process is not connected") from e
        finally:
            self._calls.pop(call_id, None)
        if reply.error is not None:
            raise_remote(reply.error)
        return decode_value(reply.result, result)

    # -- requests (event loop) ------------------------------------------------------------

    async def submit_async(
        self,
        prompts: Sequence[tuple[str | list[int], SamplingParams]],
        lora: str | None,
        *,
        priority: int = 0,
        user: str | None = None,
    ) -> RequestGroup:
        group = self._admit(len(prompts))
        requests = []
        for rid, (prompt, params) in zip(group.request_ids, prompts, strict=True):
            ids = list(self.tokenizer(prompt).input_ids) if isinstance(prompt, str) else prompt
            requests.append(NewRequest(rid, ids, params, lora, priority, user))
            self._detokenizers[rid] = IncrementalDetokenizer(
                self.tokenizer, ids, params.stop, params.skip_special_tokens
            )
        for rid in group.request_ids:
            self._routes[rid] = (group, lora)
        try:
            await self.call(lambda cid: AddRequests(cid, requests), type(None), QUICK_CALL_S)
        except BaseException:
            for rid in group.request_ids:
                self._routes.pop(rid, None)
                self._detokenizers.pop(rid, None)
            if self._dead is None:  # refused: nothing queued; timed out: make sure
                with contextlib.suppress(APIError):
                    self._write(Abort(group.request_ids))
            raise
        return group

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Render each output's text here, then deliver as the base bridge does. A request
        whose text reaches a stop string finishes here ("stop") and is aborted in the engine,
        which does not see text."""
        rendered: list[RequestOutput] = []
        stopped: list[str] = []
        for out in outputs:
            detokenizer = self._detokenizers.get(out.request_id)
            if detokenizer is None:  # finished here already, or never ours
                rendered.append(out)
                continue
            for token in out.new_token_ids:
                detokenizer.add_token(token)
                if detokenizer.stopped:
                    break
            if detokenizer.stopped and not out.finished:
                out = dataclasses.replace(out, finished=True, finish_reason="stop")
                stopped.append(out.request_id)
            delta = detokenizer.release(out.finished)
            text = ""
            if out.finished:
                text = detokenizer.released_text
                del self._detokenizers[out.request_id]
            rendered.append(dataclasses.replace(out, delta=delta, text=text))
        self._engine_abort(stopped)
        super()._deliver(rendered)

    def _engine_abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid not in self._routes:  # its client has gone: no final output to render
                self._detokenizers.pop(rid, None)
        if request_ids and self._dead is None and not self._stopping:
            with contextlib.suppress(APIError):
                self._write(Abort(request_ids))
