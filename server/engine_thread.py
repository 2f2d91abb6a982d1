"""The thread that steps an in-process engine: :class:`EngineBridge`.

One thread owns the engine and steps it once per iteration while any request is unfinished,
whatever the number of open connections: HTTP handlers never call ``step()``. Handlers
``submit`` requests (the engine's ``add_request`` is thread-safe and validates at once);
the thread posts each step's outputs to the event loop in one callback, where
:class:`~server.bridge.BridgeBase` delivers them to the request groups.

Threads: ``_calls``, ``_busy_since`` and ``_dead`` are shared with the engine thread (a
queue, and plain attributes the watchdog reads); the rest is the event loop's, as in
:class:`~server.bridge.BridgeBase`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from engine.outputs import EngineStats, RequestOutput
from engine.parallel.executor import WorkerDied
from engine.sampling_params import SamplingParams
from server.bridge import BridgeBase, Health
from server.metrics import ServerMetrics
from server.request_group import RequestGroup

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # the engine thread's sleep when there is nothing to run
_MAX_STEP_FAILURES = 3  # consecutive unhandled step failures before the engine is declared dead
_STALL_WAIT_S = 0.002  # after a step that ran nothing, before trying again


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


class EngineBridge(BridgeBase):
    """Runs the engine loop in a thread and fans its outputs out to request groups.

    Args:
        engine: the engine (only this bridge's thread may call ``step``).
        max_pending: the most unfinished engine requests; past it, ``submit`` raises 429.
        watchdog_s: a step running longer than this makes :meth:`health` fail.
        metrics: receives request timings.
        on_dead: called once on the event loop if the engine thread dies (rather than being
            stopped), so that ``loraserve serve`` exits non-zero as it does when the engine
            process dies.
    """

    def __init__(
        self,
        engine: Engine,
        max_pending: int,
        watchdog_s: float,
        metrics: ServerMetrics,
        on_dead: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(max_pending, watchdog_s, metrics)
        self.engine = engine
        self.on_dead = on_dead
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

    @property
    def dead(self) -> bool:
        """Whether the engine thread died (rather than being stopped)."""
        return self._dead

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
                if self.on_dead is not None:
                    self._post(self.on_dead)

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
