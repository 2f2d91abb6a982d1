"""Which of the base model's linear layers a PEFT LoRA config adapts, with what rank and scaling.

Mirrors PEFT 0.21, function by function:

* :func:`is_targeted`: ``peft.tuners.tuners_utils.check_target_module_exists``.
  ``exclude_modules`` wins; a string ``target_modules`` is a regex that must match the whole
  module path (``re.fullmatch``); a list entry matches the path exactly, or as a suffix after a
  ``.``; only suffix matches are then filtered by ``layers_to_transform``, whose layer index is
  the first number after ``layers_pattern`` (or after any segment when that is unset).
  ``"all-linear"`` (any case) is ``_maybe_include_all_linear_layers``: every ``nn.Linear``
  except the output head, i.e. every layer of the :class:`BaseModelLayout`.
* :func:`module_rank` / :func:`module_alpha`: ``peft.utils.other.get_pattern_key`` as
  ``LoraModel._create_and_replace`` uses it: the first ``rank_pattern`` (``alpha_pattern``)
  key ``k``, in file order, for which ``re.match(rf"(.*\\.)?({k})$", path)``; else ``r``
  (``lora_alpha``).
* :func:`module_scaling`: ``LoraLayer.update_layer``: ``alpha / r``, or ``alpha / sqrt(r)``
  with ``use_rslora``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_ADAPTER, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.peft_config import (
    ALL_LINEAR,
    LAYERS_PATTERN_TEMPLATE,
    PATTERN_KEY_TEMPLATE,
    LoraAdapterConfig,
)

# The input embeddings and the output head: not linear layers of the layout, but a LoRA may
# target them (`adapters/embed_head.py` plans and reads it).
EMBED_PATH = "model.embed_tokens"
HEAD_PATH = "lm_head"


def is_targeted(config: LoraAdapterConfig, module_path: str) -> bool:
    """Whether PEFT adapts the linear layer at ``module_path`` (a linear layer of the base)."""
    if _is_excluded(config.exclude_modules, module_path):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return targets.lower() == ALL_LINEAR or re.fullmatch(targets, module_path) is not None
    if module_path in targets:
        return True  # an exact path skips the layer filter, as in PEFT
    if not any(module_path.endswith(f".{t}") for t in targets):
        return False
    indexes = config.layers_to_transform
    if indexes is None or indexes == ():
        return True
    index = _layer_index(config.layers_pattern, module_path)
    if index is None:
        return False
    return index == indexes if isinstance(indexes, int) else index in indexes


def module_rank(config: LoraAdapterConfig, module_path: str) -> int:
    """The module's rank: ``rank_pattern``'s first matching key, else ``r``."""
    return config.rank_pattern.get(_pattern_key(config.rank_pattern, module_path), config.r)


def module_alpha(config: LoraAdapterConfig, module_path: str) -> float:
    """The module's alpha: ``alpha_pattern``'s first matching key, else ``lora_alpha``."""
    key = _pattern_key(config.alpha_pattern, module_path)
    return config.alpha_pattern.get(key, config.lora_alpha)


def module_scaling(config: LoraAdapterConfig, module_path: str) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    rank, alpha = module_rank(config, module_path), module_alpha(config, module_path)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def unmatched_targets(config: LoraAdapterConfig, module_paths: Iterable[str]) -> list[str]:
    """``target_modules`` list entries that name none of ``module_paths``."""
    if isinstance(config.target_modules, str):
        return []
    paths = list(module_paths)
    return [
        t for t in config.target_modules if not any(p == t or p.endswith(f".{t}") for p in paths)
    ]


@dataclass(frozen=True)
class PlannedModule:
    """What one adapted module's tensors must look like, from the config and the base.

    Attributes:
        module_path: e.g. ``model.layers.0.self_attn.q_proj``.
        rank: its rank after ``rank_pattern``.
        in_features: ``lora_a`` is ``(rank, in_features)``.
        out_features: ``lora_b`` is ``(out_features, rank)``.
        scaling: its scaling after ``alpha_pattern`` and rsLoRA.
    """

    module_path: str
    rank: int
    in_features: int
    out_features: int
    scaling: float

    @property
    def keys(self) -> tuple[str, str]:
        """The tensor keys PEFT's ``save_pretrained`` writes for ``lora_A`` and ``lora_B``."""
        prefix = f"base_model.model.{self.module_path}"
        return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def plan_modules(
    config: LoraAdapterConfig, layout: BaseModelLayout, embed_head: bool = False
) -> dict[tuple[int, str], PlannedModule]:
    """Every ``(layer, target)`` PEFT would adapt on this base.

    The embeddings and the head are never in it. With ``embed_head`` (LoRA, whose loader
    plans them in `adapters/embed_head.py`) they count as targets: an entry naming them is
    not unmatched, and an adapter of only them is valid; other kinds refuse them.

    Raises:
        AdapterError: a ``target_modules`` entry names no linear layer of the base
            (``unsupported_adapter_feature`` for ``lm_head`` / ``embed_tokens`` unless
            ``embed_head``), or nothing is selected at all.
    """
    paths = [path for _, _, path in layout.modules()]
    if embed_head:
        paths += [EMBED_PATH, HEAD_PATH]
    for entry in unmatched_targets(config, paths):
        last = entry.rsplit(".", 1)[-1]
        if last in (EMBED_PATH.rsplit(".", 1)[-1], HEAD_PATH):
            raise AdapterError(
                UNSUPPORTED_ADAPTER_FEATURE,
                f"target module {entry!r}: this adapter kind's {last} is not served",
            )
        raise AdapterError(
            INVALID_ADAPTER,
            f"target module {entry[:120]!r} is not one of the base model's linear layers "
            f"({', '.join(layout.linear_shapes)})",
        )
    plan = {}
    for layer, target, module_path in layout.modules():
        if is_targeted(config, module_path):
            in_features, out_features = layout.linear_shapes[target]
            plan[layer, target] = PlannedModule(
                module_path=module_path,
                rank=module_rank(config, module_path),
                in_features=in_features,
                out_features=out_features,
                scaling=module_scaling(config, module_path),
            )
    if not plan and not (
        embed_head and any(is_targeted(config, p) for p in (EMBED_PATH, HEAD_PATH))
    ):
        raise AdapterError(INVALID_ADAPTER, "target_modules selects no layer of the base model")
    return plan


def _layer_index(layers_pattern: str | tuple[str, ...] | None, module_path: str) -> int | None:
    # Lazy ".*?": the first numbered segment is the layer, not e.g. an expert index after it.
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_path)
    else:
        patterns = (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern
        for pattern in patterns:
            match = re.match(LAYERS_PATTERN_TEMPLATE.replace("{}", pattern), module_path)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _is_excluded(exclude: str | tuple[str, ...] | None, module_path: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, module_path) is not None
    return module_path in exclude or any(module_path.endswith(f".{e}") for e in exclude)


def _pattern_key(patterns: Mapping[str, object], module_path: str) -> str:
    """``get_pattern_key``: the first key matching the end of the path, else the path."""
    for key in patterns:
        if re.match(PATTERN_KEY_TEMPLATE.replace("{}", key), module_path):
            return key
    return module_path
