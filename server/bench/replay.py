"""A request list replayed through loraserve's engine in this process.

:func:`run_loraserve` receives a :class:`~server.bench.workload.Workload` and returns one
:class:`~server.bench.metrics.RequestRecord` per request: sent at its arrival time, with the
time of each generated token (exactly ``output_len`` of them: EOS is ignored). Requests are
added to the engine as they arrive and the engine is stepped continuously: the same engine
the server runs, without HTTP in between.

Any other system replayed the same way is a :data:`System` (``benchmarks/baselines.py``
makes the Hugging Face baselines into ones), so ``bench sweep`` can replay its lists
through it beside loraserve.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from server.bench.metrics import RequestRecord
from server.bench.workload import Workload

# A system under test: replays a request list in this process with ``adapters[i]`` (name,
# path) serving workload adapter i, given the engine's configuration (the model and its
# dtype, for a system that loads the same base its own way).
System = Callable[[EngineConfig, Workload, list[tuple[str, Path]]], list[RequestRecord]]


def release_memory() -> None:
    """Free what a finished run held before the next one starts: an engine sizes its page
    pool to what the device has, so the last run's engine (reference cycles keep it alive
    until a collection) and the allocator's cached blocks must be gone first."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wait_until(t: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``t`` (at once when it has)."""
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_loraserve(
    config: EngineConfig,
    workload: Workload,
    adapters: list[tuple[str, Path]],
    kernels: str | None = None,
) -> list[RequestRecord]:
    """Replay through the engine; ``adapters[i]`` serves workload adapter i."""
    engine = LLMEngine(config, kernels=kernels)
    for name, path in adapters:
        engine.load_lora(name, path)
    # Warm-up, untimed: a base request and, with adapters, a LoRA one, so the first timed
    # requests do not pay for compiling the kernels (on a GPU, seconds of Triton JIT).
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    engine.add_request([5, 6, 7], warm)
    if adapters:
        engine.add_request([5, 6, 7, 8], warm, lora=adapters[0][0])
    while engine.has_unfinished():
        engine.step()
    names = [name for name, _ in adapters]
    requests = workload.requests
    records: dict[str, RequestRecord] = {}
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and requests[pending[0]].arrival <= now:
            i = pending.pop(0)
            r = requests[i]
            params = SamplingParams(
                temperature=0.0, max_tokens=r.output_len, min_tokens=r.output_len, ignore_eos=True
            )
            lora = None if r.adapter is None else names[r.adapter]
            rid = engine.add_request(list(r.prompt), params, request_id=str(i), lora=lora)
            records[rid] = RequestRecord(
                adapter=lora,
                prompt_len=len(r.prompt),
                start=start + r.arrival,
                token_times=[],
                end=0.0,
                output_len=0,
                error=None,
            )
        if not engine.has_unfinished():
            wait_until(start + requests[pending[0]].arrival)
            continue
        for out in engine.step():
            record = records[out.request_id]
            t = time.perf_counter()
            record.token_times.extend([t] * len(out.new_token_ids))
            record.output_len = out.num_output_tokens
            if out.finished:
                record.end = t
                record.error = out.error
    engine.shutdown()  # a split model's workers
    del engine
    release_memory()
    return [records[str(i)] for i in range(len(requests))]
