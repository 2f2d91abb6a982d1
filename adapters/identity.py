"""What makes two adapters the same adapter, for anything keyed on what an adapter computes.

The prefix cache reuses a prompt's keys and values only under the adapter that computed
them, so its key must change whenever the computation does. A name is not enough (a name can
be loaded again with other weights), and neither is a registry id (it changes with every
load, even of the same files). The identity here is the name plus a digest of the content:
every module's layer, target, A, B and scaling, which is all the ``adapter_config.json``
decides about what a LoRA adapter computes (its rank is A's shape; alpha, rsLoRA and the
patterns end up in the scalings; ``target_modules`` and ``layers_to_transform`` in which
modules exist), and the version of the name (each load of a name is a new version), so that
nothing cached under one version is reused by the next, even when a replacement happens to
carry the same weights. A mixture's identity is its name, version and its components'
identities with their weights, so it never shares with a component, nor with another mixture
of other weights.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

import torch

from adapters.page_cost import ModuleWeights
from adapters.weights import AdapterWeights


def content_digest(modules: Mapping[tuple[int, str], ModuleWeights]) -> bytes:
    """SHA-256 over every module's (layer, target, dtype, shapes, scaling, A, B), in order."""
    h = hashlib.sha256(b"loraserve-lora-v1")
    for layer, target in sorted(modules):
        module = modules[(layer, target)]
        h.update(struct.pack("<i", layer))
        h.update(target.encode())
        h.update(struct.pack("<d", float(module.scaling)))
        for tensor in (module.lora_a, module.lora_b):
            h.update(str(tensor.dtype).encode())
            h.update(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
            h.update(_bytes(tensor))
    return h.digest()


def weights_digest(weights: AdapterWeights) -> bytes:
    """:func:`content_digest` of an adapter of any kind: its LoRA modules, and for other
    kinds also the kind and every other tensor it holds (plain LoRA hashes as before)."""
    digest = content_digest(weights.modules)
    if not weights.blocks_present:
        return digest
    h = hashlib.sha256(b"loraserve-kind-v1")
    h.update(digest)
    h.update(weights.kind.encode())
    # Every layer's rows, in a fixed order (one "layer" would drop the per-layer blocks'
    # rows past layer 0: DoRA's and IA³'s vectors, prefix tuning's keys and values).
    num_layers = 1 + max((layer for layer, _ in (*weights.dora, *weights.ia3)), default=0)
    if weights.prefix is not None:
        num_layers = max(num_layers, int(weights.prefix.shape[0]))
    for block in weights.blocks(num_layers):
        h.update(block.key.encode())
        if block.scaling != 1.0:
            h.update(struct.pack("<d", block.scaling))
        for rows in block.rows:
            if rows is not None:
                h.update(struct.pack(f"<{rows.dim()}q", *rows.shape))
                h.update(_bytes(rows))
    return h.digest()


def adapter_identity(name: str, version: int, digest: bytes) -> bytes:
    """The identity of version ``version`` of ``name``, whose content hashes to ``digest``."""
    return _hash(b"adapter", name.encode(), struct.pack("<q", version), digest)


def mixture_identity(name: str, version: int, components: Iterable[tuple[bytes, float]]) -> bytes:
    """The identity of a mixture: its name and version, each component's identity and
    weight, in order."""
    parts = [b"mixture", name.encode(), struct.pack("<q", version)]
    for identity, weight in components:
        parts += [identity, struct.pack("<d", weight)]
    return _hash(*parts)


def _hash(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(struct.pack("<q", len(part)))  # lengths keep ("ab", "c") from ("a", "bc")
        h.update(part)
    return h.digest()


def _bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()
