"""Mixed-adapter batches equal each request run alone through transformers + PEFT."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.test_generation import random_prompts
from tests.tiny_models import make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Ranks 1 to 64, attention-only, MLP-only and all-linear targets, a regex, rsLoRA,
# alpha != r, and per-module rank/alpha patterns.
ADAPTERS: dict[str, dict[str, Any]] = {
    "r1-qv": {"r": 1, "alpha": 2, "targets": ["q_proj", "v_proj"]},
    "r4-attn": {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "r8-all": {"r": 8, "alpha": 16, "targets": "all-linear"},
    "r16-rslora": {"r": 16, "alpha": 16, "targets": "all-linear", "use_rslora": True},
    "r3-mlp": {"r": 3, "alpha": 5, "targets": ["gate_proj", "up_proj", "down_proj"]},
    "r32-regex": {"r": 32, "alpha": 8, "targets": r".*\.(q_proj|o_proj|down_proj)"},
    "r64": {"r": 64, "alpha": 32, "targets": ALL},
    "patterned": {
        "r": 8,
        "alpha": 8,
        "targets": "all-linear",
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "down_proj": 12},
        "alpha_pattern": {"up_proj": 3.0},
    },
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_adapters(
    request: pytest.FixtureRequest,
    model_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Path]]:
    base = model_dirs[request.param]
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    paths = {
        name: make_adapter(base, root / name, seed=i, std=0.3 / spec["r"] ** 0.25, **spec)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }
    return base, paths


def peft_greedy(
    base: Path, paths: dict[str, Path], jobs: list[tuple[list[int], str | None]], max_tokens: int
) -> list[list[int]]:
    """Each (prompt, adapter) alone through transformers + PEFT, greedy."""
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(paths)
    model = PeftModel.from_pretrained(hf, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    model.eval()
    results = []
    for prompt, adapter in jobs:
        ids = torch.tensor([prompt])
        kwargs = {"max_new_tokens": max_tokens, "do_sample": False, "pad_token_id": 0}
        with torch.inference_mode():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, **kwargs)
            else:
                model.set_adapter(adapter)
                out = model.generate(input_ids=ids, **kwargs)
        results.append([int(t) for t in out[0, len(prompt) :]])
    return results


def test_mixed_batch_matches_peft_alone(family_adapters: tuple[Path, dict[str, Path]]) -> None:
    base, paths = family_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", max_num_batched_tokens=48))
    for name, path in paths.items():
        engine.load_lora(name, path)
    rng = random.Random(0)
    prompts = random_prompts(20, seed=5)
    choices: list[str | None] = [*paths, None]
    jobs = [(p, choices[i % len(choices)]) for i, p in enumerate(prompts)]
    rng.shuffle(jobs)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    pending = list(enumerate(jobs))
    done = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:4]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[4:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    expected = peft_greedy(base, paths, jobs, params.max_tokens)
    for i, (_, adapter) in enumerate(jobs):
        assert done[str(i)] == expected[i], (i, adapter)
    cached = engine.kv_cache_manager.num_cached_pages
    assert (
        engine.pool.num_free + cached == engine.pool.num_pages - engine.adapters.residency.num_pages
    )


def test_adapters_change_outputs(family_adapters: tuple[Path, dict[str, Path]]) -> None:
    """Guards the test above against adapters too weak to matter."""
    base, paths = family_adapters
    prompt = random_prompts(1, seed=9)[0]
    outs = peft_greedy(base, paths, [(prompt, None), *((prompt, n) for n in paths)], 8)
    assert sum(o != outs[0] for o in outs[1:]) >= len(paths) - 1
