"""Random PEFT adapters for benchmarks (server/bench/make_adapters.py), read back by our
loader and by PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from adapters.base_layout import LINEAR_TARGETS
from adapters.loader import load_lora_adapter
from engine.arch import ModelArch
from server.bench.make_adapters import make_random_adapters

TINY = Path(__file__).resolve().parents[2] / "benchmarks" / "presets" / "tiny"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_adapters_load_in_loraserve_with_their_ranks_and_values(tmp_path: Path) -> None:
    ranks = [8, 4, 16]
    paths = make_random_adapters(TINY, tmp_path, 5, ranks, LINEAR_TARGETS, seed=7)
    assert [p.name for p in paths] == [f"lora-{i:04d}" for i in range(5)]
    layout = ModelArch.load(TINY).layout()
    for i, path in enumerate(paths):
        weights = load_lora_adapter(path, layout, max_lora_rank=64)
        rank = ranks[i % len(ranks)]
        assert len(weights.modules) == layout.num_layers * len(LINEAR_TARGETS)
        for (_, target), module in weights.modules.items():
            in_features, out_features = layout.linear_shapes[target]
            assert module.lora_a.shape == (rank, in_features)
            assert module.lora_b.shape == (out_features, rank)
            assert module.scaling == 2.0  # alpha = 2 * rank
        for in_features in (128, 384):  # hidden and MLP widths: A ~ N(0, 1 / in_features)
            a = torch.cat(
                [
                    m.lora_a.flatten()
                    for m in weights.modules.values()
                    if m.lora_a.shape[1] == in_features
                ]
            )
            assert abs(a.std().item() * math.sqrt(in_features) - 1) < 0.1
        b = torch.cat([m.lora_b.flatten() for m in weights.modules.values()])
        assert abs(b.std().item() - 0.01) < 0.001
    config = json.loads((paths[0] / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 16, "tiny")


def test_adapters_are_seeded_per_index(tmp_path: Path) -> None:
    layout = ModelArch.load(TINY).layout()
    first = make_random_adapters(TINY, tmp_path / "a", 2, [8], ATTENTION, seed=1)
    more = make_random_adapters(TINY, tmp_path / "b", 3, [8], ATTENTION, seed=1)
    other = make_random_adapters(TINY, tmp_path / "c", 1, [8], ATTENTION, seed=2)
    key = (0, "q_proj")

    def lora_a(path: Path) -> torch.Tensor:
        return load_lora_adapter(path, layout, 64, torch.float16).modules[key].lora_a

    assert torch.equal(lora_a(first[1]), lora_a(more[1]))
    assert not torch.equal(lora_a(first[0]), lora_a(first[1]))
    assert not torch.equal(lora_a(first[0]), lora_a(other[0]))
    assert lora_a(first[0]).dtype == torch.float16


def test_distinct_reuses_directories_round_robin(tmp_path: Path) -> None:
    ranks = [8, 4]
    paths = make_random_adapters(TINY, tmp_path, 9, ranks, ATTENTION, seed=0, distinct=4)
    assert len(paths) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"lora-{i:04d}" for i in range(4)]
    assert paths == [tmp_path / f"lora-{i % 4:04d}" for i in range(9)]
    layout = ModelArch.load(TINY).layout()
    for i, path in enumerate(paths):  # the round-robin rank holds for every path
        assert load_lora_adapter(path, layout, 64).max_rank == ranks[i % len(ranks)]
    # distinct >= n writes n directories; a distinct that breaks the ranks' cycle is refused
    assert len(set(make_random_adapters(TINY, tmp_path / "x", 2, ranks, ATTENTION, 0, 5))) == 2
    with pytest.raises(ValueError, match="multiple"):
        make_random_adapters(TINY, tmp_path / "y", 9, ranks, ATTENTION, seed=0, distinct=3)
    with pytest.raises(ValueError, match="targets"):
        make_random_adapters(TINY, tmp_path / "z", 1, ranks, ["lm_head"], seed=0)
    assert make_random_adapters(TINY, tmp_path / "w", 0, ranks, ATTENTION, seed=0) == []


def test_peft_loads_them_on_a_model_built_from_the_preset(tmp_path: Path) -> None:
    paths = make_random_adapters(TINY, tmp_path, 2, [8, 16], [*ATTENTION, "down_proj"], seed=3)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    model.load_adapter(paths[1], adapter_name="a1")
    layout = ModelArch.load(TINY).layout()
    for name, path, rank in (("a0", paths[0], 8), ("a1", paths[1], 16)):
        ours = load_lora_adapter(path, layout, 64)
        for (layer, target), module in ours.modules.items():
            peft_layer = model.base_model.model.get_submodule(layout.module_path(layer, target))
            assert peft_layer.r[name] == rank
            assert peft_layer.scaling[name] == module.scaling
            torch.testing.assert_close(peft_layer.lora_A[name].weight, module.lora_a)
            torch.testing.assert_close(peft_layer.lora_B[name].weight, module.lora_b)
    ids = torch.tensor([[1, 5, 9, 13]])
    model.set_adapter("a1")
    with torch.no_grad(), model.disable_adapter():
        plain = model(ids).logits
    assert not torch.allclose(model(ids).logits, plain)  # the adapter changes the output
