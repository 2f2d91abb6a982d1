"""Mixture adapters: y = Wx + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢx), run component by component through the LoRA
kernels, equal PEFT's ``cat`` merge of the same adapters and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.errors import AdapterError
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.test_generation import random_prompts
from tests.engine.test_multilora import ADAPTERS, peft_greedy
from tests.tiny_models import make_adapter

COMPONENTS = {"r4-attn": 0.7, "r8-all": -0.4, "r16-rslora": 1.2}


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture-adapters")
    return {
        name: make_adapter(
            llama_dir, root / name, seed=i, std=0.3 / ADAPTERS[name]["r"] ** 0.25, **ADAPTERS[name]
        )
        for i, name in enumerate(COMPONENTS)
    }


def peft_cat_greedy(
    base: Path, adapters: dict[str, Path], prompts: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """PEFT's ``add_weighted_adapter(..., combination_type="cat")``, greedy, one at a time."""
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(hf, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, [COMPONENTS[n] for n in names], "mix", combination_type="cat")
    model.set_adapter("mix")
    model.eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            out.append([int(t) for t in ids[0, len(prompt) :]])
    return out


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_mixture_equals_peft_cat_in_a_mixed_batch(
    llama_dir: Path, adapters: dict[str, Path], kernels: str
) -> None:
    engine = LLMEngine(
        EngineConfig.create(llama_dir, dtype="float32", max_num_batched_tokens=32), kernels
    )
    for name, path in adapters.items():
        engine.load_lora(name, path)
    engine.register_mixture("mix", list(COMPONENTS.items()))
    # The interpreter is slow: there, three prompts (1, 2 and 7 tokens), three tokens each.
    count, max_tokens = (9, 6) if kernels == "torch" else (3, 3)
    prompts = random_prompts(count, seed=21)[:count]
    choices: list[str | None] = ["mix", "r8-all", None]
    jobs = [(p, choices[i % 3]) for i, p in enumerate(prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    done: dict[str, list[int]] = {}
    pending = list(enumerate(jobs))
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:2]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[2:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    mixed = [i for i, (_, a) in enumerate(jobs) if a == "mix"]
    expected_mix = peft_cat_greedy(llama_dir, adapters, [jobs[i][0] for i in mixed], max_tokens)
    assert [done[str(i)] for i in mixed] == expected_mix
    others = [i for i, (_, a) in enumerate(jobs) if a != "mix"]
    expected = peft_greedy(llama_dir, adapters, [jobs[i] for i in others], max_tokens)
    assert [done[str(i)] for i in others] == expected
    # The mixture differs from each component alone (so the test can fail).
    alone = peft_greedy(llama_dir, adapters, [(jobs[mixed[0]][0], n) for n in adapters], 6)
    expected_alone_mix = peft_cat_greedy(llama_dir, adapters, [jobs[mixed[0]][0]], 6)[0]
    assert all(tokens != expected_alone_mix for tokens in alone)


def test_mixture_lifecycle(llama_dir: Path, adapters: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    for name, path in adapters.items():
        engine.load_lora(name, path)
    engine.register_mixture("mix", [("r4-attn", 1.0), ("r8-all", 0.5)])
    with pytest.raises(AdapterError, match="cannot be nested") as nested:
        engine.register_mixture("mix2", [("mix", 1.0)])
    assert nested.value.code == "invalid_merge"
    with pytest.raises(AdapterError, match="at most once"):
        engine.register_mixture("mix3", [("r4-attn", 1.0), ("r4-attn", 2.0)])
    with pytest.raises(AdapterError, match="does not exist"):
        engine.register_mixture("mix4", [("nope", 1.0)])
    params = SamplingParams(temperature=0.0, max_tokens=4)
    before = engine.add_request([5, 6, 7], params, lora="mix")
    # A component unloaded by name stays alive for the mixture that holds it.
    engine.unload_lora("r4-attn")
    after = engine.add_request([5, 6, 7], params, lora="mix")
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.token_ids
        engine.check_integrity()
    assert outs[before] == outs[after]
    held = engine.adapters.get("mix").components[0][0]
    assert held.name == "r4-attn" and held.unloading and held.refs == 1
    engine.unload_lora("mix")
    engine.step()
    assert held.refs == 0 and held.id not in engine.adapters.residency
