"""The resolvers that ship: a directory mounted under a scheme, and the Hugging Face Hub.

``FilesystemResolver`` serves ``NAME://sub/path`` from ``DIR/sub/path`` (``--lora-source
NAME=DIR``): a bucket mounted on the machine, or a shared volume. It copies into the cache as
a download would, regular files only, so nothing in the cache points back into the mount;
the source directory is confined to ``DIR`` as a ``lora_path`` is to its root.

``HfResolver`` serves ``hf://ORG/REPO[@REVISION]`` with ``huggingface_hub.snapshot_download``
(credentials from ``HF_TOKEN`` or the Hub's login, as every Hub client finds them), fetching
only the files the adapter loader reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from adapters.confinement import inside
from adapters.errors import ADAPTER_FETCH_FAILED, INVALID_ADAPTER_SOURCE, AdapterError
from adapters.sources import AdapterResolver, AdapterSource

# What adapter directory holds that loraserve reads; a pickled ``.bin`` is fetched too,
# so that the loader refuses it by name rather than reporting the weights missing.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class FilesystemResolver(AdapterResolver):
    """``scheme://sub/path`` → a copy of the adapter files (:data:`ADAPTER_FILES`) of the
    directory ``root/sub/path``.

    Args:
        scheme: the URI scheme that names this directory.
        root: the directory; every source must resolve inside it, symlinks followed.
    """

    def __init__(self, scheme: str, root: Path) -> None:
        self.scheme = scheme
        self.root = root

    @property
    def schemes(self) -> tuple[str, ...]:
        return (self.scheme,)

    def fetch(self, source: AdapterSource, dest: Path) -> None:
        root_real = os.path.realpath(self.root)
        directory = os.path.realpath(os.path.join(root_real, *source.parts))
        missing = AdapterError(
            ADAPTER_FETCH_FAILED, f"{self.scheme}:// holds no adapter directory at that path"
        )
        # A symlink out of the source reads as absent: the refusal names nothing outside it.
        if not inside(directory, root_real) or not os.path.isdir(directory):
            raise missing
        # Only the adapter's own files, each a regular file inside the source (a symlink is
        # followed only when it stays inside): the cache gets files, nothing else is read.
        dest.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            path = os.path.join(directory, name)
            real = os.path.realpath(path)
            if not os.path.lexists(path):
                continue
            if not inside(real, root_real) or not os.path.isfile(real):
                raise missing
            shutil.copyfile(real, dest / name)


class HfResolver(AdapterResolver):
    """``hf://ORG/REPO[@REVISION]`` (or ``hf://REPO``) → the adapter's files at that revision
    (the default branch without one)."""

    @property
    def schemes(self) -> tuple[str, ...]:
        return ("hf",)

    def fetch(self, source: AdapterSource, dest: Path) -> None:
        repo_id, at, revision = source.path.partition("@")
        if len(repo_id.split("/")) > 2 or (at and not revision):
            raise AdapterError(INVALID_ADAPTER_SOURCE, "hf:// takes hf://ORG/REPO[@REVISION]")
        try:
            snapshot_download(
                repo_id,
                revision=revision or None,
                local_dir=dest,
                allow_patterns=list(ADAPTER_FILES),
            )
        except HFValidationError:
            raise AdapterError(INVALID_ADAPTER_SOURCE, "not a Hugging Face repository id") from None
        except RevisionNotFoundError:
            raise AdapterError(
                ADAPTER_FETCH_FAILED, "the repository has no such revision"
            ) from None
        except RepositoryNotFoundError:  # gated and private ones included
            raise AdapterError(
                ADAPTER_FETCH_FAILED, "no such Hugging Face repository, or no access to it"
            ) from None
