"""Load a Hugging Face model directory into :class:`engine.model.CausalLM`.

Weights come from ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``; pickled checkpoints are never opened. The model is built
on the meta device and materialised on the target device, so no memory is spent on random
initial weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from engine.model import Backends, CausalLM

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the engine recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_config(model_dir: Path) -> PretrainedConfig:
    """The transformers config; remote code is never trusted."""
    config: PretrainedConfig = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{model_dir.name}: no *.safetensors weights (pickle checkpoints are refused)"
        )
    return files


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, on the CPU, one at a time."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, backends: Backends
) -> CausalLM:
    """Build the model for ``model_dir`` and load its weights in ``dtype`` on ``device``."""
    config = load_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(config, backends)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in tqdm(
        iterate_weights(model_dir), desc="loading weights", unit="tensor", leave=False
    ):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in params:
            raise ValueError(f"unexpected tensor {name} in checkpoint")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    if model.arch.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    model.eval()
    logger.info(
        "loaded %s: %d layers, %.1fM parameters, %s",
        model_dir.name,
        model.arch.num_layers,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
    )
    return model


def eos_token_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {int(eos)}
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
