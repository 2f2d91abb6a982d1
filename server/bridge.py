"""The engine thread and the asyncio side that talks to it.

:class:`BridgeBase` is what the routes use whichever way the engine runs: admission (429
past the queue bound), request groups, aborts, drain and the delivery of outputs to the
groups; :class:`EngineBridge` steps an in-process engine in a thread, and
:class:`server.engine_client.ProcessBridge` reads the outputs of an engine process.

One thread owns the engine and steps it once per iteration while any request is unfinished,
whatever the number of open connections: HTTP handlers never call ``step()``. Handlers
``submit`` requests (the engine's ``add_request`` is thread-safe and validates at once) and
read a :class:`RequestGroup`, an asyncio queue that the engine thread fills by posting each
step's outputs to the event loop in one callback. A handler whose client goes away aborts its
group; the engine frees the pages and the adapter reference at its next step.

Threads: ``_routes``, ``_draining`` and the groups are touched only on the event loop;
``_calls``, ``_busy_since`` and ``_dead`` are shared with the engine thread (a queue, and
plain attributes the watchdog reads).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.outputs import EngineStats, RequestOutput
from engine.parallel.executor import WorkerDied
from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.metrics import ServerMetrics
from server.request_group import RequestGroup, final_output

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # the engine thread's sleep when there is nothing to run
_MAX_STEP_FAILURES = 3  # consecutive unhandled step failures before the engine is declared dead
_STALL_WAIT_S = 0.002  # after a step that ran nothing, before trying again
_ABORT_GRACE_S = 2.0  # after aborting, how long to wait for the engine's abort outputs


class Engine(Protocol):
    """What the bridge needs of :class:`engine.LLMEngine`."""

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        lora: str | None,
        *,
        priority: int = 0,
        user: str | None = None,
    ) -> str: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def check_workers(self) -> None: ...

    def stats(self) -> EngineStats: ...


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = "ok"


class BridgeBase(abc.ABC):
    """Admission, request groups, aborts, drain and delivery (event loop only).

    Args:
        max_pending: the most unfinished engine requests; past it, submissions get 429.
        watchdog_s: an engine making no progress for longer than this makes
            :meth:`health` fail.
        metrics: receives request timings.
    """

    def __init__(self, max_pending: int, watchdog_s: float, metrics: ServerMetrics) -> None:
        self.max_pending = max_pending
        self.watchdog_s = watchdog_s
        self.metrics = metrics
        self._routes: dict[str, tuple[RequestGroup, str | None]] = {}  # rid → (group, adapter)
        self._draining = False
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what each form provides ----------------------------------------------------------

    @abc.abstractmethod
    def health(self) -> Health: ...

    @abc.abstractmethod
    def _engine_abort(self, request_ids: list[str]) -> None:
        """Tell the engine to stop these requests (their final outputs follow)."""

    @abc.abstractmethod
    async def submit_async(
        self,
        prompts: Sequence[tuple[str | list[int], SamplingParams]],
        lora: str | None,
        *,
        priority: int = 0,
        user: str | None = None,
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params); all or none are queued.

        ``priority`` and ``user`` go to every request as ``LLMEngine.add_request`` takes them
        (the scheduling policy's inputs).

        Raises:
            APIError: 503 while draining or when the engine is unavailable, 429 past
                ``max_pending``.
            ValueError, AdapterError: from the engine's validation (nothing stays queued).
        """

    # -- lifecycle ------------------------------------------------------------------------

    def begin_drain(self, timeout_s: float) -> None:
        """Stop admitting; abort whatever still runs after ``timeout_s``. Event loop only."""
        if self._draining:
            return
        self._draining = True
        logger.info("draining %d requests (up to %.0f s)", len(self._routes), timeout_s)
        assert self._loop is not None
        self._loop.call_later(timeout_s, self._abort_all)

    def request_drain(self, timeout_s: float) -> None:
        """:meth:`begin_drain` from any thread (a signal handler)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain, timeout_s)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_pending(self) -> int:
        return len(self._routes)

    # -- requests (event loop) ------------------------------------------------------------

    def _admit(self, num_prompts: int) -> RequestGroup:
        """A new group for ``num_prompts`` requests, if they may be queued now."""
        if self._draining:
            raise APIError(503, "server_shutting_down", "the server is shutting down")
        health = self.health()
        if not health.ok:
            raise APIError(503, "engine_unavailable", health.reason)
        if len(self._routes) + num_prompts > self.max_pending:
            raise APIError(
                429,
                "server_overloaded",
                "too many requests queued; retry shortly",
                headers={"Retry-After": "1"},
            )
        base = f"req-{next(self._ids)}"
        return RequestGroup([f"{base}-{i}" for i in range(num_prompts)], time.monotonic())

    def abort(self, group: RequestGroup) -> None:
        """Drop a group whose client has gone; the engine frees it at its next step."""
        aborted = []
        for rid in list(group.unfinished):
            if self._routes.pop(rid, None) is not None:
                aborted.append(rid)
                self.metrics.request_finished("abort", time.monotonic() - group.arrival)
        group.unfinished.clear()
        self._engine_abort(aborted)

    def _abort_all(self) -> None:
        """Drain timeout: abort every request; clients still receive their final outputs."""
        if not self._routes:
            return
        logger.warning("drain timeout: aborting %d requests", len(self._routes))
        self._engine_abort(list(self._routes))
        assert self._loop is not None
        self._loop.call_later(_ABORT_GRACE_S, self._finish_stragglers, "abort", None)

    def _finish_stragglers(
        self, reason: str, error: str | None, error_code: str | None = None
    ) -> None:
        """End requests the engine never answered (it failed, or lost them) with a final output."""
        stragglers = list(self._routes)
        self._engine_abort(stragglers)
        self._deliver([final_output(rid, reason, error, error_code) for rid in stragglers])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs, on the event loop: route each to its group, record timings."""
        now = time.monotonic()
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue  # aborted by its client
            group, adapter = route
            rid = output.request_id
            if output.new_token_ids:
                group.num_tokens[rid] = output.num_output_tokens
                last = group.last_token_time.get(rid)
                if last is None:
                    # A request yields tokens only once admitted: its output has a queue time.
                    assert output.queue_time is not None
                    self.metrics.first_token(now - group.arrival, output.queue_time, adapter)
                else:
                    self.metrics.inter_token(now - last)
                self.metrics.tokens(len(output.new_token_ids), adapter)
                group.last_token_time[rid] = now
            if output.finished:
                del self._routes[output.request_id]
                reason = output.finish_reason or "abort"
                self.metrics.request_finished(reason, now - group.arrival, adapter)
            group.queue.put_nowait(output)


class EngineBridge(BridgeBase):
    """Runs the engine loop in a thread and fans its outputs out to request groups.

    Args:
        engine: the engine (only this bridge's thread may call ``step``).
        max_pending: the most unfinished engine requests; past it, ``submit`` raises 429.
        watchdog_s: a step running longer than this makes :meth:`health` fail.
        metrics: receives request timings.
    """

    def __init__(
        self, engine: Engine, max_pending: int, watchdog_s: float, metrics: ServerMetrics
    ) -> None:
        super().__init__(max_pending, watchdog_s, metrics)
        self.engine = engine
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dead = False
        self._busy_since: float | None = None  # when the running step (or call) began
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> Health:
        if self._draining:
            return Health(False, "shutting down")
        if self._dead or self._thread is None or not self._thread.is_alive():
            return Health(False, "the engine has stopped")
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.watchdog_s:
            return Health(False, f"the engine has made no progress for {self.watchdog_s:.0f} s")
        return Health(True)

    def submit_call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the engine thread between two steps (integrity checks, tests).

        Safe from any thread but the engine's own; the future holds the result.
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """:meth:`submit_call`, awaited."""
        return await asyncio.wrap_future(self.submit_call(fn))

    # -- requests (event loop) ------------------------------------------------------------

    def submit(
        self,
        prompts: Sequence[tuple[str | list[int], SamplingParams]],
        lora: str | None,
        *,
        priority: int = 0,
        user: str | None = None,
    ) -> RequestGroup:
        """:meth:`submit_async`, at once (the engine validates in the caller's thread)."""
        group = self._admit(len(prompts))
        queued: list[str] = []
        try:
            for rid, (prompt, params) in zip(group.request_ids, prompts, strict=True):
                self.engine.add_request(
                    prompt, params, request_id=rid, lora=lora, priority=priority, user=user
                )
                queued.append(rid)
        except Exception:
            self._engine_abort(queued)
            raise
        for rid in queued:
            self._routes[rid] = (group, lora)
        self._wake.set()
        return group

    async def submit_async(
        self,
        prompts: Sequence[tuple[str | list[int], SamplingParams]],
        lora: str | None,
        *,
        priority: int = 0,
        user: str | None = None,
    ) -> RequestGroup:
        return self.submit(prompts, lora, priority=priority, user=user)

    def _engine_abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)
        self._wake.set()

    # -- the engine thread ----------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: the server is gone
            self._stop.set()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                self._busy_since = time.monotonic()
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who re-raises it
                    future.set_exception(e)
                finally:
                    self._busy_since = None

    def _run(self) -> None:
        try:
            self._step_until_stopped()
        except BaseException:
            logger.exception("the engine thread died")
            raise
        finally:
            if not self._stop.is_set():  # died rather than stopped: fail what is in flight
                self._dead = True
                self._post(self._finish_stragglers, "abort", "the engine has stopped")

    def _step_until_stopped(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._run_calls()
            try:
                self.engine.check_workers()
            except WorkerDied as e:
                logger.error("the model's workers are gone (%s); the engine stops", e)
                return
            if not self.engine.has_unfinished():
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                continue
            self._busy_since = time.monotonic()
            try:
                outputs = self.engine.step()
                failures = 0
            except WorkerDied as e:
                logger.error("the model's workers are gone (%s); the engine stops", e)
                return
            except Exception:
                # The engine contains batch failures itself; reaching here is a bug in it.
                failures += 1
                logger.exception("engine step failed (%d in a row)", failures)
                self._post(self._finish_stragglers, "abort", "the engine failed to run a step")
                if failures >= _MAX_STEP_FAILURES:
                    return
                continue
            finally:
                self._busy_since = None
            if outputs:
                self._post(self._deliver, outputs)
            elif self.engine.stats().num_running == 0:
                # Only waiting requests (an adapter still loading from disk, or no room yet):
                # do not spin on empty steps.
                self._wake.wait(_STALL_WAIT_S)
                self._wake.clear()
