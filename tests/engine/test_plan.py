"""``loraserve plan`` (engine/plan.py) against what the engine allocates at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import LLMEngine
from engine.arch import ModelArch
from engine.config import DEMO_DIR, EngineConfig
from engine.cuda_graph import capture_sizes, graph_memory_bytes
from engine.export import quantize_checkpoint
from engine.plan import make_plan, parse_size
from engine.quantization import quantize_nf4
from engine.sizing import graph_shape
from kernels.nf4 import nf4_nbytes
from server.cli import main
from server.plan_cli import format_plan
from tests.tiny_models import make_model, write_random_adapter

PRESET_7B = Path(__file__).resolve().parents[2] / "benchmarks" / "presets" / "llama-2-7b"
GIB = 1 << 30


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen2 (q/k/v biases) and a rank-8 adapter on three of its layers."""
    root = tmp_path_factory.mktemp("plan")
    model = make_model(root / "model", "qwen2")
    config = json.loads((model / "config.json").read_text())
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "v_proj": (hidden, kv), "down_proj": (mlp, hidden)}
    adapter = write_random_adapter(
        root / "adapter", shapes, config["num_hidden_layers"], r=8, alpha=16, seed=0
    )
    return model, adapter


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("family", ["demo", "qwen2"])
def test_plan_matches_engine_startup(
    family: str, quantization: str, qwen2: tuple[Path, Path]
) -> None:
    if family == "demo":  # rank 4 on the attention's four layers
        model, adapter, rank, targets = DEMO_DIR / "model", DEMO_DIR / "adapters" / "upper", 4, 4
    else:
        (model, adapter), rank, targets = qwen2, 8, 3
    # The CPU default pool (1 GiB), as the engine sizes it there.
    plan = make_plan(
        model, quantization=quantization, device="cpu", adapter_dirs=[adapter], ranks=[rank]
    )
    engine = LLMEngine(EngineConfig.create(model, quantization=quantization, device="cpu"))
    assert plan.pool.source == "cpu"
    assert abs(plan.pool.num_pages - engine.pool.num_pages) <= 1
    assert plan.pool.page_bytes == engine.pool.page_bytes
    assert plan.weights.bytes == engine.weights.base_bytes
    assert plan.weights.quantized_params == engine.weights.quantized_params
    if quantization == "nf4":
        assert plan.weights.quantized_bits_per_param == engine.weights.bits_per_param
    assert plan.geometry.kv_bytes_per_token == 2 * engine.pool.page_bytes
    engine.load_lora("a", adapter)
    (planned,) = [a for a in plan.adapters if a.name == adapter.name]
    assert planned.pages == engine.adapters.get("a").pages
    assert (planned.rank, len(planned.targets)) == (rank, targets)
    # A rank of the grid on those targets costs what that adapter costs.
    grid = make_plan(model, num_pages=64, device="cpu", ranks=[rank], targets=planned.targets)
    assert grid.adapters[0].pages == planned.pages


def test_plan_with_a_pool_size_matches_engine(qwen2: tuple[Path, Path]) -> None:
    model, _ = qwen2
    plan = make_plan(model, pool_memory=3_000_000, device="cpu")
    engine = LLMEngine(EngineConfig.create(model, pool_memory=3_000_000, device="cpu"))
    assert plan.pool.num_pages == engine.pool.num_pages == 3_000_000 // engine.pool.page_bytes
    assert make_plan(model, num_pages=77, device="cpu").pool.num_pages == 77


@pytest.fixture(scope="module")
def plans_7b() -> dict[str, dict[str, object]]:
    """The 7B preset's plans on an 80 GiB GPU, bf16 and NF4 (JSON), from config.json alone."""
    return {
        q: make_plan(
            PRESET_7B, device_memory=80 * GIB, dtype="bfloat16", load_format="dummy", quantization=q
        ).to_json()
        for q in ("none", "nf4")
    }


def test_7b_plan_is_what_create_computes(plans_7b: dict[str, dict[str, object]]) -> None:
    pool_memory = 40 * GIB
    config = EngineConfig.create(
        PRESET_7B, load_format="dummy", dtype="bfloat16", pool_memory=pool_memory, device="cpu"
    )
    planned = make_plan(
        PRESET_7B,
        load_format="dummy",
        dtype="bfloat16",
        pool_memory=pool_memory,
        device="cpu",
        ranks=[16],
    )
    page_bytes = 32 * 4096 * 2  # layers × KV heads · head dim × bf16
    assert planned.pool.page_bytes == page_bytes
    assert planned.pool.num_pages == config.cache.num_pages == pool_memory // page_bytes
    assert planned.geometry.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    # Rank 16 on all seven linears: 16 × (q, k, v, o: 1 + 1; gate, up: 1 + 3; down: 3 + 1).
    assert planned.adapters[0].pages == 16 * (4 * 2 + 3 * 4)

    # On an 80 GiB GPU: the config EngineConfig.create builds for that memory, and the
    # formula written out.
    for quantization, plan in plans_7b.items():
        config = EngineConfig.create(
            PRESET_7B,
            load_format="dummy",
            dtype="bfloat16",
            quantization=quantization,
            device="cuda",  # a config only: nothing is allocated, no GPU is asked
            device_memory=80 * GIB,
        )
        pool, weights = plan["pool"], plan["weights"]
        assert isinstance(pool, dict) and isinstance(weights, dict)
        assert pool["num_pages"] == config.cache.num_pages
        arch = ModelArch.load(PRESET_7B)
        graphs = graph_memory_bytes(graph_shape(arch, torch.bfloat16, 64, capture_sizes(64)))
        assert pool["graph_bytes"] == graphs > 0
        budget = int(80 * GIB * 0.85) - weights["bytes"] - GIB - graphs
        assert pool["num_pages"] == budget // page_bytes
    none, nf4 = plans_7b["none"]["weights"], plans_7b["nf4"]["weights"]
    assert isinstance(none, dict) and isinstance(nf4, dict)
    assert none["params"] == nf4["params"] == 6_738_415_616
    assert none["bytes"] == 2 * 6_738_415_616
    # QLoRA's 4 + 8/64 + 32/(64·256) = 4.127 bits, plus each weight's two code tables.
    assert nf4["quantized_bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    assert 4.127 <= nf4["quantized_bits_per_param"] < 4.128


@pytest.mark.parametrize("shape", [(64, 64), (3, 100), (5, 4097)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_nbytes_is_the_weights_bytes(shape: tuple[int, int], double_quant: bool) -> None:
    weight = quantize_nf4(torch.randn(shape), double_quant=double_quant)
    assert nf4_nbytes(shape[0] * shape[1], nested=double_quant) == weight.nbytes


def test_plan_cli_prints_the_table_and_json(
    capsys: pytest.CaptureFixture[str], plans_7b: dict[str, dict[str, object]]
) -> None:
    args = ["plan", str(PRESET_7B), "--gpu-memory", "80GiB", "--dtype", "bfloat16"]
    assert main([*args, "--load-format", "dummy", "--quantization", "nf4"]) == 0
    text = capsys.readouterr().out
    pool = plans_7b["nf4"]["pool"]
    assert isinstance(pool, dict)
    for line in (
        "weights      6,738,415,616 params",
        "4.127 bits/param",
        f"pool         {pool['num_pages']:,} pages × 256.00 KiB",
        "KV/token     512.00 KiB = 2 × 32 layers × 32 KV heads × 128 head dim × 2 bytes",
        "rank 64",
        "resident adapters → tokens of context that still fit",
    ):
        assert line in text
    assert main([*args, "--ranks", "8", "--targets", "q_proj,v_proj", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pool"]["num_pages"] == plans_7b["none"]["pool"]["num_pages"]  # type: ignore[index]
    (adapter,) = out["adapters"]
    assert adapter["targets"] == ["q_proj", "v_proj"] and adapter["pages"] == 8 * 2 * 2
    assert adapter["fits"][0] == {"adapters": 1, "tokens": (out["pool"]["num_pages"] - 32) // 2}


def test_plan_cli_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", str(PRESET_7B)]) == 2
    assert "pass --gpu-memory" in capsys.readouterr().err
    assert main(["plan", str(PRESET_7B), "--gpu-memory", "80GiB", "--ranks", "128"]) == 2
    assert "--max-lora-rank 64" in capsys.readouterr().err


def test_parse_size() -> None:
    assert parse_size("80GiB") == 80 * GIB
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("1.5MiB") == 3 << 19
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("80 gigs")


def test_format_plan_names_the_source(qwen2: tuple[Path, Path]) -> None:
    text = format_plan(make_plan(qwen2[0], num_pages=64, device="cpu"))
    assert "64 pages" in text and "--num-pages" in text


def test_plan_sizes_a_directory_of_adapters_as_the_engine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every demo adapter (LoRA of several ranks and targets, prefix tuning) takes the pages
    the plan says once loaded."""
    adapters = DEMO_DIR / "adapters"
    assert main(["plan", "--num-pages", "5000", "--adapters", str(adapters), "--json"]) == 0
    planned = {a["name"]: a for a in json.loads(capsys.readouterr().out)["adapters"]}
    engine = LLMEngine(EngineConfig.create(DEMO_DIR / "model", num_pages=5000, device="cpu"))
    names = sorted(p.name for p in adapters.iterdir() if p.is_dir())
    assert names and set(names) < set(planned)
    for name in names:
        engine.load_lora(name, adapters / name)
        assert planned[name]["pages"] == engine.adapters.get(name).pages, name


def test_readme_shows_the_7b_plan() -> None:
    """The README's bf16 example is this code's output, line for line."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = "$ loraserve plan benchmarks/presets/llama-2-7b --load-format dummy "
    shown = readme.split(command, 1)[1].split("\n", 1)[1].split("```", 1)[0].rstrip("\n")
    plan = make_plan(PRESET_7B, device_memory=80 * GIB, dtype="bfloat16", load_format="dummy")
    assert shown == format_plan(plan)


def test_plan_of_a_stored_nf4_checkpoint(qwen2: tuple[Path, Path], tmp_path: Path) -> None:
    """A checkpoint stored in 4 bits counts from its quant states as the engine loads it."""
    stored = tmp_path / "nf4"
    quantize_checkpoint(qwen2[0], stored, torch.float32, torch.device("cpu"))
    plan = make_plan(stored, device="cpu")
    engine = LLMEngine(EngineConfig.create(stored, device="cpu"))
    assert plan.quantization == "nf4" and plan.pool.num_pages == engine.pool.num_pages
    assert plan.weights.bytes == engine.weights.base_bytes
    assert plan.weights.quantized_params == engine.weights.quantized_params
    assert plan.weights.quantized_bytes == engine.weights.quantized_bytes
