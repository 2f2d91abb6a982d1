"""Read a PEFT LoRA adapter directory into host tensors, refusing anything the engine can't serve.

An adapter is ``adapter_config.json`` (:mod:`adapters.peft_config`) plus
``adapter_model.safetensors`` holding, for every module the config adapts
(:mod:`adapters.peft_targets`), exactly the two tensors PEFT's ``save_pretrained`` writes,
with no adapter name in the key::

    base_model.model.<module path>.lora_A.weight   (rank, in_features)
    base_model.model.<module path>.lora_B.weight   (out_features, rank)

Every check runs before anything is returned, so nothing invalid reaches the page pool: the
config, its ranks against ``max_lora_rank``, the safetensors header
(:mod:`adapters.safetensors_file`), every key against the adapted modules, every shape against
the base model and the module's rank, every value for NaN/Inf. Pickled weights
(``adapter_model.bin``, ``*.pt``) are refused without being opened. Messages name files
inside the adapter directory, never the directory's path.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.base_layout import BaseModelLayout
from adapters.errors import (
    ADAPTER_NOT_FOUND,
    ADAPTER_RANK_TOO_LARGE,
    INVALID_ADAPTER,
    PICKLE_REFUSED,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import PlannedModule, plan_modules
from adapters.safetensors_file import DTYPE_NAMES, ITEMSIZE, TensorInfo, read_header, read_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_CONFIG_BYTES = 16 << 20  # real configs are KiBs; an "all-linear" list grows with layers
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# Fragments of tensor keys for things the engine does not serve, and what to call them.
_UNSERVED_KEYS = (
    ("lora_embedding_", "LoRA on embeddings (lora_embedding_A/B)"),
    ("lora_magnitude_vector", "DoRA magnitude vectors"),
    (".lora_B.bias", "lora_bias"),
    ("modules_to_save", "modules_to_save"),
    ("lm_head", "LoRA on or weights for lm_head"),
    ("embed_tokens", "LoRA on or weights for embed_tokens"),
)


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted linear layer: ``delta_W = scaling · lora_b @ lora_a``.

    Attributes:
        lora_a: ``(rank, in_features)``, contiguous, on the host.
        lora_b: ``(out_features, rank)``, contiguous, on the host.
        scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def nbytes(self) -> int:
        return self.lora_a.nbytes + self.lora_b.nbytes

    def delta_weight(self) -> torch.Tensor:
        """``(out_features, in_features)``: what the adapter adds to the base weight."""
        return self.scaling * (self.lora_b @ self.lora_a)


@dataclass(frozen=True)
class LoraAdapterWeights:
    """A validated adapter, ready to be placed in the page pool.

    Attributes:
        name: the adapter directory's name.
        config: its parsed ``adapter_config.json``.
        modules: ``(layer, target)`` to weights, for every module the adapter touches
            (never empty).
    """

    name: str
    config: LoraAdapterConfig
    modules: Mapping[tuple[int, str], LoraModuleWeights]

    @property
    def targets(self) -> frozenset[str]:
        """The target names (``q_proj``, ...) adapted in at least one layer."""
        return frozenset(target for _, target in self.modules)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def pin_memory(self) -> LoraAdapterWeights:
        """A copy in page-locked host memory, for asynchronous host → device copies."""
        pinned = {
            key: dataclasses.replace(m, lora_a=m.lora_a.pin_memory(), lora_b=m.lora_b.pin_memory())
            for key, m in self.modules.items()
        }
        return dataclasses.replace(self, modules=pinned)


def load_lora_adapter(
    path: Path,
    layout: BaseModelLayout,
    max_lora_rank: int,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapterWeights:
    """Read and validate the PEFT LoRA adapter in directory ``path``.

    Args:
        path: the adapter directory (the caller has already checked it may be read).
        layout: the base model's target linear layers.
        max_lora_rank: the largest rank the server accepts.
        dtype: the floating dtype of the returned tensors.

    Raises:
        AdapterError: ``adapter_not_found``, ``invalid_adapter``, ``pickle_refused``,
            ``unsupported_adapter_feature`` or ``adapter_rank_too_large``.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(ADAPTER_NOT_FOUND, "adapter directory not found")
    config = read_adapter_config(path)
    if config.max_rank > max_lora_rank:
        raise AdapterError(
            ADAPTER_RANK_TOO_LARGE,
            f"adapter rank {config.max_rank} exceeds the server's max_lora_rank {max_lora_rank}",
        )
    plan = plan_modules(config, layout)
    weights_path = _weights_file(path)
    header, size = read_header(weights_path)
    _check_tensors(header, plan)  # before a byte of tensor data is read
    tensors = read_tensors(weights_path, size)
    # Again on what was read: the file may have changed since its header was checked.
    _check_tensors(
        {k: (DTYPE_NAMES.get(t.dtype, "?"), tuple(t.shape)) for k, t in tensors.items()}, plan
    )
    modules = {}
    for layer_target, planned in plan.items():
        key_a, key_b = planned.keys
        modules[layer_target] = LoraModuleWeights(
            lora_a=_converted(key_a, tensors[key_a], dtype),
            lora_b=_converted(key_b, tensors[key_b], dtype),
            scaling=planned.scaling,
        )
    return LoraAdapterWeights(name=path.absolute().name, config=config, modules=modules)


def read_adapter_config(path: Path) -> LoraAdapterConfig:
    """Parse ``adapter_config.json`` in directory ``path`` as plain JSON."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():  # also refuses a FIFO, whose read would block
        raise AdapterError(INVALID_ADAPTER, f"no {CONFIG_NAME} in the adapter directory")
    try:
        with config_path.open("rb") as f:
            text = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, f"cannot read {CONFIG_NAME} ({e.strerror})") from None
    if len(text) > _MAX_CONFIG_BYTES:
        raise AdapterError(INVALID_ADAPTER, f"{CONFIG_NAME} is too large")
    return LoraAdapterConfig.from_json(text)


def _weights_file(path: Path) -> Path:
    weights_path = path / WEIGHTS_NAME
    if weights_path.is_file():
        return weights_path
    # Names only: a pickle is never opened, since loading one can run arbitrary code.
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            PICKLE_REFUSED,
            f"pickle refused: the adapter has only pickled weights ({pickles[0][:120]}); "
            f"convert them to {WEIGHTS_NAME}",
        )
    raise AdapterError(INVALID_ADAPTER, f"no {WEIGHTS_NAME} in the adapter directory")


def _check_tensors(
    infos: Mapping[str, TensorInfo], plan: Mapping[tuple[int, str], PlannedModule]
) -> None:
    """The tensors are exactly the planned ones, each with a served dtype and its shape."""
    expected = {key for planned in plan.values() for key in planned.keys}
    for key in sorted(set(infos) - expected):
        raise _unexpected_key(key)
    for planned in plan.values():
        key_a, key_b = planned.keys
        for key in (key_a, key_b):
            if key not in infos:
                raise AdapterError(INVALID_ADAPTER, f"{WEIGHTS_NAME} lacks {key}")
            if infos[key][0] not in ITEMSIZE:
                raise AdapterError(INVALID_ADAPTER, f"{key} has an unsupported dtype")
        shape_a, shape_b = infos[key_a][1], infos[key_b][1]
        if len(shape_a) != 2 or shape_a[1] != planned.in_features:
            raise AdapterError(
                INVALID_ADAPTER,
                f"{key_a} has shape {list(shape_a)}; the base model expects "
                f"[rank, {planned.in_features}]",
            )
        if len(shape_b) != 2 or shape_b[0] != planned.out_features:
            raise AdapterError(
                INVALID_ADAPTER,
                f"{key_b} has shape {list(shape_b)}; the base model expects "
                f"[{planned.out_features}, rank]",
            )
        if shape_a[0] != planned.rank or shape_b[1] != planned.rank:
            raise AdapterError(
                INVALID_ADAPTER,
                f"{planned.module_path}: lora_A has rank {shape_a[0]} and lora_B rank "
                f"{shape_b[1]}, but {CONFIG_NAME} gives it rank {planned.rank}",
            )


def _unexpected_key(key: str) -> AdapterError:
    """Why a tensor that no planned module claims is refused."""
    short = key if len(key) <= 160 else key[:160] + "…"  # keys come from the file
    for fragment, feature in _UNSERVED_KEYS:
        if fragment in key:
            return AdapterError(
                UNSUPPORTED_ADAPTER_FEATURE, f"{feature}: not supported (tensor {short})"
            )
    if _KEY.fullmatch(key):
        return AdapterError(
            INVALID_ADAPTER,
            f"tensor {short} is for a module that {CONFIG_NAME} does not target "
            "or the base model does not have",
        )
    return AdapterError(INVALID_ADAPTER, f"unrecognised tensor key {short}")


def _converted(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A finite, contiguous copy of ``tensor`` in ``dtype`` that owns its memory."""
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(INVALID_ADAPTER, f"{key} contains NaN or Inf values")
    converted = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    if not bool(torch.isfinite(converted).all()):
        raise AdapterError(INVALID_ADAPTER, f"{key} overflows {dtype} (values too large)")
    return converted
