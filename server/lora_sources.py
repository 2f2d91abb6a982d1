"""A ``lora_path`` that is a source URI: fetched into the cache off the event loop, in time.

``--lora-cache-dir`` turns adapter sources on (:mod:`adapters.sources`): ``hf://`` always,
each ``--lora-source NAME=DIR``, and whatever installed plugins register. Without it a URI
is refused with a 400 that names the flag. The fetch runs in a thread of its own, so the
event loop (every other request, streaming) and the engine go on while a load waits; a load
that waits past ``--lora-fetch-timeout`` is refused, though the fetch runs to its end and is
cached if it succeeds. Only then does the engine, in this process or its own, get the
cached directory as any local ``lora_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from adapters.errors import ADAPTER_FETCH_FAILED, AdapterError
from adapters.resolvers import FilesystemResolver, HfResolver
from adapters.source_cache import AdapterCache
from adapters.sources import ResolverRegistry, is_source_uri, load_resolver_plugins, parse_source
from server.config import ServerConfig
from server.errors import APIError, from_adapter_error
from server.lora_paths import resolve_lora_path

T = TypeVar("T")


def adapter_cache(config: ServerConfig) -> AdapterCache | None:
    """The cache and its resolvers as ``config`` asks; None when sources are off."""
    if config.lora_cache_dir is None:
        return None
    registry = ResolverRegistry()
    registry.register_resolver(HfResolver())
    for scheme, directory in config.lora_sources:
        registry.register_resolver(FilesystemResolver(scheme, directory))
    load_resolver_plugins(registry)
    return AdapterCache(config.lora_cache_dir, registry)


async def resolve_lora(lora_path: str, config: ServerConfig, cache: AdapterCache | None) -> Path:
    """The local adapter directory ``lora_path`` names: under an ``--adapter-root``, or
    fetched from a source into ``cache``.

    Raises:
        APIError: the local path's refusals (:func:`resolve_lora_path`); 400
            ``adapter_sources_disabled`` for a URI without a cache, and the cache's
            ``invalid_adapter_source``, ``unknown_adapter_source`` or ``adapter_fetch_failed``.
    """
    if not is_source_uri(lora_path):
        return resolve_lora_path(lora_path, config.adapter_roots)
    if cache is None:
        raise APIError(
            400,
            "adapter_sources_disabled",
            "lora_path is a source URI, and adapter sources are off: start the server with "
            "--lora-cache-dir to enable them",
            "lora_path",
        )
    timeout_s = config.lora_fetch_timeout_s
    try:
        source = parse_source(lora_path)
        return await asyncio.wait_for(_in_thread(lambda: cache.get(source)), timeout_s)
    except AdapterError as e:
        raise from_adapter_error(e, "lora_path") from None
    except asyncio.TimeoutError:
        message = f"the source did not deliver the adapter within {timeout_s:g} s"
        raise APIError(400, ADAPTER_FETCH_FAILED, message, "lora_path") from None


async def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread of its own: unlike the loop's executor (which the API's
    tokenization shares), a source that hangs holds no pooled worker and no exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # the waiter may have timed out
            outcome()

    def run() -> None:
        try:
            outcome = functools.partial(future.set_result, fn())
        except BaseException as e:
            outcome = functools.partial(future.set_exception, e)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits now
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="lora-fetch", daemon=True).start()
    return await future
