"""Source URIs as text, the resolver registry and its plugins, and cache entry names
(no server, no fetch: tests/server/test_lora_sources.py drives fetches through the route)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from adapters.errors import AdapterError
from adapters.resolvers import FilesystemResolver, HfResolver
from adapters.source_cache import entry_name
from adapters.sources import ResolverRegistry, is_source_uri, load_resolver_plugins, parse_source


def test_uris_are_told_from_paths_and_normalized() -> None:
    assert is_source_uri("s3://bucket/key") and is_source_uri("HF://org/repo")
    assert not is_source_uri("team/upper") and not is_source_uri("/abs/s3://x")
    source = parse_source("S3://bucket/adapters/sql/")
    assert (source.scheme, source.path, source.uri) == (
        "s3",
        "bucket/adapters/sql",
        "s3://bucket/adapters/sql",
    )
    assert source.parts == ("bucket", "adapters", "sql")


def test_entry_names_are_safe_and_distinct() -> None:
    odd = parse_source("s3://bucket/we ird/na$me")
    name = entry_name(odd)
    assert re.fullmatch(r"s3-na_me-[0-9a-f]{16}", name)
    # The same tail from another URI is another entry.
    assert entry_name(parse_source("s3://other/we ird/na$me")) != name


def test_registry_refuses_a_second_resolver_for_a_scheme(tmp_path: Path) -> None:
    registry = ResolverRegistry()
    registry.register_resolver(HfResolver())
    with pytest.raises(ValueError, match="hf://"):
        registry.register_resolver(FilesystemResolver("hf", tmp_path))
    with pytest.raises(ValueError, match="scheme"):
        registry.register_resolver(FilesystemResolver("Bad_Scheme", tmp_path))
    with pytest.raises(AdapterError, match="served: hf://"):
        registry.resolver_for("s3")


def test_plugins_register_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def register(registry: ResolverRegistry) -> None:
        registry.register_resolver(FilesystemResolver("s3", tmp_path))

    class EntryPoint:
        name = "s3-plugin"

        def load(self) -> Any:
            return register

    groups: list[str] = []

    def entry_points(group: str) -> list[EntryPoint]:
        groups.append(group)
        return [EntryPoint()]

    monkeypatch.setattr("adapters.sources.entry_points", entry_points)
    registry = ResolverRegistry()
    assert load_resolver_plugins(registry) == ["s3-plugin"]
    assert groups == ["loraserve.adapter_resolvers"] and registry.schemes == ["s3"]
