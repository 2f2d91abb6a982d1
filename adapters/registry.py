"""Which adapters exist, by name, and how many unfinished requests use each.

A name maps to the current :class:`AdapterEntry`; every load creates a new entry with a new
id, so unloading a name while requests still use it leaves those requests holding the old
entry (and its weights) until they finish, while the name is free for a new load.

Three kinds of entry: an adapter read from a directory (``path``), one made in memory (a
merge or a composition: ``weights``), and a *mixture*, a virtual adapter whose requests run
every component adapter with its weight (``components``); a mixture holds its components'
entries, so they outlive it.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterError
from adapters.identity import adapter_identity, mixture_identity
from adapters.weights import LORA, AdapterWeights


@dataclass(eq=False)
class AdapterEntry:
    """One loaded adapter.

    Attributes:
        id: unique for the registry's lifetime; keys the host cache and the pool.
        name: what requests call it (the OpenAI ``model`` field).
        path: its directory, read again if its weights must be reloaded; None for an
            adapter made in memory or a mixture.
        max_rank: the largest rank of any of its modules (a mixture: of its components).
        nbytes: its weights' size.
        pages: pool pages it takes when resident (a mixture: its components together).
        refs: unfinished requests naming it; it cannot leave the pool while running
            requests use it, nor be forgotten while any do.
        unloading: unregistered, waiting for ``refs`` to drain.
        digest: a hash of what its weights compute (``adapters.identity.content_digest``;
            empty for a mixture).
        identity: its name, version and content together (``adapters.identity``): what
            the prefix cache keys on, so nothing cached for one entry is reused by another.
        version: 1 for the first load of a name, one more with each load of the same name
            since (a replacement, or a load after an unload): counted for the server's life.
        pinned: the operator asked to keep it in the pool through any churn, until unloaded.
        flops_ratio: the arithmetic its modules add to a token, over the base model's linear
            layers' (``adapters.base_layout.BaseModelLayout.flops_ratio``; a mixture: the sum
            of its components'): what the scheduler prices its rank by.
        kind: the PEFT method (`adapters/kinds.py`; a mixture: ``lora``).
        num_virtual_tokens: positions its requests take before their own tokens (prompt
            and prefix tuning), counted against the context length.
        lora_only: all it adds is LoRA on the decoder's linear layers
            (``AdapterWeights.is_lora_only``; not so with a LoRA on the embeddings or the
            head): what a mixture may combine.
    """

    id: int
    name: str
    path: Path | None
    max_rank: int
    nbytes: int
    pages: int = 0
    refs: int = 0
    unloading: bool = False
    weights: AdapterWeights | None = None  # an adapter made in memory
    components: tuple[tuple[AdapterEntry, float], ...] = ()  # a mixture's (adapter, weight)
    digest: bytes = b""
    identity: bytes = b""
    version: int = 1
    pinned: bool = False
    flops_ratio: float = 0.0
    kind: str = LORA
    num_virtual_tokens: int = 0
    lora_only: bool = True

    @property
    def is_mixture(self) -> bool:
        return bool(self.components)


class AdapterRegistry:
    """Thread-safe name → entry map (HTTP handlers load and unload while the engine runs)."""

    def __init__(self) -> None:
        self._by_name: dict[str, AdapterEntry] = {}
        self._ids = itertools.count(1)
        self._versions: dict[str, int] = {}  # the last version of every name ever loaded
        self._lock = threading.Lock()

    def register(
        self,
        name: str,
        path: Path | None,
        max_rank: int,
        nbytes: int,
        replace: bool = False,
        weights: AdapterWeights | None = None,
        components: tuple[tuple[AdapterEntry, float], ...] = (),
        digest: bytes = b"",
        pages: int = 0,
        pinned: bool = False,
        flops_ratio: float = 0.0,
        kind: str = LORA,
        num_virtual_tokens: int = 0,
        lora_only: bool = True,
    ) -> tuple[AdapterEntry, AdapterEntry | None]:
        """Add ``name``; returns (new entry, the entry it replaced or None).

        Raises:
            AdapterError: ``adapter_already_loaded`` when the name is taken and not replaced.
        """
        with self._lock:
            old = self._by_name.get(name)
            if old is not None and not replace:
                raise AdapterError(
                    "adapter_already_loaded", f"an adapter named {name!r} is already loaded"
                )
            version = self._versions.get(name, 0) + 1
            if components:
                parts = [(part.identity, weight) for part, weight in components]
                identity = mixture_identity(name, version, parts)
            else:
                identity = adapter_identity(name, version, digest)
            entry = AdapterEntry(
                next(self._ids),
                name,
                path,
                max_rank,
                nbytes,
                pages=pages,
                weights=weights,
                components=components,
                digest=digest,
                identity=identity,
                version=version,
                pinned=pinned,
                flops_ratio=flops_ratio,
                kind=kind,
                num_virtual_tokens=num_virtual_tokens,
                lora_only=lora_only,
            )
            self._versions[name] = entry.version
            self._by_name[name] = entry
            if old is not None:
                old.unloading = True
            return entry, old

    def get(self, name: str) -> AdapterEntry:
        """The entry for ``name``.

        Raises:
            AdapterError: ``model_not_found`` for a name that is not loaded.
        """
        with self._lock:
            entry = self._by_name.get(name)
        if entry is None:
            raise AdapterError("model_not_found", f"the model {name!r} does not exist")
        return entry

    def unregister(self, name: str) -> AdapterEntry:
        """Remove ``name``; its entry is marked unloading and returned.

        Raises:
            AdapterError: ``model_not_found`` for a name that is not loaded.
        """
        with self._lock:
            entry = self._by_name.pop(name, None)
        if entry is None:
            raise AdapterError("model_not_found", f"the adapter {name!r} is not loaded")
        entry.unloading = True
        return entry

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return [self._by_name[name] for name in sorted(self._by_name)]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_name)
