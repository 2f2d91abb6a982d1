"""Adapter kinds: which PEFT methods loraserve serves, and how each one's directory is read.

A kind turns a PEFT directory into :class:`adapters.weights.AdapterWeights`; from there the
registry, the host cache, the residency (pages, slots, eviction, prefetch) and the scheduler
treat every kind the same way. What a kind takes in the pool and what it adds to a forward
follow from the parts it fills (`adapters/weights.py`'s table; the forward is
`engine/kinds.py`).

========================  =============================  ===================================
``adapter_config.json``   kind                           read by
========================  =============================  ===================================
``LORA``                  ``lora``                       `adapters/loader.py`
``LORA`` + ``use_dora``   ``dora``                       `adapters/loader.py` (+ base norms)
``ADALORA``               ``adalora`` (served as LoRA)   `adapters/adalora.py`
``IA3``                   ``ia3``                        `adapters/ia3.py`
``PROMPT_TUNING``         ``prompt_tuning``              `adapters/prompt_tuning.py`
``PREFIX_TUNING``         ``prefix_tuning``              `adapters/prefix_tuning.py`
========================  =============================  ===================================

Anything else PEFT can save (LoHa, LoKr, OFT, BOFT, VeRA, ...) is refused with a message
naming it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.adalora import read_adalora
from adapters.base_layout import BaseModelLayout
from adapters.errors import UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.ia3 import read_ia3
from adapters.loader import check_adapter_dir, load_lora_adapter, read_config_json
from adapters.prefix_tuning import read_prefix_tuning
from adapters.prompt_tuning import read_prompt_tuning
from adapters.weights import (
    ADALORA,
    DORA,
    IA3,
    LORA,
    PREFIX_TUNING,
    PROMPT_TUNING,
    AdapterWeights,
    BaseWeights,
)


@dataclass(frozen=True)
class LoadContext:
    """What reading any adapter needs to know about the server.

    Attributes:
        layout: the base model's linear layers (and its sizes).
        max_lora_rank: the largest LoRA rank served.
        dtype: the dtype of the returned tensors.
        base: the served base weights (DoRA computes its scales from them); None where
            nothing can provide them, which refuses DoRA.
    """

    layout: BaseModelLayout
    max_lora_rank: int
    dtype: torch.dtype = torch.float32
    base: BaseWeights | None = None


class AdapterKind(abc.ABC):
    """One PEFT method: which configs are its own, and how to read its directory."""

    name: str

    @abc.abstractmethod
    def claims(self, raw: Mapping[str, Any]) -> bool:
        """Whether the (unvalidated) ``adapter_config.json`` object is of this kind."""

    @abc.abstractmethod
    def read(self, path: Path, raw: Mapping[str, Any], context: LoadContext) -> AdapterWeights:
        """Read and validate the adapter in directory ``path`` (``raw``: its config).

        Raises:
            AdapterError: anything invalid or not served, before anything is returned.
        """


class LoraKind(AdapterKind):
    """Plain LoRA, and DoRA (a LoRA config with ``use_dora``): one reader for both."""

    name = LORA

    def claims(self, raw: Mapping[str, Any]) -> bool:
        return bool(raw.get("peft_type", "LORA") == "LORA")

    def read(self, path: Path, raw: Mapping[str, Any], context: LoadContext) -> AdapterWeights:
        return load_lora_adapter(
            path, context.layout, context.max_lora_rank, context.dtype, base=context.base
        )


class AdaLoraKind(AdapterKind):
    """AdaLoRA: its SVD-form update served as LoRA, singular values folded in at load."""

    name = ADALORA

    def claims(self, raw: Mapping[str, Any]) -> bool:
        return bool(raw.get("peft_type") == "ADALORA")

    def read(self, path: Path, raw: Mapping[str, Any], context: LoadContext) -> AdapterWeights:
        return read_adalora(path, raw, context.layout, context.max_lora_rank, context.dtype)


class Ia3Kind(AdapterKind):
    """IA³: learned vectors rescaling activations."""

    name = IA3

    def claims(self, raw: Mapping[str, Any]) -> bool:
        return bool(raw.get("peft_type") == "IA3")

    def read(self, path: Path, raw: Mapping[str, Any], context: LoadContext) -> AdapterWeights:
        return read_ia3(path, raw, context.layout, context.dtype)


class PromptTuningKind(AdapterKind):
    """Prompt tuning: n virtual token embeddings before the request's tokens."""

    name = PROMPT_TUNING

    def claims(self, raw: Mapping[str, Any]) -> bool:
        return bool(raw.get("peft_type") == "PROMPT_TUNING")

    def read(self, path: Path, raw: Mapping[str, Any], context: LoadContext) -> AdapterWeights:
        return read_prompt_tuning(path, raw, context.layout, context.dtype)


class PrefixTuningKind(AdapterKind):
    """Prefix tuning: n keys and values per layer attended before the request's tokens."""

    name = PREFIX_TUNING

    def claims(self, raw: Mapping[str, Any]) -> bool:
        return bool(raw.get("peft_type") == "PREFIX_TUNING")

    def read(self, path: Path, raw: Mapping[str, Any], context: LoadContext) -> AdapterWeights:
        return read_prefix_tuning(path, raw, context.layout, context.dtype)


# The first kind that claims a config reads it.
KINDS: tuple[AdapterKind, ...] = (
    LoraKind(),
    AdaLoraKind(),
    Ia3Kind(),
    PromptTuningKind(),
    PrefixTuningKind(),
)


def config_kind(raw: Mapping[str, Any]) -> str | None:
    """The kind an ``adapter_config.json`` object names, as ``/v1/models`` reports it
    (``dora`` for a LoRA config with ``use_dora``); None when no served kind claims it."""
    kind = next((k for k in KINDS if k.claims(raw)), None)
    if kind is None:
        return None
    return DORA if kind.name == LORA and raw.get("use_dora") else kind.name


def read_adapter(path: Path, context: LoadContext) -> AdapterWeights:
    """Read the PEFT adapter in directory ``path``, whatever its kind.

    Raises:
        AdapterError: ``adapter_not_found``, ``invalid_adapter``, ``pickle_refused``,
            ``unsupported_adapter_feature`` (a PEFT method or feature not served) or
            ``adapter_rank_too_large``.
    """
    path = Path(path)
    check_adapter_dir(path)
    raw = read_config_json(path)
    for kind in KINDS:
        if kind.claims(raw):
            return kind.read(path, raw, context)
    peft_type = raw.get("peft_type")
    shown = repr(peft_type) if isinstance(peft_type, str) and len(peft_type) <= 40 else "this"
    raise AdapterError(
        UNSUPPORTED_ADAPTER_FEATURE,
        f"adapter_config.json: peft_type {shown} is not served (served: LORA, DoRA, ADALORA, IA3, "
        "PROMPT_TUNING, PREFIX_TUNING)",
    )
