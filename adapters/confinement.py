"""Adapter paths on disk, looked at without opening anything: whether a directory stays
inside a root once every symlink is followed, and what kind of file a path names.

Shared by the two places adapters arrive from: ``lora_path`` values under an
``--adapter-root`` (``server/lora_paths.py``) and adapters fetched into the source cache
(``adapters/source_cache.py``); the loader (``adapters/loader.py``) asks the kind of each
file before it opens it. Nothing is opened here: ``realpath``, ``stat`` and directory
listings. Reasons for a failure name a field or a file's own name, never the path.
"""

from __future__ import annotations

import enum
import errno
import os
import stat


def inside(path: str, root: str) -> bool:
    """Whether the real path ``path`` lies strictly inside the real directory ``root``."""
    return path.startswith(root.rstrip(os.sep) + os.sep)


def links_inside(directory: str, root: str) -> bool:
    """Whether every symlink among ``directory``'s entries resolves inside ``root``.

    Only the directory's own entries are looked at (a caller that needs a whole tree walks
    it). Raises ``OSError`` when the directory cannot be listed.
    """
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_symlink() and not inside(os.path.realpath(entry.path), root):
                return False
    return True


class PathKind(enum.Enum):
    """What a path names once every symlink is followed."""

    DIRECTORY = "directory"
    FILE = "file"  # a regular file
    OTHER = "other"  # a FIFO, socket or device: never opened (reading a FIFO blocks)
    MISSING = "missing"  # nothing there, and no symlink either
    DANGLING = "dangling"  # a symlink to nothing


def path_kind(path: str) -> PathKind:
    """What ``path`` names, by ``stat`` alone.

    Raises:
        OSError: anything but a missing path: a name too long, permission denied, a symlink
            loop, a file where a directory should be on the way (:func:`os_error_reason`
            says it in words).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return PathKind.DANGLING if os.path.islink(path) else PathKind.MISSING
    if stat.S_ISDIR(mode):
        return PathKind.DIRECTORY
    return PathKind.FILE if stat.S_ISREG(mode) else PathKind.OTHER


def os_error_reason(error: OSError, name: str) -> str:
    """Why ``error`` happened on ``name`` (a request field such as ``lora_path``, or a file's
    own name), in words. Only ``strerror`` is used: ``str(error)`` carries the path."""
    if error.errno == errno.ENAMETOOLONG:
        return f"{name} is too long"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied reading {name}"
    if error.errno == errno.ENOTDIR:
        return f"{name}: a directory was expected, and a file is in its place"
    if error.errno == errno.EISDIR:
        return f"{name} is a directory; a file was expected"
    if error.errno == errno.ELOOP:
        return f"{name}: too many levels of symbolic links"
    if error.errno == errno.ENOENT:
        return f"{name} was not found"
    return f"cannot read {name} ({error.strerror})"
