"""Reading DoRA, AdaLoRA and IA³ directories, and refusing what is not served, with the
exact error each gets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_ADAPTER, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.kinds import LoadContext, read_adapter
from adapters.weights import ADALORA, DORA, IA3, LORA
from tests.peft_kinds import make_kind_adapter
from tests.tiny_models import make_adapter, make_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class _Base:
    """Stands in for the served weights: the checkpoint's own, by (layer, target)."""

    def __init__(self, model_dir: Path, layout: BaseModelLayout) -> None:
        self.tensors = load_file(model_dir / "model.safetensors")
        self.layout = layout

    def weight(self, layer: int, target: str) -> torch.Tensor:
        return self.tensors[f"{self.layout.module_path(layer, target)}.weight"].float()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.fixture(scope="module")
def context(base_dir: Path) -> LoadContext:
    config = json.loads((base_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    layout = BaseModelLayout.for_decoder(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_heads=heads,
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["hidden_size"] // heads,
    )
    return LoadContext(layout, max_lora_rank=16, base=_Base(base_dir, layout))


@pytest.fixture(scope="module")
def saved(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "dora": make_kind_adapter(base_dir, root / "dora", "dora", seed=1, r=4),
        "adalora": make_kind_adapter(base_dir, root / "ada", "adalora", seed=2, prune=True),
        "ia3": make_kind_adapter(base_dir, root / "ia3", "ia3", seed=3),
        "lora": make_adapter(base_dir, root / "lora", r=4, alpha=8, targets=["q_proj"], seed=4),
    }


def edited(
    source: Path,
    target: Path,
    config: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """A copy of the adapter at ``source`` with its config or tensors edited."""
    target.mkdir()
    raw = json.loads((source / CONFIG).read_text())
    if config is not None:
        config(raw)
    (target / CONFIG).write_text(json.dumps(raw))
    weights = load_file(source / WEIGHTS)
    if tensors is not None:
        tensors(weights)
    save_file(weights, target / WEIGHTS)
    return target


def refused(path: Path, context: LoadContext, code: str, fragment: str) -> None:
    with pytest.raises(AdapterError) as info:
        read_adapter(path, context)
    assert info.value.code == code, info.value.message
    assert fragment in info.value.message, info.value.message
    assert str(path.parent) not in info.value.message


def test_each_kind_is_read_as_its_own(saved: dict[str, Path], context: LoadContext) -> None:
    kinds = {name: read_adapter(path, context) for name, path in saved.items()}
    assert {n: w.kind for n, w in kinds.items()} == {
        "dora": DORA, "adalora": ADALORA, "ia3": IA3, "lora": LORA,
    }  # fmt: skip
    assert kinds["dora"].dora.keys() == kinds["dora"].modules.keys()
    assert kinds["ia3"].modules == {}
    assert {v.feedforward for v in kinds["ia3"].ia3.values()} == {True, False}
    # pruned AdaLoRA: ranks below init_r, E folded into A
    ranks = {m.rank for m in kinds["adalora"].modules.values()}
    assert max(ranks) < 8, ranks


def test_adalora_fold_is_pefts_math(saved: dict[str, Path], context: LoadContext) -> None:
    weights = read_adapter(saved["adalora"], context)
    raw = json.loads((saved["adalora"] / CONFIG).read_text())
    tensors = load_file(saved["adalora"] / WEIGHTS)
    (layer, target), module = next(iter(weights.modules.items()))
    prefix = f"base_model.model.{context.layout.module_path(layer, target)}"
    a, e, b = (tensors[f"{prefix}.lora_{x}"] for x in "AEB")
    ranknum = torch.tensor(float(raw["init_r"])) + 1e-5
    want = (b @ (a * e)) * raw["lora_alpha"] / ranknum
    assert torch.allclose(module.delta_weight(), want, atol=1e-6)


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "OFT", "BOFT", "VERA", "FOURIERFT"])
def test_other_peft_methods_are_refused_by_name(
    saved: dict[str, Path], context: LoadContext, tmp_path: Path, peft_type: str
) -> None:
    path = edited(saved["lora"], tmp_path / "a", config=lambda c: c.update(peft_type=peft_type))
    refused(path, context, UNSUPPORTED_ADAPTER_FEATURE, f"peft_type {peft_type!r} is not served")


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config.update(fields)


def _retensor(key_part: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in tensors if key_part in k)
        tensors[key] = make(tensors[key])

    return edit


def _drop(key_part: str) -> Any:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[next(k for k in tensors if key_part in k)]

    return edit


CASES: dict[str, tuple[str, Any, Any, str, str]] = {
    # name: (source, config edit, tensor edit, code, fragment)
    "dora_magnitude_shape": (
        "dora", None, _retensor("lora_magnitude_vector", lambda t: t[:-1].clone()),
        INVALID_ADAPTER, "the base model expects [",
    ),
    "dora_missing_magnitude": (
        "dora", None, _drop("lora_magnitude_vector"), INVALID_ADAPTER, "lacks",
    ),
    "magnitude_without_dora": (
        "dora", _set(use_dora=False), None, UNSUPPORTED_ADAPTER_FEATURE,
        "DoRA magnitude vectors (without use_dora)",
    ),
    "dora_nan": (
        "dora", None, _retensor("lora_magnitude_vector", lambda t: t * float("nan")),
        INVALID_ADAPTER, "NaN",
    ),
    "adalora_mask_length": (
        "adalora",
        lambda c: c["rank_pattern"].update({k: [True] for k in c["rank_pattern"]}),
        None, INVALID_ADAPTER, "entries, not init_r",
    ),
    "adalora_rank_mismatch": (
        "adalora", None, _retensor("lora_E", lambda t: torch.cat([t, t])),
        INVALID_ADAPTER, "the base model expects [",
    ),
    "adalora_bad_init_r": (
        "adalora", _set(init_r=0), None, INVALID_ADAPTER, "init_r must be a positive integer",
    ),
    "adalora_rank_too_large": (
        "adalora", lambda c: c.update(init_r=40, rank_pattern=None), None,
        "adapter_rank_too_large", "exceeds the server's max_lora_rank 16",
    ),
    "ia3_not_subset": (
        "ia3", _set(feedforward_modules=["up_proj"]), None, INVALID_ADAPTER,
        "feedforward_modules must be a subset of target_modules",
    ),
    "ia3_vector_side": (
        "ia3", _set(feedforward_modules=[]), None, INVALID_ADAPTER,
        "the base model expects [",
    ),
    "ia3_modules_to_save": (
        "ia3", _set(modules_to_save=["lm_head"]), None, UNSUPPORTED_ADAPTER_FEATURE,
        "modules_to_save is not supported",
    ),
    "ia3_unknown_field": (
        "ia3", _set(some_new_field=3), None, UNSUPPORTED_ADAPTER_FEATURE,
        "unknown field 'some_new_field'",
    ),
    "ia3_stray_tensor": (
        "ia3", None, lambda t: t.update(extra=torch.zeros(2)), INVALID_ADAPTER,
        "unrecognised tensor key extra",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_refusals(saved: dict[str, Path], context: LoadContext, tmp_path: Path, case: str) -> None:
    source, config, tensors, code, fragment = CASES[case]
    path = edited(saved[source], tmp_path / case, config, tensors)
    refused(path, context, code, fragment)


def test_dora_without_the_base_weights_is_refused(
    saved: dict[str, Path], context: LoadContext
) -> None:
    no_base = LoadContext(context.layout, context.max_lora_rank)
    refused(saved["dora"], no_base, UNSUPPORTED_ADAPTER_FEATURE, "DoRA (use_dora) is not supported")
