"""``load_format="dummy"``: serving a model from its config.json alone (engine/dummy.py)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.dummy import init_dummy_weights, init_std, synthetic_tokenizer
from engine.loader import load_config, load_model, load_tokenizer
from engine.model import Backends, CausalLM
from engine.packed import checkpoint_tensors
from engine.quantization import NF4Linear, nf4_layer, quantize_nf4
from engine.weight_memory import weight_bytes
from server.engine_args import add_engine_args, engine_config

PRESETS = Path(__file__).resolve().parents[2] / "benchmarks" / "presets"
TINY = PRESETS / "tiny"
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def generate(engine: LLMEngine, prompts: list[str | list[int]]) -> list[list[int]]:
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return [done[i] for i in ids]


def dummy_model(model_dir: Path, seed: int = 0, quantization: str = "none") -> CausalLM:
    return load_model(
        model_dir, torch.float32, CPU, Backends.select(None, CPU), quantization, "dummy", seed
    )


def without_weights(src: Path, dst: Path) -> Path:
    """A copy of model directory ``src`` with its config and tokenizer but no safetensors."""
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)
    return dst


def test_tiny_preset_serves_without_weights_or_tokenizer() -> None:
    assert sorted(p.name for p in TINY.iterdir()) == ["config.json"]
    engine = LLMEngine(EngineConfig.create(TINY, load_format="dummy"))
    assert engine.config.model.load_format == "dummy"
    outputs = generate(engine, ["t5 t17 t300", [3, 4, 5, 6, 7, 8, 9]])
    assert [len(o) for o in outputs] == [GREEDY.max_tokens] * 2
    assert all(0 <= t < 320 for o in outputs for t in o)
    assert engine.eos_token_ids == {2}
    assert engine.pool.num_free + engine.kv_cache_manager.num_cached_pages == engine.pool.num_pages


def test_synthetic_tokenizer_covers_the_vocabulary() -> None:
    tokenizer = synthetic_tokenizer(load_config(TINY))
    assert len(tokenizer) == 320
    assert tokenizer("t5 t17  t319").input_ids == [5, 17, 319]
    assert tokenizer("hello").input_ids == [0]  # unknown words: the padding token
    assert tokenizer.decode([5, 2, 17], skip_special_tokens=True) == "t5 t17"
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("t2", "t1", "t0")
    assert load_tokenizer(TINY, "dummy").vocab_size == 320


def test_a_model_dir_without_safetensors_loads_dummy_with_its_tokenizer(
    llama_dir: Path, tmp_path: Path
) -> None:
    bare = without_weights(llama_dir, tmp_path / "bare")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        LLMEngine(EngineConfig.create(bare, dtype="float32"))
    engine = LLMEngine(EngineConfig.create(bare, dtype="float32", load_format="dummy"))
    assert engine.tokenizer.bos_token == "<s>"  # the directory's byte tokenizer, not t0..tN
    outputs = generate(engine, ["hello", "a longer prompt of text"])
    assert [len(o) for o in outputs] == [GREEDY.max_tokens] * 2


def test_weights_are_seeded_and_initialised_like_transformers(model_dirs: dict[str, Path]) -> None:
    for family in ("llama", "mistral", "qwen2"):
        model_dir = model_dirs[family]
        a, b = dummy_model(model_dir, seed=1), dummy_model(model_dir, seed=1)
        other = dummy_model(model_dir, seed=2)
        std = load_config(model_dir).initializer_range
        for (name, pa), pb, po in zip(
            a.state_dict().items(),
            b.state_dict().values(),
            other.state_dict().values(),
            strict=True,
        ):
            assert torch.equal(pa, pb), name
            if name.endswith("norm.weight"):
                assert torch.equal(pa, torch.ones_like(pa)), name
            elif pa.dim() == 1:
                assert torch.equal(pa, torch.zeros_like(pa)), name  # biases (qwen2)
            else:
                assert not torch.equal(pa, po), name
                assert abs(pa.std().item() - std) < 0.1 * std, name
        if a.arch.tie_word_embeddings:  # mistral
            assert a.lm_head.weight is a.model.embed_tokens.weight


def test_nf4_dummy_quantizes_the_same_random_weights(llama_dir: Path) -> None:
    plain = dummy_model(llama_dir, seed=3)
    nf4 = dummy_model(llama_dir, seed=3, quantization="nf4")
    assert len([m for m in nf4.modules() if isinstance(m, NF4Linear)]) == 7 * plain.arch.num_layers
    floats = dict(checkpoint_tensors(plain))  # q, k, v, gate and up: slices of packed layers
    modules = [
        n.removesuffix(".weight") for n, t in floats.items() if t.dim() == 2 and "_proj" in n
    ]
    assert len(modules) == 7 * plain.arch.num_layers
    for module in modules:
        weight = nf4_layer(nf4, module).weight
        assert weight is not None
        expected = quantize_nf4(floats[f"{module}.weight"].detach())
        assert torch.equal(weight.packed, expected.packed), module
        assert torch.equal(weight.absmax, expected.absmax), module
    assert torch.equal(nf4.lm_head.weight, plain.lm_head.weight)  # the head stays float


def test_nf4_dummy_engine_generates() -> None:
    engine = LLMEngine(EngineConfig.create(TINY, load_format="dummy", quantization="nf4"))
    assert engine.weights.quantized_params > 0
    assert [len(o) for o in generate(engine, [[1, 2, 3]])] == [GREEDY.max_tokens]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_weight_bytes_without_safetensors(quantization: str) -> None:
    estimate = weight_bytes(TINY, torch.float32, quantization, "dummy")
    engine_bytes = LLMEngine(
        EngineConfig.create(TINY, load_format="dummy", quantization=quantization, num_pages=64)
    ).weights.base_bytes
    # Exact, NF4's scales and code tables included.
    assert estimate == engine_bytes
    # Llama-2-7B has 6,738,415,616 parameters.
    assert weight_bytes(PRESETS / "llama-2-7b", torch.bfloat16, "none", "dummy") == 2 * 6738415616


def test_presets_have_the_published_shapes() -> None:
    for name, layers, hidden, mlp, kv_heads, vocab in (
        ("llama-2-7b", 32, 4096, 11008, 32, 32000),
        ("llama-3-8b", 32, 4096, 14336, 8, 128256),
        ("tiny", 4, 128, 384, 2, 320),
    ):
        config = load_config(PRESETS / name)
        assert (
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_key_value_heads,
            config.vocab_size,
        ) == (layers, hidden, mlp, kv_heads, vocab), name
    assert EngineConfig.create(
        PRESETS / "llama-2-7b", load_format="dummy", num_pages=8
    ).model.dtype == (torch.bfloat16)


def test_load_format_is_validated_and_passed_from_the_flags() -> None:
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        EngineConfig.create(TINY, load_format="random")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--load-format", "dummy", "--num-pages", "64"])
    assert engine_config(args, TINY).model.load_format == "dummy"
    assert engine_config(parser.parse_args([]), None).model.load_format == "auto"


def test_a_transformers_model_gets_the_same_dummy_weights() -> None:
    """Baselines can run transformers on exactly the weights the engine serves."""
    config = load_config(TINY)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_dummy_weights(hf, init_std(config), seed=5)
    ours = dict(checkpoint_tensors(dummy_model(TINY, seed=5)))
    theirs = dict(hf.named_parameters())
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
