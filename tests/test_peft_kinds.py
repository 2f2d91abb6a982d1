"""The PEFT-kinds harness: each kind saves, reloads, changes greedy tokens, and its documented
math (tests/peft_kinds.py's docstring), recomputed from the saved files alone, equals PEFT."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache

from tests.peft_kinds import (
    KINDS,
    make_kind_adapter,
    peft_forward_greedy,
    peft_logits,
    untie_embeddings,
)
from tests.tiny_models import make_model

PROMPTS = [[1, 50, 60, 70], [1, 100, 101, 102, 103, 104]]
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    *((kind, {}) for kind in KINDS),
    ("adalora", {"prune": True}),
    ("prefix_tuning", {"prefix_projection": True}),
    ("lora_embed_head", {"with_attention": True}),
]
TOKENS = [1, 100, 101, 102, 103, 104, 7]

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::RuntimeWarning"
)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family: str = request.param
    return make_model(tmp_path_factory.mktemp(family) / "base", family)


def _adapter(base: Path, kind: str, **options: Any) -> Path:
    name = kind + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    out = base.parent / "adapters" / name
    if not (out / "adapter_config.json").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_kind_adapter(base, out, kind, seed=3, **options)
    return out


@pytest.mark.parametrize(("kind", "options"), VARIANTS)
def test_kind_saves_reloads_and_changes_greedy(
    base: Path, kind: str, options: dict[str, Any]
) -> None:
    adapter = _adapter(base, kind, **options)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "adapter_model.safetensors").exists() and config["peft_type"]
    plain = [peft_forward_greedy(base, None, p, 4) for p in PROMPTS]
    adapted = [peft_forward_greedy(base, adapter, p, 4) for p in PROMPTS]
    assert plain != adapted
    # Teacher forcing: each step is the argmax of the forward over prompt + tokens so far.
    tokens = PROMPTS[0] + adapted[0]
    assert int(peft_logits(base, adapter, tokens[:-1]).argmax()) == tokens[-1]


def _base_model(base: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _module(model: Any, key: str) -> Any:
    """The module of a saved key such as base_model.model.model.layers.0.mlp.down_proj.lora_A."""
    path = key.removeprefix("base_model.model.").split(".")
    kept = [p for p in path if not p.startswith(("lora_", "ia3_")) and p != "weight"]
    return model.get_submodule(".".join(kept))


def _logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


@pytest.mark.parametrize("prune", [False, True])
def test_adalora_folds_into_lora(base: Path, prune: bool) -> None:
    adapter = _adapter(base, "adalora", prune=prune)
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    scale = torch.tensor(config["lora_alpha"], dtype=torch.float32) / (
        torch.tensor(float(config["init_r"])) + 1e-5
    )
    model = _base_model(base)
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A"):
                stem = key.removesuffix(".lora_A")
                a_folded = tensors[f"{stem}.lora_E"] * a  # row i of A times E[i]
                _module(model, key).weight += tensors[f"{stem}.lora_B"] @ a_folded * scale
    ranks = {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")}
    assert (len(set(ranks.values())) > 1) == prune
    torch.testing.assert_close(_logits(model, TOKENS), peft_logits(base, adapter, TOKENS))


def test_dora_folds_into_weights(base: Path) -> None:
    adapter = _adapter(base, "dora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    s = config["lora_alpha"] / config["r"]
    model = _base_model(base)
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                stem = key.removesuffix(".lora_A.weight")
                linear = _module(model, key)
                merged = linear.weight + s * tensors[f"{stem}.lora_B.weight"] @ a
                norm = torch.linalg.norm(merged, dim=1)
                magnitude = tensors[f"{stem}.lora_magnitude_vector"]
                linear.weight.copy_((magnitude / norm)[:, None] * merged)  # bias untouched
    torch.testing.assert_close(_logits(model, TOKENS), peft_logits(base, adapter, TOKENS))


def test_ia3_folds_into_weights(base: Path) -> None:
    adapter = _adapter(base, "ia3")
    tensors = load_file(adapter / "adapter_model.safetensors")
    model = _base_model(base)
    with torch.no_grad():
        for key, scale in tensors.items():
            linear = _module(model, key)
            if scale.shape[0] == 1:  # feedforward: scales the input
                linear.weight.mul_(scale)
            else:  # scales the output, bias included
                linear.weight.mul_(scale)
                if linear.bias is not None:
                    linear.bias.mul_(scale[:, 0])
    torch.testing.assert_close(_logits(model, TOKENS), peft_logits(base, adapter, TOKENS))


@pytest.mark.parametrize("tying", [False, True])
def test_lora_embed_head_folds(base: Path, tying: bool) -> None:
    adapter = _adapter(base, "lora_embed_head", ensure_weight_tying=tying)
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    s = config["lora_alpha"] / config["r"]
    prefix = "base_model.model."
    model = _base_model(untie_embeddings(base, base.parent / "untied"))
    embed_a = tensors[f"{prefix}model.embed_tokens.lora_embedding_A"]  # (r, vocab)
    embed_b = tensors[f"{prefix}model.embed_tokens.lora_embedding_B"]  # (hidden, r)
    head_a, head_b = (
        tensors[f"{prefix}lm_head.lora_A.weight"],
        tensors[f"{prefix}lm_head.lora_B.weight"],
    )
    if (
        tying and model.config.model_type == "mistral"
    ):  # tied base: lm_head's LoRA is the embedding's
        assert "lm_head" not in config["target_modules"] and config["ensure_weight_tying"]
        torch.testing.assert_close(head_a, embed_b.T)
        torch.testing.assert_close(head_b, embed_a.T)
    with torch.no_grad():
        model.get_input_embeddings().weight += s * (embed_b @ embed_a).T
        model.get_output_embeddings().weight += s * head_b @ head_a
    torch.testing.assert_close(_logits(model, TOKENS), peft_logits(base, adapter, TOKENS))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_layout_and_positions(base: Path, projection: bool) -> None:
    adapter = _adapter(base, "prefix_tuning", prefix_projection=projection)
    config = json.loads((adapter / "adapter_config.json").read_text())
    prefix = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"]
    n, layers, heads = (
        config["num_virtual_tokens"],
        config["num_layers"],
        config["num_attention_heads"],
    )
    model = _base_model(base)
    assert heads == model.config.num_key_value_heads
    kv = prefix.view(n, layers, 2, heads, -1).permute(1, 2, 3, 0, 4)  # (layer, k/v, head, n, dim)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)  # keys as stored: no RoPE
    positions = torch.arange(n, n + len(TOKENS))[None]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([TOKENS]), cache=cache, position_ids=positions)
    torch.testing.assert_close(out.logits[0, -1], peft_logits(base, adapter, TOKENS))


def test_prompt_tuning_prepends_embeddings(base: Path) -> None:
    adapter = _adapter(base, "prompt_tuning")
    prompt = load_file(adapter / "adapter_model.safetensors")["prompt_embeddings"]  # (n, hidden)
    model = _base_model(base)
    with torch.inference_mode():
        embeds = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(TOKENS))])
        positions = torch.arange(len(embeds))[None]  # virtual tokens 0..n-1, then the request
        out = model(inputs_embeds=embeds[None], position_ids=positions)
    torch.testing.assert_close(out.logits[0, -1], peft_logits(base, adapter, TOKENS))


def test_generate_ignores_the_prefix(base: Path) -> None:
    """Known disagreement (PEFT 0.21, transformers 5): generate drops prefix tuning's prefix."""
    from tests.peft_kinds import _load

    adapter = _adapter(base, "prefix_tuning")
    model = _load(str(base), str(adapter))
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([PROMPTS[1]]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    generated = [int(t) for t in out[0, len(PROMPTS[1]) :]]
    assert generated == peft_forward_greedy(base, None, PROMPTS[1], 6)
    assert generated != peft_forward_greedy(base, adapter, PROMPTS[1], 6)
