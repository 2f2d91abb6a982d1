"""Adapter placement as a runner command: the scheduler writes no device memory, the runner
writes every placement in order, and only the engine thread touches the residency."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.errors import AdapterError
from adapters.placement import Placement
from adapters.residency import AdapterResidency
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.scheduler_output import ChunkResult, SchedulerOutput
from kernels.lora import read_rows
from tests.engine.test_generation import random_prompts
from tests.engine.test_multilora import peft_greedy
from tests.tiny_models import make_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# On the tiny Llama (hidden 64, intermediate 160, page width 16) a rank-r adapter takes 26r
# pages on the attention projections and 68r on all linear layers.
SPECS: list[dict[str, Any]] = [
    {"r": 2 + i % 3, "alpha": 8, "targets": ATTN if i % 2 else "all-linear"} for i in range(10)
]


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("placement-adapters")
    return {
        f"a{i}": make_adapter(llama_dir, root / f"a{i}", seed=i, std=0.2, **spec)
        for i, spec in enumerate(SPECS)
    }


def device_state(engine: LLMEngine) -> list[torch.Tensor]:
    """Copies of every device tensor a placement writes: the pool and the LoRA tables."""
    tables = engine.adapters.residency.tables
    tensors = [*engine.pool.layers, tables.ranks, tables.scalings]
    tensors += [*tables.a_pages.values(), *tables.b_pages.values()]
    return [t.clone() for t in tensors]


def record_steps(engine: LLMEngine, before_execute: Callable[[SchedulerOutput], None]) -> None:
    """Call ``before_execute`` with each step's output between schedule and execute."""
    execute = engine.runner.execute

    def recording(output: SchedulerOutput) -> dict[str, ChunkResult]:
        before_execute(output)
        return execute(output)

    engine.runner.execute = recording  # type: ignore[method-assign]


def assert_in_pool(engine: LLMEngine, name: str) -> None:
    """The adapter's weights read back from its pages equal its lora_a and lora_b."""
    engine.runner.placements.wait()  # on CUDA, a prefetched adapter's copy may be in flight
    manager = engine.adapters
    entry = manager.get(name)
    weights = manager.weights_of(entry)
    resident = manager.residency.get(entry.id)
    assert resident is not None
    tables = manager.residency.tables
    for (layer, target), module in weights.modules.items():
        pool = engine.pool.layers[layer]
        rank = module.rank
        a_pages = tables.a_pages[target][resident.slot, :rank]
        b_pages = tables.b_pages[target][resident.slot, :rank]
        lora_a = read_rows(pool, a_pages, module.lora_a.shape[1]).cpu()
        lora_b_t = read_rows(pool, b_pages, module.lora_b.shape[0]).cpu()
        assert torch.equal(lora_a, module.lora_a.to(pool.dtype))
        assert torch.equal(lora_b_t, module.lora_b.t().to(pool.dtype))
    assert torch.equal(tables.ranks[resident.slot].cpu(), tables.host_ranks[resident.slot])
    assert torch.equal(tables.scalings[resident.slot].cpu(), tables.host_scalings[resident.slot])


def test_schedule_writes_no_device_memory(llama_dir: Path, adapters: dict[str, Path]) -> None:
    """One request is admitted (its adapter placed) and the next one's adapter is prefetched,
    in one schedule that leaves the pool and the tables byte for byte as they were; the
    runner then writes both adapters."""
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", max_num_seqs=1))
    for name in ("a0", "a1"):
        engine.load_lora(name, adapters[name])
    engine.add_request([5, 6, 7], GREEDY, request_id="first", lora="a0")
    engine.add_request([8, 9], GREEDY, request_id="second", lora="a1")
    before = device_state(engine)
    outputs: list[SchedulerOutput] = []
    # Checked between schedule and execute, asserted after the step (an assert inside it
    # would fail the step, not the test).
    unchanged: list[bool] = []

    def check(output: SchedulerOutput) -> None:
        if not outputs:
            after = device_state(engine)
            unchanged.append(all(torch.equal(b, a) for b, a in zip(before, after, strict=True)))
        outputs.append(output)

    record_steps(engine, check)
    engine.step()
    assert unchanged == [True]
    (first,) = outputs
    ids = [engine.adapters.get(n).id for n in ("a0", "a1")]
    assert [p.adapter_id for p in first.placements] == ids  # admitted, then prefetched
    assert [c.request_id for c in first.chunks] == ["first"]
    assert engine.runner.placements.num_applied == 2
    for name in ("a0", "a1"):
        assert_in_pool(engine, name)
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
    assert engine.runner.placements.num_applied == 2  # "second" found its adapter resident


def test_placements_evicted_in_the_same_schedule_are_dropped(
    llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """An adapter placed and evicted before the runner applies it leaves no placement; the
    slot and pages, handed to the next adapter, receive only that adapter's weights."""
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", max_resident_loras=1))
    residency = engine.adapters.residency
    weights = {}
    for name in ("a0", "a1"):
        engine.load_lora(name, adapters[name])
        weights[name] = engine.adapters.weights_of(engine.adapters.get(name))
    ids = {name: engine.adapters.get(name).id for name in weights}
    before = device_state(engine)
    gone = residency.place(ids["a0"], weights["a0"].modules)
    residency.evict(ids["a0"])
    kept = residency.place(ids["a1"], weights["a1"].modules)
    assert kept.slot == gone.slot and set(kept.pages) <= set(gone.pages)  # reused at once
    assert all(torch.equal(b, a) for b, a in zip(before, device_state(engine), strict=True))
    placements = engine.adapters.take_placements()
    assert [p.adapter_id for p in placements] == [ids["a1"]]
    assert engine.adapters.take_placements() == ()
    engine.runner.placements.apply(placements, [kept.slot])
    assert_in_pool(engine, "a1")
    engine.check_integrity()


def churn_jobs() -> list[tuple[list[int], str | None]]:
    prompts = random_prompts(30, seed=11)
    names: list[str | None] = [*(f"a{i}" for i in range(len(SPECS))), None]
    return [(prompts[i][:12], names[(7 * i) % len(names)]) for i in range(30)]


def run_jobs(
    engine: LLMEngine, jobs: list[tuple[list[int], str | None]], per_step: int = 3
) -> dict[str, list[int]]:
    pending = list(enumerate(jobs))
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, lora) in pending[:per_step]:
            engine.add_request(prompt, GREEDY, request_id=str(i), lora=lora)
        pending = pending[per_step:]
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length", out.error
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return done


def test_churn_reuses_slots_and_pages_exactly(llama_dir: Path, adapters: dict[str, Path]) -> None:
    """Ten adapters through four slots and a pool that holds about three: slots and pages
    are evicted and placed again step after step, and every request generates what it
    generates alone through PEFT."""
    engine = LLMEngine(
        EngineConfig.create(llama_dir, dtype="float32", num_pages=600, max_resident_loras=4)
    )
    for name, path in adapters.items():
        engine.load_lora(name, path)
    placed: list[Placement] = []
    record_steps(engine, lambda output: placed.extend(output.placements))
    jobs = churn_jobs()
    done = run_jobs(engine, jobs)
    expected = peft_greedy(llama_dir, adapters, jobs, GREEDY.max_tokens)
    assert [done[str(i)] for i in range(len(jobs))] == expected
    residency = engine.adapters.residency
    assert residency.num_evicted >= len(SPECS)
    assert engine.runner.placements.num_applied == len(placed) == residency.num_placed
    tenants: dict[int, set[int]] = {}
    for p in placed:
        tenants.setdefault(p.slot, set()).add(p.adapter_id)
    assert len(tenants) <= 4 and max(len(ids) for ids in tenants.values()) >= 3


def test_a_failed_step_forgets_what_it_placed(llama_dir: Path, adapters: dict[str, Path]) -> None:
    """When the runner fails before writing a placement, the adapter does not stay
    "resident" on unwritten pages: the next request places and writes it again."""
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    engine.load_lora("a2", adapters["a2"])
    apply = engine.runner.placements.apply

    def failing(placements: Any, used_slots: Any) -> None:
        engine.runner.placements.apply = apply  # type: ignore[method-assign]
        raise RuntimeError("injected")

    engine.runner.placements.apply = failing  # type: ignore[method-assign]
    engine.add_request([5, 6, 7], GREEDY, request_id="failed", lora="a2")
    (out,) = engine.step()
    assert out.finished and out.error_code == "engine_error"
    assert engine.adapters.get("a2").id not in engine.adapters.residency
    engine.check_integrity()
    again = run_jobs(engine, [([5, 6, 7], "a2")])
    assert again["0"] == peft_greedy(llama_dir, adapters, [([5, 6, 7], "a2")], 5)[0]
    assert_in_pool(engine, "a2")


def test_fit_is_checked_against_a_fixed_capacity(
    llama_dir: Path, tmp_path: Path, adapters: dict[str, Path]
) -> None:
    """Loading refuses only what could never fit (the pool less one token's KV pages), not
    what does not fit while the KV cache is busy; that waits for room on the engine thread.
    A mixture too large is refused at registration, even with its components on disk (an
    entry's pages are fixed when it is loaded)."""
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", num_pages=300))
    big = make_adapter(llama_dir, tmp_path / "big", r=8, alpha=8, targets=ATTN, seed=1)  # 208
    huge = make_adapter(llama_dir, tmp_path / "huge", r=12, alpha=8, targets=ATTN, seed=2)
    assert engine.adapters.max_adapter_pages == 298
    with pytest.raises(AdapterError) as info:
        engine.load_lora("huge", huge)  # 312 pages
    assert info.value.code == "adapter_too_large"
    long_run = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    engine.add_request(list(range(5, 65)), long_run, request_id="busy")
    engine.step()
    assert engine.pool.num_free < 208  # the old, time-dependent check refused here
    engine.load_lora("big", big)
    engine.add_request([5, 6, 7], GREEDY, request_id="waits", lora="big")
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        engine.check_integrity()
    assert done["waits"].finish_reason == "length"
    assert (
        done["waits"].token_ids == peft_greedy(llama_dir, {"big": big}, [([5, 6, 7], "big")], 5)[0]
    )

    engine.load_lora("big2", big)
    for name in ("big", "big2"):
        engine.adapters.host_cache.drop(engine.adapters.get(name).id)
    with pytest.raises(AdapterError) as info:
        engine.register_mixture("both", [("big", 1.0), ("big2", 1.0)])  # 416 pages
    assert info.value.code == "adapter_too_large"
    assert not engine.has_unfinished()


# -- the residency race ------------------------------------------------------------------


class ThreadRecorder:
    """The threads that touched the recorded objects."""

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.calls = 0

    def note(self) -> None:
        self.threads.add(threading.get_ident())
        self.calls += 1

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.note()
            return fn(*args, **kwargs)

        return recorded

    def subclass(self, base: type, names: list[str] | None = None) -> type:
        """A subclass of ``base`` whose methods and properties (or ``names``) record."""
        namespace: dict[str, Any] = {}
        for name, attr in vars(base).items():
            if names is not None and name not in names:
                continue
            if isinstance(attr, property) and attr.fget is not None:
                namespace[name] = property(self.wrap(attr.fget))
            elif callable(attr) and name != "__init__":
                namespace[name] = self.wrap(attr)
        for name in names or []:
            if name not in namespace:
                namespace[name] = self.wrap(getattr(base, name))
        return type(f"Recorded{base.__name__}", (base,), namespace)


CONTAINER_METHODS = [
    "__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "__len__",
    "get", "pop", "popitem", "values", "items", "keys", "move_to_end",
]  # fmt: skip


def record_residency(residency: AdapterResidency, recorder: ThreadRecorder) -> None:
    """Make every method of the residency, its resident map, its free slots and its page
    lender note the calling thread."""
    dict_type = recorder.subclass(OrderedDict, CONTAINER_METHODS)
    list_type = recorder.subclass(list, ["__getitem__", "__iter__", "__len__", "pop", "append"])
    residency._resident = dict_type(residency._resident)
    residency._free_slots = list_type(residency._free_slots)
    residency.pages.__class__ = recorder.subclass(type(residency.pages))
    residency.__class__ = recorder.subclass(AdapterResidency)


def test_only_the_engine_thread_touches_residency(
    llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """Worker threads load, register (from files, from memory, as a mixture) and unload
    adapters while the engine steps through a pool too small for them all; every access to
    the residency comes from the stepping thread, and every request generates what it does
    in a roomy engine."""
    config = EngineConfig.create(llama_dir, dtype="float32", num_pages=600, max_resident_loras=4)
    engine = LLMEngine(config)
    recorder = ThreadRecorder()
    record_residency(engine.adapters.residency, recorder)
    names = list(adapters)
    engine.load_lora(names[0], adapters[names[0]])
    engine.load_lora(names[1], adapters[names[1]])
    in_memory = engine.adapters.weights_of(engine.adapters.get(names[0]))  # as a new adapter
    errors: list[BaseException] = []

    def worker(job: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                job()
            except BaseException as e:  # reported by the test, not lost in the thread
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def load_half(half: list[str]) -> Callable[[], None]:
        def job() -> None:
            for name in half:
                engine.load_lora(name, adapters[name])
                engine.load_lora(f"{name}-spare", adapters[name])
                engine.unload_lora(f"{name}-spare")

        return job

    def register_others() -> None:
        engine.load_lora_weights("memory", in_memory)
        engine.register_mixture("mix", [(names[0], 0.5), (names[1], -0.7)])
        engine.load_lora("temporary", adapters[names[3]])
        engine.unload_lora("temporary")

    threads = [
        worker(load_half(names[2:6])),
        worker(load_half(names[6:])),
        worker(register_others),
    ]
    wanted = [*names, "memory", "mix"]
    prompts = random_prompts(2 * len(wanted), seed=4)
    jobs: list[tuple[list[int], str]] = []
    done: dict[str, list[int]] = {}
    for _ in range(100_000):
        if not any(t.is_alive() for t in threads) and len(jobs) == 2 * len(wanted):
            break
        loaded = set(engine.adapters.registry.names())
        for name in wanted:
            if name in loaded and sum(lora == name for _, lora in jobs) < 2:
                jobs.append((prompts[len(jobs)][:10], name))
                engine.add_request(jobs[-1][0], GREEDY, request_id=str(len(jobs) - 1), lora=name)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    for thread in threads:
        thread.join()
    assert not errors, errors
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()

    assert recorder.calls > 0 and recorder.threads == {threading.get_ident()}
    assert engine.adapters.residency.num_evicted > 0  # the pool did churn
    assert set(engine.adapters.registry.names()) == set(wanted)
    roomy = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    for name in names:
        roomy.load_lora(name, adapters[name])
    roomy.load_lora_weights("memory", in_memory)
    roomy.register_mixture("mix", [(names[0], 0.5), (names[1], -0.7)])
    assert run_jobs(roomy, jobs) == done
    assert len(done) == len(jobs) == 2 * len(wanted)
