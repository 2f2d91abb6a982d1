from __future__ import annotations

from pathlib import Path

import pytest

from adapters.base_layout import BaseModelLayout
from adapters.catalog import AdapterCatalog
from adapters.manager import AdapterManager
from adapters.residency import AdapterResidency
from engine.kv_cache_manager import KVCacheManager
from engine.page_pool import PagePool, Tenant
from tests.tiny_models import make_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random tiny model per supported family."""
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(root / family, family) for family in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]


def adapter_manager(pool: PagePool, kv_cache_manager: KVCacheManager) -> AdapterManager:
    """The adapter side of a scheduler tested without a model: a real manager over the pool
    (one layer's ``q_proj``), nothing loaded, reclaiming unused cached blocks in one order
    with the adapters as the engine's does."""
    width = pool.page_width
    layout = BaseModelLayout(1, {"q_proj": (width, width)})
    residency = AdapterResidency(
        pool.tenant(Tenant.ADAPTER), 1, layout.linear_shapes, max_slots=2, max_lora_rank=8
    )
    pool.register(Tenant.ADAPTER, residency)
    residency.spare = kv_cache_manager.prefix
    catalog = AdapterCatalog(
        residency.cost, residency.max_slots, layout, 8, max_adapter_pages=pool.num_pages
    )
    return AdapterManager(residency, catalog)
