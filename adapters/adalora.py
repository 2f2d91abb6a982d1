"""AdaLoRA adapters (``peft_type: ADALORA``), served as LoRA.

AdaLoRA trains an SVD-shaped update per module, ``P Λ Q`` with ``lora_A`` = Q
``(r, in_features)``, ``lora_E`` = the singular values ``(r, 1)`` and ``lora_B`` = P
``(out_features, r)``, and prunes singular values during training. PEFT saves the survivors:
``rank_pattern`` maps ``<module path>.lora_E`` to a mask over the initial ``init_r`` values
and each module's tensors keep only the masked rows. PEFT's forward (peft 0.21,
``tuners/adalora/layer.py``) is

    y = W x + (x · (A ⊙ E)ᵀ · Bᵀ) · scaling / (ranknum + 1e-5)

with ``scaling = lora_alpha`` (or the module's rank when ``lora_alpha`` is not positive) and
``ranknum = init_r`` (the rank before pruning, which loading a pruned adapter keeps). So the
served LoRA module is ``lora_a = A ⊙ E`` with scaling ``scaling / (init_r + 1e-5)``, folded
once at load. Targeting follows LoRA's rules (AdaLoRA's config is a LoRA config), except that
AdaLoRA ignores ``alpha_pattern`` and rsLoRA, as PEFT does. A module pruned to rank 0 adds
nothing and takes no pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapters.base_layout import BaseModelLayout
from adapters.errors import (
    ADAPTER_RANK_TOO_LARGE,
    INVALID_ADAPTER,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.loader import WEIGHTS_NAME, check_shapes, converted, unexpected_key, weights_file
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import plan_modules
from adapters.safetensors_file import DTYPE_NAMES, read_header, read_tensors
from adapters.weights import ADALORA, AdapterWeights, LoraModuleWeights

# AdaLoraConfig's fields for the training schedule: they change nothing at inference.
_SCHEDULE_FIELDS = (
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
)  # fmt: skip
_IGNORED_BY_ADALORA = ("alpha_pattern", "use_rslora")  # PEFT's AdaLoRA layers never read them
_DEFAULT_INIT_R = 12  # AdaLoraConfig's default
_DEFAULT_ALPHA = 8  # LoraConfig's default


def _invalid(message: str) -> AdapterError:
    return AdapterError(INVALID_ADAPTER, f"adapter_config.json: {message}")


def read_adalora(
    path: Path,
    raw: Mapping[str, Any],
    layout: BaseModelLayout,
    max_lora_rank: int,
    dtype: torch.dtype = torch.float32,
) -> AdapterWeights:
    """Read the AdaLoRA adapter in directory ``path`` (``raw``: its config) as LoRA.

    Raises:
        AdapterError: ``invalid_adapter``, ``unsupported_adapter_feature``,
            ``adapter_rank_too_large``, ``pickle_refused``.
    """
    init_r = raw.get("init_r", _DEFAULT_INIT_R)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r <= 0:
        raise _invalid(f"init_r must be a positive integer, got {str(init_r)[:40]}")
    if raw.get("use_dora"):
        raise AdapterError(UNSUPPORTED_ADAPTER_FEATURE, "AdaLoRA with use_dora does not exist")
    ranks = _pruned_ranks(raw.get("rank_pattern"), init_r)
    # As a LoRA config: every module at init_r, the pruned ones at their surviving rank.
    lora_raw = {
        k: v
        for k, v in raw.items()
        if k not in _SCHEDULE_FIELDS and k not in _IGNORED_BY_ADALORA and k != "rank_pattern"
    }
    alpha = raw.get("lora_alpha", _DEFAULT_ALPHA)
    lora_raw |= {"peft_type": "LORA", "r": init_r, "lora_alpha": alpha}
    config = LoraAdapterConfig.from_dict(lora_raw)
    plan = plan_modules(config, layout)
    weights_path = weights_file(path)
    header, size = read_header(weights_path)
    shapes = {}
    for (_, _), planned in plan.items():
        rank = ranks.get(planned.module_path, init_r)
        if rank > max_lora_rank:
            raise AdapterError(
                ADAPTER_RANK_TOO_LARGE,
                f"adapter rank {rank} exceeds the server's max_lora_rank {max_lora_rank}",
            )
        prefix = f"base_model.model.{planned.module_path}"
        shapes[f"{prefix}.lora_A"] = (rank, planned.in_features)
        shapes[f"{prefix}.lora_E"] = (rank, 1)
        shapes[f"{prefix}.lora_B"] = (planned.out_features, rank)
    for name in sorted(set(header) - set(shapes)):
        raise unexpected_key(name)
    check_shapes(header, shapes)  # before a byte of tensor data is read
    tensors = read_tensors(weights_path, size)
    check_shapes({k: (DTYPE_NAMES.get(t.dtype, "?"), tuple(t.shape)) for k, t in tensors.items()},
                 shapes)  # fmt: skip
    # float32, as PEFT's ranknum parameter: scaling / (ranknum + 1e-5)
    ranknum = float(torch.tensor(float(init_r)) + 1e-5)
    modules = {}
    for layer_target, planned in plan.items():
        prefix = f"base_model.model.{planned.module_path}"
        lora_a = converted(f"{prefix}.lora_A", tensors[f"{prefix}.lora_A"], torch.float32)
        lora_e = converted(f"{prefix}.lora_E", tensors[f"{prefix}.lora_E"], torch.float32)
        lora_b = converted(f"{prefix}.lora_B", tensors[f"{prefix}.lora_B"], torch.float32)
        rank = lora_a.shape[0]
        if rank == 0:
            continue  # pruned away entirely
        scaling = float(alpha) if alpha > 0 else float(rank)
        modules[layer_target] = LoraModuleWeights(
            lora_a=converted(f"{prefix}.lora_E", lora_a * lora_e, dtype),
            lora_b=lora_b.to(dtype),
            scaling=scaling / ranknum,
        )
    if not modules:
        raise AdapterError(INVALID_ADAPTER, f"{WEIGHTS_NAME}: every module was pruned to rank 0")
    return AdapterWeights(name=path.absolute().name, config=config, modules=modules, kind=ADALORA)


def _pruned_ranks(pattern: object, init_r: int) -> dict[str, int]:
    """Module path to its rank after pruning, from AdaLoRA's ``rank_pattern`` (keys
    ``<module path>.lora_E``, values masks over the ``init_r`` singular values)."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise _invalid("rank_pattern must be an object")
    ranks = {}
    for key, mask in pattern.items():
        if not (isinstance(mask, list) and all(isinstance(m, bool) for m in mask)):
            raise _invalid(f"rank_pattern[{key[:80]!r}] must be a list of true/false")
        if len(mask) != init_r:
            raise _invalid(f"rank_pattern[{key[:80]!r}] has {len(mask)} entries, not init_r")
        module = key.removesuffix(".lora_E").removesuffix(".default")
        ranks[module] = sum(mask)
    return ranks
