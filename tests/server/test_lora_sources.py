"""Adapters named by source URIs through the load route: a fake resolver (``fake://``,
served from a temporary directory, counting and holding its fetches), the filesystem
resolver (``models://``), the Hugging Face resolver with ``snapshot_download`` faked, and
the cache: fetched once, nothing left by a failure, nothing that leads out of it."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from adapters.resolvers import ADAPTER_FILES
from adapters.source_cache import AdapterCache
from adapters.sources import AdapterResolver, AdapterSource, ResolverRegistry
from server.config import ServerConfig
from server.errors import APIError
from server.lora_sources import resolve_lora
from server.serve import server_config
from tests.server.conftest import (
    BASE,
    Served,
    assert_error,
    assert_good,
    complete,
    copy_adapter,
    make_engine,
    serve,
)
from tests.server.test_cli import parse


class FakeResolver(AdapterResolver):
    """``fake://PATH`` → a copy of ``store/PATH`` (symlinks kept as they are), except
    ``fake://broken``, which fails as a source with a secret in its error would."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.fetched: list[str] = []
        self.started = threading.Event()
        self.gate = threading.Event()  # cleared: fetches wait for it
        self.gate.set()

    @property
    def schemes(self) -> tuple[str, ...]:
        return ("fake",)

    def fetch(self, source: AdapterSource, dest: Path) -> None:
        self.fetched.append(source.uri)
        self.started.set()
        assert self.gate.wait(30)
        if source.path == "broken":
            raise RuntimeError("403 for https://bucket.example/?token=hunter2")
        shutil.copytree(self.store / source.path, dest, symlinks=True, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fake store, a mounted directory for ``models://``, the cache, and a directory
    outside all of them that symlinks point at."""
    base = tmp_path_factory.mktemp("sources")
    store, mounted, outside = base / "store", base / "mounted", base / "outside"
    for name in ("team/upper", "team/slow", "escape"):
        copy_adapter("upper", store / name)
    copy_adapter("upper", store / "no-config")
    (store / "no-config" / "adapter_config.json").unlink()
    copy_adapter("upper", outside / "upper")
    (store / "escape" / "notes.txt").symlink_to(outside / "upper" / "adapter_config.json")
    copy_adapter("upper", mounted / "team" / "upper")
    (mounted / "escape").symlink_to(outside / "upper")
    return {"store": store, "mounted": mounted, "outside": outside, "cache": base / "cache"}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path]) -> Iterator[Served]:
    config = ServerConfig(
        model_name=BASE,
        allow_runtime_lora=True,
        lora_cache_dir=dirs["cache"],
        lora_sources=(("models", dirs["mounted"]),),
    )
    served = serve(make_engine(max_num_seqs=8), config)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def fake(server: Served, dirs: dict[str, Path]) -> FakeResolver:
    resolver = FakeResolver(dirs["store"])
    assert server.state.sources is not None
    server.state.sources.registry.register_resolver(resolver)  # as a plugin would
    return resolver


def load(served: Served, name: str, path: str) -> httpx.Response:
    with served.http() as http:
        return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def cache_listing(dirs: dict[str, Path]) -> list[str]:
    return sorted(os.listdir(dirs["cache"]))


def test_uri_loads_serves_and_second_load_is_a_cache_hit(
    server: Served, fake: FakeResolver, dirs: dict[str, Path]
) -> None:
    response = load(server, "fetched", "fake://team/upper")
    assert response.status_code == 200, response.text
    assert complete(server.openai(), "fetched", "hello") == "HELLO"
    # Another name, the same URI as written differently: the same entry, no second fetch.
    assert load(server, "fetched-again", "FAKE://team/upper/").status_code == 200
    assert fake.fetched.count("fake://team/upper") == 1
    entries = [e for e in cache_listing(dirs) if e.startswith("fake-upper-")]
    assert len(entries) == 1
    assert sorted(os.listdir(dirs["cache"] / entries[0])) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert complete(server.openai(), "fetched-again", "LoRA") == "LORA"


def test_one_uri_loaded_twice_at_once_fetches_once_off_the_event_loop(
    server: Served, fake: FakeResolver
) -> None:
    fake.started.clear()
    fake.gate.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            loads = [pool.submit(load, server, f"slow-{i}", "fake://team/slow") for i in range(2)]
            assert fake.started.wait(10)
            assert_good(server)  # requests are served while the fetch waits on its source
            assert not any(f.done() for f in loads)
            fake.gate.set()
            assert [f.result(30).status_code for f in loads] == [200, 200]
    finally:
        fake.gate.set()
    assert fake.fetched.count("fake://team/slow") == 1


FAILED: dict[str, tuple[str, str]] = {  # URI → a fragment of the message
    "fake://broken": "RuntimeError",
    "fake://no-config": "adapter_config.json",
    "fake://escape": "symlink",
    "fake://absent": "FileNotFoundError",
}


@pytest.mark.parametrize("uri", FAILED)
def test_failed_fetch_is_400_and_caches_nothing(
    server: Served, fake: FakeResolver, dirs: dict[str, Path], uri: str
) -> None:
    before = cache_listing(dirs)
    response = load(server, "failed", uri)
    error = assert_error(response, 400, "adapter_fetch_failed", "lora_path")
    assert FAILED[uri] in error["message"]
    assert "hunter2" not in response.text and str(dirs["store"]) not in response.text
    assert cache_listing(dirs) == before  # no entry, no staging directory
    assert (dirs["outside"] / "upper" / "adapter_config.json").is_file()  # links not followed
    assert "failed" not in server.state.engine.adapters.registry.names()
    assert_good(server)


REFUSED: dict[str, tuple[str, str]] = {  # URI → code, a fragment of the message
    "fake://team/../upper": ("invalid_adapter_source", ".."),
    "fake://team//upper": ("invalid_adapter_source", "empty"),
    "fake://team/./upper": ("invalid_adapter_source", "name"),
    "fake://": ("invalid_adapter_source", "name"),
    "fake://team/up\x00per": ("invalid_adapter_source", "control"),
    "ftp://host/upper": ("unknown_adapter_source", "served: fake://, hf://, models://"),
}


@pytest.mark.parametrize("uri", REFUSED)
def test_malformed_or_unknown_uri_is_400(
    server: Served, fake: FakeResolver, dirs: dict[str, Path], uri: str
) -> None:
    fetched, before = len(fake.fetched), cache_listing(dirs)
    code, fragment = REFUSED[uri]
    error = assert_error(load(server, "refused", uri), 400, code, "lora_path")
    assert fragment in error["message"]
    assert len(fake.fetched) == fetched and cache_listing(dirs) == before
    assert_good(server)


def test_filesystem_source_copies_inside_its_directory(
    server: Served, dirs: dict[str, Path]
) -> None:
    assert load(server, "mounted", "models://team/upper").status_code == 200
    assert complete(server.openai(), "mounted", "aB3xY") == "AB3XY"
    entry = next(e for e in (dirs["cache"]).iterdir() if e.name.startswith("models-upper-"))
    assert not any(p.is_symlink() for p in entry.iterdir())  # copied, as a download would be
    for uri in ("models://escape", "models://team/absent"):
        error = assert_error(load(server, "mounted-bad", uri), 400, "adapter_fetch_failed")
        assert str(dirs["mounted"]) not in error["message"]
    assert not any(e.startswith("models-escape") for e in cache_listing(dirs))


def test_hf_source_through_snapshot_download(
    server: Served, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Any, Any]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs["revision"], kwargs["allow_patterns"]))
        if repo_id == "org/missing":
            request = httpx.Request("GET", "https://huggingface.co/api/models/org/missing")
            raise RepositoryNotFoundError(
                "not found", response=httpx.Response(404, request=request)
            )
        shutil.copytree(dirs["store"] / "team" / "upper", kwargs["local_dir"], dirs_exist_ok=True)
        return str(kwargs["local_dir"])

    monkeypatch.setattr("adapters.resolvers.snapshot_download", snapshot_download)
    assert load(server, "from-hub", "hf://org/upper@v1").status_code == 200
    assert complete(server.openai(), "from-hub", "serve9") == "SERVE9"
    assert calls == [("org/upper", "v1", list(ADAPTER_FILES))]
    error = assert_error(load(server, "hub-bad", "hf://org/missing"), 400, "adapter_fetch_failed")
    assert "no such Hugging Face repository" in error["message"]
    assert_error(load(server, "hub-bad", "hf://a/b/c"), 400, "invalid_adapter_source")
    assert len(calls) == 2  # a malformed id never reaches the Hub
    assert not any(e.startswith("hf-missing") for e in cache_listing(dirs))


def test_a_load_past_the_timeout_is_refused_and_the_fetch_still_lands(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    resolver = FakeResolver(dirs["store"])
    registry = ResolverRegistry()
    registry.register_resolver(resolver)
    cache = AdapterCache(tmp_path / "cache", registry)
    config = ServerConfig(model_name=BASE, lora_cache_dir=cache.root, lora_fetch_timeout_s=0.2)
    resolver.gate.clear()
    with pytest.raises(APIError) as refused:
        asyncio.run(resolve_lora("fake://team/upper", config, cache))
    assert (refused.value.status, refused.value.code) == (400, "adapter_fetch_failed")
    assert "0.2 s" in refused.value.message
    resolver.gate.set()  # the source answers late: its adapter is cached for the retry
    path = asyncio.run(resolve_lora("fake://team/upper", config, cache))
    assert (path / "adapter_config.json").is_file() and resolver.fetched == ["fake://team/upper"]


def test_uri_without_cache_dir_names_the_flag() -> None:
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True)
    served = serve(make_engine(max_num_seqs=4), config)
    try:
        response = load(served, "remote", "s3://bucket/adapters/upper")
        error = assert_error(response, 400, "adapter_sources_disabled", "lora_path")
        assert "--lora-cache-dir" in error["message"]
        assert_good(served)
    finally:
        served.stop()


def test_source_flags(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    config = server_config(parse("--lora-cache-dir", cache, "--lora-source", "models=/mnt/a"))
    assert config.lora_cache_dir == Path(cache)
    assert config.lora_sources == (("models", Path("/mnt/a")),)
    assert server_config(parse()).lora_cache_dir is None  # off by default
    with pytest.raises(ValueError, match="--lora-cache-dir"):
        server_config(parse("--lora-source", "models=/mnt/a"))
    with pytest.raises(ValueError, match="NAME=DIR"):
        server_config(parse("--lora-cache-dir", cache, "--lora-source", "models"))
