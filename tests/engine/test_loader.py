"""Loading checkpoints: shards, dtypes, tied weights, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.loader import load_model
from engine.model import Backends
from engine.packed import checkpoint_tensors
from tests.references import hf_greedy

CPU = torch.device("cpu")


def shard(src: Path, dst: Path) -> Path:
    """Copy a model directory, splitting its weights into two shards with an index."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, dst / file)
        weight_map.update(dict.fromkeys(keys, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_loads_and_matches(llama_dir: Path, tmp_path: Path) -> None:
    sharded = shard(llama_dir, tmp_path / "sharded")
    prompt = [5, 6, 7, 8, 9]
    out = LLM(sharded, dtype="float32").generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8)
    )
    assert out[0].token_ids == hf_greedy(llama_dir, prompt, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(llama_dir: Path, dtype: torch.dtype) -> None:
    model = load_model(llama_dir, dtype, CPU, Backends.select(None, CPU))
    assert {p.dtype for p in model.parameters()} == {dtype}
    reference = load_file(llama_dir / "model.safetensors")
    loaded = dict(checkpoint_tensors(model))  # q, k, v, gate, up: slices of packed layers
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor.to(dtype)), name


def test_packed_layers_load_their_slices_in_order(model_dirs: dict[str, Path]) -> None:
    """Qwen2's q, k and v (weights and biases) are rows of qkv_proj; gate and up of gate_up_proj."""
    model = load_model(model_dirs["qwen2"], torch.float32, CPU, Backends.select(None, CPU))
    reference = load_file(model_dirs["qwen2"] / "model.safetensors")
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    for kind in ("weight", "bias"):
        qkv = [reference[f"{attn}.{t}.{kind}"] for t in ("q_proj", "k_proj", "v_proj")]
        packed = model.get_parameter(f"{attn}.qkv_proj.{kind}")
        assert torch.equal(packed, torch.cat(qkv))
    gate_up = [reference[f"{mlp}.{t}.weight"] for t in ("gate_proj", "up_proj")]
    assert torch.equal(model.get_parameter(f"{mlp}.gate_up_proj.weight"), torch.cat(gate_up))


def test_auto_dtype_reads_the_checkpoint(llama_dir: Path) -> None:
    assert EngineConfig.create(llama_dir).model.dtype == torch.float32


def test_tied_embeddings_stay_tied(model_dirs: dict[str, Path]) -> None:
    model = load_model(model_dirs["mistral"], torch.float32, CPU, Backends.select(None, CPU))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_pickle_only_checkpoint_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pickled"
    shutil.copytree(llama_dir, dst)
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        load_model(dst, torch.float32, CPU, Backends.select(None, CPU))


def test_missing_and_misshapen_tensors_are_refused(llama_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "broken"
    shutil.copytree(llama_dir, dst)
    weights = load_file(dst / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, dst / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        load_model(dst, torch.float32, CPU, Backends.select(None, CPU))
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape"):
        load_model(dst, torch.float32, CPU, Backends.select(None, CPU))


def test_unsupported_architecture_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "gpt2ish"
    shutil.copytree(llama_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported"):
        load_model(dst, torch.float32, CPU, Backends.select(None, CPU))


def test_invalid_config_values() -> None:
    with pytest.raises(ValueError, match="not a model directory"):
        EngineConfig.create("/nonexistent")
