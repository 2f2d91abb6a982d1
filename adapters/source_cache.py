"""The local cache of adapters fetched from sources: one directory per source URI.

An entry is named after its URI: the scheme, a readable tail (the URI's last part, reduced
to ``[A-Za-z0-9._-]``) and 16 hex digits of the SHA-256 of the normalized URI
(``hf-sql-lora-3f2a9c...``), so two URIs never share an entry and no URI can name a path.
A fetch writes into a fresh ``.fetch-*`` directory inside the cache; only once that holds
``adapter_config.json`` and no symlink out of the cache is it renamed into place (one
atomic rename), so a failed or interrupted fetch leaves no entry, and a second load of the
same URI finds the entry and fetches nothing. Loads of one URI at once fetch once (a lock
per URI; the rename also settles two servers sharing a cache).

An entry is the source as first fetched: a URI whose content changes (an ``hf://`` repo
without a revision, an overwritten bucket prefix) is fetched again only once its entry is
deleted. Publish new weights under a new URI (or pin ``@revision``) instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.confinement import inside, links_inside
from adapters.errors import ADAPTER_FETCH_FAILED, AdapterError
from adapters.sources import AdapterResolver, AdapterSource, ResolverRegistry

logger = logging.getLogger(__name__)

_CONFIG_NAME = "adapter_config.json"  # what makes a directory a PEFT adapter
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def entry_name(source: AdapterSource) -> str:
    """The cache directory's name for ``source`` (starts with a letter: never ``.fetch-``)."""
    tail = _UNSAFE.sub("_", source.parts[-1])[:48]
    digest = hashlib.sha256(source.uri.encode()).hexdigest()[:16]
    return f"{source.scheme}-{tail}-{digest}"


class AdapterCache:
    """Fetched adapters under ``root``, fetched through ``registry``'s resolvers.

    Thread-safe: :meth:`get` blocks on the source and is meant for a worker thread.
    """

    def __init__(self, root: Path, registry: ResolverRegistry) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.registry = registry
        self._root_real = os.path.realpath(root)
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # entry → (lock, users)

    def get(self, source: AdapterSource) -> Path:
        """The local adapter directory for ``source``, fetched unless already cached.

        Raises:
            AdapterError: ``unknown_adapter_source`` (no resolver for the scheme),
                ``invalid_adapter_source`` (the resolver refused the URI), or
                ``adapter_fetch_failed`` (the source failed, sent no adapter, or sent a
                symlink out of the cache); nothing is cached then.
        """
        resolver = self.registry.resolver_for(source.scheme)
        entry = os.path.join(self._root_real, entry_name(source))
        with self._locked(entry):
            if not os.path.lexists(entry):
                self._fetch(resolver, source, entry)
            self._check_confined(entry)
        return Path(entry)

    def _fetch(self, resolver: AdapterResolver, source: AdapterSource, entry: str) -> None:
        started = time.monotonic()
        staging = tempfile.mkdtemp(prefix=".fetch-", dir=self._root_real)
        try:
            try:
                resolver.fetch(source, Path(staging))
            except AdapterError:
                raise
            except Exception as e:  # a resolver's own failure: a plugin's, the network's
                logger.warning("fetching %s failed", source.uri, exc_info=True)
                raise AdapterError(
                    ADAPTER_FETCH_FAILED,
                    f"fetching from {source.scheme}:// failed ({type(e).__name__})",
                ) from None
            self._check_confined(staging)
            if not os.path.isfile(os.path.join(staging, _CONFIG_NAME)):
                raise AdapterError(
                    ADAPTER_FETCH_FAILED, f"the source holds no {_CONFIG_NAME}: not a PEFT adapter"
                )
            try:
                os.rename(staging, entry)
            except OSError:
                if not os.path.isdir(entry):
                    raise AdapterError(
                        ADAPTER_FETCH_FAILED, "the fetched adapter could not be stored"
                    ) from None
                # Another server sharing this cache stored the same URI first: keep theirs.
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; links not followed
        logger.info("fetched %s in %.1f s", source.uri, time.monotonic() - started)

    def _check_confined(self, directory: str) -> None:
        """``directory`` and every symlink in its tree resolve inside the cache."""
        message = "the fetched adapter holds a symlink that leaves the cache"
        if not inside(os.path.realpath(directory), self._root_real):
            raise AdapterError(ADAPTER_FETCH_FAILED, message)
        try:
            for walked, _, _ in os.walk(directory):
                if not links_inside(walked, self._root_real):
                    raise AdapterError(ADAPTER_FETCH_FAILED, message)
        except OSError:
            raise AdapterError(ADAPTER_FETCH_FAILED, "the fetched adapter cannot be read") from None

    @contextmanager
    def _locked(self, entry: str) -> Iterator[None]:
        """Hold ``entry``'s lock; the lock lives only while someone holds or waits for it."""
        with self._guard:
            lock, users = self._locks.get(entry, (threading.Lock(), 0))
            self._locks[entry] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[entry]
                if users == 1:
                    del self._locks[entry]
                else:
                    self._locks[entry] = (lock, users - 1)
