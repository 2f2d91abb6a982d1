"""The LoRA backends by kernel name (``"torch"``, ``"triton"``): the registry of the
:class:`~engine.lora.LoraBackend` variation point, apart from the ABC so that it never
imports its implementations."""

from __future__ import annotations

from collections.abc import Callable

from engine.lora import LoraBackend
from engine.lora_torch import TorchLora
from engine.lora_triton import TritonLora

# Factories: each engine gets its own backend (the CPU one caches views of its pool).
LORA_BACKENDS: dict[str, Callable[[], LoraBackend]] = {"torch": TorchLora, "triton": TritonLora}
