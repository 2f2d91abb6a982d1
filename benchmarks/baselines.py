"""The Hugging Face baselines loraserve is compared with: transformers + PEFT, in this process.

Each replays a :class:`~server.bench.workload.Workload` the way
:func:`server.bench.replay.run_loraserve` does and returns the same
:class:`~server.bench.metrics.RequestRecord` per request:

* :func:`run_peft_server`: "PEFT server", S-LoRA's PEFT column: the waiting requests of one
  adapter (the one waiting longest) form a padded static batch, ``set_adapter`` between
  batches, each batch runs to its longest request.
* :func:`run_peft_mixed`: PEFT mixed batches: waiting requests in arrival order, each with
  its own adapter (``generate(adapter_names=...)``).
* :func:`run_merge_swap`: merge-and-swap: like the PEFT server, but the batch's adapter is
  merged into the base weights first and unmerged after, so the batch runs at base speed.

Each times its tokens with a stopping criterion called once per step. They are benchmark
code, not part of the installed server: ``benchmarks/sweep_baselines.py`` and
``benchmarks/compare.py`` run them beside loraserve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
)

from engine.config import EngineConfig
from engine.dummy import init_dummy_weights, init_std
from server.bench.metrics import RequestRecord
from server.bench.replay import System, release_memory, wait_until
from server.bench.workload import BenchRequest, Workload

# A baseline: (the model peft_model loaded, the list, the adapters' names, the batch size).
Baseline = Callable[[Any, Workload, list[str], int], list[RequestRecord]]


class _TokenClock(StoppingCriteria):
    """Records the time of each generation step (called once per new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def peft_model(base: Path, adapters: list[tuple[str, Path]], dtype: torch.dtype) -> Any:
    """transformers + PEFT with every adapter loaded (the base alone for none), on the GPU
    when there is one. A directory without weights (a preset, ``--load-format dummy``)
    gets transformers' random initialisation."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if any(base.glob("*.safetensors")):
        hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device)
    else:
        config = AutoConfig.from_pretrained(base)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
        init_dummy_weights(hf, init_std(config), seed=0)  # the engine's dummy weights
    if not adapters:
        hf.train(False)
        return hf
    (first, path), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(hf, path, adapter_name=first)
    for name, p in rest:
        model.load_adapter(p, adapter_name=name)
    return model.eval()


def _warm_up(model: Any) -> None:
    """One short generate, so no system's first batch pays one-off setup costs."""
    ids = torch.tensor([[5, 6, 7]], device=model.device)
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def _generate(
    model: Any, batch: list[BenchRequest], records: list[RequestRecord], **kwargs: Any
) -> None:
    """One padded static batch, run to its longest request; fills the batch's records."""
    width = max(len(r.prompt) for r in batch)
    ids = torch.tensor([[0] * (width - len(r.prompt)) + list(r.prompt) for r in batch])
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
    longest = max(r.output_len for r in batch)
    clock = _TokenClock()
    with torch.inference_mode():
        model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([clock]),
            **kwargs,
        )
    end = time.perf_counter()
    for r, record in zip(batch, records, strict=True):
        record.token_times = clock.times[: r.output_len]
        record.output_len = len(record.token_times)
        record.end = end  # a static batch answers when it is done


def _replay_batches(
    workload: Workload,
    pick: Callable[[list[int]], list[int]],
    run_batch: Callable[[list[int]], None],
    records: list[RequestRecord],
) -> None:
    """The baselines' server loop: wait for arrivals, pick a batch among them, run it."""
    requests = workload.requests
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    start = time.perf_counter()
    for i in order:
        records[i].start = start + requests[i].arrival
    waiting: list[int] = []
    while order or waiting:
        now = time.perf_counter() - start
        while order and requests[order[0]].arrival <= now:
            waiting.append(order.pop(0))
        if not waiting:
            wait_until(start + requests[order[0]].arrival)
            continue
        batch = pick(waiting)
        waiting = [i for i in waiting if i not in batch]
        run_batch(batch)


def _base_only(model: Any, base: bool) -> Any:
    """PEFT's adapter-free context for a base request; nothing for a plain model."""
    return model.disable_adapter() if base and isinstance(model, PeftModel) else nullcontext()


def _records(workload: Workload, names: list[str]) -> list[RequestRecord]:
    return [
        RequestRecord(
            adapter=None if r.adapter is None else names[r.adapter],
            prompt_len=len(r.prompt),
            start=0.0,
            token_times=[],
            end=0.0,
            output_len=0,
            error=None,
        )
        for r in workload.requests
    ]


def _by_adapter(workload: Workload, batch_size: int) -> Callable[[list[int]], list[int]]:
    """The waiting requests of the adapter whose request has waited longest."""

    def pick(waiting: list[int]) -> list[int]:
        adapter = workload.requests[waiting[0]].adapter
        same = [i for i in waiting if workload.requests[i].adapter == adapter]
        return same[:batch_size]

    return pick


def run_peft_server(
    model: Any, workload: Workload, names: list[str], batch_size: int, merge: bool = False
) -> list[RequestRecord]:
    """Static batches of one adapter each; ``merge`` folds the adapter into the base weights
    for its batch (merge-and-swap) instead of running the LoRA path."""
    records = _records(workload, names)

    def run(batch: list[int]) -> None:
        adapter = workload.requests[batch[0]].adapter
        reqs = [workload.requests[i] for i in batch]
        if adapter is not None:
            model.set_adapter(names[adapter])
        merged = merge and adapter is not None
        if merged:
            model.merge_adapter()  # W += s·BA; merged LoRA layers skip the LoRA path
        try:
            with _base_only(model, adapter is None):
                _generate(model, reqs, [records[i] for i in batch])
        finally:
            if merged:
                model.unmerge_adapter()

    _replay_batches(workload, _by_adapter(workload, batch_size), run, records)
    return records


def run_peft_mixed(
    model: Any, workload: Workload, names: list[str], batch_size: int
) -> list[RequestRecord]:
    records = _records(workload, names)

    def run(batch: list[int]) -> None:
        reqs = [workload.requests[i] for i in batch]
        kwargs = {}
        if isinstance(model, PeftModel):
            kwargs["adapter_names"] = [
                "__base__" if r.adapter is None else names[r.adapter] for r in reqs
            ]
        _generate(model, reqs, [records[i] for i in batch], **kwargs)

    _replay_batches(workload, lambda waiting: waiting[:batch_size], run, records)
    return records


def run_merge_swap(
    model: Any, workload: Workload, names: list[str], batch_size: int
) -> list[RequestRecord]:
    return run_peft_server(model, workload, names, batch_size, merge=True)


# The baselines by their ``--baselines`` name, and their labels in results.
BASELINES: dict[str, Baseline] = {
    "peft": run_peft_server,
    "peft-mixed": run_peft_mixed,
    "merge-swap": run_merge_swap,
}
LABELS = {"peft": "PEFT server", "peft-mixed": "PEFT mixed batches", "merge-swap": "merge-and-swap"}


def as_system(name: str, model_dir: Path, batch_size: int, warm: bool = False) -> System:
    """Baseline ``name`` as a :data:`~server.bench.replay.System`: it loads the model with the
    run's adapters in the engine's dtype (``warm``: then runs one short generate, untimed),
    replays, and frees the model before returning."""
    baseline = BASELINES[name]

    def replay(
        config: EngineConfig, workload: Workload, adapters: list[tuple[str, Path]]
    ) -> list[RequestRecord]:
        model = peft_model(model_dir, adapters, config.model.dtype)
        if warm:
            _warm_up(model)
        records = baseline(model, workload, [n for n, _ in adapters], batch_size)
        del model
        release_memory()
        return records

    return replay
