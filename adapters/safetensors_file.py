"""Reading an untrusted safetensors file: the header first and cheaply, the data only when valid.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}}``), then the data. The declared length is
checked against the file's size before the header is read, so a corrupt or hostile length
(a git-LFS pointer's text, a truncated download, 2**62) never becomes an allocation. The data
is read into memory rather than memory-mapped: a file truncated while it is read raises an
error instead of a SIGBUS. Messages name the file (``adapter_model.safetensors``), never its
directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters.errors import INVALID_ADAPTER, AdapterError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the float dtypes adapters may use
DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}

TensorInfo = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Each tensor's dtype and shape, and the file's total size they account for.

    Raises:
        AdapterError: ``invalid_adapter`` for a truncated, padded or malformed file, an LFS
            pointer, or a dtype other than F16/BF16/F32/F64.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if prefix.startswith(b"version "):
                raise _corrupt(path, "it is a git-LFS pointer file, not the weights (git lfs pull)")
            if len(prefix) < 8:
                raise _corrupt(path, f"truncated ({size} bytes)")
            header_size = int.from_bytes(prefix, "little")
            if header_size > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(path, f"its header claims {header_size} bytes; the file has {size}")
            raw_header = f.read(header_size)
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, f"cannot read {path.name} ({e.strerror})") from None
    try:
        raw = json.loads(raw_header)
    except (ValueError, RecursionError):
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(raw, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header = {k: _tensor_info(path, k, v) for k, v in raw.items() if k != "__metadata__"}
    expected = 8 + header_size + sum(ITEMSIZE[d] * math.prod(shape) for d, shape in header.values())
    if expected != size:
        raise _corrupt(path, f"truncated or padded: {size} bytes, its header describes {expected}")
    return header, size


def read_tensors(path: Path, expected_size: int) -> dict[str, torch.Tensor]:
    """Every tensor of a file whose header :func:`read_header` accepted, as CPU tensors.

    ``expected_size`` (from :func:`read_header`) bounds the read: a file that has grown or
    shrunk since is refused rather than read.
    """
    try:
        with path.open("rb") as f:
            data = f.read(expected_size + 1)
    except OSError as e:
        raise AdapterError(INVALID_ADAPTER, f"cannot read {path.name} ({e.strerror})") from None
    if len(data) != expected_size:
        raise _corrupt(path, "it changed while being read")
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _corrupt(path, str(e).splitlines()[0][:200]) from None


def _tensor_info(path: Path, key: str, entry: object) -> TensorInfo:
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(type(d) is int and d >= 0 for d in entry["shape"])
    ):
        raise _corrupt(path, f"bad header entry for {key[:120]!r}")
    if entry["dtype"] not in ITEMSIZE:
        raise AdapterError(
            INVALID_ADAPTER,
            f"{key[:120]} has dtype {entry['dtype'][:16]}; adapters must be {', '.join(ITEMSIZE)}",
        )
    return entry["dtype"], tuple(entry["shape"])


def _corrupt(path: Path, reason: str) -> AdapterError:
    return AdapterError(INVALID_ADAPTER, f"{path.name} is corrupt: {reason}")
