"""The asyncio side of the engine, whichever way it runs: :class:`BridgeBase`.

What the routes use to reach the engine: admission (429 past the queue bound), request
groups, aborts, drain and the delivery of each step's outputs to the groups. Its two forms
differ only in how requests reach the engine and outputs come back:
:class:`server.engine_thread.EngineBridge` steps an in-process engine in a thread, and
:class:`server.engine_client.ProcessBridge` reads the outputs of an engine process.

Handlers ``submit`` requests and read a :class:`RequestGroup`, an asyncio queue that the
bridge fills with each step's outputs, delivered on the event loop in one callback. A
handler whose client goes away aborts its group; the engine frees the pages and the adapter
reference at its next step.

Threads: ``_routes``, ``_draining`` and the groups are touched only on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.metrics import ServerMetrics
from server.request_group import RequestGroup, final_output

logger = logging.getLogger(__name__)

_ABORT_GRACE_S = 2.0  # after aborting, how long to wait for the engine's abort outputs


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

    @property
    @abc.abstractmethod
    def dead(self) -> bool:
        """Whether the engine died (rather than being stopped): the server then exits 1."""

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
