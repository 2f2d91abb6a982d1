"""Compositions' scoring requests in the engine process, run by the loop's own steps.

A LoRAHub composition (:class:`~server.adapter_ops.ComposeJobs`) scores its candidates
from a thread of its own through ``run_batch``. In the engine process that thread adds the
requests to the engine (thread-safe), wakes the loop and waits; the loop
(:class:`~server.engine_loop.EngineCore`) steps them next to the API's requests and hands
every step's outputs to :meth:`ScoringRequests.route`, which keeps the scoring ones (they
never cross the socket) and returns the API's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.scoring import SCORING_PARAMS
from server.request_group import final_output

_SCORING_TIMEOUT_S = 600.0  # one composition batch, at most


class _Scoring:
    """One batch of a composition's scoring requests, waited for by its thread."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.finals: dict[str, RequestOutput] = {}
        self.done = threading.Event()


class ScoringRequests:
    """The scoring requests in flight, by request id.

    Threads: composition threads call :meth:`run_batch`; the loop calls :meth:`route`,
    :meth:`fail` and :meth:`stop`. ``_lock`` guards the table and ``_stopping``.

    Args:
        engine: the engine the loop steps.
        wake: wakes the loop (from any thread) so that it steps what was just added.
    """

    def __init__(self, engine: LLMEngine, wake: Callable[[], None]) -> None:
        self.engine = engine
        self._wake = wake
        self._scoring: dict[str, _Scoring] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = False

    def run_batch(self, batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        """A composition's ``run_batch`` (its own thread): the requests run in the loop's
        steps, next to the API's, in chunks of at most ``max_num_seqs``."""
        chunk = max(1, self.engine.config.scheduler.max_num_seqs)
        finals: list[RequestOutput] = []
        for lo in range(0, len(batch), chunk):
            part = batch[lo : lo + chunk]
            scoring = _Scoring([f"score-{next(self._ids)}" for _ in part])
            with self._lock:
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
                with self._lock:
                    for rid in scoring.request_ids:
                        self._scoring.pop(rid, None)
                for rid in scoring.request_ids:
                    self.engine.abort(rid)
                self._wake()
                raise
            finals.extend(scoring.finals[rid] for rid in scoring.request_ids)
        return finals

    def route(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Hand scoring outputs to their compositions; returns the API's."""
        if not self._scoring:
            return outputs
        remote = []
        with self._lock:
            for output in outputs:
                scoring = self._scoring.get(output.request_id)
                if scoring is None:
                    remote.append(output)
                elif output.finished:
                    del self._scoring[output.request_id]
                    self._finish(scoring, output)
        return remote

    def fail(self, error: str) -> None:
        """Abort every scoring request in flight; their batches end with ``error``."""
        with self._lock:
            pending, self._scoring = self._scoring, {}
        for rid, scoring in pending.items():
            self.engine.abort(rid)
            self._finish(scoring, final_output(rid, "abort", error, "engine_error"))

    def stop(self, error: str) -> None:
        """Refuse new batches from now on, and fail those in flight."""
        with self._lock:
            self._stopping = True
        self.fail(error)

    @staticmethod
    def _finish(scoring: _Scoring, output: RequestOutput) -> None:
        scoring.finals[output.request_id] = output
        if len(scoring.finals) == len(scoring.request_ids):
            scoring.done.set()
