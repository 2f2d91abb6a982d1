"""Adapter sources: a ``lora_path`` that names an adapter elsewhere, and who fetches it.

A source is a URI ``SCHEME://PATH`` (``hf://org/repo@v2``, ``s3://bucket/adapters/sql``,
``models://team/sql`` for a mounted directory). An :class:`AdapterResolver` fetches the
PEFT adapter directory a URI names for each scheme it handles; a :class:`ResolverRegistry`
maps schemes to resolvers; the cache (:mod:`adapters.source_cache`) keeps what was fetched.
The resolvers that ship are in :mod:`adapters.resolvers`; others (S3, GCS, ...) come from
plugins:

    # my_plugin/s3.py, with boto3 (a dependency of the plugin, not of loraserve)
    class S3Resolver(AdapterResolver):
        @property
        def schemes(self) -> tuple[str, ...]:
            return ("s3",)

        def fetch(self, source: AdapterSource, dest: Path) -> None:
            ...  # download every object under the prefix into dest

    def register(registry: ResolverRegistry) -> None:
        registry.register_resolver(S3Resolver())

    # the plugin's pyproject.toml
    [project.entry-points."loraserve.adapter_resolvers"]
    s3 = "my_plugin.s3:register"

Nothing here touches tensors or the network; URIs are checked as text before any resolver
sees them.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from adapters.errors import INVALID_ADAPTER_SOURCE, UNKNOWN_ADAPTER_SOURCE, AdapterError

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "loraserve.adapter_resolvers"  # entry points: register(registry) functions
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def is_source_uri(text: str) -> bool:
    """Whether ``text`` is written as a URI (``SCHEME://...``) rather than a path."""
    return _URI.match(text) is not None


@dataclass(frozen=True)
class AdapterSource:
    """A source URI, checked and normalized (:func:`parse_source`).

    Attributes:
        scheme: the scheme, lower case (``hf``, ``s3``, ...).
        path: what follows ``://``: ``/``-separated parts, none empty, ``.`` or ``..``,
            without a trailing ``/``. What it means is the resolver's (a bucket and a key
            prefix, a repository id and a revision, ...).
    """

    scheme: str
    path: str

    @property
    def uri(self) -> str:
        """The normalized URI: the cache's key."""
        return f"{self.scheme}://{self.path}"

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))


def parse_source(text: str) -> AdapterSource:
    """The source ``text`` names, refused unless every part is a plain name.

    Raises:
        AdapterError: ``invalid_adapter_source`` for a control character (NUL included), a
            backslash, an empty, ``.`` or ``..`` part, or no path at all.
    """
    match = _URI.fullmatch(text)
    if match is None:
        raise AdapterError(INVALID_ADAPTER_SOURCE, "lora_path is not a SCHEME://PATH URI")
    scheme, path = match.group(1).lower(), match.group(2).rstrip("/")
    if any(ord(c) < 32 or c == "\x7f" for c in path) or "\\" in path:
        raise AdapterError(INVALID_ADAPTER_SOURCE, "lora_path holds a control character or \\")
    if not path or any(part in ("", ".", "..") for part in path.split("/")):
        raise AdapterError(
            INVALID_ADAPTER_SOURCE, "every part of a source URI must be a name (no empty, . or ..)"
        )
    return AdapterSource(scheme, path)


class AdapterResolver(ABC):
    """Fetches PEFT adapter directories from one kind of source."""

    @property
    @abstractmethod
    def schemes(self) -> tuple[str, ...]:
        """The URI schemes this resolver handles (lower case)."""

    @abstractmethod
    def fetch(self, source: AdapterSource, dest: Path) -> None:
        """Write the adapter directory ``source`` names into ``dest``.

        ``dest`` exists, is empty and lies inside the cache; the adapter's files
        (``adapter_config.json``, ``adapter_model.safetensors``) go directly into it. Runs
        in a worker thread, never on the event loop, so it may block on the network; the
        cache validates what it wrote and removes it on any failure.

        Raises:
            AdapterError: for a failure known to the resolver (``adapter_fetch_failed``,
                ``invalid_adapter_source``), with a message a client may read: no
                credentials, no server paths. Any other exception is reported to the client
                by its type name only (and logged in full).
        """


class ResolverRegistry:
    """Scheme → resolver, for one server; plugins add theirs with :meth:`register_resolver`."""

    def __init__(self) -> None:
        self._by_scheme: dict[str, AdapterResolver] = {}

    def register_resolver(self, resolver: AdapterResolver) -> None:
        """Serve ``resolver.schemes`` with ``resolver``.

        Raises:
            ValueError: a malformed scheme, or one that already has a resolver.
        """
        for scheme in resolver.schemes:
            if not _SCHEME.fullmatch(scheme):
                raise ValueError(f"{scheme!r} is not a URI scheme (lower case, [a-z0-9+.-])")
            if scheme in self._by_scheme:
                raise ValueError(f"the {scheme}:// scheme already has a resolver")
        for scheme in resolver.schemes:
            self._by_scheme[scheme] = resolver

    @property
    def schemes(self) -> list[str]:
        return sorted(self._by_scheme)

    def resolver_for(self, scheme: str) -> AdapterResolver:
        """The resolver of ``scheme``.

        Raises:
            AdapterError: ``unknown_adapter_source``, naming the schemes that are served.
        """
        resolver = self._by_scheme.get(scheme)
        if resolver is None:
            known = ", ".join(f"{s}://" for s in self.schemes) or "none"
            raise AdapterError(
                UNKNOWN_ADAPTER_SOURCE, f"no resolver for {scheme}:// (served: {known})"
            )
        return resolver


def load_resolver_plugins(registry: ResolverRegistry) -> list[str]:
    """Call every installed ``loraserve.adapter_resolvers`` entry point with ``registry``;
    return their names. A plugin that fails to load stops the server (its error raised)."""
    names = []
    for entry_point in entry_points(group=PLUGIN_GROUP):
        entry_point.load()(registry)
        logger.info("adapter resolver plugin %s registered", entry_point.name)
        names.append(entry_point.name)
    return names
