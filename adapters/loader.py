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

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapters.base_layout import BaseModelLayout
from adapters.confinement import PathKind, os_error_reason, path_kind
from adapters.embed_head import check_optional_shapes, plan_embed_head, read_embed_head
from adapters.errors import (
    ADAPTER_NOT_FOUND,
    ADAPTER_RANK_TOO_LARGE,
    INVALID_ADAPTER,
    PICKLE_REFUSED,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.peft_config import LoraAdapterConfig, parse_json_object
from adapters.peft_targets import PlannedModule, plan_modules
from adapters.safetensors_file import DTYPE_NAMES, ITEMSIZE, TensorInfo, read_header, read_tensors
from adapters.weights import DORA, AdapterWeights, BaseWeights, LoraModuleWeights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_CONFIG_BYTES = 16 << 20  # real configs are KiBs; an "all-linear" list grows with layers
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# Fragments of tensor keys for things the engine does not serve, and what to call them.
_UNSERVED_KEYS = (
    ("lora_magnitude_vector", "DoRA magnitude vectors (without use_dora)"),
    (".lora_B.bias", "lora_bias"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_tokens", "trainable tokens"),
)


def load_lora_adapter(
    path: Path,
    layout: BaseModelLayout,
    max_lora_rank: int,
    dtype: torch.dtype = torch.float32,
    base: BaseWeights | None = None,
) -> AdapterWeights:
    """Read and validate the PEFT LoRA (or DoRA) adapter in directory ``path``.

    Args:
        path: the adapter directory (the caller has already checked it may be read).
        layout: the base model's target linear layers.
        max_lora_rank: the largest rank the server accepts.
        dtype: the floating dtype of the returned tensors.
        base: the served base weights, which DoRA's scales are computed from (a DoRA
            adapter is refused without them).

    Raises:
        AdapterError: ``adapter_not_found``, ``invalid_adapter``, ``pickle_refused``,
            ``unsupported_adapter_feature`` or ``adapter_rank_too_large``.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    path = Path(path)
    check_adapter_dir(path)
    config = read_adapter_config(path)
    if config.use_dora and base is None:
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE,
            "DoRA (use_dora) is not supported without the served base weights, which its "
            "scales are computed from",
        )
    if config.max_rank > max_lora_rank:
        raise AdapterError(
            ADAPTER_RANK_TOO_LARGE,
            f"adapter rank {config.max_rank} exceeds the server's max_lora_rank {max_lora_rank}",
        )
    plan = plan_modules(config, layout, embed_head=True)
    embed_head = plan_embed_head(config, layout)
    weights_path = weights_file(path)
    header, size = read_header(weights_path)
    # DoRA: one magnitude per output feature of every adapted module
    extra = embed_head.required()
    if config.use_dora:
        extra |= {_magnitude_key(p): (p.out_features,) for p in plan.values()}
    optional = embed_head.optional()

    def check(infos: Mapping[str, TensorInfo]) -> None:
        check_optional_shapes(embed_head, infos)
        _check_tensors({k: v for k, v in infos.items() if k not in optional}, plan, extra)

    check(header)  # before a byte of tensor data is read
    tensors = read_tensors(weights_path, size)
    # Again on what was read: the file may have changed since its header was checked.
    check({k: (DTYPE_NAMES.get(t.dtype, "?"), tuple(t.shape)) for k, t in tensors.items()})
    embedding, head = read_embed_head(embed_head, tensors, dtype, base, converted)
    modules = {}
    for layer_target, planned in plan.items():
        key_a, key_b = planned.keys
        modules[layer_target] = LoraModuleWeights(
            lora_a=converted(key_a, tensors[key_a], dtype),
            lora_b=converted(key_b, tensors[key_b], dtype),
            scaling=planned.scaling,
        )
    name = path.absolute().name
    if not config.use_dora:
        return AdapterWeights(
            name=name, config=config, modules=modules, embedding=embedding, head=head
        )
    assert base is not None
    dora = {}
    for (layer, target), planned in plan.items():
        key = _magnitude_key(planned)
        magnitude = converted(key, tensors[key], torch.float32)
        dora[layer, target] = dora_scale(
            magnitude, base.weight(layer, target), tensors[planned.keys[0]],
            tensors[planned.keys[1]], planned.scaling, key,
        ).to(dtype)  # fmt: skip
    return AdapterWeights(
        name=name, config=config, modules=modules, kind=DORA, dora=dora,
        embedding=embedding, head=head,
    )  # fmt: skip


def dora_scale(
    magnitude: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    key: str = "lora_magnitude_vector",
) -> torch.Tensor:
    """DoRA's per-output-feature scale ``g = m / ‖W + s·B·A‖`` (each row's L2 norm, over the
    input features), in float32, as PEFT's ``DoraLinearLayer`` computes it in the forward;
    ``weight`` is the base weight as served (an NF4 base's dequantization)."""
    adapted = weight.float() + scaling * (lora_b.float() @ lora_a.float())
    scale: torch.Tensor = magnitude.float() / torch.linalg.norm(adapted, dim=1)
    if not bool(torch.isfinite(scale).all()):
        raise AdapterError(INVALID_ADAPTER, f"{key}: the adapted weight has a row of norm 0")
    return scale


def _magnitude_key(planned: PlannedModule) -> str:
    return f"base_model.model.{planned.module_path}.lora_magnitude_vector"


def read_adapter_config(path: Path) -> LoraAdapterConfig:
    """Parse ``adapter_config.json`` in directory ``path`` as plain JSON."""
    return LoraAdapterConfig.from_dict(read_config_json(path))


def check_adapter_dir(path: Path) -> None:
    """Refuse ``path`` unless it names a directory (nothing is opened).

    Raises:
        AdapterError: ``adapter_not_found`` when it names none, ``invalid_adapter`` when the
            file system will not say (a name too long, permission denied, a symlink loop).
    """
    try:
        kind = path_kind(str(path))
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, os_error_reason(e, "the adapter directory")) from None
    if kind is not PathKind.DIRECTORY:
        raise AdapterError(ADAPTER_NOT_FOUND, "adapter directory not found")


def read_config_json(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` in directory ``path``: a JSON object, not yet validated."""
    config_path = path / CONFIG_NAME
    if not _regular_file(config_path):
        raise AdapterError(INVALID_ADAPTER, f"no {CONFIG_NAME} in the adapter directory")
    try:
        with config_path.open("rb") as f:
            text = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, os_error_reason(e, CONFIG_NAME)) from None
    if len(text) > _MAX_CONFIG_BYTES:
        raise AdapterError(INVALID_ADAPTER, f"{CONFIG_NAME} is too large")
    return parse_json_object(text)


def weights_file(path: Path) -> Path:
    """``adapter_model.safetensors`` in directory ``path``, checked to be a regular file."""
    weights_path = path / WEIGHTS_NAME
    if _regular_file(weights_path):
        return weights_path
    try:
        entries = list(path.iterdir())
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, os_error_reason(e, "the adapter directory")) from None
    # Names only: a pickle is never opened, since loading one can run arbitrary code.
    pickles = sorted(p.name for p in entries if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            PICKLE_REFUSED,
            f"pickle refused: the adapter has only pickled weights ({pickles[0][:120]}); "
            f"convert them to {WEIGHTS_NAME}",
        )
    raise AdapterError(INVALID_ADAPTER, f"no {WEIGHTS_NAME} in the adapter directory")


# Why a file of the adapter directory that is there cannot be read, by its kind.
_NOT_READABLE = {
    PathKind.DIRECTORY: "{name} is a directory; a file was expected",
    PathKind.OTHER: "{name} is not a regular file (a FIFO, socket or device)",
    PathKind.DANGLING: "{name} is a dangling symbolic link",
}


def _regular_file(path: Path) -> bool:
    """Whether the adapter's file ``path`` is there (False when nothing is), refused unless
    a regular file. Decided by ``stat`` before anything opens it: opening a FIFO for reading
    blocks until something writes to it."""
    try:
        kind = path_kind(str(path))
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, os_error_reason(e, path.name)) from None
    if kind in _NOT_READABLE:
        raise AdapterError(INVALID_ADAPTER, _NOT_READABLE[kind].format(name=path.name))
    return kind is PathKind.FILE


def _check_tensors(
    infos: Mapping[str, TensorInfo],
    plan: Mapping[tuple[int, str], PlannedModule],
    extra: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """The tensors are exactly the planned ones (and ``extra``: key to shape), each with a
    served dtype and its shape."""
    extra = extra or {}
    expected = {key for planned in plan.values() for key in planned.keys} | set(extra)
    for key in sorted(set(infos) - expected):
        raise unexpected_key(key)
    check_shapes(infos, extra)
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


def check_shapes(infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Each key of ``shapes`` is in ``infos``, with a served dtype and exactly that shape."""
    for key, shape in shapes.items():
        if key not in infos:
            raise AdapterError(INVALID_ADAPTER, f"{WEIGHTS_NAME} lacks {key}")
        if infos[key][0] not in ITEMSIZE:
            raise AdapterError(INVALID_ADAPTER, f"{key} has an unsupported dtype")
        if tuple(infos[key][1]) != tuple(shape):
            raise AdapterError(
                INVALID_ADAPTER,
                f"{key} has shape {list(infos[key][1])}; the base model expects {list(shape)}",
            )


def unexpected_key(key: str) -> AdapterError:
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


def converted(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A finite, contiguous copy of ``tensor`` in ``dtype`` that owns its memory."""
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(INVALID_ADAPTER, f"{key} contains NaN or Inf values")
    out = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    if not bool(torch.isfinite(out).all()):
        raise AdapterError(INVALID_ADAPTER, f"{key} overflows {dtype} (values too large)")
    return out
