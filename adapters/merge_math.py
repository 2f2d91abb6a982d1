"""The tensor math of LoRA merges: PEFT 0.21's combination types, on one module at a time.

:mod:`adapters.merge` decides which adapters and modules take part and the merged config;
this module turns one module's members ``(w_i, module_i)`` (the caller's weight and the
adapter's float32 factors and scaling ``s_i``) into the merged factors.

Semantics, per module::

    linear, ties, dare_linear, dare_ties, magnitude_prune   (all ranks equal; factor-wise)
        A = combine_i(A_i, sign(w_i·s_i)·sqrt|w_i·s_i|)     B = combine_i(B_i, sqrt|w_i·s_i|)
        (linear's B·A then has cross terms B_i·A_j: a rough approximation, as PEFT warns)
    cat                                                     (rank Σ r_i; exact)
        A = [w_1·s_1·A_1; w_2·s_2·A_2; ...]                 B = [B_1, B_2, ...]
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
        Δ = combine_i(s_i·B_i·A_i, w_i);  U·diag(S)·Vh = svd(Δ);  B = U[:, :k]·diag(S[:k]),
        A = Vh[:k]  with k = svd_rank (default: the largest input rank); then, with svd_clamp,
        q = quantile(B's and A's signed values, svd_clamp) and both clamped to [-q, q]

    combine(T, w):  linear: Σ w_i·T_i        magnitude_prune: Σ w_i·top_d(T_i)
                    dare_linear: Σ w_i·T_i⊙Bernoulli(d)/d
                    ties: T'_i = top_d(T_i); σ = sign Σ_i T'_i ("total") or sign Σ_i sign T'_i
                          ("frequency"), 0 counting as +; Σ_i w_i·T'_i·[sign T'_i = σ] / max(1,
                          #{i: sign T'_i = σ})   (the vote ignores the weights, as in PEFT)
                    dare_ties: ties with T'_i = T_i⊙Bernoulli(d)/d
    top_d keeps the int(d·numel) entries of largest |value|; d ≥ 1 keeps everything.

DARE's masks are drawn from the caller's ``torch.Generator``; for factor-wise types every A,
then every B. Everything is float32 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from adapters.weights import LoraModuleWeights

# Every combination_type of PEFT 0.21's add_weighted_adapter, grouped by how factors are built.
FACTORWISE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTORWISE_TYPES, "cat", *SVD_TYPES)
# The method that combines the delta weights before each svd type's SVD.
_SVD_METHOD = dict(zip(SVD_TYPES, FACTORWISE_TYPES, strict=True))  # svd: linear, ...
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude")))


class CombineOptions(Protocol):
    """The merge options the math reads (:class:`adapters.merge.MergeSpec` has them all)."""

    @property
    def density(self) -> float | None: ...

    @property
    def majority_sign_method(self) -> str: ...

    @property
    def svd_clamp(self) -> float | None: ...

    @property
    def svd_full_matrices(self) -> bool: ...


def merged_factors(
    combination_type: str,
    members: list[tuple[float, LoraModuleWeights]],
    rank: int,
    spec: CombineOptions,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's merged ``(lora_a, lora_b)``, before padding to the merged ``rank``.

    ``members``: ``(w_i, module_i)`` for each adapter that has the module, float32 CPU.
    """
    if combination_type == "cat":
        return _cat(members)
    if combination_type in SVD_TYPES:
        return _svd(combination_type, members, rank, spec, generator)
    return _factorwise(combination_type, members, spec, generator)


def float32_cpu(module: LoraModuleWeights) -> LoraModuleWeights:
    return LoraModuleWeights(
        lora_a=module.lora_a.to("cpu", torch.float32),
        lora_b=module.lora_b.to("cpu", torch.float32),
        scaling=module.scaling,
    )


def _cat(members: list[tuple[float, LoraModuleWeights]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors: ``B·A = Σ w_i·s_i·B_i·A_i`` exactly."""
    lora_a = torch.cat([m.lora_a * w * m.scaling for w, m in members], dim=0)  # (Σ r_i, in)
    lora_b = torch.cat([m.lora_b for _, m in members], dim=1)  # (out, Σ r_i)
    return lora_a, lora_b


def _factorwise(
    combination_type: str,
    members: list[tuple[float, LoraModuleWeights]],
    spec: CombineOptions,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B combined separately; ``sqrt|w·s|`` on each side, the sign on A only."""
    roots = [math.sqrt(abs(w * m.scaling)) for w, m in members]
    signs = [1.0 if w * m.scaling >= 0 else -1.0 for w, m in members]
    weights_a = torch.tensor(
        [r * s for r, s in zip(roots, signs, strict=True)], dtype=torch.float32
    )
    weights_b = torch.tensor(roots, dtype=torch.float32)
    combine = _COMBINE[combination_type]
    lora_a = combine([m.lora_a for _, m in members], weights_a, spec, generator)
    lora_b = combine([m.lora_b for _, m in members], weights_b, spec, generator)
    return lora_a, lora_b


def _svd(
    combination_type: str,
    members: list[tuple[float, LoraModuleWeights]],
    rank: int,
    spec: CombineOptions,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined delta weights, truncated to ``rank`` by SVD."""
    deltas = [(m.lora_b @ m.lora_a) * m.scaling for _, m in members]  # (out, in) each
    weights = torch.tensor([w for w, _ in members], dtype=torch.float32)
    delta = _COMBINE[_SVD_METHOD[combination_type]](deltas, weights, spec, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=spec.svd_full_matrices)
    k = min(rank, s.numel())  # a module narrower than svd_rank has fewer singular values
    lora_b = u[:, :k] @ torch.diag(s[:k])  # (out, k)
    lora_a = vh[:k, :]  # (k, in)
    if spec.svd_clamp is not None:
        high = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), spec.svd_clamp)
        lora_b, lora_a = lora_b.clamp(-high, high), lora_a.clamp(-high, high)
    return lora_a, lora_b


def zero_padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """A fresh contiguous copy of ``tensor`` with zeros appended along ``dim`` up to ``rank``."""
    shape = list(tensor.shape)
    shape[dim] = rank
    padded = torch.zeros(shape, dtype=torch.float32)
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return padded


# combine(T, w): PEFT's merge_utils, one function per method. Each takes the task tensors
# (equal shapes), their float32 weights and the spec, and returns one tensor of that shape.
_Combine = Callable[
    [list[torch.Tensor], torch.Tensor, CombineOptions, torch.Generator], torch.Tensor
]


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors)  # (n, *shape)
    return (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(dim=0)


def _top_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density·numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.view(tensor.shape)


def _random_rescaled(
    tensor: torch.Tensor, density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE: each entry kept with probability ``density``, kept ones divided by it."""
    if density >= 1:
        return tensor  # no draw, as in PEFT: density 1 equals the non-DARE type exactly
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _ties(pruned: list[torch.Tensor], weights: torch.Tensor, method: str) -> torch.Tensor:
    """Elect a sign per entry from the unweighted tensors; average the agreeing weighted ones."""
    stacked = torch.stack(pruned)  # (n, *shape)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agree = signs == elected  # a pruned (zero) entry agrees with no sign
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _density(spec: CombineOptions) -> float:
    assert spec.density is not None  # MergeSpec.validate requires it for these types
    return spec.density


_COMBINE: dict[str, _Combine] = {
    "linear": lambda ts, w, spec, g: _weighted_sum(ts, w),
    "magnitude_prune": lambda ts, w, spec, g: _weighted_sum(
        [_top_magnitude(t, _density(spec)) for t in ts], w
    ),
    "dare_linear": lambda ts, w, spec, g: _weighted_sum(
        [_random_rescaled(t, _density(spec), g) for t in ts], w
    ),
    "ties": lambda ts, w, spec, g: _ties(
        [_top_magnitude(t, _density(spec)) for t in ts], w, spec.majority_sign_method
    ),
    "dare_ties": lambda ts, w, spec, g: _ties(
        [_random_rescaled(t, _density(spec), g) for t in ts], w, spec.majority_sign_method
    ),
}
