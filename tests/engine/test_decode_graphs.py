"""The static-shape decode path (what CUDA graphs capture), run eagerly on the CPU.

Padding a decode batch up to the next size of the ladder must change nothing: greedy tokens
equal the eager engine's for mixed-adapter and base batches at every size, and padded rows
touch only the scratch page.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLMEngine, SamplingParams, sizing
from engine.arch import ModelArch
from engine.config import EngineConfig
from engine.cuda_graph import (
    CAPTURE_LADDER,
    GraphShape,
    bucket_for,
    capture_sizes,
    graph_memory_bytes,
)
from engine.weight_memory import weight_bytes
from tests.tiny_models import make_adapter

LADDER_16 = (1, 2, 4, 8, 16)


def test_capture_sizes_follow_the_ladder_up_to_max_num_seqs() -> None:
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert capture_sizes(1) == (1,)
    assert capture_sizes(256)[-4:] == (96, 128, 192, 256)
    assert capture_sizes(64, (8, 1, 8, 100)) == (1, 8, 64)
    assert set(capture_sizes(10_000)) <= {*CAPTURE_LADDER, 10_000}
    with pytest.raises(ValueError):
        capture_sizes(8, (0, 4))


def test_bucket_is_the_smallest_size_that_holds_the_batch() -> None:
    sizes = capture_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 9, 17, 25, 33, 49, 64)] == [
        1, 2, 4, 8, 16, 24, 32, 48, 64, 64,
    ]  # fmt: skip
    assert bucket_for(65, sizes) is None


def _shape(sizes: tuple[int, ...], rank: int = 16) -> GraphShape:
    return GraphShape(
        hidden_size=4096,
        intermediate_size=11008,
        q_width=4096,
        kv_width=4096,
        max_lora_rank=rank,
        sizes=sizes,
        itemsize=2,
    )


def test_graph_memory_grows_with_the_largest_batch_and_the_rank() -> None:
    small, large = graph_memory_bytes(_shape((1, 2, 4))), graph_memory_bytes(_shape((1, 64)))
    assert 0 < small < large
    assert graph_memory_bytes(_shape((1, 64), rank=64)) > large
    # A 7B-shaped ladder up to 256 rows stays a small share of an H100.
    assert graph_memory_bytes(_shape(capture_sizes(256))) < 1 << 30


def test_graph_memory_is_set_aside_before_the_pool_is_sized(llama_dir: Path) -> None:
    # A device whose default budget, after the weights and the headroom, is about 60 MiB.
    weights = weight_bytes(llama_dir, torch.float32, "none")
    device_memory = int(((60 << 20) + weights + sizing.GPU_HEADROOM_BYTES) / 0.85)
    budget = int(device_memory * 0.85) - weights - sizing.GPU_HEADROOM_BYTES
    common = {
        "dtype": "float32",
        "device": "cuda",  # a config only: the device is never asked
        "device_memory": device_memory,
        "max_num_seqs": 256,
        "max_model_len": 256,
    }
    graphs = EngineConfig.create(llama_dir, **common)
    eager = EngineConfig.create(llama_dir, enforce_eager=True, **common)
    assert graphs.graphs.mode == "graphs" and eager.graphs.mode == "eager"
    arch = ModelArch.load(llama_dir)
    page = sizing.PageGeometry.of(arch, torch.float32).page_bytes
    shape = sizing.graph_shape(arch, torch.float32, 64, graphs.graphs.sizes)
    cap = 2 * 256 * 256 * page  # every sequence at full length: the pool never needs more
    set_aside = graph_memory_bytes(shape)
    assert budget - set_aside < cap < budget  # so the set-aside shows in the pool's size
    assert eager.cache.num_pages == cap // page
    assert graphs.cache.num_pages == (budget - set_aside) // page


def test_cpu_defaults_to_eager_and_static_is_asked_for(llama_dir: Path) -> None:
    cpu = {"num_pages": 64, "device": "cpu"}  # the CPU even where a GPU is
    assert EngineConfig.create(llama_dir, **cpu).graphs.mode == "eager"
    static = EngineConfig.create(llama_dir, **cpu, graph_mode="static", max_num_seqs=20)
    assert static.graphs.mode == "static" and static.graphs.sizes == (1, 2, 4, 8, 16, 20)
    forced = EngineConfig.create(llama_dir, **cpu, graph_mode="static", enforce_eager=True)
    assert forced.graphs.mode == "eager"
    with pytest.raises(ValueError, match="graph mode"):
        EngineConfig.create(llama_dir, **cpu, graph_mode="sometimes")


def test_graphs_fall_back_to_eager_without_cuda(llama_dir: Path) -> None:
    config = EngineConfig.create(llama_dir, num_pages=64, graph_mode="graphs", device="cpu")
    engine = LLMEngine(config)
    assert engine.runner.graphs is None


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-adapters")
    specs = {
        "r4-attn": {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "r8-all": {"r": 8, "alpha": 16, "targets": "all-linear"},
        "r2-mlp": {"r": 2, "alpha": 4, "targets": ["gate_proj", "up_proj", "down_proj"]},
    }
    return {
        name: make_adapter(llama_dir, root / name, seed=i, **spec)  # type: ignore[arg-type]
        for i, (name, spec) in enumerate(specs.items())
    }


def _engine(
    llama_dir: Path,
    adapters: dict[str, Path],
    mode: str,
    kernels: str | None = None,
    device: str | None = None,
) -> LLMEngine:
    config = EngineConfig.create(
        llama_dir, dtype="float32", num_pages=4096, max_num_seqs=16, graph_mode=mode, device=device
    )
    engine = LLMEngine(config, kernels=kernels)
    for name, path in adapters.items():
        engine.load_lora(name, path)
    return engine


def _generate(
    engine: LLMEngine, jobs: list[tuple[list[int], str | None]], max_tokens: int
) -> list[list[int]]:
    """All jobs at once: after their prefills, every step is a decode batch of len(jobs)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(jobs):
        engine.add_request(prompt, params, request_id=str(i), lora=adapter)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return [done[str(i)] for i in range(len(jobs))]


def _jobs(n: int, names: list[str | None], seed: int) -> list[tuple[list[int], str | None]]:
    """``n`` prompts of 2 to 40 tokens (so the first step is a prefill), adapters in turn."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(2, 40))] for _ in range(n)]
    return [(p, names[i % len(names)]) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("lora", [True, False], ids=["mixed-adapters", "base"])
def test_static_decode_equals_eager_at_every_ladder_size(
    llama_dir: Path, adapters: dict[str, Path], lora: bool
) -> None:
    eager = _engine(llama_dir, adapters, "eager")
    static = _engine(llama_dir, adapters, "static")
    graphs = static.runner.graphs
    assert graphs is not None and graphs.sizes == LADDER_16
    names: list[str | None] = [*adapters, None] if lora else [None]
    # Every size of the ladder, and sizes in between that pad (3 -> 4, 11 -> 16).
    for n in (1, 2, 3, 4, 5, 8, 11, 16):
        jobs = _jobs(n, names, seed=n)
        before = graphs.runs[bucket_for(n, LADDER_16), lora]
        assert _generate(static, jobs, 5) == _generate(eager, jobs, 5), n
        # Four decode steps after the prefill step, all on the padded path.
        assert graphs.runs[bucket_for(n, LADDER_16), lora] - before == 4, n
    assert eager.runner.graphs is None
    # The padding row still points at the scratch page only, which no request was lent.
    tables = static.runner.page_tables
    assert bool((tables.k[tables.pad_row] == static.pool.scratch_page).all())
    assert static.pool.num_free == eager.pool.num_free


def test_static_decode_equals_eager_with_the_triton_kernels(
    llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """The kernels graphs capture (under the interpreter): one segment per row, max rank."""
    eager = _engine(llama_dir, adapters, "eager", kernels="triton")
    static = _engine(llama_dir, adapters, "static", kernels="triton")
    jobs = _jobs(3, [*adapters, None], seed=42)  # padded to 4; every adapter and the base
    assert _generate(static, jobs, 3) == _generate(eager, jobs, 3)
    graphs = static.runner.graphs
    assert graphs is not None and graphs.runs[4, True] == 2


def test_prefill_and_mixture_steps_stay_eager(llama_dir: Path, adapters: dict[str, Path]) -> None:
    static = _engine(llama_dir, adapters, "static")
    static.register_mixture("mix", [("r4-attn", 0.5), ("r8-all", 0.5)])
    eager = _engine(llama_dir, adapters, "eager")
    eager.register_mixture("mix", [("r4-attn", 0.5), ("r8-all", 0.5)])
    jobs = _jobs(2, ["mix"], seed=3)
    assert _generate(static, jobs, 3) == _generate(eager, jobs, 3)
    graphs = static.runner.graphs
    assert graphs is not None and sum(graphs.runs.values()) == 0


def test_static_buffers_hold_the_padded_batch(llama_dir: Path, adapters: dict[str, Path]) -> None:
    """One (fields, largest size) int32 buffer; a batch of 3 fills 4 columns, the padding
    column pointing at the scratch page and the padding row, with no adapter."""
    static = _engine(llama_dir, adapters, "static", device="cpu")  # capture refuses the CPU
    graphs = static.runner.graphs
    assert graphs is not None
    assert graphs._static.shape == (7, 16) and graphs._static.dtype == torch.int32
    assert not graphs.captured
    _generate(static, _jobs(3, ["r8-all", None], seed=1), 2)
    scratch, pad_row = static.pool.scratch_page, static.runner.page_tables.pad_row
    assert scratch == static.pool.num_pages and static.pool.layers[0].shape[0] == scratch + 1
    assert graphs.new_k[3] == scratch and graphs.new_v[3] == scratch
    assert graphs.rows[3] == pad_row and graphs.seq_lens[3] == 1 and graphs.adapters[3] == -1
    slots = graphs.adapters[:3].tolist()
    assert slots == sorted(slots) and slots.count(-1) == 1  # grouped: base rows, then r8-all
    with pytest.raises(AssertionError, match="CUDA"):
        graphs.capture(progress=False)
