"""What a checkpoint's ``config.json`` says about how it can be served: its dtype, its
quantization, and whether a tensor-parallel split fits its shape and the machine.

:meth:`engine.config.EngineConfig.create` asks these before anything loads, so a checkpoint
that cannot be served as asked is refused with the reason and the flag to change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.arch import ModelArch
from engine.parallel.group import check_divisible
from kernels.nf4 import DEFAULT_BLOCKSIZE

QUANTIZATIONS = ("none", "nf4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, model_dir: Path) -> torch.dtype:
    """Map ``--dtype`` to a torch dtype; "auto" takes the checkpoint's ``torch_dtype``."""
    if name == "auto":
        config = json.loads((model_dir / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
        if name not in DTYPES:
            name = "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def check_tensor_parallel(
    size: int, arch: ModelArch, quantization: str, device: torch.device, count_gpus: bool
) -> None:
    """Refuse a split the model's shape or the machine cannot take, before anything loads."""
    check_divisible(
        size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
    )
    if quantization == "nf4":
        # Each worker's part of an NF4 weight holds whole 64-value blocks: its rows whole
        # (q, k, v, gate, up: the hidden size), or its part of them (o, down: their inputs / N).
        rows = {
            "q/k/v/gate/up": (arch.hidden_size, arch.hidden_size),
            "o_proj": (arch.q_width, arch.q_width // size),
            "down_proj": (arch.intermediate_size, arch.intermediate_size // size),
        }
        for name, (features, part) in rows.items():
            if part % DEFAULT_BLOCKSIZE:
                raise ValueError(
                    f"--tensor-parallel-size {size} with nf4 cuts {name}'s {features} inputs "
                    f"into parts of {part}, not whole {DEFAULT_BLOCKSIZE}-value blocks; choose "
                    "a size that does, or serve without nf4"
                )
    if count_gpus and device.type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(
            f"--tensor-parallel-size {size} needs {size} GPUs; this machine has "
            f"{torch.cuda.device_count()}"
        )


def resolve_quantization(name: str | None, hf: dict[str, Any], model_dir: Path) -> str:
    """``--quantization``: None takes the checkpoint's; a 4-bit checkpoint must stay 4-bit."""
    stored = "nf4" if hf.get("quantization_config") else "none"
    if stored == "nf4":
        _check_quantization_config(hf["quantization_config"])
    if name is None:
        return stored
    if stored == "nf4" and name != "nf4":
        raise ValueError(
            f"{model_dir.name} is stored in nf4 (bitsandbytes); it can only be served with "
            "quantization nf4"
        )
    return name


def _check_quantization_config(qc: dict[str, Any]) -> None:
    """Refuse every bitsandbytes variant but 4-bit NF4 in uint8 storage, with the reason."""
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        kind = "8-bit bitsandbytes" if qc.get("load_in_8bit") else repr(qc.get("quant_method"))
        raise ValueError(f"{kind} quantization is not supported; bitsandbytes nf4 only")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(
            f"bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type')!r} is not supported; nf4 only"
        )
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"bnb_4bit_quant_storage {storage!r} is not supported; uint8 only")
