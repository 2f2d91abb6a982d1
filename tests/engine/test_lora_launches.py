"""Kernel launches per step: the triton LoRA backend runs one shrink and one expand per linear
layer of the model (the packed qkv_proj and gate_up_proj count once) and per pass, however
many adapters the batch mixes and whichever slices each one targets.

Launches are counted at the ``@triton.jit`` kernels themselves (the interpreter runs them
here), so a launcher that looped over slices would show.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from kernels import lora_expand, lora_shrink
from tests.tiny_models import write_random_adapter

# adapter -> (rank, targets): every target, attention only, and q/v only (k's slice rank 0)
ADAPTERS = {
    "all-r4": (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "attn-r8": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qv-r2": (2, ("q_proj", "v_proj")),
}


class CountingKernel:
    """Stands in for a ``@triton.jit`` kernel: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel: Any, name: str, counts: Counter[str]) -> None:
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid: Any) -> Any:
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def engine(llama_dir: Path, tmp_path: Path) -> LLMEngine:
    # Eager: a replayed CUDA graph launches nothing from Python (test_decode_graphs.py).
    config = EngineConfig.create(llama_dir, dtype="float32", enforce_eager=True)
    engine = LLMEngine(config, "triton")
    shapes = engine.adapters.layout.linear_shapes
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        chosen = {t: shapes[t] for t in targets}
        path = write_random_adapter(
            tmp_path / name, chosen, engine.model.arch.num_layers, r=rank, alpha=2 * rank, seed=seed
        )
        engine.load_lora(name, path)
    engine.register_mixture("mix", [("all-r4", 0.5), ("qv-r2", -1.0)])
    return engine


def decode_step_launches(
    engine: LLMEngine, adapters: list[str | None], monkeypatch: pytest.MonkeyPatch
) -> Counter[str]:
    """Prefill one short prompt per adapter, then count one all-decode step's launches."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, adapter in enumerate(adapters):
        engine.add_request([5 + i, 6, 7], params, request_id=str(i), lora=adapter)
    engine.step()  # every prompt prefills in this one step (the token budget holds them all)
    requests = list(engine.scheduler.running)  # every one prefilled, none waiting
    assert len(requests) == len(adapters)
    assert all(r.num_computed_tokens == len(r.prompt_token_ids) for r in requests)
    counts: Counter[str] = Counter()
    for module, kernels in ((lora_shrink, "shrink"), (lora_expand, "expand")):
        for form in ("sgmv", "bgmv"):
            name = f"_{kernels}_{form}_kernel"
            monkeypatch.setattr(module, name, CountingKernel(getattr(module, name), name, counts))
    engine.step()
    assert all(r.num_computed_tokens == len(r.prompt_token_ids) + 1 for r in requests)
    return counts


@pytest.mark.parametrize(
    ("adapters", "num_passes"),
    [
        (["all-r4", "attn-r8", None, "qv-r2", "all-r4"], 1),
        (["mix", "attn-r8", None, "qv-r2"], 2),  # a mixture of two: a second pass
    ],
    ids=["adapters", "mixture"],
)
def test_a_mixed_decode_step_launches_one_shrink_and_expand_per_layer_and_pass(
    engine: LLMEngine,
    adapters: list[str | None],
    num_passes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = decode_step_launches(engine, adapters, monkeypatch)
    layers = engine.model.arch.num_layers
    # per layer: qkv_proj (packed), o_proj, gate_up_proj (packed), down_proj
    expected = layers * 4 * num_passes
    # One form per step: SGMV under the interpreter; a GPU's block table may pick BGMV.
    (form,) = {name.split("_")[2] for name in counts}
    assert counts == {f"_shrink_{form}_kernel": expected, f"_expand_{form}_kernel": expected}
