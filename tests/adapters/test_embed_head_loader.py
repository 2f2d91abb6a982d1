"""Reading LoRA on embed_tokens and lm_head from PEFT files: what loads, and the refusals.

The adapters are saved by PEFT itself (``tests/peft_kinds.py``) on the tiny llama (untied)
and mistral (tied), then edited to break them one way at a time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.base_layout import BaseModelLayout
from adapters.errors import (
    ADAPTER_RANK_TOO_LARGE,
    INVALID_ADAPTER,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.loader import WEIGHTS_NAME, load_lora_adapter
from tests.peft_kinds import make_kind_adapter
from tests.tiny_models import make_model

EMBED = "base_model.model.model.embed_tokens"
HEAD = "base_model.model.lm_head"


class HfBase:
    """The served base's embeddings and head, as the engine's ``ServedBaseWeights`` gives them."""

    def __init__(self, model_dir: Path) -> None:
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def weight(self, layer: int, target: str) -> torch.Tensor:
        raise AssertionError("not needed by a LoRA on the embeddings")

    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()  # type: ignore[no-any-return]

    def head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach()  # type: ignore[no-any-return]


def layout_of(model_dir: Path) -> BaseModelLayout:
    from engine.arch import ModelArch

    return ModelArch.load(model_dir).layout()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eh-bases")
    return {family: make_model(root / family, family) for family in ("llama", "mistral")}


@pytest.fixture(scope="module")
def saved(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embed + head + q/v adapter on the untied llama, saved by PEFT."""
    out = tmp_path_factory.mktemp("eh-adapter") / "eh"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_kind_adapter(
            bases["llama"], out, "lora_embed_head", seed=1, r=4, alpha=8, with_attention=True
        )


def edited(source: Path, out: Path, change: Any = None, config: Any = None) -> Path:
    """A copy of adapter ``source`` with its tensors (and config) changed in place."""
    out.mkdir()
    tensors = load_file(source / WEIGHTS_NAME)
    raw = json.loads((source / "adapter_config.json").read_text())
    if change is not None:
        change(tensors)
    if config is not None:
        raw.update(config)
    save_file(tensors, str(out / WEIGHTS_NAME))
    (out / "adapter_config.json").write_text(json.dumps(raw))
    return out


def refused(path: Path, base_dir: Path, max_rank: int = 16, base: Any = "hf") -> AdapterError:
    served = HfBase(base_dir) if base == "hf" else base
    with pytest.raises(AdapterError) as info:
        load_lora_adapter(path, layout_of(base_dir), max_rank, base=served)
    return info.value


def test_loads_what_peft_saved(saved: Path, bases: dict[str, Path]) -> None:
    tensors = load_file(saved / WEIGHTS_NAME)
    weights = load_lora_adapter(saved, layout_of(bases["llama"]), 16, base=HfBase(bases["llama"]))
    assert weights.embedding is not None and weights.head is not None
    assert torch.equal(weights.embedding.lora_a, tensors[f"{EMBED}.lora_embedding_A"])
    assert torch.equal(weights.embedding.lora_b, tensors[f"{EMBED}.lora_embedding_B"])
    assert torch.equal(weights.head.lora_a, tensors[f"{HEAD}.lora_A.weight"])
    assert torch.equal(weights.head.lora_b, tensors[f"{HEAD}.lora_B.weight"])
    assert weights.embedding.scaling == weights.head.scaling == 2.0
    assert len(weights.modules) == 2 * 2  # q_proj and v_proj in both layers
    keys = [b.key for b in weights.blocks(2)]
    assert keys == ["embed_a", "embed_b", "head_a", "head_b"]
    assert [b.scaling for b in weights.blocks(2)] == [1.0, 2.0, 1.0, 2.0]


def test_base_matrices_that_differ_from_the_served_base_are_refused(
    saved: Path, bases: dict[str, Path], tmp_path: Path
) -> None:
    def trained_token(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{EMBED}.base_layer.weight"][7] += 0.5

    error = refused(edited(saved, tmp_path / "a", trained_token), bases["llama"])
    assert error.code == INVALID_ADAPTER
    assert error.message == (
        f"{EMBED}.base_layer.weight differs from the served base's embed_tokens weight: the "
        "adapter was saved from other base weights (trained or resized token embeddings are "
        "not served)"
    )

    def other_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{HEAD}.base_layer.weight"] *= 2

    error = refused(edited(saved, tmp_path / "b", other_head), bases["llama"])
    assert error.message.startswith(f"{HEAD}.base_layer.weight differs from the served base's")

    def resized(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{EMBED}.base_layer.weight"] = torch.zeros(330, 64)

    error = refused(edited(saved, tmp_path / "c", resized), bases["llama"])
    assert error.code == INVALID_ADAPTER
    assert error.message == (
        f"{EMBED}.base_layer.weight has shape [330, 64]; the base model expects [320, 64] "
        "(a resized vocabulary is not served)"
    )
    # without the served weights nothing can vouch for them
    error = refused(saved, bases["llama"], base=None)
    assert error.code == UNSUPPORTED_ADAPTER_FEATURE
    assert error.message == (
        f"{EMBED}.base_layer.weight cannot be checked here: the served base weights are not "
        "available"
    )


def test_wrong_shapes_and_ranks_are_refused(
    saved: Path, bases: dict[str, Path], tmp_path: Path
) -> None:
    def wrong_vocab(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{EMBED}.lora_embedding_A"] = torch.zeros(4, 300)

    error = refused(edited(saved, tmp_path / "a", wrong_vocab), bases["llama"])
    assert error.code == INVALID_ADAPTER
    assert error.message == (
        f"{EMBED}.lora_embedding_A has shape [4, 300]; the base model expects [4, 320]"
    )

    def wrong_rank(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{HEAD}.lora_B.weight"] = torch.zeros(320, 5)

    error = refused(edited(saved, tmp_path / "b", wrong_rank), bases["llama"])
    assert (
        error.message == f"{HEAD}.lora_B.weight has shape [320, 5]; the base model expects [320, 4]"
    )

    def missing(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[f"{EMBED}.lora_embedding_B"]

    error = refused(edited(saved, tmp_path / "c", missing), bases["llama"])
    assert error.message == f"{WEIGHTS_NAME} lacks {EMBED}.lora_embedding_B"

    error = refused(saved, bases["llama"], max_rank=2)
    assert error.code == ADAPTER_RANK_TOO_LARGE
    assert error.message == "adapter rank 4 exceeds the server's max_lora_rank 2"

    error = refused(edited(saved, tmp_path / "d", config={"use_dora": True}), bases["llama"])
    assert error.code == UNSUPPORTED_ADAPTER_FEATURE
    assert error.message == "DoRA (use_dora) on embed_tokens or lm_head is not served"


def test_tied_head_is_the_embeddings_transposed(bases: dict[str, Path], tmp_path: Path) -> None:
    """With ensure_weight_tying on the tied mistral, lm_head's LoRA is the embedding's
    transposed; a file whose lm_head tensors say otherwise is refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_kind_adapter(
            bases["mistral"], tmp_path / "tied", "lora_embed_head", seed=2,
            ensure_weight_tying=True,
        )  # fmt: skip
    assert "lm_head" not in json.loads((path / "adapter_config.json").read_text())["target_modules"]
    layout = layout_of(bases["mistral"])
    weights = load_lora_adapter(path, layout, 16, base=HfBase(bases["mistral"]))
    assert weights.embedding is not None and weights.head is not None
    assert torch.equal(weights.head.lora_a, weights.embedding.lora_b.T)
    assert torch.equal(weights.head.lora_b, weights.embedding.lora_a.T)

    def untied(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{HEAD}.lora_A.weight"] = tensors[f"{HEAD}.lora_A.weight"] + 1

    error = refused(edited(path, tmp_path / "bad", untied), bases["mistral"])
    assert error.code == INVALID_ADAPTER
    assert error.message == (
        f"{HEAD}.lora_A.weight is not the embedding's LoRA transposed, though "
        "ensure_weight_tying ties lm_head to embed_tokens"
    )


def test_other_kinds_still_refuse_the_embeddings(bases: dict[str, Path], tmp_path: Path) -> None:
    from adapters.peft_config import LoraAdapterConfig
    from adapters.peft_targets import plan_modules

    config = LoraAdapterConfig(r=4, lora_alpha=8, target_modules=("q_proj", "embed_tokens"))
    with pytest.raises(AdapterError) as info:
        plan_modules(config, layout_of(bases["llama"]))
    assert info.value.code == UNSUPPORTED_ADAPTER_FEATURE
    assert info.value.message == (
        "target module 'embed_tokens': this adapter kind's embed_tokens is not served"
    )
