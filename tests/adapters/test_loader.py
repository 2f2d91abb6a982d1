"""Reading PEFT LoRA adapters: the deltas PEFT itself computes, and every refusal.

Adapters are made by PEFT (``get_peft_model`` + ``save_pretrained``) on a tiny random Llama;
refusals start from a valid saved adapter and break one thing.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from adapters.base_layout import BaseModelLayout
from adapters.errors import (
    ADAPTER_NOT_FOUND,
    ADAPTER_RANK_TOO_LARGE,
    INVALID_ADAPTER,
    PICKLE_REFUSED,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.loader import CONFIG_NAME, WEIGHTS_NAME, load_lora_adapter
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import is_targeted, module_rank
from tests.adapters.conftest import save_peft_adapter

MAX_RANK = 16
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DELETE = object()  # a config change that removes the field

# ---------------------------------------------------------------- agreement with PEFT

PEFT_CASES: dict[str, dict[str, Any]] = {
    "list": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "regex": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": r"model\.layers\.\d+\.(self_attn\.k_proj|mlp\.(gate|down)_proj)",
    },
    "regex_one_layer": {"r": 2, "lora_alpha": 4, "target_modules": r".*1\.self_attn\.o_proj"},
    "all_linear": {"r": 4, "lora_alpha": 16, "target_modules": "all-linear"},
    "rslora": {
        "r": 8,
        "lora_alpha": 4,
        "use_rslora": True,
        "target_modules": ["q_proj", "up_proj"],
    },
    "alpha_not_r": {"r": 8, "lora_alpha": 3, "target_modules": ["o_proj", "gate_proj"]},
    "rank_and_alpha_patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_TARGETS,
        # per layer and module (full path, regex) and per module name; first match wins
        "rank_pattern": {
            "model.layers.1.self_attn.q_proj": 2,
            r"layers\.0\.mlp\.up_proj": 3,
            "down_proj": 6,
        },
        "alpha_pattern": {"model.layers.0.mlp.down_proj": 12, "v_proj": 1.5, "k_proj": 5},
    },
    "patterns_with_rslora": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "down_proj"],
        "rank_pattern": {"down_proj": 9},
        "alpha_pattern": {"model.layers.1.self_attn.q_proj": 2},
    },
    "layers_to_transform": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "down_proj"],
        "layers_to_transform": [1],
    },
    "layers_to_transform_int_with_pattern": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["k_proj", "up_proj"],
        "layers_to_transform": 0,
        "layers_pattern": "layers",
    },
    "layers_pattern_list": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["o_proj", "gate_proj"],
        "layers_to_transform": [0, 1],
        "layers_pattern": ["blocks", "layers"],
    },
    "exact_path_skips_layer_filter": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"],
        "layers_to_transform": [1],
    },
    "exclude_modules": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "exclude_modules": ["k_proj", "model.layers.0.mlp.up_proj"],
    },
    "exclude_regex": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_TARGETS,
        "exclude_modules": r".*\.1\.mlp\..*",
    },
}


def peft_wrapped(model: Any) -> dict[str, LoraLayer]:
    """The modules PEFT adapted, by path inside the transformers model."""
    inner = model.base_model.model
    return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


def assert_matches_peft(loaded: Any, model: Any, layout: BaseModelLayout) -> None:
    wrapped = peft_wrapped(model)
    assert {layout.module_path(*key) for key in loaded.modules} == set(wrapped)
    for (layer, target), module in loaded.modules.items():
        peft_layer = wrapped[layout.module_path(layer, target)]
        assert module.rank == peft_layer.r["default"]
        assert module.scaling == peft_layer.scaling["default"]
        assert module.lora_a.is_contiguous() and module.lora_b.is_contiguous()
        with torch.no_grad():
            expected = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(module.delta_weight(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_deltas_match_peft(
    case: str, base_model: PreTrainedModel, layout: BaseModelLayout, tmp_path: Path
) -> None:
    model = save_peft_adapter(base_model, tmp_path / case, **PEFT_CASES[case])
    loaded = load_lora_adapter(tmp_path / case, layout, MAX_RANK)
    assert_matches_peft(loaded, model, layout)
    assert loaded.name == case
    assert loaded.targets == {target for _, target in loaded.modules}
    assert loaded.nbytes == sum(
        4 * (m.lora_a.numel() + m.lora_b.numel()) for m in loaded.modules.values()
    )
    assert loaded.max_rank == max(m.rank for m in loaded.modules.values())


def test_literal_all_linear_and_fan_in_fan_out(
    base_model: PreTrainedModel,
    layout: BaseModelLayout,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # PEFT saves "all-linear" expanded to module paths; a hand-written config keeps the word.
    # fan_in_fan_out on nn.Linear: PEFT warns and uses false (and even saves false), so the
    # loader does the same for a config that says true.
    directory = tmp_path / "literal"
    model = save_peft_adapter(
        base_model, directory, r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True
    )
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert isinstance(config["target_modules"], list)
    assert config["fan_in_fan_out"] is False
    config["target_modules"] = "ALL-LINEAR"
    config["fan_in_fan_out"] = True
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="adapters.peft_config"):
        loaded = load_lora_adapter(directory, layout, MAX_RANK)
    assert "fan_in_fan_out" in caplog.text
    assert len(loaded.modules) == layout.num_layers * len(ALL_TARGETS)
    assert_matches_peft(loaded, model, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion(
    reference_adapter: Path, layout: BaseModelLayout, dtype: torch.dtype
) -> None:
    full = load_lora_adapter(reference_adapter, layout, MAX_RANK)
    half = load_lora_adapter(reference_adapter, layout, MAX_RANK, dtype=dtype)
    for key, module in half.modules.items():
        assert module.lora_a.dtype == module.lora_b.dtype == dtype
        assert torch.equal(module.lora_a, full.modules[key].lora_a.to(dtype))
    assert half.nbytes * 2 == full.nbytes


def test_pin_memory_copies_every_tensor(
    reference_adapter: Path, layout: BaseModelLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPU-only torch cannot pin; stand in a copy to check the structure is preserved.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    loaded = load_lora_adapter(reference_adapter, layout, MAX_RANK)
    pinned = loaded.pin_memory()
    assert pinned.name == loaded.name and pinned.config == loaded.config
    assert pinned.modules.keys() == loaded.modules.keys()
    for key, module in pinned.modules.items():
        assert module.scaling == loaded.modules[key].scaling
        assert torch.equal(module.lora_b, loaded.modules[key].lora_b)
        assert module.lora_a.data_ptr() != loaded.modules[key].lora_a.data_ptr()


def test_layout_matches_the_model(base_model: PreTrainedModel, layout: BaseModelLayout) -> None:
    modules = dict(base_model.named_modules())
    for _, target, path in layout.modules():
        linear = modules[path]
        assert layout.linear_shapes[target] == (linear.in_features, linear.out_features)
    with pytest.raises(ValueError):
        layout.module_path(layout.num_layers, "q_proj")
    with pytest.raises(ValueError):
        BaseModelLayout(num_layers=2, linear_shapes={"c_attn": (4, 4)})


def test_config_api_mirrors_peft_matching() -> None:
    config = LoraAdapterConfig(
        r=4,
        lora_alpha=8,
        target_modules=("q_proj",),
        layers_to_transform=(1,),
        rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 3},
    )
    assert not is_targeted(config, "model.layers.0.self_attn.q_proj")
    assert is_targeted(config, "model.layers.1.self_attn.q_proj")
    assert not is_targeted(config, "model.layers.1.self_attn.xq_proj")  # suffix after a dot only
    assert module_rank(config, "model.layers.1.self_attn.q_proj") == 2  # first key wins
    assert config.max_rank == 4


# ---------------------------------------------------------------- refusals


def assert_refused(
    path: Path,
    layout: BaseModelLayout,
    code: str,
    fragment: str,
    *,
    max_rank: int = MAX_RANK,
    dtype: torch.dtype = torch.float32,
) -> AdapterError:
    """The load fails with ``code``, the message says ``fragment`` and names no server path."""
    with pytest.raises(AdapterError) as info:
        load_lora_adapter(path, layout, max_rank, dtype=dtype)
    error = info.value
    assert error.code == code, error.message
    assert fragment in error.message
    root = str(path.parent)
    assert root not in error.message and root not in str(error)
    assert isinstance(error, ValueError)
    return error


def copy_adapter(reference: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "adapter"
    shutil.copytree(reference, directory)
    return directory


def with_config(reference: Path, tmp_path: Path, changes: dict[str, Any]) -> Path:
    directory = copy_adapter(reference, tmp_path)
    config = json.loads((directory / CONFIG_NAME).read_text())
    for name, value in changes.items():
        if value is DELETE:
            config.pop(name)
        else:
            config[name] = value
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    return directory


def with_tensors(
    reference: Path, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None]
) -> Path:
    directory = copy_adapter(reference, tmp_path)
    tensors = load_file(directory / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)
    return directory


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
A_KEY = "base_model.model.model.layers.{}.{}.lora_A.weight"

CONFIG_REFUSALS: dict[str, tuple[dict[str, Any], str, str]] = {
    "missing_r": ({"r": DELETE}, INVALID_ADAPTER, "missing 'r'"),
    "missing_lora_alpha": ({"lora_alpha": DELETE}, INVALID_ADAPTER, "missing 'lora_alpha'"),
    "missing_target_modules": (
        {"target_modules": DELETE},
        INVALID_ADAPTER,
        "missing 'target_modules'",
    ),
    "r_zero": ({"r": 0}, INVALID_ADAPTER, "r must be a positive integer, got 0"),
    "r_negative": ({"r": -4}, INVALID_ADAPTER, "r must be a positive integer, got -4"),
    "r_float": ({"r": 4.0}, INVALID_ADAPTER, "r must be a positive integer, got 4.0"),
    "r_string": ({"r": "4"}, INVALID_ADAPTER, "r must be a positive integer, got '4'"),
    "r_bool": ({"r": True}, INVALID_ADAPTER, "r must be a positive integer, got True"),
    "alpha_string": ({"lora_alpha": "8"}, INVALID_ADAPTER, "lora_alpha must be a finite number"),
    "alpha_nan": ({"lora_alpha": float("nan")}, INVALID_ADAPTER, "NaN is not a JSON number"),
    "peft_type": ({"peft_type": "PREFIX_TUNING"}, INVALID_ADAPTER, "peft_type is 'PREFIX_TUNING'"),
    "rank_above_max": ({"r": 32}, ADAPTER_RANK_TOO_LARGE, "adapter rank 32 exceeds"),
    "rank_pattern_above_max": (
        {"rank_pattern": {"q_proj": 64}},
        ADAPTER_RANK_TOO_LARGE,
        "adapter rank 64 exceeds the server's max_lora_rank 16",
    ),
    "rank_pattern_zero": (
        {"rank_pattern": {"q_proj": 0}},
        INVALID_ADAPTER,
        "rank_pattern['q_proj']",
    ),
    "use_dora": (
        {"use_dora": True},
        UNSUPPORTED_ADAPTER_FEATURE,
        "DoRA (use_dora) is not supported",
    ),
    "modules_to_save": (
        {"modules_to_save": ["lm_head"]},
        UNSUPPORTED_ADAPTER_FEATURE,
        "modules_to_save ['lm_head'] is not supported",
    ),
    "bias_all": ({"bias": "all"}, UNSUPPORTED_ADAPTER_FEATURE, "bias 'all'"),
    "bias_lora_only": ({"bias": "lora_only"}, UNSUPPORTED_ADAPTER_FEATURE, "bias 'lora_only'"),
    "bias_unknown": ({"bias": "some"}, INVALID_ADAPTER, "bias must be 'none'"),
    "lora_bias": ({"lora_bias": True}, UNSUPPORTED_ADAPTER_FEATURE, "lora_bias"),
    "use_qalora": ({"use_qalora": True}, UNSUPPORTED_ADAPTER_FEATURE, "QA-LoRA"),
    "alora": ({"alora_invocation_tokens": [5, 6]}, UNSUPPORTED_ADAPTER_FEATURE, "activated LoRA"),
    "kasa_defaults": ({"kasa_config": {}}, UNSUPPORTED_ADAPTER_FEATURE, "KaSA (kasa_config)"),
    "bdlora": ({"use_bdlora": {"nblocks": 2}}, UNSUPPORTED_ADAPTER_FEATURE, "block-diagonal"),
    "target_parameters": (
        {"target_parameters": ["mlp.experts.down_proj"]},
        UNSUPPORTED_ADAPTER_FEATURE,
        "target_parameters",
    ),
    "layer_replication": (
        {"layer_replication": [[0, 2]]},
        UNSUPPORTED_ADAPTER_FEATURE,
        "layer_replication",
    ),
    "init_pissa": (
        {"init_lora_weights": "pissa_niter_4"},
        UNSUPPORTED_ADAPTER_FEATURE,
        "rewritten base",
    ),
    "init_loftq": ({"init_lora_weights": "loftq"}, UNSUPPORTED_ADAPTER_FEATURE, "rewritten base"),
    "init_unknown": ({"init_lora_weights": "mystery"}, UNSUPPORTED_ADAPTER_FEATURE, "'mystery'"),
    "unknown_field": (
        {"use_hydra": True},
        UNSUPPORTED_ADAPTER_FEATURE,
        "unknown field 'use_hydra'",
    ),
    "target_base_lacks": ({"target_modules": ["q_proj", "c_attn"]}, INVALID_ADAPTER, "'c_attn'"),
    "target_lm_head_on_a_file_of_other_modules": (
        {"target_modules": ["q_proj", "lm_head"]},
        INVALID_ADAPTER,
        "does not target",
    ),
    "target_empty": ({"target_modules": []}, INVALID_ADAPTER, "non-empty list"),
    "target_number": ({"target_modules": 5}, INVALID_ADAPTER, "a string or a list of strings"),
    "regex_selects_nothing": (
        {"target_modules": r".*\.c_attn"},
        INVALID_ADAPTER,
        "selects no layer",
    ),
    "layers_out_of_range": ({"layers_to_transform": [7]}, INVALID_ADAPTER, "selects no layer"),
    # valid alone, invalid inside the regex PEFT builds around it
    "rank_pattern_bad_in_context": (
        {"rank_pattern": {"(?i)q_proj": 2}},
        INVALID_ADAPTER,
        "rank_pattern key '(?i)q_proj' is not a valid regular expression",
    ),
    "layers_pattern_bad_in_context": (
        {"layers_to_transform": [0], "layers_pattern": "(?P<idx>layers)"},
        INVALID_ADAPTER,
        "layers_pattern '(?P<idx>layers)' is not a valid regular expression",
    ),
    "bad_regex": ({"target_modules": "(("}, INVALID_ADAPTER, "not a valid regular expression"),
    "regex_with_layers": (
        {"target_modules": ".*q_proj", "layers_to_transform": [0]},
        INVALID_ADAPTER,
        "layers_to_transform cannot be used when target_modules is a str",
    ),
    "layers_pattern_alone": (
        {"layers_pattern": "layers"},
        INVALID_ADAPTER,
        "needs layers_to_transform",
    ),
    # The file holds rank-4 tensors for q_proj, v_proj and down_proj.
    "r_disagrees_with_tensors": ({"r": 8}, INVALID_ADAPTER, "gives it rank 8"),
    "tensors_not_targeted": (
        {"target_modules": ["q_proj", "v_proj"]},
        INVALID_ADAPTER,
        "adapter_config.json does not target",
    ),
    "targeted_without_tensors": ({"target_modules": ALL_TARGETS}, INVALID_ADAPTER, "lacks"),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_config_refusals(
    case: str, reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    changes, code, fragment = CONFIG_REFUSALS[case]
    assert_refused(with_config(reference_adapter, tmp_path, changes), layout, code, fragment)


def test_missing_directory(layout: BaseModelLayout, tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope", layout, ADAPTER_NOT_FOUND, "adapter directory not found")
    (tmp_path / "file").write_text("x")
    assert_refused(tmp_path / "file", layout, ADAPTER_NOT_FOUND, "not found")


def test_config_file_refusals(
    reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    directory = copy_adapter(reference_adapter, tmp_path)
    config = directory / CONFIG_NAME
    config.unlink()
    assert_refused(directory, layout, INVALID_ADAPTER, "no adapter_config.json")
    config.write_text("{'r': 4,")
    assert_refused(directory, layout, INVALID_ADAPTER, "adapter_config.json: not valid JSON")
    config.write_text("[4, 8]")
    assert_refused(directory, layout, INVALID_ADAPTER, "must be a JSON object")
    config.write_text("[" * 100_000)
    assert_refused(directory, layout, INVALID_ADAPTER, "not valid JSON")
    with config.open("wb") as f:
        f.truncate(17 << 20)  # sparse: never read
    assert_refused(directory, layout, INVALID_ADAPTER, "adapter_config.json is too large")


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]

    return edit


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def _poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[V_B] = tensors[V_B].clone()
        tensors[V_B][3, 1] = value

    return edit


TENSOR_REFUSALS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str, str]] = {
    "key_for_layer_base_lacks": (
        _set(A_KEY.format(5, "self_attn.q_proj"), torch.zeros(4, 64)),
        INVALID_ADAPTER,
        "does not target or the base model does not have",
    ),
    "key_for_module_base_lacks": (
        _set(A_KEY.format(0, "self_attn.c_attn"), torch.zeros(4, 64)),
        INVALID_ADAPTER,
        "does not target or the base model does not have",
    ),
    "key_with_adapter_name": (
        _set(Q_A.replace("lora_A.", "lora_A.default."), torch.zeros(4, 64)),
        INVALID_ADAPTER,
        "unrecognised tensor key",
    ),
    "lora_on_untargeted_lm_head": (
        _set("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64)),
        INVALID_ADAPTER,
        "lm_head.lora_A.weight is for a module that adapter_config.json does not target",
    ),
    "lora_on_untargeted_embedding": (
        _set("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 320)),
        INVALID_ADAPTER,
        "unrecognised tensor key base_model.model.model.embed_tokens.lora_embedding_A",
    ),
    "saved_embed_tokens_untargeted": (
        _set("base_model.model.model.embed_tokens.weight", torch.zeros(320, 64)),
        INVALID_ADAPTER,
        "unrecognised tensor key base_model.model.model.embed_tokens.weight",
    ),
    "dora_magnitude": (
        _set(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64)
        ),
        UNSUPPORTED_ADAPTER_FEATURE,
        "DoRA magnitude vectors",
    ),
    "lora_b_bias": (
        _set(Q_B.replace(".weight", ".bias"), torch.zeros(64)),
        UNSUPPORTED_ADAPTER_FEATURE,
        "lora_bias",
    ),
    "missing_lora_b": (_drop(Q_B), INVALID_ADAPTER, f"lacks {Q_B}"),
    "in_features_mismatch": (
        _set(Q_A, torch.zeros(4, 65)),
        INVALID_ADAPTER,
        "has shape [4, 65]; the base model expects [rank, 64]",
    ),
    "out_features_mismatch": (
        _set(V_B, torch.zeros(17, 4)),
        INVALID_ADAPTER,
        "has shape [17, 4]; the base model expects [16, rank]",
    ),
    "one_dimensional": (_set(Q_A, torch.zeros(256)), INVALID_ADAPTER, "has shape [256]"),
    "rank_mismatch": (
        _set(Q_A, torch.zeros(5, 64)),
        INVALID_ADAPTER,
        "lora_A has rank 5 and lora_B rank 4, but adapter_config.json gives it rank 4",
    ),
    "integer_dtype": (
        _set(Q_A, torch.zeros(4, 64, dtype=torch.int32)),
        INVALID_ADAPTER,
        "has dtype I32",
    ),
    "nan": (_poison(float("nan")), INVALID_ADAPTER, f"{V_B} contains NaN or Inf"),
    "inf": (_poison(float("inf")), INVALID_ADAPTER, "contains NaN or Inf"),
    "minus_inf": (_poison(float("-inf")), INVALID_ADAPTER, "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", TENSOR_REFUSALS)
def test_tensor_refusals(
    case: str, reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    edit, code, fragment = TENSOR_REFUSALS[case]
    assert_refused(with_tensors(reference_adapter, tmp_path, edit), layout, code, fragment)


def test_overflow_on_conversion(
    reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    directory = with_tensors(reference_adapter, tmp_path, _poison(1e6))
    load_lora_adapter(directory, layout, MAX_RANK)  # finite in float32
    assert_refused(
        directory, layout, INVALID_ADAPTER, "overflows torch.float16", dtype=torch.float16
    )


def _corrupt(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(make(path.read_bytes()))

    return write


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 12345\n"
)
FILE_REFUSALS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated_data": (lambda data: data[:-10], "truncated or padded"),
    "truncated_header": (lambda data: data[:100], "its header claims"),
    "padded": (lambda data: data + b"\0" * 16, "truncated or padded"),
    "tiny": (lambda data: data[:3], "truncated (3 bytes)"),
    "empty": (lambda data: b"", "truncated (0 bytes)"),
    "lfs_pointer": (lambda data: LFS_POINTER, "git-LFS pointer"),
    "huge_header": (
        lambda data: struct.pack("<Q", 1 << 62) + b"{}",
        f"header claims {1 << 62} bytes",
    ),
    "header_not_json": (lambda data: struct.pack("<Q", 4) + b"\xff\xfe{[", "header is not JSON"),
    "header_not_object": (lambda data: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "bad_entry": (
        lambda data: struct.pack("<Q", 23) + b'{"x": {"dtype": "F32"}}',
        "bad header entry for 'x'",
    ),
}


@pytest.mark.parametrize("case", FILE_REFUSALS)
def test_corrupt_safetensors(
    case: str, reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    make, fragment = FILE_REFUSALS[case]
    directory = copy_adapter(reference_adapter, tmp_path)
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(make(weights.read_bytes()))
    error = assert_refused(directory, layout, INVALID_ADAPTER, fragment)
    assert error.message.startswith(f"{WEIGHTS_NAME} is corrupt")


def test_safetensors_own_checks_are_wrapped(
    reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    # Sizes add up but the offsets overlap: caught by safetensors, reported as corrupt.
    directory = copy_adapter(reference_adapter, tmp_path)
    weights = directory / WEIGHTS_NAME
    data = weights.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    header[Q_A]["data_offsets"] = [
        0,
        header[Q_A]["data_offsets"][1] - header[Q_A]["data_offsets"][0],
    ]
    raw = json.dumps(header).encode().ljust(header_size)
    weights.write_bytes(data[:8] + raw + data[8 + header_size :])
    assert_refused(directory, layout, INVALID_ADAPTER, f"{WEIGHTS_NAME} is corrupt")


class _Marker:
    """Unpickling this creates a file: evidence that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., None], tuple[Path]]:
        return Path.touch, (self.path,)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.pth"])
def test_pickle_refused_unopened(
    name: str,
    reference_adapter: Path,
    layout: BaseModelLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = copy_adapter(reference_adapter, tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    marker = tmp_path / "unpickled"
    (directory / name).write_bytes(pickle.dumps(_Marker(marker)))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was loaded")

    with monkeypatch.context() as patch:
        for target in (torch, pickle):
            patch.setattr(target, "load", forbidden)
        patch.setattr(pickle, "loads", forbidden)
        error = assert_refused(
            directory,
            layout,
            PICKLE_REFUSED,
            f"pickle refused: the adapter has only pickled weights ({name})",
        )
    assert not marker.exists()
    assert WEIGHTS_NAME in error.message
    pickle.loads((directory / name).read_bytes())  # the marker works: unpickling creates it
    assert marker.exists()


def test_pickle_beside_safetensors_is_ignored(
    reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path
) -> None:
    directory = copy_adapter(reference_adapter, tmp_path)
    marker = tmp_path / "unpickled"
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    load_lora_adapter(directory, layout, MAX_RANK)
    assert not marker.exists()


def test_no_weights(reference_adapter: Path, layout: BaseModelLayout, tmp_path: Path) -> None:
    directory = copy_adapter(reference_adapter, tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    assert_refused(directory, layout, INVALID_ADAPTER, "no adapter_model.safetensors")


def test_overlapping_rank_patterns_refused_like_peft(
    base_model: PreTrainedModel, layout: BaseModelLayout, tmp_path: Path
) -> None:
    # PEFT trains with the first matching key in insertion order, but save_pretrained sorts
    # the keys, so on reload (PEFT's and ours) layer 1's q_proj gets rank 3 while the saved
    # tensors have rank 2: PEFT's own from_pretrained fails with a size mismatch.
    save_peft_adapter(
        base_model,
        tmp_path / "overlap",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 3},
    )
    saved = json.loads((tmp_path / "overlap" / CONFIG_NAME).read_text())
    assert list(saved["rank_pattern"]) == ["model.layers.1.self_attn.q_proj", "q_proj"]
    assert_refused(tmp_path / "overlap", layout, INVALID_ADAPTER, "gives it rank 3")


PEFT_REFUSALS: dict[str, tuple[dict[str, Any], str, str]] = {
    "dora": ({"use_dora": True}, UNSUPPORTED_ADAPTER_FEATURE, "DoRA"),
    "bias_lora_only": ({"bias": "lora_only"}, UNSUPPORTED_ADAPTER_FEATURE, "bias 'lora_only'"),
    "lora_bias": ({"lora_bias": True}, UNSUPPORTED_ADAPTER_FEATURE, "lora_bias"),
    "modules_to_save": (
        {"modules_to_save": ["lm_head"]},
        UNSUPPORTED_ADAPTER_FEATURE,
        "modules_to_save",
    ),
    # LoRA on lm_head and embed_tokens is served: tests/adapters/test_embed_head_loader.py
    "rank_above_max": ({"r": 17}, ADAPTER_RANK_TOO_LARGE, "adapter rank 17 exceeds"),
}


@pytest.mark.parametrize("case", PEFT_REFUSALS)
def test_peft_saved_unsupported_features(
    case: str, base_model: PreTrainedModel, layout: BaseModelLayout, tmp_path: Path
) -> None:
    changes, code, fragment = PEFT_REFUSALS[case]
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **changes}
    save_peft_adapter(base_model, tmp_path / case, **kwargs)
    assert_refused(tmp_path / case, layout, code, fragment)
