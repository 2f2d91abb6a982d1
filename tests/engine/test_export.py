"""``loraserve merge``: a base with a LoRA adapter merged in, written as a Hugging Face model.

Oracles: on a float base, PEFT's ``merge_and_unload``; on an NF4 base, W = dequantize(Q) +
scaling · B @ A with bitsandbytes' own dequantization, and
transformers + PEFT on the float model whose weights are bitsandbytes' dequantize(Q).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from bitsandbytes.functional import QuantState
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from engine.quantization import nf4_from_checkpoint, quantize_nf4
from kernels.nf4 import dequantize_nf4
from server.cli import main as cli_main
from tests.engine.test_generation import random_prompts
from tests.engine.test_nf4_model import (
    bitsandbytes_dequantized,
    packed_modules,
    save_with_bitsandbytes,
)
from tests.references import bnb_dequantize
from tests.tiny_models import make_adapter, write_random_adapter

ALL_LINEAR: dict[str, Any] = {"r": 8, "alpha": 16, "targets": "all-linear"}
# Tied embeddings (Mistral), rsLoRA and per-module ranks and alphas.
PATTERNED: dict[str, Any] = {
    "r": 8,
    "alpha": 16,
    "targets": "all-linear",
    "use_rslora": True,
    "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "down_proj": 12},
    "alpha_pattern": {"up_proj": 3.0},
}
CASES = {"llama": ALL_LINEAR, "qwen2": ALL_LINEAR, "mistral": PATTERNED}  # family -> adapter
PROMPTS = random_prompts(7, seed=5)[2:6]  # 7 to 33 tokens
NUM_TARGETS = 7  # q, k, v, o, gate, up, down


@dataclass(frozen=True)
class Merged:
    """A base, an adapter for it and ``loraserve merge``'s float32 output."""

    base: Path
    adapter: Path
    out: Path


def merge(*argv: Path | str) -> None:
    assert cli_main(["merge", *map(str, argv)]) == 0


def float32_model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_merged(base: Path, adapter: Path) -> PreTrainedModel:
    model = PeftModel.from_pretrained(float32_model(base), adapter)
    merged: PreTrainedModel = model.merge_and_unload()
    return merged.eval()


def greedy(model: PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
        outs.append([int(t) for t in out[0, len(prompt) :]])
    return outs


def assert_same_weights(ours: PreTrainedModel, theirs: PreTrainedModel) -> None:
    mine, expected = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-6, rtol=0, msg=name)


def lora_delta(adapter: Path, module: str, scaling: float) -> torch.Tensor:
    """scaling · B @ A of ``module``, read straight from the adapter's file."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    return scaling * (b @ a)


@pytest.fixture(scope="module")
def merged(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Merged]:
    root = tmp_path_factory.mktemp("merge")
    cases = {}
    for i, (name, spec) in enumerate(CASES.items()):
        base = model_dirs[name]
        adapter = make_adapter(base, root / f"{name}-adapter", seed=i, std=0.3 / 8**0.25, **spec)
        out = root / f"{name}-merged"
        if name == "mistral":
            out.mkdir()  # an existing empty directory is written into
        merge(base, adapter, out, "--dtype", "float32")
        cases[name] = Merged(base, adapter, out)
    return cases


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(case: str, merged: dict[str, Merged]) -> None:
    m = merged[case]
    ours, theirs = float32_model(m.out), peft_merged(m.base, m.adapter)
    assert_same_weights(ours, theirs)
    prompts = PROMPTS if case == "llama" else PROMPTS[:2]
    assert greedy(ours, prompts) == greedy(theirs, prompts)
    assert greedy(ours, prompts) != greedy(float32_model(m.base), prompts)  # the adapter matters
    config, base_config = (json.loads((d / "config.json").read_text()) for d in (m.out, m.base))
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["architectures"] == base_config["architectures"]
    assert config["tie_word_embeddings"] == base_config["tie_word_embeddings"]
    assert (m.out / "tokenizer.json").read_bytes() == (m.base / "tokenizer.json").read_bytes()


def test_bfloat16_output_is_the_float32_merge_rounded(
    merged: dict[str, Merged], tmp_path: Path
) -> None:
    m = merged["qwen2"]
    merge(m.base, m.adapter, tmp_path / "bf16", "--dtype", "bfloat16")
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    exact = load_file(m.out / "model.safetensors")
    assert got.keys() == exact.keys()
    for name, tensor in exact.items():
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_nf4_output_loads_in_bitsandbytes_and_is_the_merge_quantized(
    merged: dict[str, Merged], tmp_path: Path
) -> None:
    m = merged["llama"]
    out = tmp_path / "nf4"
    merge(m.base, m.adapter, out, "--dtype", "float32", "--quantization", "nf4")
    float_weights = load_file(m.out / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    modules = packed_modules(out)
    assert len(modules) == NUM_TARGETS * hf.config.num_hidden_layers
    for module in modules:
        layer = hf.get_submodule(module)
        theirs = bnb_dequantize(layer.weight.data, layer.weight.quant_state).float()
        expected = dequantize_nf4(quantize_nf4(float_weights[module + ".weight"]))
        assert torch.equal(theirs, expected), module
    # Merging into nf4 is the float merge quantized by ``loraserve quantize``, byte for byte.
    assert cli_main(["quantize", str(m.out), str(tmp_path / "q"), "--dtype", "float32"]) == 0
    got, want = load_file(out / "model.safetensors"), load_file(tmp_path / "q/model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@dataclass(frozen=True)
class NF4Base:
    """A bitsandbytes NF4 checkpoint of a tiny Llama, an adapter and the float merge."""

    quantized: Path
    adapter: Path
    scaling: float
    out: Path


@pytest.fixture(scope="module")
def nf4_base(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> NF4Base:
    root = tmp_path_factory.mktemp("merge-nf4")
    quantized = save_with_bitsandbytes(model_dirs["llama"], root / "bnb")
    adapter = make_adapter(model_dirs["llama"], root / "adapter", seed=7, std=0.2, **ALL_LINEAR)
    merge(quantized, adapter, root / "merged", "--dtype", "float32")
    return NF4Base(quantized, adapter, ALL_LINEAR["alpha"] / ALL_LINEAR["r"], root / "merged")


def bnb_weights(quantized: Path) -> dict[str, torch.Tensor]:
    """Each packed module's weight as bitsandbytes dequantizes it, float32."""
    weights = {}
    for module, parts in packed_modules(quantized).items():
        components = {k: v for k, v in parts.items() if k != "weight"}
        state = QuantState.from_dict(components, device=torch.device("cpu"))
        weights[module] = bnb_dequantize(parts["weight"], state).float()
    return weights


def test_nf4_base_merges_into_its_dequantized_weights(nf4_base: NF4Base, tmp_path: Path) -> None:
    got = load_file(nf4_base.out / "model.safetensors")
    dequantized = bnb_weights(nf4_base.quantized)
    assert len(dequantized) == NUM_TARGETS * 2
    for module, weight in dequantized.items():
        expected = weight + lora_delta(nf4_base.adapter, module, nf4_base.scaling)
        torch.testing.assert_close(got[module + ".weight"], expected, atol=1e-6, rtol=0)
    config = json.loads((nf4_base.out / "config.json").read_text())
    assert "quantization_config" not in config
    # Through transformers, the export is PEFT's merge on bitsandbytes' dequantized base.
    oracle = bitsandbytes_dequantized(nf4_base.quantized, tmp_path / "oracle")
    theirs = peft_merged(oracle, nf4_base.adapter)
    ours = float32_model(nf4_base.out)
    assert_same_weights(ours, theirs)
    assert greedy(ours, PROMPTS) == greedy(theirs, PROMPTS)


def test_nf4_base_to_nf4_keeps_untouched_layers(
    nf4_base: NF4Base, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Adapted layers are merged and quantized again; the others keep their exact bytes."""
    adapter = make_adapter(
        model_dirs["llama"], tmp_path / "qv", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=3
    )
    out = tmp_path / "nf4"
    merge(nf4_base.quantized, adapter, out, "--dtype", "float32", "--quantization", "nf4")
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    dequantized = bnb_weights(nf4_base.quantized)
    ours = packed_modules(out)
    assert ours.keys() == dequantized.keys()
    for module, weight in dequantized.items():
        layer = hf.get_submodule(module)
        theirs = bnb_dequantize(layer.weight.data, layer.weight.quant_state).float()
        if module.endswith(("q_proj", "v_proj")):
            merged = weight + lora_delta(adapter, module, 8 / 4)
            assert torch.equal(theirs, dequantize_nf4(quantize_nf4(merged))), module
        else:
            assert torch.equal(theirs, weight), module
        assert torch.equal(dequantize_nf4(nf4_from_checkpoint(module, ours[module])), theirs)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("narrow adapter", "has shape [4, 32]; the base model expects [rank, 64]"),
        ("deeper adapter", "or the base model does not have"),
        ("no adapter", "adapter directory not found"),
        ("non-empty out_dir", "directory 'out' exists and is not empty; nothing was written"),
        ("no model", "not a model directory (no config.json)"),
    ],
)
def test_bad_merges_exit_2(
    problem: str,
    message: str,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, out = model_dirs["llama"], tmp_path / "out"
    adapter = tmp_path / "adapter"
    shapes = {"q_proj": (64, 64)}
    if problem == "narrow adapter":
        shapes = {"q_proj": (32, 64)}
    write_random_adapter(
        adapter, shapes, num_layers=3 if problem == "deeper adapter" else 2, r=4, alpha=8, seed=0
    )
    if problem == "no adapter":
        adapter = tmp_path / "missing"
    if problem == "non-empty out_dir":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    if problem == "no model":
        base = tmp_path
    assert cli_main(["merge", str(base), str(adapter), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraserve: error: ") and message in err, err
    if problem == "non-empty out_dir":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()
        if problem != "no model":
            assert str(adapter) in err  # the CLI names the adapter it refused


def test_nf4_base_missing_a_component_is_refused(
    nf4_base: NF4Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(nf4_base.quantized, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, str(broken / "model.safetensors"))
    out = tmp_path / "out"
    assert cli_main(["merge", str(broken), str(nf4_base.adapter), str(out)]) == 2
    assert "lacks model.layers.1.mlp.up_proj.weight.absmax" in capsys.readouterr().err
    assert not out.exists()  # a merge that fails part way writes nothing
