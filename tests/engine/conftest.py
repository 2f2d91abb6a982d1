from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random tiny model per supported family."""
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(root / family, family) for family in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]
