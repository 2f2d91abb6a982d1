"""PEFT LoRA adapters: loading, registry, residency in the page pool, prefetch, merging."""
