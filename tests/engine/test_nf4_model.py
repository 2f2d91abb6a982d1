"""The NF4 base end to end: checkpoints from transformers + bitsandbytes, quantization at
load and ``loraserve quantize``, with adapters on top, against transformers + PEFT.

The oracle is W = dequantize(Q): each weight rebuilt with
bitsandbytes' ``dequantize_4bit`` and run in float32 through transformers + PEFT.
(bitsandbytes' own CPU forward computes in bfloat16, so it is not an exact reference.)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import QuantState
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.quantization import QUANT_STATE_KEY, NF4Linear, nf4_from_checkpoint
from engine.weight_memory import weight_bytes
from kernels.nf4 import dequantize_nf4
from server.cli import main as cli_main
from server.metrics import ServerMetrics
from tests.engine.test_generation import random_prompts
from tests.engine.test_multilora import ADAPTERS, peft_greedy
from tests.references import bnb_dequantize
from tests.tiny_models import make_adapter

ADAPTER_NAMES = ["r4-attn", "r8-all", "r16-rslora", "patterned"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_with_bitsandbytes(base: Path, out: Path) -> Path:
    """``base`` quantized by transformers + bitsandbytes (NF4, double quantization), saved."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return out


def packed_modules(model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each 4-bit module's tensors in a checkpoint, keyed like bitsandbytes' ``from_dict``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        for name in names:
            if name.endswith(".weight." + QUANT_STATE_KEY):
                module = name.removesuffix(".weight." + QUANT_STATE_KEY)
                prefix = module + ".weight."
                modules[module] = {
                    "weight": f.get_tensor(module + ".weight"),
                    **{
                        k.removeprefix(prefix): f.get_tensor(k)
                        for k in names
                        if k.startswith(prefix)
                    },
                }
    return modules


def bitsandbytes_dequantized(quantized: Path, out: Path) -> Path:
    """A float32 copy of ``quantized``, each weight rebuilt by bitsandbytes' own code."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(quantized / "model.safetensors", framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            if ".weight." not in name:
                tensors[name] = f.get_tensor(name)
    for module, parts in packed_modules(quantized).items():
        components = {k: v for k, v in parts.items() if k != "weight"}
        state = QuantState.from_dict(dict(components), device=torch.device("cpu"))
        tensors[module + ".weight"] = bnb_dequantize(parts["weight"], state).float()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (quantized / name).is_file():
            shutil.copy(quantized / name, out / name)
    return out


@dataclass(frozen=True)
class Family:
    """A tiny model, its bitsandbytes NF4 checkpoint, adapters, jobs and the oracle's tokens."""

    base: Path
    quantized: Path
    adapters: dict[str, Path]
    jobs: list[tuple[list[int], str | None]]
    expected: list[list[int]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def nf4_family(
    request: pytest.FixtureRequest,
    model_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Family:
    base = model_dirs[request.param]
    root = tmp_path_factory.mktemp(f"nf4-{request.param}")
    quantized = save_with_bitsandbytes(base, root / "bnb")
    adapters = {
        name: make_adapter(
            base, root / name, seed=i, std=0.3 / ADAPTERS[name]["r"] ** 0.25, **ADAPTERS[name]
        )
        for i, name in enumerate(ADAPTER_NAMES)
    }
    prompts = random_prompts(10, seed=11)
    choices: list[str | None] = [*adapters, None]
    jobs = [(p, choices[i % len(choices)]) for i, p in enumerate(prompts)]
    oracle = bitsandbytes_dequantized(quantized, root / "oracle")
    expected = peft_greedy(oracle, adapters, jobs, max_tokens=8)
    return Family(base, quantized, adapters, jobs, expected)


def assert_matches_oracle(got: list[list[int]], family: Family) -> None:
    for i, (tokens, expected) in enumerate(zip(got, family.expected, strict=False)):
        assert tokens == expected, (i, family.jobs[i][1])


def run_mixed(
    engine: LLMEngine,
    adapters: dict[str, Path],
    jobs: list[tuple[list[int], str | None]],
    max_tokens: int = 8,
) -> list[list[int]]:
    """All jobs in one queue, two joining per step, integrity checked every step."""
    for name, path in adapters.items():
        engine.load_lora(name, path)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    pending = list(enumerate(jobs))
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:2]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[2:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return [done[str(i)] for i in range(len(jobs))]


def test_bitsandbytes_checkpoint_with_adapters_matches_peft(nf4_family: Family) -> None:
    engine = LLMEngine(
        EngineConfig.create(nf4_family.quantized, dtype="float32", max_num_batched_tokens=40)
    )
    assert engine.config.model.quantization == "nf4"
    layers = [m for m in engine.model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 7 * engine.model.arch.num_layers
    got = run_mixed(engine, nf4_family.adapters, nf4_family.jobs)
    assert_matches_oracle(got, nf4_family)


def test_quantized_at_load_gives_the_same_tokens(nf4_family: Family) -> None:
    config = EngineConfig.create(
        nf4_family.base, dtype="float32", quantization="nf4", max_num_batched_tokens=40
    )
    got = run_mixed(LLMEngine(config), nf4_family.adapters, nf4_family.jobs)
    assert_matches_oracle(got, nf4_family)


# The jobs each family runs under the Triton kernels (indexes into Family.jobs) and the
# tokens each job generates. The interpreter runs every kernel program in numpy, so cost
# grows with programs launched, and the LoRA expand kernels launch the most: llama's three
# jobs of five tokens take about a quarter of a minute. The LoRA kernels see the same shapes in
# every family, so llama alone runs them; Qwen2 runs its base job over three tokens (about
# two seconds), which holds what Qwen2 changes for the kernels: the bias added to each q, k
# and v slice the NF4 kernels write, and one KV head (head_dim 16) for four query heads in
# paged attention, prefill and decode.
TRITON_JOBS = {"llama": ([3, 1, 4], 5), "qwen2": ([4], 3)}


def test_triton_kernels_on_the_nf4_base(nf4_family: Family) -> None:
    """Every kernel in Triton (the interpreter here), against the oracle's tokens: on llama
    two adapters and a base request; on Qwen2 the base request (see TRITON_JOBS)."""
    config = EngineConfig.create(nf4_family.quantized, dtype="float32", max_num_batched_tokens=40)
    engine = LLMEngine(config, kernels="triton")
    picked, max_tokens = TRITON_JOBS[nf4_family.base.name]
    jobs = [nf4_family.jobs[i] for i in picked]
    if nf4_family.base.name == "llama":
        assert [adapter for _, adapter in jobs] == ["patterned", "r8-all", None]
    else:
        assert [adapter for _, adapter in jobs] == [None]
        assert engine.arch.qkv_bias  # what this case is here for
    got = run_mixed(engine, nf4_family.adapters, jobs, max_tokens)
    # Greedy: the first tokens of the oracle's.
    assert got == [nf4_family.expected[i][:max_tokens] for i in picked]


def test_quantize_command_writes_what_transformers_loads(
    nf4_family: Family, tmp_path: Path
) -> None:
    base, out = nf4_family.base, tmp_path / "q"
    assert cli_main(["quantize", str(base), str(out), "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ours = packed_modules(out)
    for module, parts in ours.items():
        layer = hf.get_submodule(module)
        expected = bnb_dequantize(layer.weight.data, layer.weight.quant_state)
        mine = dequantize_nf4(nf4_from_checkpoint(module + ".weight", parts))
        assert torch.equal(mine, expected.float()), module
    # Served by loraserve, the written checkpoint is the model quantized at load.
    at_load = LLMEngine(EngineConfig.create(base, dtype="float32", quantization="nf4"))
    saved = LLMEngine(EngineConfig.create(out, dtype="float32"))
    jobs = [(p, None) for p, _ in nf4_family.jobs[:4]]
    assert run_mixed(saved, {}, jobs) == run_mixed(at_load, {}, jobs)


def test_memory_accounting(nf4_family: Family, caplog: pytest.LogCaptureFixture) -> None:
    quantized = nf4_family.quantized
    plain = LLMEngine(EngineConfig.create(nf4_family.base, dtype="float32", num_pages=64))
    with caplog.at_level(logging.INFO, logger="engine.assembly"):
        nf4 = LLMEngine(EngineConfig.create(quantized, dtype="float32", num_pages=64))
    assert f"room for {nf4.freed_pages} more pages" in caplog.text
    s, p = nf4.stats(), plain.stats()
    assert p.quantized_bits_per_param == 0 and p.quantization_freed_pages == 0
    assert s.unquantized_weight_bytes == p.weight_bytes
    # Tiny layers carry bitsandbytes' two code tables (1 KiB) each: more than 4.127 bits.
    assert 4.127 < s.quantized_bits_per_param < 8
    assert s.weight_bytes < p.weight_bytes
    assert s.quantization_freed_pages == (p.weight_bytes - s.weight_bytes) // nf4.pool.page_bytes
    metrics = ServerMetrics(nf4.stats).render().decode()
    assert f"loraserve:quantization_freed_pages {float(nf4.freed_pages)}" in metrics
    assert f"loraserve:base_weight_bytes {float(s.weight_bytes)}" in metrics
    assert "loraserve:quantized_bits_per_param" in metrics
    # The start-up count that sizes a GPU pool is what loading took, to the byte.
    for model_dir, engine, quantization in (
        (quantized, nf4, "nf4"),
        (nf4_family.base, plain, "none"),
    ):
        assert weight_bytes(model_dir, torch.float32, quantization) == engine.weights.base_bytes


def test_bad_quantization_configs_are_refused(nf4_family: Family, tmp_path: Path) -> None:
    quantized = nf4_family.quantized
    with pytest.raises(ValueError, match="can only be served with quantization nf4"):
        EngineConfig.create(quantized, quantization="none")
    for change, message in (
        ({"bnb_4bit_quant_type": "fp4"}, "'fp4' is not supported; nf4 only"),
        ({"load_in_4bit": False, "load_in_8bit": True}, "8-bit bitsandbytes"),
        ({"bnb_4bit_quant_storage": "bfloat16"}, "quant_storage 'bfloat16'"),
    ):
        copy = tmp_path / message[:4].strip("'")
        shutil.copytree(quantized, copy)
        config = json.loads((copy / "config.json").read_text())
        config["quantization_config"] |= change
        (copy / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            EngineConfig.create(copy)
    assert cli_main(["quantize", str(quantized), str(tmp_path / "again")]) == 2


def test_checkpoint_missing_a_component_is_refused(nf4_family: Family, tmp_path: Path) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(nf4_family.quantized, copy)
    with safe_open(copy / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight\.absmax"):
        LLMEngine(EngineConfig.create(copy))
