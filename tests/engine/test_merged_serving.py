"""Adapters merged by loraserve generate, through loraserve, what PEFT generates with its own
``add_weighted_adapter`` result (greedy, float32). The tensors themselves are compared in
``tests/adapters/test_merge.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.merge import MergeSpec, merge_adapters
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.test_generation import random_prompts
from tests.tiny_models import make_adapter

NAMES = ["a", "b", "c"]
WEIGHTS = [0.8, -0.5, 1.1]
# Deterministic types; the linear family needs equal ranks, cat and svd take mixed ranks.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.6}),
    ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 1.0}),
    ("cat", {"mixed": True}),
    ("svd", {"mixed": True}),
    ("ties_svd", {"density": 0.5, "mixed": True, "svd_rank": 6}),
    ("magnitude_prune_svd", {"density": 0.7, "mixed": True}),
]


@pytest.fixture(scope="module")
def adapter_sets(
    llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[bool, dict[str, Path]]:
    """Equal-rank adapters (False) and mixed-rank ones (True), all-linear."""
    root = tmp_path_factory.mktemp("merge-serving")
    sets = {}
    for mixed in (False, True):
        ranks = [4, 8, 6] if mixed else [4, 4, 4]
        sets[mixed] = {
            name: make_adapter(
                llama_dir,
                root / f"{name}{int(mixed)}",
                seed=10 * i + mixed,
                r=r,
                alpha=2 * r,
                targets="all-linear",
                std=0.3 / r**0.25,
            )
            for i, (name, r) in enumerate(zip(NAMES, ranks, strict=True))
        }
    return sets


@pytest.mark.parametrize(("combination_type", "options"), CASES, ids=[c for c, _ in CASES])
def test_merged_adapter_generates_like_peft(
    llama_dir: Path,
    adapter_sets: dict[bool, dict[str, Path]],
    combination_type: str,
    options: dict[str, Any],
) -> None:
    options = dict(options)
    paths = adapter_sets[options.pop("mixed", False)]
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    for name, path in paths.items():
        engine.load_lora(name, path)
    spec = MergeSpec(tuple(NAMES), tuple(WEIGHTS), combination_type, **options)
    weights = [engine.adapters.weights_of(engine.adapters.get(n)) for n in NAMES]
    engine.load_lora_weights("merged", merge_adapters(weights, spec, "merged"))
    prompts = random_prompts(4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    ids = [engine.add_request(p, params, lora="merged") for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, paths["a"], adapter_name="a")
    for name in NAMES[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    model.add_weighted_adapter(
        NAMES, WEIGHTS, "merged", combination_type=combination_type, **options
    )
    model.set_adapter("merged")
    model.eval()
    with torch.inference_mode():
        for rid, prompt in zip(ids, prompts, strict=True):
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
            assert done[rid] == [int(t) for t in out[0, len(prompt) :]], (combination_type, prompt)
