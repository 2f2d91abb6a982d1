"""IA³ adapters (``peft_type: IA3``): learned vectors that rescale activations.

PEFT saves one vector per adapted linear layer, ``base_model.model.<module path>.ia3_l``:
``(out_features, 1)`` for most (``y = (W x + b) ⊙ l``: keys, values, ...) and
``(1, in_features)`` for the modules ``feedforward_modules`` names (``y = W (x ⊙ l) + b``:
the down projection, whose input is the feed-forward activation). PEFT's forward is
``tuners/ia3/layer.py``'s ``Linear.forward`` (peft 0.21). Nothing is low-rank: an IA³
adapter takes one row of pages per adapted module and layer, and the forward multiplies each
of its rows' activations by the vector (`engine/kinds.py`). IA³ adapters merge with each
other as PEFT's ``add_weighted_adapter`` merges them (:func:`merge_ia3`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapters.base_layout import BaseModelLayout
from adapters.errors import (
    INVALID_ADAPTER,
    INVALID_MERGE,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.loader import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_shapes,
    converted,
    unexpected_key,
    weights_file,
)
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import plan_modules
from adapters.safetensors_file import DTYPE_NAMES, read_header, read_tensors
from adapters.weights import IA3, AdapterWeights, Ia3Vector

# IA3Config's fields that change nothing in what is served.
_HARMLESS = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
        "base_model_name_or_path", "init_ia3_weights", "target_modules", "exclude_modules",
        "feedforward_modules", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
        "layers_pattern",
    }
)  # fmt: skip


def _invalid(message: str) -> AdapterError:
    return AdapterError(INVALID_ADAPTER, f"adapter_config.json: {message}")


def read_ia3(
    path: Path, raw: Mapping[str, Any], layout: BaseModelLayout, dtype: torch.dtype = torch.float32
) -> AdapterWeights:
    """Read the IA³ adapter in directory ``path`` (``raw``: its config).

    Raises:
        AdapterError: ``invalid_adapter``, ``unsupported_adapter_feature``, ``pickle_refused``.
    """
    for name, value in raw.items():
        if name not in _HARMLESS and value not in (None, False, [], {}, ""):
            raise AdapterError(
                UNSUPPORTED_ADAPTER_FEATURE,
                f"adapter_config.json: unknown field {name[:80]!r} is not supported",
            )
    if raw.get("modules_to_save"):
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE, "adapter_config.json: modules_to_save is not supported"
        )
    if raw.get("target_modules") is None:
        raise _invalid("missing 'target_modules'")
    feedforward = raw.get("feedforward_modules") or []
    if not (isinstance(feedforward, str) or _is_names(feedforward)):
        raise _invalid("feedforward_modules must be a string or a list of strings")
    targets = raw["target_modules"]
    if _is_names(feedforward) and _is_names(targets) and not set(feedforward) <= set(targets):
        raise _invalid("feedforward_modules must be a subset of target_modules")
    # Which modules: LoRA's targeting rules (PEFT shares them across tuners).
    targeting = {k: raw.get(k) for k in ("target_modules", "exclude_modules",
                                         "layers_to_transform", "layers_pattern")}  # fmt: skip
    config = LoraAdapterConfig.from_dict({**targeting, "r": 1, "lora_alpha": 1})
    plan = plan_modules(config, layout)
    shapes = {}
    is_feedforward = {}
    for key, planned in plan.items():
        ff = _is_feedforward(feedforward, planned.module_path)
        is_feedforward[key] = ff
        name = f"base_model.model.{planned.module_path}.ia3_l"
        shapes[name] = (1, planned.in_features) if ff else (planned.out_features, 1)
    weights_path = weights_file(path)
    header, size = read_header(weights_path)
    for name in sorted(set(header) - set(shapes)):
        raise unexpected_key(name)
    check_shapes(header, shapes)
    tensors = read_tensors(weights_path, size)
    check_shapes({k: (DTYPE_NAMES.get(t.dtype, "?"), tuple(t.shape)) for k, t in tensors.items()},
                 shapes)  # fmt: skip
    vectors = {}
    for key, planned in plan.items():
        name = f"base_model.model.{planned.module_path}.ia3_l"
        values = converted(name, tensors[name], dtype).flatten()
        vectors[key] = Ia3Vector(values=values, feedforward=is_feedforward[key])
    return AdapterWeights(
        name=path.absolute().name, config=config, modules={}, kind=IA3, ia3=vectors
    )


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_feedforward(feedforward: str | list[str], module_path: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``."""
    if isinstance(feedforward, str):
        try:
            return bool(re.fullmatch(feedforward, module_path))
        except re.error as e:
            raise _invalid(f"feedforward_modules is not a valid regular expression ({e})") from None
    return any(module_path.endswith(name) for name in feedforward)


def merge_ia3(
    adapters: Sequence[AdapterWeights], weights: Sequence[float], name: str
) -> AdapterWeights:
    """PEFT's IA³ ``add_weighted_adapter``: the merged adapter targets every module one of
    ``adapters`` targets, each vector the weighted sum of theirs (an adapter without the
    module adds nothing, so a module only one adapter has gets ``w · l``).

    Raises:
        AdapterError: ``invalid_merge`` when a module scales its input in one adapter and
            its output in another (PEFT's sum would not even have one shape), or an adapter
            restricts its layers (PEFT's merged config would keep only the first's).
    """
    if len(adapters) != len(weights) or not adapters:
        raise AdapterError(INVALID_MERGE, "an IA³ merge needs one weight per adapter")
    for adapter in adapters:
        if adapter.kind != IA3:
            raise AdapterError(INVALID_MERGE, f"{adapter.name!r} is not an IA³ adapter")
        if adapter.config.layers_to_transform is not None:
            raise AdapterError(
                INVALID_MERGE, f"{adapter.name!r} restricts its layers (layers_to_transform)"
            )
    merged: dict[tuple[int, str], Ia3Vector] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for key, vector in adapter.ia3.items():
            values = vector.values.float() * float(weight)
            if key not in merged:
                merged[key] = Ia3Vector(values=values, feedforward=vector.feedforward)
            elif merged[key].feedforward != vector.feedforward:
                raise AdapterError(
                    INVALID_MERGE,
                    f"{key[1]} scales its input in one adapter and its output in another",
                )
            else:
                merged[key] = Ia3Vector(merged[key].values + values, vector.feedforward)
    targets = tuple(sorted({target for _, target in merged}))
    config = LoraAdapterConfig(r=1, lora_alpha=1, target_modules=targets)
    return AdapterWeights(name=name, config=config, modules={}, kind=IA3, ia3=merged)


def save_ia3_adapter(
    weights: AdapterWeights,
    out_dir: Path,
    layout: BaseModelLayout,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write an IA³ adapter as PEFT's ``save_pretrained`` does (``ia3_l`` vectors of shape
    ``(out_features, 1)``, or ``(1, in_features)`` for a feed-forward module); each file
    is written under a temporary name and renamed."""
    out_dir = Path(out_dir)
    tensors = {}
    for (layer, target), vector in sorted(weights.ia3.items()):
        shape = (1, -1) if vector.feedforward else (-1, 1)
        key = f"base_model.model.{layout.module_path(layer, target)}.ia3_l"
        tensors[key] = vector.values.detach().to("cpu").reshape(shape).contiguous()
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted({t for _, t in weights.ia3}),
        "feedforward_modules": sorted({t for (_, t), v in weights.ia3.items() if v.feedforward}),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, weights_tmp, metadata={"format": "pt"})
    os.replace(weights_tmp, out_dir / WEIGHTS_NAME)
    config_tmp = out_dir / f".{CONFIG_NAME}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(config_tmp, out_dir / CONFIG_NAME)
    return out_dir
