"""Reading PEFT prompt-tuning and prefix-tuning adapters: the layout of what is read, and the
refusals (each names what is wrong)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_ADAPTER, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.identity import weights_digest
from adapters.kinds import LoadContext, read_adapter
from tests.peft_kinds import make_kind_adapter
from tests.tiny_models import make_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEY = "prompt_embeddings"
N = 5  # virtual tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny llama (8 heads, 2 kv heads of 8, 2 layers) and one adapter of each kind."""
    root = tmp_path_factory.mktemp("virtual")
    base = make_model(root / "llama", "llama")
    return {
        "base": base,
        "prompt": make_kind_adapter(base, root / "prompt", "prompt_tuning", seed=1),
        "prefix": make_kind_adapter(base, root / "prefix", "prefix_tuning", seed=2),
        "projected": make_kind_adapter(
            base, root / "projected", "prefix_tuning", seed=3, prefix_projection=True
        ),
    }


@pytest.fixture(scope="module")
def context(saved: dict[str, Path]) -> LoadContext:
    config = json.loads((saved["base"] / "config.json").read_text())
    layout = BaseModelLayout.for_decoder(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
    )
    return LoadContext(layout=layout, max_lora_rank=16)


def test_prompt_tuning_reads_its_embeddings(saved: dict[str, Path], context: LoadContext) -> None:
    weights = read_adapter(saved["prompt"], context)
    embeddings = load_file(saved["prompt"] / WEIGHTS)[KEY]
    assert weights.kind == "prompt_tuning"
    assert weights.num_virtual_tokens == N
    assert weights.virtual_tokens is not None
    assert torch.equal(weights.virtual_tokens, embeddings)  # (n, hidden)
    assert not weights.modules and weights.max_rank == 0
    # spread over the 2 layers: layer 0 holds tokens 0, 2, 4; layer 1 tokens 1, 3
    (block,) = weights.blocks(2)
    assert block.key == "prompt"
    assert torch.equal(block.rows[0], embeddings[0::2])  # type: ignore[arg-type]
    assert torch.equal(block.rows[1], embeddings[1::2])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["prefix", "projected"])
def test_prefix_tuning_reads_keys_and_values_per_layer(
    saved: dict[str, Path], context: LoadContext, name: str
) -> None:
    """Row t viewed as (layers, 2, kv_width): [l, 0] layer l's key, [l, 1] its value; the
    projected variant's file holds the projection's output, read the same way."""
    weights = read_adapter(saved[name], context)
    embeddings = load_file(saved[name] / WEIGHTS)[KEY]  # (n, layers · 2 · kv_width)
    assert weights.kind == "prefix_tuning"
    assert weights.num_virtual_tokens == N
    prefix = weights.prefix
    assert prefix is not None and prefix.shape == (2, 2, N, 16)
    view = embeddings.view(N, 2, 2, 16)
    for layer in range(2):
        for t in range(N):
            assert torch.equal(prefix[layer, 0, t], view[t, layer, 0])
            assert torch.equal(prefix[layer, 1, t], view[t, layer, 1])
    (block,) = weights.blocks(2)
    assert block.key == "prefix" and block.features == 16
    rows = block.rows[1]
    assert rows is not None and rows.shape == (2 * N, 16)  # K rows, then V rows
    assert torch.equal(rows[:N], prefix[1, 0]) and torch.equal(rows[N:], prefix[1, 1])


def test_prefix_digest_covers_every_layer(
    saved: dict[str, Path], context: LoadContext, tmp_path: Path
) -> None:
    """Files changed in a later layer's keys change the digest (what catches an adapter
    changed on disk)."""
    changed = _copy_with(saved["prefix"], tmp_path / "changed", tensors=_bump_last_layer)
    assert weights_digest(read_adapter(changed, context)) != weights_digest(
        read_adapter(saved["prefix"], context)
    )


def _bump_last_layer(tensors: dict[str, torch.Tensor]) -> None:
    tensors[KEY] = tensors[KEY].clone()
    tensors[KEY][0, -1] += 1.0  # the last layer's value, last element, of token 0


def _copy_with(
    source: Path,
    dest: Path,
    config: dict[str, Any] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    shutil.copytree(source, dest)
    if config is not None:
        raw = json.loads((dest / CONFIG).read_text())
        for key, value in config.items():
            if value is _DELETE:
                raw.pop(key, None)
            else:
                raw[key] = value
        (dest / CONFIG).write_text(json.dumps(raw))
    if tensors is not None:
        loaded = load_file(dest / WEIGHTS)
        tensors(loaded)
        save_file(loaded, dest / WEIGHTS)
    return dest


_DELETE = object()


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[KEY] = tensors[KEY].clone()
    tensors[KEY][1, 3] = float("nan")


def _missing(tensors: dict[str, torch.Tensor]) -> None:
    tensors["other"] = tensors.pop(KEY)


# name → (adapter, config edits, tensor edit, code, the exact message)
REFUSALS: dict[str, tuple[str, dict[str, Any], Any, str, str]] = {
    "prompt_token_dim": (
        "prompt", {"token_dim": 32}, None, INVALID_ADAPTER,
        "adapter_config.json: token_dim is 32; the base model has 64",
    ),
    "prefix_token_dim": (
        # a prefix's token_dim is kv heads × head dim (16), not the hidden size
        "prefix", {"token_dim": 64}, None, INVALID_ADAPTER,
        "adapter_config.json: token_dim is 64; the base model has 16",
    ),
    "num_layers": (
        "prompt", {"num_layers": 4}, None, INVALID_ADAPTER,
        "adapter_config.json: num_layers is 4; the base model has 2",
    ),
    "prefix_num_layers": (
        "prefix", {"num_layers": 3}, None, INVALID_ADAPTER,
        "adapter_config.json: num_layers is 3; the base model has 2",
    ),
    "prompt_heads": (
        "prompt", {"num_attention_heads": 4}, None, INVALID_ADAPTER,
        "adapter_config.json: num_attention_heads is 4; the base model has 8",
    ),
    "prefix_heads": (
        # PEFT writes the kv heads (2) for a GQA model's prefix
        "prefix", {"num_attention_heads": 8}, None, INVALID_ADAPTER,
        "adapter_config.json: num_attention_heads is 8; the base model has 2",
    ),
    "no_num_virtual_tokens": (
        "prompt", {"num_virtual_tokens": _DELETE}, None, INVALID_ADAPTER,
        "adapter_config.json: missing 'num_virtual_tokens'",
    ),
    "zero_virtual_tokens": (
        "prefix", {"num_virtual_tokens": 0}, None, INVALID_ADAPTER,
        "adapter_config.json: num_virtual_tokens must be a positive integer",
    ),
    "more_virtual_tokens_than_saved": (
        "prompt", {"num_virtual_tokens": 6}, None, INVALID_ADAPTER,
        f"{KEY} has shape [5, 64]; the base model expects [6, 64]",
    ),
    "renamed_tensor": ("prefix", {}, _missing, INVALID_ADAPTER, "unrecognised tensor key other"),
    "nan": ("prefix", {}, _nan, INVALID_ADAPTER, f"{KEY} contains NaN or Inf values"),
    "unknown_field": (
        "prompt", {"prompt_tuning_magic": 3}, None, UNSUPPORTED_ADAPTER_FEATURE,
        "adapter_config.json: unknown field 'prompt_tuning_magic' is not supported",
    ),
    "lora_field_on_prefix": (
        "prefix", {"r": 8}, None, UNSUPPORTED_ADAPTER_FEATURE,
        "adapter_config.json: unknown field 'r' is not supported",
    ),
    "modules_to_save": (
        "prefix", {"modules_to_save": ["lm_head"]}, None, UNSUPPORTED_ADAPTER_FEATURE,
        "adapter_config.json: modules_to_save is not supported",
    ),
    "task_type": (
        "prompt", {"task_type": "SEQ_CLS"}, None, UNSUPPORTED_ADAPTER_FEATURE,
        "adapter_config.json: task_type 'SEQ_CLS' is not served (CAUSAL_LM only)",
    ),
    "encoder_decoder": (
        "prompt", {"num_transformer_submodules": 2}, None, UNSUPPORTED_ADAPTER_FEATURE,
        "adapter_config.json: num_transformer_submodules must be 1 "
        "(encoder-decoder models are not served)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_what_is_wrong(
    saved: dict[str, Path], context: LoadContext, tmp_path: Path, case: str
) -> None:
    source, config, tensors, code, message = REFUSALS[case]
    broken = _copy_with(saved[source], tmp_path / case, config or None, tensors)
    with pytest.raises(AdapterError) as info:
        read_adapter(broken, context)
    assert (info.value.code, info.value.message) == (code, message)


def test_a_missing_tensor_is_named(
    saved: dict[str, Path], context: LoadContext, tmp_path: Path
) -> None:
    """A file without ``prompt_embeddings`` (and nothing else) says what it lacks."""
    broken = _copy_with(saved["prompt"], tmp_path / "empty")
    save_file({}, broken / WEIGHTS)
    with pytest.raises(AdapterError) as info:
        read_adapter(broken, context)
    assert info.value.message == f"{WEIGHTS} lacks {KEY}"
