"""The default pool holds the startup adapters; a given pool too small for them is refused,
with the flag and the value that would do, before any weight loads.

`engine/sizing.py` sizes the startup adapters from their configs (``adapter_pages``); these
tests check those counts against the engine's own once the adapters load, start the demo
as ``loraserve serve --max-num-seqs 4`` builds it (the engine process's path, without the
process), and check that ``loraserve plan`` reports the same pool.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import engine.assembly
import server.serve
from adapters.footprint import adapter_pages
from engine import LLMEngine, SamplingParams
from engine.arch import ModelArch
from engine.config import DEMO_DIR, EngineConfig
from engine.plan import make_plan
from engine.sizing import (
    GPU_HEADROOM_BYTES,
    GPU_MEMORY_FRACTION,
    StartupAdapter,
    resident_at_once,
    size_pool,
)
from engine.weight_memory import weight_bytes
from server.cli import main
from server.engine_args import engine_config
from server.engine_core import build_from_spec
from server.engine_protocol import HEADER_BYTES, Hello, decode_to_engine, frame
from server.serve import engine_spec
from server.serve_args import add_serve_args, lora_modules
from tests.peft_kinds import make_kind_adapter
from tests.tiny_models import make_model

DEMO_MODEL = DEMO_DIR / "model"
# What each demo adapter makes of "LoRA4all=" (examples/demo/tasks.py); the base copies.
ANSWERS = {
    "upper": "LORA4ALL",
    "swapcase": "lOra4ALL",
    "caesar": "OrUD4doo",
    "reverse": "lla4ARoL",
    "lower": "lora4all",
}
# The demo's adapters at start-up (model len 128, so one request's KV is 256 pages): reverse
# (rank 32 on every linear layer) is the largest.
REVERSE_PAGES = 32 * 38  # q, o: 2 + 2; k, v: 2 + 1; gate, up: 2 + 6; down: 6 + 2
FLOOR = 2 * 128 + REVERSE_PAGES


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(argv)


def demo_startup() -> list[tuple[str, Path]]:
    modules = lora_modules(parse())
    if sorted(name for name, _ in modules) != sorted(ANSWERS):
        pytest.skip("the demo adapters are not all trained yet")
    return modules


def layout_and_width(model_dir: Path) -> tuple[Any, int]:
    arch = ModelArch.load(model_dir)
    return arch.layout(), arch.kv_width


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    """A tiny Llama and a tied Mistral, and a PEFT adapter of every kind beyond plain LoRA
    (the demo's cover LoRA and prefix tuning)."""
    root = tmp_path_factory.mktemp("kinds")
    llama, mistral = make_model(root / "llama", "llama"), make_model(root / "mistral", "mistral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on pruned AdaLoRA keys, tied heads
        adapters = {
            "dora": make_kind_adapter(llama, root / "dora", "dora", seed=1, r=4),
            "adalora": make_kind_adapter(llama, root / "ada", "adalora", seed=2, prune=True),
            "ia3": make_kind_adapter(llama, root / "ia3", "ia3", seed=3),
            "prompt": make_kind_adapter(llama, root / "prompt", "prompt_tuning", seed=4),
            "embed_head": make_kind_adapter(
                llama, root / "eh", "lora_embed_head", seed=5, with_attention=True
            ),
            "tied": make_kind_adapter(
                mistral, root / "tied", "lora_embed_head", seed=6, ensure_weight_tying=True
            ),
        }
    return llama, mistral, adapters


def test_config_pages_are_the_pages_each_kind_takes_once_loaded(
    kinds: tuple[Path, Path, dict[str, Path]],
) -> None:
    """``adapter_pages`` reads configs (and AdaLoRA's and IA³'s safetensors headers), never a
    tensor, and counts what the residency counts once the adapter is loaded."""
    llama, mistral, adapters = kinds
    cases = [(DEMO_MODEL, name, path) for name, path in demo_startup()]
    cases += [(mistral if name == "tied" else llama, name, path) for name, path in adapters.items()]
    engines = {
        model: LLMEngine(EngineConfig.create(model, num_pages=20_000, device="cpu"))
        for model in (DEMO_MODEL, llama, mistral)
    }
    for model, name, path in cases:
        layout, width = layout_and_width(model)
        engines[model].load_lora(name, path)
        loaded = engines[model].adapters.get(name).pages
        assert adapter_pages(path, layout, width, max_lora_rank=64) == loaded, name
    layout, width = layout_and_width(DEMO_MODEL)
    assert adapter_pages(DEMO_DIR / "adapters" / "reverse", layout, width, 64) == REVERSE_PAGES


def test_the_default_pool_holds_every_demo_adapter_beside_the_sequences() -> None:
    """``serve --max-num-seqs 4`` on the demo: four full-length sequences beside all five
    startup adapters (it was four sequences alone, too small for reverse)."""
    args = parse("--max-num-seqs", "4")
    sizing = engine_config(args, None, 0, demo_startup()).cache.sizing
    assert sizing is not None
    pages = {a.name: a.pages for a in sizing.startup_adapters}
    assert pages["reverse"] == max(pages.values()) == REVERSE_PAGES
    assert sizing.num_pages == 2 * 128 * 4 + sum(pages.values())
    assert sizing.floor_pages == FLOOR
    # Without startup adapters the pool is what it was: the sequences alone.
    assert engine_config(args, None).cache.num_pages == 2 * 128 * 4


def test_the_cpu_default_rises_to_the_floor() -> None:
    """The CPU's 1 GiB is a default, not a limit: a startup adapter larger than that still
    gets a pool holding it beside one full-length request."""
    big = [StartupAdapter("big", 3 << 20)]  # 3 Mi pages of 1 KiB: 3 GiB
    raised = size_pool(
        model_dir=DEMO_MODEL, arch=ModelArch.load(DEMO_MODEL), dtype=torch.float32,
        quantization="none", load_format="auto", device_memory=None, graph_mode="eager",
        graph_sizes=(), max_lora_rank=64, max_model_len=128, max_num_seqs=1, startup_adapters=big,
    )  # fmt: skip
    assert raised.budget == 1 << 30 and raised.num_pages == raised.floor_pages == 256 + (3 << 20)


def test_serve_max_num_seqs_4_starts_and_answers_on_every_demo_adapter() -> None:
    """The engine the engine process builds from ``serve --max-num-seqs 4``'s spec (encoded
    and decoded as it travels) loads the five demo adapters and answers on each."""
    args = parse("--max-num-seqs", "4")
    spec = engine_spec(args, demo_startup())
    hello = decode_to_engine(frame(Hello("token", spec))[HEADER_BYTES:])
    assert isinstance(hello, Hello)
    built = build_from_spec(hello.spec)
    try:
        assert sorted(built.adapters.registry.names()) == sorted(ANSWERS)
        params = SamplingParams(temperature=0.0, max_tokens=16)
        ids = {built.add_request("LoRA4all=", params, lora=name): name for name in ANSWERS}
        texts: dict[str, str] = {}
        while built.has_unfinished():
            for out in built.step():
                if out.finished:
                    texts[ids[out.request_id]] = out.text
        assert texts == ANSWERS
        built.check_integrity()
    finally:
        built.shutdown()


def test_a_ray_replica_sizes_its_pool_for_the_adapters_it_loads_on_demand() -> None:
    """A spec with ``sized_for`` (a Ray replica's: the startup adapters, loaded later by the
    multiplexer) gives the pool the same floor as one server's, and loads nothing."""
    args = parse("--max-num-seqs", "4")
    spec = engine_spec(args, [], (), demo_startup())
    hello = decode_to_engine(frame(Hello("token", spec))[HEADER_BYTES:])
    assert isinstance(hello, Hello)
    built = build_from_spec(hello.spec)
    try:
        assert built.adapters.registry.names() == []
        served = engine_config(args, None, 0, demo_startup()).cache
        assert built.config.cache.num_pages == served.num_pages
        assert built.config.cache.sizing is not None
        assert built.config.cache.sizing.floor_pages == FLOOR
    finally:
        built.shutdown()


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any load of the base's weights, or start of an engine or its process, fails the test."""

    def refuse(*_: object, **__: object) -> Any:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(engine.assembly, "load_model", refuse)
    monkeypatch.setattr(server.serve, "LLMEngine", refuse)
    monkeypatch.setattr(server.serve.EngineProcess, "spawn", refuse)


@pytest.mark.usefixtures("no_weights")
def test_a_given_pool_too_small_is_refused_naming_the_flag_before_weights_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_startup()
    # The command line: refused in the API process, before an engine process starts.
    assert main(["serve", "--num-pages", "100"]) == 2
    err = capsys.readouterr().err
    assert f"adapter reverse: the adapter needs {REVERSE_PAGES} pages" in err
    assert "--max-model-len 128" in err
    assert f"--num-pages 100 cannot hold them: pass --num-pages {FLOOR} or more" in err
    assert main(["serve", "--pool-memory", "100000"]) == 2
    page_bytes = 4 * 64 * 4  # layers × KV width × float32
    assert f"pass --pool-memory {FLOOR * page_bytes} or more" in capsys.readouterr().err
    # The engine process's own build refuses it the same way (a spec sent as it is).
    spec = engine_spec(parse("--num-pages", "100"), demo_startup())
    with pytest.raises(ValueError, match=f"pass --num-pages {FLOOR} or more"):
        build_from_spec(spec)


@pytest.mark.usefixtures("no_weights")
def test_the_floor_holds_the_pins_and_max_loras_largest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    adapters = [StartupAdapter("a", 10), StartupAdapter("b", 30, pinned=True)]
    adapters += [StartupAdapter("c", 20), StartupAdapter("d", 5)]
    assert [a.name for a in resident_at_once(adapters, None)] == ["c", "b"]
    assert [a.name for a in resident_at_once(adapters, 2)] == ["c", "a", "b"]
    assert resident_at_once([], 4) == ()
    # Pinned upper, two adapters a step: reverse, caesar and upper resident at once.
    argv = ["serve", "--num-pages", "2000", "--max-loras", "2", "--pinned-lora-modules", "upper"]
    demo_startup()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "adapters reverse, caesar, upper (pinned): resident at once they need" in err
    assert "pass --num-pages 2136 or more" in err  # 256 + 1216 + 608 + 56
    startup = dict(demo_startup())
    ok = engine_config(parse("--num-pages", "2136", "--max-loras", "2"), None, 0, [
        ("reverse", startup["reverse"]), ("caesar", startup["caesar"]),
        ("upper", startup["upper"]),
    ], ["upper"])  # fmt: skip
    assert ok.cache.num_pages == 2136


def test_a_gpu_default_below_the_floor_is_refused() -> None:
    """On a GPU the default pool is what its memory leaves; when that is below the floor the
    config is refused (no GPU is asked: the memory is given)."""
    weights = weight_bytes(DEMO_MODEL, torch.float32, "none")
    leaves = 1000 * 1024  # 1000 pages of the demo's 1 KiB

    def memory(budget: int) -> int:
        return int((budget + weights + GPU_HEADROOM_BYTES) / GPU_MEMORY_FRACTION) + 1

    options: dict[str, Any] = {"device": "cuda", "enforce_eager": True, "max_num_seqs": 4}
    options["lora_modules"] = demo_startup()
    with pytest.raises(ValueError, match=r"adapter reverse: .* room for 1000 pages") as e:
        EngineConfig.create(DEMO_MODEL, device_memory=memory(leaves), **options)
    assert "--max-model-len" in str(e.value)
    roomy = EngineConfig.create(DEMO_MODEL, device_memory=memory(100 * leaves), **options)
    assert roomy.cache.num_pages == 2 * 128 * 4 + sum(
        p.pages
        for p in roomy.cache.sizing.startup_adapters  # type: ignore[union-attr]
    )


def test_plan_sizes_the_pool_serve_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """``loraserve plan`` counts the demo's startup adapters as ``serve`` does: the same
    pool on the CPU, and on a GPU of a given memory."""
    startup = demo_startup()
    served = engine_config(parse("--max-num-seqs", "4"), None, 0, startup).cache
    planned = make_plan(None, max_num_seqs=4, lora_modules=startup)  # this machine's device
    assert planned.pool == served.sizing
    argv = ["plan", "--max-num-seqs", "4", "--gpu-memory", "80GiB", "--enforce-eager"]
    assert main([*argv, "--json"]) == 0
    pool = json.loads(capsys.readouterr().out)["pool"]
    gpu = EngineConfig.create(
        None, device="cuda", device_memory=80 << 30, max_num_seqs=4, enforce_eager=True,
        lora_modules=startup,
    )  # fmt: skip
    assert pool["num_pages"] == gpu.cache.num_pages == served.num_pages
    assert pool["floor_pages"] == FLOOR
    assert {a["name"] for a in pool["startup_adapters"]} == set(ANSWERS)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "startup      5 adapters" in text and f"at least {FLOOR:,} pages" in text
