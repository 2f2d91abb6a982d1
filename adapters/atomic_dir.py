"""Directories that appear whole or not at all: what the server writes to disk (saved
adapters, compositions, exported models) is written under a hidden name and renamed into
place, so a reader never finds half of it and a failure, a full disk included, leaves
nothing behind."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def write_directory(out: Path, write: Callable[[Path], object]) -> Path:
    """Make directory ``out`` with ``write(directory)``, all or nothing.

    ``write`` fills a new hidden directory beside ``out`` (``.NAME.partial-XXXXXXXX``), which
    is renamed to ``out`` once ``write`` returns. ``out`` must not exist, or be empty.

    Returns:
        ``out``.

    Raises:
        OSError: writing or the rename failed (``ENOSPC``: the disk is full); nothing is
            left, neither ``out`` nor the hidden directory.
        Whatever ``write`` raises, likewise leaving nothing.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        partial.mkdir()
        write(partial)
        partial.replace(out)  # atomic; refused when out holds anything
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already once renamed
    return out
