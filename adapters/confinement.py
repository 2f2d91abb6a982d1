"""Whether a directory stays inside a root once every symlink is followed.

Shared by the two places adapters arrive from: ``lora_path`` values under an
``--adapter-root`` (``server/lora_paths.py``) and adapters fetched into the source cache
(``adapters/source_cache.py``). Nothing is opened here: ``realpath`` and directory listings.
"""

from __future__ import annotations

import os


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
