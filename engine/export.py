"""Writing Hugging Face model directories: the NF4 base that ``loraserve quantize`` makes.

The output is what transformers itself saves: ``model.safetensors``, ``config.json`` (with
a bitsandbytes ``quantization_config`` when quantized) and the source's tokenizer and
generation files, so ``AutoModelForCausalLM.from_pretrained`` loads it back.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.loader import iterate_weights, safetensors_files
from engine.quantization import (
    is_quantized_linear,
    nf4_to_checkpoint,
    quantization_config,
    quantize_nf4,
)

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
                packed = nf4_to_checkpoint(quantize_nf4(tensor.to(device, dtype)), dtype)
                for suffix, part in packed.items():
                    yield name + suffix, part
            else:
                yield name, tensor.to(dtype)

    config["quantization_config"] = quantization_config(dtype)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return write_model_dir(model_dir, out_dir, tensors(), config)


def write_model_dir(
    source_dir: Path,
    out_dir: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: dict[str, object],
) -> Path:
    """Save ``tensors`` and ``config`` as a model directory, with ``source_dir``'s side files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.contiguous().cpu() for name, t in tensors}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
    logger.info("wrote %s (%d tensors)", out_dir, len(state))
    return out_dir
