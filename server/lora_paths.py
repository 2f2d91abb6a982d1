"""Where runtime-loaded adapters may come from: inside an ``--adapter-root``, by real path.

A ``lora_path`` sent over HTTP is resolved with every symlink followed and must land inside
one of the configured roots; every entry of the adapter directory must resolve inside the
same root too, so a symlinked ``adapter_model.safetensors`` cannot reach out. Then the path
must name a directory. Nothing is opened here (``realpath``, ``stat`` and a directory
listing only), and refusals never echo the path: a path the file system refuses (too long,
unreadable, a symlink loop or a dangling one, a file where a directory should be) is a 400
that says which of those it is.

What this does not cover: a file swapped for a symlink between this check and the loader's
read. The roots are the operator's directories; write access to them is trust.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path, PurePath

from adapters.confinement import PathKind, inside, links_inside, os_error_reason, path_kind
from adapters.errors import ADAPTER_NOT_FOUND, INVALID_ADAPTER
from server.errors import APIError

_FORBIDDEN = "lora_path is not inside an allowed adapter root"
# A lora_path that names something other than a directory: the code and message, by kind.
_NOT_A_DIRECTORY = {
    PathKind.DANGLING: (ADAPTER_NOT_FOUND, "lora_path is a dangling symbolic link"),
    PathKind.FILE: (INVALID_ADAPTER, "lora_path names a file; a directory was expected"),
    PathKind.OTHER: (INVALID_ADAPTER, "lora_path is not a directory (a FIFO, socket or device)"),
}


def resolve_lora_path(lora_path: str, roots: Sequence[Path]) -> Path:
    """The real directory ``lora_path`` names, checked to lie inside one of ``roots``.

    Relative paths are taken relative to each root in turn.

    Raises:
        APIError: 403 ``lora_path_not_allowed`` (no roots, ``..``, outside every root, or a
            symlink that escapes); 400 ``invalid_value`` for a malformed or too long path,
            ``adapter_not_found`` for a dangling symlink, ``invalid_adapter`` for a path
            that is not a readable directory.
    """
    if "\x00" in lora_path:
        raise APIError(400, "invalid_value", "lora_path is malformed", "lora_path")
    if not roots:
        raise APIError(403, "lora_path_not_allowed", "no --adapter-root is configured", "lora_path")
    if ".." in PurePath(lora_path).parts:
        raise APIError(403, "lora_path_not_allowed", _FORBIDDEN, "lora_path")
    for root in roots:
        root_real = os.path.realpath(root)
        joined = os.path.join(root_real, lora_path)  # absolute wins
        # realpath stops without raising where it cannot resolve (a name too long, a
        # loop); the stat in _check_directory reports it.
        candidate = os.path.realpath(joined)
        if inside(candidate, root_real):
            if _check_directory(joined):  # unresolved: a dangling symlink is still one
                _check_entries(candidate, root_real)
            return Path(candidate)
    raise APIError(403, "lora_path_not_allowed", _FORBIDDEN, "lora_path")


def _check_directory(path: str) -> bool:
    """Whether ``path`` is a directory; False when nothing is there (the loader reports it
    missing: 400 ``adapter_not_found``). Anything else is refused."""
    try:
        kind = path_kind(path)
    except OSError as e:
        code = "invalid_value" if e.errno == errno.ENAMETOOLONG else INVALID_ADAPTER
        raise APIError(400, code, os_error_reason(e, "lora_path"), "lora_path") from None
    if kind in _NOT_A_DIRECTORY:
        code, message = _NOT_A_DIRECTORY[kind]
        raise APIError(400, code, message, "lora_path")
    return kind is PathKind.DIRECTORY


def _check_entries(directory: str, root_real: str) -> None:
    """Every entry of the adapter directory must resolve inside the root too."""
    try:
        confined = links_inside(directory, root_real)
    except OSError as e:
        reason = os_error_reason(e, "the adapter directory")
        raise APIError(400, INVALID_ADAPTER, reason, "lora_path") from None
    if not confined:
        raise APIError(403, "lora_path_not_allowed", _FORBIDDEN, "lora_path")
