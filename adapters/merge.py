"""Merge LoRA adapters into a new one, as PEFT 0.21's ``LoraModel.add_weighted_adapter`` does.

Which adapters and modules take part, and the merged config; the tensor math of each
combination type is in :mod:`adapters.merge_math`. ``w_i`` is the caller's weight for adapter
``i``. Only the adapters that have a module take part in it: one that lacks it is skipped
there, as PEFT skips it (not counted as zero, so ties' vote counts and ranks see only the
others).

With one adapter every type is ``linear`` (PEFT's rule). The merged config is PEFT's: ``r`` is
the new rank, ``lora_alpha = r``, no rank/alpha patterns, ``target_modules`` the union of the
inputs' (regexes joined by ``|``), and ``use_rslora`` and the layer filters
(``layers_to_transform``, ``layers_pattern``, ``exclude_modules``) of the *first* adapter. So
the merged scaling is 1, or ``sqrt(r)`` when the first adapter uses rsLoRA (a PEFT quirk: the
inputs' scalings are already folded into the factors, yet PEFT applies rsLoRA's scaling
again), and modules outside the first adapter's layer filters are dropped. Modules narrower
than the new rank (``cat`` over adapters lacking a module, a ``rank_pattern``, ``svd_rank``
above the module's width) are zero-padded to it, as PEFT pads ``cat``, so the result is one
uniform rank that PEFT and :func:`adapters.loader.load_lora_adapter` read back.

DARE's masks come from a ``torch.Generator`` seeded with ``MergeSpec.seed``, drawn module by
module in ``(layer, target)`` order (for factor-wise types: every A, then every B). PEFT draws
from torch's global RNG in its own module order, so with ``density < 1`` results match PEFT's
only in distribution, never bit for bit. Everything runs on float32 CPU copies and touches
no engine state: it may run off the engine thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_MERGE, AdapterError
from adapters.merge_math import (
    COMBINATION_TYPES,
    DENSITY_TYPES,
    FACTORWISE_TYPES,
    SVD_TYPES,
    float32_cpu,
    merged_factors,
    zero_padded,
)
from adapters.peft_config import ALL_LINEAR, LoraAdapterConfig
from adapters.peft_targets import is_targeted, module_scaling
from adapters.weights import ADALORA, DORA, LORA, AdapterWeights, LoraModuleWeights

MIXTURE = "mixture"  # not a weight merge: the caller routes it elsewhere

_MAJORITY_SIGN_METHODS = ("total", "frequency")
_SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")  # torch.linalg.svd's cuSOLVER drivers


# Why PEFT's add_weighted_adapter does not merge an adapter kind (the message of a refusal).
_UNMERGEABLE = {
    ADALORA: "PEFT's add_weighted_adapter does not support AdaLoRA",
    DORA: "add_weighted_adapter combines lora_A and lora_B only and would drop DoRA's magnitudes",
}


def _invalid(message: str) -> AdapterError:
    return AdapterError(INVALID_MERGE, message)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how: ``add_weighted_adapter``'s arguments, plus a seed for DARE.

    Attributes:
        adapters: the names of the adapters to merge, in order (the first one decides
            ``use_rslora`` and the layer filters of the result).
        weights: one weight per adapter; negative weights subtract.
        combination_type: one of :data:`adapters.merge_math.COMBINATION_TYPES`, or
            :data:`MIXTURE` (accepted here, merged elsewhere).
        density: the fraction of values kept, in (0, 1]; required by the ties, dare and
            magnitude_prune types, ignored by the others.
        majority_sign_method: ``"total"`` or ``"frequency"`` (ties and dare_ties types).
        svd_rank: the merged rank for the svd types; None: the largest input rank.
        svd_clamp: a quantile in [0, 1] at which to clamp the SVD factors; None: no clamp.
        svd_full_matrices: passed to ``torch.linalg.svd``.
        svd_driver: a cuSOLVER driver; merges run on the CPU, where torch refuses one.
        seed: seeds the generator of DARE's random masks.
    """

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: str = "svd"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "weights", tuple(self.weights))
        self.validate()

    def validate(self) -> None:
        """Check everything that does not need the adapters' weights.

        Raises:
            AdapterError: ``invalid_merge``, naming the broken rule.
        """
        if self.combination_type not in (*COMBINATION_TYPES, MIXTURE):
            raise _invalid(
                f"unknown combination_type {self.combination_type!r}; valid types: "
                f"{', '.join((*COMBINATION_TYPES, MIXTURE))}"
            )
        if not self.adapters:
            raise _invalid("adapters is empty; name at least one adapter to merge")
        for i, name in enumerate(self.adapters):
            if not isinstance(name, str) or not name:
                raise _invalid(f"adapters[{i}] must be a non-empty adapter name")
        if len(self.weights) != len(self.adapters):
            raise _invalid(
                f"got {len(self.weights)} weights for {len(self.adapters)} adapters; "
                "give one weight per adapter"
            )
        for i, weight in enumerate(self.weights):
            if not _is_real(weight) or not math.isfinite(weight):
                raise _invalid(f"weights[{i}] must be a finite number, got {weight!r}")
        self._check_density()
        if self.majority_sign_method not in _MAJORITY_SIGN_METHODS:
            raise _invalid(
                f"majority_sign_method must be 'total' or 'frequency', "
                f"got {self.majority_sign_method!r}"
            )
        self._check_svd_options()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise _invalid(f"seed must be an integer, got {self.seed!r}")
        if not -(2**63) <= self.seed < 2**64:  # torch.Generator.manual_seed's range
            raise _invalid("seed must fit in 64 bits")

    def _check_density(self) -> None:
        density = self.density
        if density is not None and (not _is_real(density) or not math.isfinite(density)):
            raise _invalid(f"density must be a finite number, got {density!r}")
        if self.effective_combination_type not in DENSITY_TYPES:
            return  # PEFT ignores density for linear, cat and svd
        # PEFT: None fails deep in its pruning; 0 prunes everything (and divides 0 by 0 in
        # DARE); > 1 is silently treated as 1. All refused here.
        if density is None or not 0 < density <= 1:
            raise _invalid(
                f"density must be in (0, 1] for combination_type {self.combination_type!r} "
                f"(the fraction of values kept), got {density!r}"
            )

    def _check_svd_options(self) -> None:
        if self.svd_rank is not None and (
            not isinstance(self.svd_rank, int)
            or isinstance(self.svd_rank, bool)
            or self.svd_rank < 1
        ):
            raise _invalid(f"svd_rank must be a positive integer, got {self.svd_rank!r}")
        clamp = self.svd_clamp
        if clamp is not None and (not _is_real(clamp) or not 0 <= clamp <= 1):
            raise _invalid(f"svd_clamp must be a quantile in [0, 1], got {clamp!r}")
        if not isinstance(self.svd_full_matrices, bool):
            raise _invalid("svd_full_matrices must be true or false")
        if self.svd_driver is not None and self.svd_driver not in _SVD_DRIVERS:
            raise _invalid(
                f"svd_driver must be one of {', '.join(_SVD_DRIVERS)} or unset, "
                f"got {self.svd_driver!r}"
            )
        if self.svd_driver is not None and self.effective_combination_type in SVD_TYPES:
            raise _invalid(
                f"svd_driver {self.svd_driver!r} selects a cuSOLVER routine, which "
                "torch.linalg.svd accepts only for CUDA tensors; merges run on the CPU, "
                "so leave svd_driver unset"
            )

    @property
    def effective_combination_type(self) -> str:
        """The type PEFT actually runs: ``linear`` whenever there is only one adapter."""
        if len(self.adapters) == 1 and self.combination_type != MIXTURE:
            return "linear"
        return self.combination_type


@dataclass(frozen=True)
class _MergePlan:
    """The merged adapter's shape, decided (and checked) before any math runs."""

    config: LoraAdapterConfig
    rank: int
    modules: dict[tuple[int, str], str]  # (layer, target) -> module path


def check_merge(
    adapters: Sequence[AdapterWeights],
    spec: MergeSpec,
    layout: BaseModelLayout | None = None,
) -> LoraAdapterConfig:
    """Check that ``adapters`` can be merged as ``spec`` says; return the merged config.

    Cheap (no tensor math): callers may run it before queueing :func:`merge_adapters`.
    ``layout``: the base model; without it, the smallest layout holding every input module
    stands in for it (see :func:`merge_adapters`).

    Raises:
        AdapterError: ``invalid_merge``, naming the broken rule.
    """
    return _plan(adapters, spec, layout).config


def merge_adapters(
    adapters: Sequence[AdapterWeights],
    spec: MergeSpec,
    name: str,
    *,
    layout: BaseModelLayout | None = None,
) -> AdapterWeights:
    """The adapter PEFT's ``add_weighted_adapter`` builds from ``adapters`` (see the module doc).

    Args:
        adapters: the adapters ``spec.adapters`` names, in that order (repeats allowed).
        spec: the merge; ``combination_type`` must not be :data:`MIXTURE`.
        name: the merged adapter's name.
        layout: the base model. PEFT decides the merged modules on the base model; without
            a layout the smallest layout holding every input module stands in, which differs
            only if the merged config targets layers or projections no input has (PEFT then
            fails with "No matching LoRAs found"; that case goes unnoticed here).

    Returns:
        float32 CPU tensors, each module zero-padded to the merged rank.

    Raises:
        AdapterError: ``invalid_merge``, before any math runs.
    """
    plan = _plan(adapters, spec, layout)
    combination_type = spec.effective_combination_type
    generator = torch.Generator().manual_seed(spec.seed)
    modules = {}
    for key, path in plan.modules.items():
        members = [
            (float(weight), float32_cpu(adapter.modules[key]))
            for adapter, weight in zip(adapters, spec.weights, strict=True)
            if key in adapter.modules
        ]
        lora_a, lora_b = merged_factors(combination_type, members, plan.rank, spec, generator)
        modules[key] = LoraModuleWeights(
            lora_a=zero_padded(lora_a, plan.rank, dim=0),
            lora_b=zero_padded(lora_b, plan.rank, dim=1),
            scaling=module_scaling(plan.config, path),
        )
    return AdapterWeights(name=name, config=plan.config, modules=modules)


# ---------------------------------------------------------------- checks and the merged config


def _plan(
    adapters: Sequence[AdapterWeights], spec: MergeSpec, layout: BaseModelLayout | None
) -> _MergePlan:
    if spec.combination_type == MIXTURE:
        raise _invalid(
            "combination_type 'mixture' is not a weight merge; it is served by routing "
            "between the adapters, not by merge_adapters"
        )
    if len(adapters) != len(spec.adapters):
        raise _invalid(f"got {len(adapters)} adapters for a MergeSpec naming {len(spec.adapters)}")
    for adapter in adapters:
        if adapter.kind != LORA:
            why = _UNMERGEABLE.get(adapter.kind, "only LoRA adapters merge")
            raise _invalid(f"{adapter.name!r} is a {adapter.kind} adapter: {why}")
        if adapter.embedding is not None or adapter.head is not None:
            raise _invalid(
                f"{adapter.name!r} has a LoRA on embed_tokens or lm_head: merges here combine "
                "LoRA on the decoder's linear layers only"
            )
    layout = _checked_layout(adapters, layout)
    combination_type = spec.effective_combination_type
    max_ranks = [a.config.max_rank for a in adapters]  # PEFT: max(r, *rank_pattern.values())
    if combination_type in FACTORWISE_TYPES:
        if len(set(max_ranks)) != 1:
            ranks = ", ".join(f"{a.name}: {r}" for a, r in zip(adapters, max_ranks, strict=True))
            raise _invalid(
                f"all adapters must have the same r value when using combination_type "
                f"{combination_type!r} (PEFT's rule for linear, ties, dare_linear, dare_ties "
                f"and magnitude_prune); got r = {ranks}; merge different ranks with cat or "
                "an svd type"
            )
        rank = max_ranks[0]
    elif combination_type == "cat":
        rank = sum(max_ranks)
    else:
        rank = spec.svd_rank or max(max_ranks)
    first = adapters[0].config
    config = LoraAdapterConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=_merged_targets(adapters, layout),
        use_rslora=first.use_rslora,
        layers_to_transform=first.layers_to_transform,
        layers_pattern=first.layers_pattern,
        exclude_modules=first.exclude_modules,
        base_model_name_or_path=first.base_model_name_or_path,
    )
    modules = {}
    for layer, target, path in layout.modules():
        if not is_targeted(config, path):
            continue
        members = [a for a in adapters if (layer, target) in a.modules]
        if not members:
            raise _invalid(
                f"the merged adapter targets {path} (the union of the adapters' "
                f"target_modules, filtered by {adapters[0].name!r}'s layer filters), but no "
                "adapter to merge has it (PEFT: 'No matching LoRAs found')"
            )
        if combination_type in FACTORWISE_TYPES:
            module_ranks = {a.modules[layer, target].rank: a.name for a in members}
            if len(module_ranks) > 1:
                (r1, n1), (r2, n2) = list(module_ranks.items())[:2]
                raise _invalid(
                    f"all adapters must have the same rank at every module when using "
                    f"combination_type {combination_type!r}: {path} has rank {r1} in {n1!r} "
                    f"but {r2} in {n2!r} (a rank_pattern)"
                )
        modules[layer, target] = path
    return _MergePlan(config=config, rank=rank, modules=modules)


def _checked_layout(
    adapters: Sequence[AdapterWeights], layout: BaseModelLayout | None
) -> BaseModelLayout:
    """``layout``, or the smallest one holding every module, once all inputs agree with it."""
    shapes: dict[str, tuple[int, int]] = dict(layout.linear_shapes) if layout else {}
    owners = dict.fromkeys(shapes, "the base model")
    num_layers = layout.num_layers if layout else 0
    for adapter in adapters:
        for (layer, target), m in adapter.modules.items():
            if layout and (target not in layout.linear_shapes or layer >= layout.num_layers):
                raise _invalid(
                    f"adapter {adapter.name!r} does not fit the base model: it adapts "
                    f"{target} in layer {layer}"
                )
            shape = (int(m.lora_a.shape[1]), int(m.lora_b.shape[0]))  # (in, out)
            expected = shapes.setdefault(target, shape)
            owner = owners.setdefault(target, repr(adapter.name))
            if shape != expected:
                raise _invalid(
                    f"adapter {adapter.name!r} and {owner} disagree on the shape of {target} "
                    f"({shape[0]}→{shape[1]} vs {expected[0]}→{expected[1]}): were they made "
                    "for different base models?"
                )
            num_layers = max(num_layers, layer + 1)
    return layout or BaseModelLayout(num_layers=num_layers, linear_shapes=shapes)


def _merged_targets(
    adapters: Sequence[AdapterWeights], layout: BaseModelLayout
) -> str | tuple[str, ...]:
    """PEFT's union: regexes joined by ``|``, or the union of the name lists."""
    regexes, lists = [], []
    for adapter in adapters:
        targets = adapter.config.target_modules
        if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            # PEFT expands "all-linear" on load into the paths of every linear layer.
            lists.append({path for _, _, path in layout.modules()})
        elif isinstance(targets, str):
            regexes.append(targets)
        else:
            lists.append(set(targets))
    if regexes and lists:
        raise _invalid(
            "all adapters must follow the same target modules type: mixing a list of module "
            "names with a regex string in target_modules is not supported (PEFT's rule)"
        )
    if regexes:
        return "|".join(f"({regex})" for regex in regexes)
    return tuple(sorted(set().union(*lists)))
