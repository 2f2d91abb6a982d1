"""Mixtures: what a virtual adapter y = Wx + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢx) may combine.

A mixture materialises nothing: a request for it runs each component through the LoRA
kernels with its weight, so it costs the sum of their ranks. The kernels sum LoRA updates
of the decoder's linear layers and nothing else, so every component must be an adapter whose
whole update is such a LoRA, loaded on its own (a mixture never names a mixture), with a
finite weight.
"""

from __future__ import annotations

import math

from adapters.errors import INVALID_MERGE, AdapterError
from adapters.registry import AdapterEntry, AdapterRegistry
from adapters.weights import ADALORA, LORA

# Kinds whose update is a LoRA of the linear layers alone, which a mixture can sum.
MIXABLE_KINDS = (LORA, ADALORA)


def mixture_components(
    registry: AdapterRegistry, components: list[tuple[str, float]]
) -> list[tuple[AdapterEntry, float]]:
    """The registered entries of ``components`` (name, weight pairs), with their weights.

    Raises:
        AdapterError: ``model_not_found`` for an unknown component, ``invalid_merge`` for
            no component, a mixture of mixtures, a component that is not a LoRA of the
            decoder's linear layers, a repeated component or a non-finite weight.
    """
    if not components:
        raise AdapterError(INVALID_MERGE, "a mixture needs at least one adapter")
    names = [n for n, _ in components]
    if len(set(names)) != len(names):
        raise AdapterError(INVALID_MERGE, "a mixture names each adapter at most once")
    entries = []
    for component, weight in components:
        entry = registry.get(component)
        if entry.is_mixture:
            raise AdapterError(
                INVALID_MERGE, f"{component!r} is a mixture; mixtures cannot be nested"
            )
        if entry.kind not in MIXABLE_KINDS:
            raise AdapterError(
                INVALID_MERGE,
                f"{component!r} is a {entry.kind} adapter; a mixture combines LoRA "
                f"adapters ({', '.join(MIXABLE_KINDS)})",
            )
        if not entry.lora_only:
            raise AdapterError(
                INVALID_MERGE,
                f"{component!r} has a LoRA on embed_tokens or lm_head; a mixture combines "
                "LoRA on the decoder's linear layers only",
            )
        if not math.isfinite(weight):
            raise AdapterError(INVALID_MERGE, f"the weight of {component!r} is not finite")
        entries.append((entry, float(weight)))
    return entries
