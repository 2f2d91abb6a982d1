"""Write a LoRA adapter as a PEFT adapter directory, the inverse of :mod:`adapters.loader`.

The directory holds what PEFT's ``save_pretrained`` writes for a LoRA adapter on a causal LM:
``adapter_config.json`` and ``adapter_model.safetensors`` with, for every module::

    base_model.model.<module path>.lora_A.weight   (rank, in_features)
    base_model.model.<module path>.lora_B.weight   (out_features, rank)

The config keeps the adapter's targeting (``target_modules``, ``layers_to_transform``,
``layers_pattern``, ``exclude_modules``), which selects exactly its modules on the base it was
loaded or merged for, and its ``r``, ``lora_alpha`` and ``use_rslora``. Its rank and alpha
patterns are kept when they give every module its rank and scaling; otherwise they are
replaced by one escaped full-path entry per module that differs from ``r`` / ``lora_alpha``.
Both :func:`adapters.loader.load_lora_adapter` and PEFT's ``PeftModel.from_pretrained`` read
the result back with the same tensors and scalings.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from adapters.base_layout import BaseModelLayout
from adapters.loader import CONFIG_NAME, WEIGHTS_NAME
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import (
    PlannedModule,
    is_targeted,
    module_alpha,
    module_rank,
    module_scaling,
)
from adapters.weights import AdapterWeights, LoraModuleWeights


def save_peft_adapter(
    weights: AdapterWeights, out_dir: Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``weights`` to directory ``out_dir`` (created if missing) in PEFT's format.

    Each file is written under a temporary name and then renamed, so a reader never sees a
    half-written file.

    Args:
        weights: the adapter (any float dtype; tensors are saved as they are).
        out_dir: the adapter directory to write.
        base_model_name_or_path: recorded in the config; default: the adapter's own.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the adapter's config does not describe its modules (never the case for
            an adapter from ``load_lora_adapter`` or ``merge_adapters``).
    """
    out_dir = Path(out_dir)
    layout = _layout_of(weights)
    _check_targeting(weights, layout)
    tensors = {}
    for (layer, target), module in sorted(weights.modules.items()):
        key_a, key_b = _planned(layout, layer, target, module).keys
        tensors[key_a] = module.lora_a.detach().to("cpu").contiguous()
        tensors[key_b] = module.lora_b.detach().to("cpu").contiguous()
    config = adapter_config_dict(weights, base_model_name_or_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, weights_tmp, metadata={"format": "pt"})  # PEFT's metadata
    os.replace(weights_tmp, out_dir / WEIGHTS_NAME)
    config_tmp = out_dir / f".{CONFIG_NAME}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(config_tmp, out_dir / CONFIG_NAME)
    return out_dir


def adapter_config_dict(
    weights: AdapterWeights, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` object for ``weights`` (a LoraConfig PEFT 0.21 accepts)."""
    config = weights.config
    rank_pattern, alpha_pattern = _patterns(weights, _layout_of(weights))
    targets = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "layers_to_transform": _json_value(config.layers_to_transform),
        "layers_pattern": _json_value(config.layers_pattern),
        "exclude_modules": _json_value(config.exclude_modules),
        "modules_to_save": None,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _json_value(value: str | int | tuple[Any, ...] | None) -> str | int | list[Any] | None:
    return list(value) if isinstance(value, tuple) else value


def _layout_of(weights: AdapterWeights) -> BaseModelLayout:
    """The smallest base layout holding every module of ``weights`` (for module paths)."""
    shapes = {
        target: (int(m.lora_a.shape[1]), int(m.lora_b.shape[0]))
        for (_, target), m in weights.modules.items()
    }
    num_layers = 1 + max(layer for layer, _ in weights.modules)
    return BaseModelLayout(num_layers=num_layers, linear_shapes=shapes)


def _planned(
    layout: BaseModelLayout, layer: int, target: str, module: LoraModuleWeights
) -> PlannedModule:
    in_features, out_features = layout.linear_shapes[target]
    return PlannedModule(
        module_path=layout.module_path(layer, target),
        rank=module.rank,
        in_features=in_features,
        out_features=out_features,
        scaling=module.scaling,
    )


def _check_targeting(weights: AdapterWeights, layout: BaseModelLayout) -> None:
    """On the modules' own layers and targets, the config selects exactly the modules."""
    selected = {
        (layer, target)
        for layer, target, path in layout.modules()
        if is_targeted(weights.config, path)
    }
    if selected != set(weights.modules):
        raise ValueError(
            f"adapter {weights.name!r}: its config selects {len(selected)} modules but it has "
            f"{len(weights.modules)}; it cannot be saved as a PEFT adapter"
        )


def _patterns(
    weights: AdapterWeights, layout: BaseModelLayout
) -> tuple[dict[str, int], dict[str, float]]:
    """Rank and alpha patterns that give every module its rank and scaling."""
    config = weights.config
    paths = {key: layout.module_path(*key) for key in weights.modules}
    if all(
        module_rank(config, paths[key]) == m.rank
        and module_scaling(config, paths[key]) == m.scaling
        for key, m in weights.modules.items()
    ):
        return dict(config.rank_pattern), dict(config.alpha_pattern)
    rank_pattern, alpha_pattern = {}, {}
    for key, m in sorted(weights.modules.items()):
        pattern_key = re.escape(paths[key])  # matches that one module path only
        if m.rank != config.r:
            rank_pattern[pattern_key] = m.rank
        alpha = _alpha_for(
            config, m, candidates=(config.lora_alpha, module_alpha(config, paths[key]))
        )
        if alpha != config.lora_alpha:
            alpha_pattern[pattern_key] = alpha
    return rank_pattern, alpha_pattern


def _alpha_for(
    config: LoraAdapterConfig, module: LoraModuleWeights, candidates: tuple[float, ...]
) -> float:
    """An alpha whose scaling at the module's rank is ``module.scaling``.

    A candidate from the adapter's own config is preferred (it reproduces the scaling bit for
    bit); otherwise ``scaling · rank``, which divides back to the scaling for any scaling a
    PEFT config can produce (``alpha / rank``), and to within an ulp for any other.
    """
    divisor = math.sqrt(module.rank) if config.use_rslora else module.rank
    for alpha in candidates:
        if alpha / divisor == module.scaling:
            return alpha
    return module.scaling * divisor
