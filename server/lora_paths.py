"""Where runtime-loaded adapters may come from: inside an ``--adapter-root``, by real path.

A ``lora_path`` sent over HTTP is resolved with every symlink followed and must land inside
one of the configured roots; every entry of the adapter directory must resolve inside the
same root too, so a symlinked ``adapter_model.safetensors`` cannot reach out. Nothing is
opened here (``realpath`` and a directory listing only), and refusals never echo the path.

What this does not cover: a file swapped for a symlink between this check and the loader's
read. The roots are the operator's directories; write access to them is trust.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath

from adapters.confinement import inside, links_inside
from server.errors import APIError

_FORBIDDEN = "lora_path is not inside an allowed adapter root"


def resolve_lora_path(lora_path: str, roots: Sequence[Path]) -> Path:
    """The real directory ``lora_path`` names, checked to lie inside one of ``roots``.

    Relative paths are taken relative to each root in turn.

    Raises:
        APIError: 403 ``lora_path_not_allowed`` (no roots, ``..``, outside every root, or a
            symlink that escapes), 400 for a malformed path.
    """
    if "\x00" in lora_path:
        raise APIError(400, "invalid_value", "lora_path is malformed", "lora_path")
    if not roots:
        raise APIError(403, "lora_path_not_allowed", "no --adapter-root is configured", "lora_path")
    if ".." in PurePath(lora_path).parts:
        raise APIError(403, "lora_path_not_allowed", _FORBIDDEN, "lora_path")
    for root in roots:
        root_real = os.path.realpath(root)
        candidate = os.path.realpath(os.path.join(root_real, lora_path))  # absolute wins
        if inside(candidate, root_real):
            _check_entries(candidate, root_real)
            return Path(candidate)
    raise APIError(403, "lora_path_not_allowed", _FORBIDDEN, "lora_path")


def _check_entries(directory: str, root_real: str) -> None:
    """Every entry of the adapter directory must resolve inside the root too."""
    if not os.path.isdir(directory):
        return  # the loader reports it missing (404)
    try:
        confined = links_inside(directory, root_real)
    except OSError:
        raise APIError(400, "invalid_adapter", "the adapter directory cannot be read") from None
    if not confined:
        raise APIError(403, "lora_path_not_allowed", _FORBIDDEN, "lora_path")
