"""Writing Hugging Face model directories: the NF4 base that ``loraserve quantize`` makes, and
a base with a LoRA adapter merged in (``loraserve merge``).

The output is what transformers itself saves: ``model.safetensors``, ``config.json`` (with
a bitsandbytes ``quantization_config`` when quantized) and the source's tokenizer and
generation files, so ``AutoModelForCausalLM.from_pretrained`` loads it back.

Merging is one more state-dict transform. For every module the adapter adapts::

    W' = W + scaling · lora_b @ lora_a          (float32, then cast to the output dtype)

where W is the checkpoint's float weight, or ``dequantize_nf4(Q)`` for an NF4 base. A LoRA
on the embeddings or the head merges as PEFT's ``merge_and_unload`` does:
``E' = E + s·(B @ A)ᵀ`` (A is ``(rank, vocab)``), ``H' = H + s·B @ A``; on a base that ties
them only when the head's update is the embedding's transposed (``ensure_weight_tying``), so
the one matrix holds both. Every other tensor is copied, cast to the output dtype. Written
in NF4, each decoder linear weight is quantized after the merge, as ``loraserve quantize``
would quantize the float merge.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from adapters.atomic_dir import write_directory
from adapters.base_layout import BaseModelLayout
from adapters.kinds import LoadContext, read_adapter
from adapters.weights import AdapterWeights, LoraModuleWeights
from engine.arch import ModelArch
from engine.base_weights import CheckpointBaseWeights
from engine.checkpoint import QUANTIZATIONS, resolve_quantization
from engine.loader import iterate_weights, quantized_modules, safetensors_files
from engine.naming import is_quantized_linear
from engine.quantization import (
    QUANT_STATE_KEY,
    nf4_from_checkpoint,
    nf4_to_checkpoint,
    quantization_config,
    quantize_nf4,
    unpack_quant_state,
)
from kernels.nf4 import NF4Weight, dequantize_nf4

logger = logging.getLogger(__name__)

# Files of a model directory that are not weights and travel with it unchanged.
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# A merge places no adapter pages, so the server's --max-lora-rank does not apply to it.
_ANY_RANK = 1 << 30
# The parts of a packed 4-bit weight, besides the packed tensor itself.
_PACKED_PARTS = ("absmax", "quant_map", QUANT_STATE_KEY)
_NESTED_PARTS = ("nested_absmax", "nested_quant_map")


def quantize_checkpoint(
    model_dir: Path, out_dir: Path, dtype: torch.dtype, device: torch.device
) -> Path:
    """Write ``model_dir`` with its decoder's linear weights in NF4 to ``out_dir``.

    Each linear weight is cast to ``dtype`` and quantized on ``device``, as transformers
    does when it loads a model with ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``; other tensors are saved
    in ``dtype``.
    """
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{model_dir.name} is quantized already")
    safetensors_files(model_dir)  # refuses a directory without safetensors weights

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        weights = tqdm(iterate_weights(model_dir), desc="quantizing to nf4", unit="tensor")
        for name, tensor in weights:
            if is_quantized_linear(name, tuple(tensor.shape)):
                yield from _nf4_tensors(name, quantize_nf4(tensor.to(device, dtype)), dtype)
            else:
                yield name, tensor.to(dtype)

    return write_model_dir(model_dir, out_dir, tensors(), _output_config(config, dtype, "nf4"))


def merge_checkpoint(
    model_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: torch.dtype,
    quantization: str = "none",
    device: torch.device | None = None,
) -> Path:
    """Write ``model_dir`` with the PEFT adapter in ``adapter_dir`` merged in to ``out_dir``.

    The adapter is validated against the base's layout first (any rank is accepted).
    ``out_dir`` must not exist or be empty. See :func:`merged_tensors` for the rest.

    Raises:
        AdapterError: the adapter is invalid or does not fit the base.
        ValueError: the base or ``out_dir`` is unusable.
    """
    _check_out_dir(out_dir)
    context = LoadContext(
        ModelArch.load(model_dir).layout(), _ANY_RANK, base=CheckpointBaseWeights(model_dir)
    )
    adapter = read_adapter(adapter_dir, context)  # any kind; merged_tensors refuses the rest
    return write_merged(model_dir, adapter, out_dir, dtype, quantization, device)


def write_merged(
    model_dir: Path,
    adapter: AdapterWeights,
    out_dir: Path,
    dtype: torch.dtype,
    quantization: str = "none",
    device: torch.device | None = None,
) -> Path:
    """Write the model directory of :func:`merged_tensors` to ``out_dir`` (new or empty)."""
    _check_out_dir(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tensors = merged_tensors(model_dir, adapter, dtype, quantization, device)
    return write_model_dir(model_dir, out_dir, tensors, _output_config(config, dtype, quantization))


def merged_tensors(
    model_dir: Path,
    adapter: AdapterWeights,
    dtype: torch.dtype,
    quantization: str = "none",
    device: torch.device | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint of ``model_dir`` with ``adapter`` merged in, tensor by tensor.

    Args:
        model_dir: the base, float or NF4 (bitsandbytes' 4-bit checkpoint).
        adapter: a validated adapter for this base (from disk or the server's memory).
        dtype: the float dtype of the output (and the compute dtype of an NF4 output).
        quantization: "none" writes float weights; "nf4" writes the decoder's linear
            weights in NF4, in bitsandbytes' format. An NF4 base's module the adapter does
            not touch keeps its packed bytes (quantizing it again could only lose accuracy).
        device: where the merge and any (de)quantization run (default: the CPU).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
    device = device or torch.device("cpu")
    config = json.loads((model_dir / "config.json").read_text())
    stored = resolve_quantization(None, config, model_dir)  # refuses all 4-bit formats but nf4
    packed = quantized_modules(model_dir) if stored == "nf4" else set()
    layout = ModelArch.load(model_dir).layout()
    _check_mergeable(adapter, layout)
    loras = {
        f"{layout.module_path(layer, target)}.weight": module
        for (layer, target), module in adapter.modules.items()
    }
    embed_head = _embed_head_deltas(adapter, layout)
    # DoRA's scales and IA³'s vectors, by the checkpoint module they rescale
    doras = {layout.module_path(*key): g for key, g in adapter.dora.items()}
    ia3s = {layout.module_path(*key): v for key, v in adapter.ia3.items()}
    touched = set(loras) | set(embed_head) | {f"{m}.weight" for m in (*doras, *ia3s)}
    weights = tqdm(_base_tensors(model_dir, packed), desc="merging", unit="tensor")
    for name, tensor in weights:
        module = name.rpartition(".")[0]
        if name.endswith(".bias") and module in ia3s and not ia3s[module].feedforward:
            # IA³ scales a module's output, bias included (PEFT's merge scales it too)
            yield name, (tensor.float() * ia3s[module].values.float()).to(dtype)
            continue
        lora = loras.pop(name, None)
        rescaled = name in touched
        shape = tuple(tensor.shape)
        # The NF4 output quantizes what the base quantized, or else the decoder's linears.
        quantized_here = (
            isinstance(tensor, NF4Weight) if packed else is_quantized_linear(name, shape)
        )
        to_nf4 = quantization == "nf4" and quantized_here
        if isinstance(tensor, NF4Weight):
            if to_nf4 and not rescaled:
                yield from _nf4_tensors(name, tensor, dtype)  # untouched: its bytes are kept
                continue
            weight = dequantize_nf4(tensor.to(device))  # (out_features, in_features) float32
        elif rescaled or to_nf4:
            weight = tensor.to(device, torch.float32)
        else:
            yield name, tensor.to(dtype)
            continue
        if lora is not None:
            weight = weight + _delta_weight(name, lora, weight)
        if name in embed_head:
            weight = weight + embed_head.pop(name).to(weight.device)
        if module in doras:  # PEFT: (m / ‖W + ΔW‖) · (W + ΔW), row by row
            weight = doras[module].to(weight.device, torch.float32).view(-1, 1) * weight
        if module in ia3s:
            vector = ia3s[module].values.to(weight.device, torch.float32)
            weight = weight * (
                vector.view(1, -1) if ia3s[module].feedforward else vector.view(-1, 1)
            )
        if to_nf4:
            yield from _nf4_tensors(name, quantize_nf4(weight.to(dtype)), dtype)
        else:
            yield name, weight.to(dtype)
    if loras or embed_head:
        lacking = sorted([*loras, *embed_head])[0]
        raise ValueError(f"{model_dir.name} lacks {lacking}, which the adapter adapts")
    logger.info("merged %s into %s: %d modules", adapter.name, model_dir.name, len(adapter.modules))


def _base_tensors(
    model_dir: Path, packed: set[str]
) -> Iterator[tuple[str, torch.Tensor | NF4Weight]]:
    """Every tensor of the checkpoint, on the CPU; the packed 4-bit weight of a module in
    ``packed`` comes as one NF4Weight named ``<module>.weight`` once all its parts have
    streamed in (they may lie in different shards)."""
    held: dict[str, dict[str, torch.Tensor]] = {}  # module -> the parts read so far
    for name, tensor in iterate_weights(model_dir):
        module, _, part = name.partition(".weight")
        if module not in packed or not (part or name.endswith(".weight")):
            yield name, tensor
            continue
        parts = held.setdefault(module, {})
        parts[part.removeprefix(".") or "weight"] = tensor
        if _complete(parts):
            del held[module]
            yield f"{module}.weight", nf4_from_checkpoint(f"{module}.weight", parts)
    for module, parts in held.items():
        lacking = [p for p in (*_PACKED_PARTS, *_NESTED_PARTS) if p not in parts]
        key = f"{module}.weight" if "weight" not in parts else f"{module}.weight.{lacking[0]}"
        raise ValueError(f"{model_dir.name}: the checkpoint lacks {key}")


def _complete(parts: dict[str, torch.Tensor]) -> bool:
    """Whether ``parts`` hold all of a packed 4-bit weight (the nested ones if its state
    says it is double-quantized)."""
    if any(p not in parts for p in ("weight", *_PACKED_PARTS)):
        return False
    nested = "nested_offset" in unpack_quant_state(parts[QUANT_STATE_KEY])
    return not nested or all(p in parts for p in _NESTED_PARTS)


def _check_mergeable(adapter: AdapterWeights, layout: BaseModelLayout) -> None:
    """Refuse a kind with no merged form (PEFT's ``merge_and_unload`` has none for it), and
    embedding and head updates that a tied base's one matrix cannot hold both of."""
    if adapter.virtual_tokens is not None or adapter.prefix is not None:
        raise ValueError(
            f"{adapter.kind} adds virtual tokens, not weights: it has no merged model "
            "(PEFT's merge_and_unload does not exist for it)"
        )
    if layout.tie_word_embeddings and (adapter.embedding or adapter.head):
        e, h = adapter.embedding, adapter.head
        tied = (
            e is not None
            and h is not None
            and e.scaling == h.scaling
            and torch.equal(h.lora_a, e.lora_b.T)
            and torch.equal(h.lora_b, e.lora_a.T)
        )
        if not tied:
            raise ValueError(
                "the base ties lm_head to embed_tokens, and the adapter's LoRA on them is "
                "not one update of both (ensure_weight_tying): a merged model cannot hold it"
            )


def _embed_head_deltas(adapter: AdapterWeights, layout: BaseModelLayout) -> dict[str, torch.Tensor]:
    """The checkpoint tensors a LoRA on the embeddings or the head updates, to their
    ``(vocab_size, hidden_size)`` float32 deltas (one, the embeddings', on a tied base)."""
    deltas = {}
    if adapter.embedding is not None:
        delta = _float32(adapter.embedding).delta_weight()  # (hidden, vocab)
        deltas["model.embed_tokens.weight"] = delta.T
    if adapter.head is not None and not layout.tie_word_embeddings:
        deltas["lm_head.weight"] = _float32(adapter.head).delta_weight()
    return deltas


def _float32(module: LoraModuleWeights) -> LoraModuleWeights:
    return LoraModuleWeights(module.lora_a.float(), module.lora_b.float(), module.scaling)


def _delta_weight(name: str, lora: LoraModuleWeights, weight: torch.Tensor) -> torch.Tensor:
    """The adapter's ``(out_features, in_features)`` delta for ``weight``, in float32 on its
    device."""
    shape = (int(lora.lora_b.shape[0]), int(lora.lora_a.shape[1]))
    if shape != tuple(weight.shape):
        raise ValueError(
            f"{name}: the adapter's delta has shape {list(shape)}, the base weight "
            f"{list(weight.shape)}"
        )
    a, b = (t.to(weight.device, torch.float32) for t in (lora.lora_a, lora.lora_b))
    return LoraModuleWeights(lora_a=a, lora_b=b, scaling=lora.scaling).delta_weight()


def _nf4_tensors(
    name: str, weight: NF4Weight, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """``name``'s packed tensor and quant state as bitsandbytes names them."""
    for suffix, part in nf4_to_checkpoint(weight, dtype).items():
        yield name + suffix, part


def _output_config(config: dict[str, Any], dtype: torch.dtype, quantization: str) -> dict[str, Any]:
    """``config`` for weights written in ``dtype``: a quantization_config only for NF4."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    if quantization == "nf4":
        out["quantization_config"] = quantization_config(dtype)
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to write into anything but a new or empty directory: nothing is overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output {out_dir.name!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(
            f"the output directory {out_dir.name!r} exists and is not empty; nothing was written"
        )


def write_model_dir(
    source_dir: Path,
    out_dir: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: dict[str, Any],
) -> Path:
    """Save ``tensors`` and ``config`` as a model directory, with ``source_dir``'s side files.

    Every tensor is made first; the files are then written under a hidden name beside
    ``out_dir`` (new, or empty) and renamed into place once complete. So a failure, a full
    disk included, leaves nothing, and a reader never finds half a model under ``out_dir``.

    Raises:
        OSError: writing failed (``ENOSPC`` for a full disk); nothing was kept.
    """
    state = {name: t.contiguous().cpu() for name, t in tensors}

    def fill(directory: Path) -> None:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (directory / "config.json").write_text(config_text)
        for name in _SIDE_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, directory / name)

    write_directory(out_dir, fill)
    logger.info("wrote %s (%d tensors)", out_dir, len(state))
    return out_dir
