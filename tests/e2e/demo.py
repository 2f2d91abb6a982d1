"""The committed demo files and their pure-Python task definitions, for the e2e tests.

``examples/`` is not a package, so its modules load by path: ``tasks.py`` here (what each
adapter does to a word; pure Python), ``evaluate.py`` where a test needs transformers + PEFT.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo"
MODEL_DIR = DEMO_DIR / "model"
ADAPTERS_DIR = DEMO_DIR / "adapters"

MIN_ACCURACY = 0.95  # the base on copy, each adapter on its task, on held-out words


def load_module(name: str) -> ModuleType:
    """Load ``examples/demo/<name>.py`` by path."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMO_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tasks = load_module("tasks")
