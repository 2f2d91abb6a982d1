"""Load a Hugging Face model directory into :class:`engine.model.CausalLM`.

Weights come from ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``; pickled checkpoints are never opened. The model is built
on the meta device and materialised on the target device, so no memory is spent on random
initial weights. The checkpoint's q, k, v, gate and up tensors load into their slices of the
model's packed layers (:func:`engine.packed.checkpoint_tensors`). An NF4 base either comes
quantized (bitsandbytes' tensors, as transformers saves them) or is quantized here as its
float tensors stream in. With ``load_format="dummy"`` only ``config.json`` is read and the
weights are random (:mod:`engine.dummy`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from engine.config import LOAD_FORMATS
from engine.dummy import (
    dummy_tensors,
    has_tokenizer,
    init_dummy_weights,
    init_std,
    synthetic_tokenizer,
)
from engine.model import Backends, CausalLM
from engine.naming import is_quantized_linear
from engine.packed import checkpoint_tensors
from engine.parallel.group import Shard
from engine.parallel.sharding import checkpoint_part, nf4_part
from engine.quantization import (
    QUANT_STATE_KEY,
    memory_report,
    nf4_from_checkpoint,
    nf4_layer,
    quantize_nf4,
    swap_linears,
)

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


def quantized_modules(model_dir: Path) -> set[str]:
    """Modules whose weight the checkpoint stores packed in 4 bits (a quant state beside it)."""
    suffix = ".weight." + QUANT_STATE_KEY
    names: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            names |= {k.removesuffix(suffix) for k in f.keys() if k.endswith(suffix)}  # noqa: SIM118
    return names


def _quantized_linears(model: CausalLM) -> set[str]:
    """The checkpoint's linear layers that NF4 quantization at load covers."""
    return {
        name.removesuffix(".weight")
        for name, tensor in checkpoint_tensors(model)
        if is_quantized_linear(name, tuple(tensor.shape))
    }


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    backends: Backends,
    quantization: str = "none",
    load_format: str = "auto",
    seed: int = 0,
) -> CausalLM:
    """Build the model for ``model_dir`` and load its weights in ``dtype`` on ``device``.

    ``quantization="nf4"`` serves the decoder's linear layers in NF4: a checkpoint saved by
    transformers + bitsandbytes loads as it is; a float checkpoint is quantized tensor by
    tensor as it loads, so its float weights never all sit on the device.
    ``load_format="dummy"`` reads ``config.json`` only and draws random weights from
    ``seed`` on the device (quantized layer by layer with nf4; see :mod:`engine.dummy`).

    With the collectives of a tensor-parallel worker in ``backends``, the model is that
    worker's part (`engine/parallel/sharding.py`): each tensor, from the checkpoint or drawn
    whole as a dummy load draws it, is cut to the part as it comes (an NF4 weight quantized
    whole first, exactly as on one device, then cut), so no worker holds the whole model.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}"
        )
    config = load_config(model_dir)
    shard = backends.collectives.shard
    dummy = load_format == "dummy"
    model, nf4_modules = empty_model(model_dir, dtype, device, backends, quantization, load_format)
    nf4 = set(nf4_modules)
    if dummy and shard.size == 1:
        init_dummy_weights(model, init_std(config), seed, nf4_modules, dtype)
    elif dummy:
        drawn = dummy_tensors(model_dir, init_std(config), seed, device, dtype)
        _load_tensors(model, drawn, nf4, False, dtype, device, shard, "dummy weights")
    else:
        prequantized = bool(nf4) and bool(quantized_modules(model_dir))
        desc = "quantizing to nf4" if nf4 and not prequantized else "loading weights"
        stream = iterate_weights(model_dir)
        _load_tensors(model, stream, nf4, prequantized, dtype, device, shard, desc)
    model.eval()
    report = memory_report(model, dtype)
    num_params = sum(p.numel() for p in model.parameters()) + report.quantized_params
    logger.info(
        "loaded %s%s: %d layers, %.1fM parameters, %s%s",
        model_dir.name,
        f" (dummy weights, seed {seed})" if dummy else "",
        model.arch.num_layers,
        num_params / 1e6,
        dtype,
        f", {len(nf4_modules)} linear layers in nf4" if nf4_modules else "",
    )
    return model


def empty_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    backends: Backends,
    quantization: str = "none",
    load_format: str = "auto",
) -> tuple[CausalLM, list[str]]:
    """The model for ``model_dir`` materialised on ``device`` with uninitialised weights, its
    NF4 layers swapped in; and those layers' checkpoint names."""
    config = load_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(config, backends)
    prequantized = set() if load_format == "dummy" else quantized_modules(model_dir)
    if prequantized and quantization != "nf4":
        raise ValueError(f"{model_dir.name} is quantized to nf4; serve it with quantization nf4")
    nf4_modules: list[str] = []
    if quantization == "nf4":
        targets = prequantized or _quantized_linears(model)
        nf4_modules = swap_linears(model, backends.nf4, keep=lambda n: n not in targets)
    model.to(dtype)  # still on the meta device: the weights are allocated in dtype at once
    model.to_empty(device=device)
    model.tie_weights()
    return model, nf4_modules


def _load_tensors(
    model: CausalLM,
    tensors: Iterable[tuple[str, torch.Tensor]],
    nf4_modules: set[str],
    prequantized: bool,
    dtype: torch.dtype,
    device: torch.device,
    shard: Shard,
    desc: str,
) -> None:
    """Copy checkpoint ``tensors`` (a tensor-parallel worker: their ``shard`` parts) into
    the materialised ``model``; every one must arrive."""
    params = dict(checkpoint_tensors(model, remove_duplicate=False))  # packed: slice views
    packed: dict[str, dict[str, torch.Tensor]] = {}  # module -> its pre-quantized tensors
    loaded: set[str] = set()
    for name, tensor in tqdm(tensors, desc=desc, unit="tensor", leave=False):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        module, _, part = name.partition(".weight")
        if module in nf4_modules and (part or name.endswith(".weight")):
            if prequantized:
                packed.setdefault(module, {})[part.removeprefix(".") or "weight"] = tensor
            else:
                weight = quantize_nf4(tensor.to(device=device, dtype=dtype))
                nf4_layer(model, module).set_weight(nf4_part(module, weight, shard))
            continue
        if name not in params:
            raise ValueError(f"unexpected tensor {name} in checkpoint")
        param = params[name]
        tensor = checkpoint_part(name, tensor, shard)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    for module, parts in packed.items():
        weight = nf4_from_checkpoint(f"{module}.weight", parts)
        nf4_layer(model, module).set_weight(nf4_part(module, weight, shard).to(device))
    if model.arch.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    missing |= {f"{m}.weight" for m in nf4_modules if nf4_layer(model, m).weight is None}
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")


def load_tokenizer(model_dir: Path, load_format: str = "auto") -> PreTrainedTokenizerBase:
    """The model directory's tokenizer; with dummy weights and no tokenizer files, a
    synthetic one covering the vocabulary (:func:`engine.dummy.synthetic_tokenizer`)."""
    if load_format == "dummy" and not has_tokenizer(model_dir):
        config = load_config(model_dir)
        logger.info(
            "%s has no tokenizer: using %d synthetic tokens", model_dir.name, config.vocab_size
        )
        return synthetic_tokenizer(config)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer


def eos_token_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {int(eos)}
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
