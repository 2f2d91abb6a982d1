"""Every adapter kind (LoRA, DoRA, AdaLoRA, IA³, prompt and prefix tuning, LoRA on the
embeddings and the head) in one mixed batch equals transformers + PEFT.

Every request runs in one engine beside plain LoRA and base requests; each must produce the
greedy tokens of the same request run alone through PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.errors import AdapterError
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.test_generation import random_prompts
from tests.peft_kinds import make_kind_adapter, peft_forward_greedy
from tests.tiny_models import EOS, make_adapter

KINDS: dict[str, dict[str, Any]] = {
    "dora": {"kind": "dora", "r": 4, "targets": "all-linear"},
    "dora-qv": {"kind": "dora", "r": 8, "targets": ["q_proj", "v_proj"]},
    "adalora": {"kind": "adalora", "targets": ["q_proj", "v_proj", "down_proj"], "prune": True},
    "ia3": {"kind": "ia3"},  # k, v (outputs) and down_proj (input)
    "ia3-packed-input": {
        "kind": "ia3",
        "targets": ["q_proj", "up_proj", "o_proj"],
        "feedforward": ["up_proj", "o_proj"],
    },
    "prompt": {"kind": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix": {"kind": "prefix_tuning", "num_virtual_tokens": 5},
    "prefix-projected": {
        "kind": "prefix_tuning",
        "num_virtual_tokens": 3,
        "prefix_projection": True,
    },
    "embed-head": {"kind": "lora_embed_head", "r": 4, "with_attention": True},
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def kind_adapters(
    request: pytest.FixtureRequest,
    model_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Path]]:
    base = model_dirs[request.param]
    root = tmp_path_factory.mktemp(f"kinds-{request.param}")
    paths = {
        name: make_kind_adapter(base, root / name, seed=i, **spec)
        for i, spec in enumerate(KINDS.values())
        for name in [list(KINDS)[i]]
    }
    paths["lora"] = make_adapter(base, root / "lora", r=8, alpha=16, targets="all-linear", seed=9)
    return base, paths


def peft_greedy(
    base: Path, paths: dict[str, Path], jobs: list[tuple[list[int], str | None]], max_tokens: int
) -> list[list[int]]:
    """Each (prompt, adapter) alone through transformers + PEFT's forward, teacher-forced
    token by token (PEFT's ``generate`` is wrong for prompt and prefix tuning), cut after
    the first end-of-sequence token as the engine stops there."""
    results = []
    for prompt, adapter in jobs:
        tokens = peft_forward_greedy(base, None if adapter is None else paths[adapter], prompt,
                                     max_tokens)  # fmt: skip
        results.append(tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens)
    return results


def run_engine(
    engine: LLMEngine,
    paths: dict[str, Path],
    jobs: list[tuple[list[int], str | None]],
    max_tokens: int,
    join_per_step: int = 3,
) -> list[list[int]]:
    """Every job in one engine, a few joining per step, the pool audited after each step."""
    for name, path in paths.items():
        engine.load_lora(name, path)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    pending = list(enumerate(jobs))
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:join_per_step]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[join_per_step:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return [done[str(i)] for i in range(len(jobs))]


def mixed_jobs(names: list[str], n: int, seed: int) -> list[tuple[list[int], str | None]]:
    choices: list[str | None] = [*names, None]
    return [(p, choices[i % len(choices)]) for i, p in enumerate(random_prompts(n, seed=seed))]


def assert_mixed_batch_matches_peft(
    base: Path, paths: dict[str, Path], changed: list[str], num_jobs: int = 14
) -> None:
    """Requests over every adapter of ``paths`` and the base, in one engine, each equal to
    PEFT alone; and each adapter of ``changed`` changed some tokens (not the base's)."""
    jobs = mixed_jobs(list(paths), num_jobs, seed=3)
    expected = peft_greedy(base, paths, jobs, max_tokens=8)
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", max_num_batched_tokens=64))
    got = run_engine(engine, paths, jobs, max_tokens=8)
    for i, (tokens, want) in enumerate(zip(got, expected, strict=True)):
        assert tokens == want, (i, jobs[i][1])
    base_only = peft_greedy(base, paths, [(p, None) for p, _ in jobs], max_tokens=8)
    for name in changed:
        rows = [i for i, (_, a) in enumerate(jobs) if a == name]
        assert any(got[i] != base_only[i] for i in rows), name


def test_every_kind_in_one_batch_matches_peft_alone(
    kind_adapters: tuple[Path, dict[str, Path]],
) -> None:
    base, paths = kind_adapters
    assert_mixed_batch_matches_peft(base, paths, changed=list(paths))


def test_kinds_survive_preemption(kind_adapters: tuple[Path, dict[str, Path]]) -> None:
    """A pool too small for every request at once: requests are preempted and recomputed,
    adapters evicted and placed again, and the tokens do not change."""
    base, paths = kind_adapters
    jobs = mixed_jobs(list(paths), 12, seed=5)
    expected = peft_greedy(base, paths, jobs, max_tokens=10)
    engine = LLMEngine(
        EngineConfig.create(base, dtype="float32", num_pages=700, max_num_batched_tokens=48)
    )
    got = run_engine(engine, paths, jobs, max_tokens=10, join_per_step=12)
    assert got == expected
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.adapter_evictions > 0


def test_kind_pages_are_counted_and_returned(
    kind_adapters: tuple[Path, dict[str, Path]],
) -> None:
    """Each kind's rows take exactly the pages its entry counts (its vectors and virtual
    tokens too, not only LoRA rows), and the pool's audit balances after each request."""
    base, paths = kind_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", num_pages=4000))
    params = SamplingParams(temperature=0.0, max_tokens=1)
    pool = engine.pool
    for name, path in paths.items():
        engine.load_lora(name, path)
        entry = engine.adapters.get(name)
        assert entry.pages > 0
        before = pool.num_free
        engine.add_request([5, 6, 7], params, request_id=name, lora=name)
        while engine.has_unfinished():
            engine.step()
        engine.check_integrity()
        used = before - pool.num_free
        assert used == entry.pages, name  # the adapter stays resident after its request
    ia3 = engine.adapters.get("ia3")
    assert ia3.kind == "ia3"
    assert ia3.max_rank == 0


def test_a_mixture_of_other_kinds_is_refused(kind_adapters: tuple[Path, dict[str, Path]]) -> None:
    base, paths = kind_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name in ("dora", "lora"):
        engine.load_lora(name, paths[name])
    with pytest.raises(AdapterError) as info:
        engine.adapters.register_mixture("mix", [("dora", 0.5), ("lora", 0.5)])
    assert info.value.code == "invalid_merge"
    assert "'dora' is a dora adapter" in info.value.message


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_kind_on_an_nf4_base(
    model_dirs: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """Every kind on an NF4 base equals PEFT on bitsandbytes' dequantized weights: DoRA's
    scales, in particular, come from the served weight, dequantize(Q)."""
    from tests.engine.test_nf4_model import bitsandbytes_dequantized, save_with_bitsandbytes

    base = model_dirs[family]
    quantized = save_with_bitsandbytes(base, tmp_path / "bnb")
    oracle = bitsandbytes_dequantized(quantized, tmp_path / "oracle")
    paths = {
        "dora": make_kind_adapter(base, tmp_path / "dora", kind="dora", seed=1, r=4),
        "ia3": make_kind_adapter(base, tmp_path / "ia3", kind="ia3", seed=2),
        "ia3-packed-input": make_kind_adapter(
            base, tmp_path / "ia3p", seed=5, **KINDS["ia3-packed-input"]
        ),
        "adalora": make_kind_adapter(base, tmp_path / "ada", kind="adalora", seed=3, prune=True),
        "lora": make_adapter(base, tmp_path / "lora", r=4, alpha=8, targets="all-linear", seed=4),
        **{
            name: make_kind_adapter(base, tmp_path / name, seed=6 + i, **KINDS[name])
            for i, name in enumerate(("prompt", "prefix", "embed-head"))
        },
    }
    jobs = mixed_jobs(list(paths), 14, seed=7)
    expected = peft_greedy(oracle, paths, jobs, max_tokens=8)
    engine = LLMEngine(EngineConfig.create(quantized, dtype="float32", max_num_batched_tokens=40))
    assert run_engine(engine, paths, jobs, max_tokens=8) == expected


@pytest.mark.parametrize("graph_mode", ["static"])
def test_kinds_run_eagerly_beside_the_decode_graphs(
    kind_adapters: tuple[Path, dict[str, Path]], graph_mode: str
) -> None:
    """The static decode path takes plain-LoRA decode steps; a step with a DoRA or IA³
    row runs eagerly, and the tokens are the same."""
    base, paths = kind_adapters
    jobs = mixed_jobs(list(paths), 8, seed=9)
    expected = peft_greedy(base, paths, jobs, max_tokens=6)
    engine = LLMEngine(
        EngineConfig.create(base, dtype="float32", graph_mode=graph_mode, max_num_seqs=8)
    )
    assert run_engine(engine, paths, jobs, max_tokens=6, join_per_step=8) == expected


def test_dora_scale_is_the_row_norm_of_the_adapted_weight() -> None:
    from adapters.loader import dora_scale

    torch.manual_seed(0)
    w, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    m = torch.rand(6) + 0.5
    g = dora_scale(m, w, a, b, 0.5)
    assert torch.allclose(g, m / (w + 0.5 * b @ a).norm(dim=1))
    with pytest.raises(AdapterError, match="norm 0"):
        dora_scale(m, torch.zeros(6, 5), torch.zeros(2, 5), b, 0.5)


@pytest.mark.parametrize("name", ["dora", "ia3", "ia3-packed-input", "adalora"])
def test_export_equals_peft_merge_and_unload(
    kind_adapters: tuple[Path, dict[str, Path]], name: str, tmp_path: Path
) -> None:
    """The exported model's weights are PEFT's ``merge_and_unload``'s (biases included)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.export import write_merged

    base, paths = kind_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    engine.load_lora(name, paths[name])
    adapter = engine.adapters.weights_of(engine.adapters.get(name))
    write_merged(base, adapter, tmp_path / "merged", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(hf, paths[name]).merge_and_unload()
    want = merged.state_dict()
    got = load_file(tmp_path / "merged" / "model.safetensors")
    changed = 0
    for key, tensor in got.items():
        assert torch.allclose(tensor, want[key], atol=1e-5, rtol=1e-5), key
        changed += not torch.equal(tensor, load_file(base / "model.safetensors")[key])
    assert changed > 0


def test_merging_other_kinds_is_refused(kind_adapters: tuple[Path, dict[str, Path]]) -> None:
    from adapters.merge import MergeSpec, check_merge

    base, paths = kind_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name in ("dora", "adalora", "ia3", "lora"):
        engine.load_lora(name, paths[name])
    weights = {
        n: engine.adapters.weights_of(engine.adapters.get(n))
        for n in ("dora", "adalora", "ia3", "lora")
    }
    expected = {
        "dora": "is a dora adapter: add_weighted_adapter combines lora_A and lora_B only",
        "adalora": "is a adalora adapter: PEFT's add_weighted_adapter does not support AdaLoRA",
        "ia3": "is a ia3 adapter: only LoRA adapters merge",
    }
    for name, message in expected.items():
        spec = MergeSpec(adapters=(name, "lora"), weights=(0.5, 0.5), combination_type="cat")
        with pytest.raises(AdapterError) as info:
            check_merge([weights[name], weights["lora"]], spec, engine.adapters.layout)
        assert info.value.code == "invalid_merge"
        assert message in info.value.message


def test_churn_over_a_mix_of_kinds(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Eighteen adapters of seven kinds through a pool that holds a few at a time, loaded,
    unloaded and loaded again while requests run: every request finishes with the tokens it
    gets alone, the pool's books balance after every step, and evictions happened."""
    base = model_dirs["llama"]
    makers = {
        "lora": lambda p, s: make_adapter(base, p, r=4, alpha=8, targets="all-linear", seed=s),
        "dora": lambda p, s: make_kind_adapter(base, p, "dora", seed=s, r=2),
        "ia3": lambda p, s: make_kind_adapter(base, p, "ia3", seed=s),
        "adalora": lambda p, s: make_kind_adapter(base, p, "adalora", seed=s, prune=True),
        "prompt": lambda p, s: make_kind_adapter(base, p, seed=s, **KINDS["prompt"]),
        "prefix": lambda p, s: make_kind_adapter(base, p, seed=s, **KINDS["prefix"]),
        "embed": lambda p, s: make_kind_adapter(base, p, seed=s, **KINDS["embed-head"]),
    }
    paths = {
        f"{kind}{i}": make(tmp_path / f"{kind}{i}", 100 + 10 * i + k)
        for k, (kind, make) in enumerate(makers.items())
        for i in range(18 // len(makers) + (k < 18 % len(makers)))
    }
    jobs = mixed_jobs(list(paths), 40, seed=13)
    # Alone: one request at a time, in a pool with room for everything.
    alone = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name, path in paths.items():
        alone.load_lora(name, path)
    want = [run_engine(alone, {}, [job], max_tokens=5)[0] for job in jobs]
    engine = LLMEngine(
        EngineConfig.create(base, dtype="float32", num_pages=900, max_num_batched_tokens=48)
    )
    for name, path in paths.items():
        engine.load_lora(name, path)
    params = SamplingParams(temperature=0.0, max_tokens=5)
    done: dict[str, list[int]] = {}
    for i, (prompt, adapter) in enumerate(jobs):
        if i % 7 == 6 and adapter is not None:  # hot reload of a name in use
            engine.unload_lora(adapter)
            engine.load_lora(adapter, paths[adapter])
        engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    assert [done[str(i)] for i in range(len(jobs))] == want
    assert engine.stats().adapter_evictions > 10


def test_ia3_merge_is_pefts_add_weighted_adapter(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Two IA³ adapters with different modules, merged with weights 0.7 and -0.2: the
    served merge's vectors and tokens are PEFT's, and the saved directory loads in PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.merge import MergeSpec
    from server.adapter_ops import merge_adapter

    base = model_dirs["qwen2"]
    paths = {
        "a": make_kind_adapter(base, tmp_path / "a", "ia3", seed=1),
        "b": make_kind_adapter(base, tmp_path / "b", "ia3", seed=2, targets=["k_proj", "up_proj"],
                               feedforward=["up_proj"]),
    }  # fmt: skip
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name, path in paths.items():
        engine.load_lora(name, path)
    spec = MergeSpec(adapters=("a", "b"), weights=(0.7, -0.2), combination_type="linear")
    merge_adapter(engine, "ab", spec, save_to=tmp_path / "saved")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, paths["a"], adapter_name="a")
    peft.load_adapter(paths["b"], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.7, -0.2], "ab")
    layout = engine.adapters.layout
    merged = engine.adapters.weights_of(engine.adapters.get("ab"))
    for (layer, target), vector in merged.ia3.items():
        module = peft.get_submodule(f"base_model.model.{layout.module_path(layer, target)}")
        assert torch.allclose(vector.values, module.ia3_l["ab"].flatten()), (layer, target)
    assert len(merged.ia3) == len(
        [m for m in peft.modules() if hasattr(m, "ia3_l") and "ab" in m.ia3_l]
    )
    # served tokens are the merged PEFT adapter's; the saved directory is PEFT's format
    jobs = [(p, "ab") for p in random_prompts(3, seed=1)]
    peft.set_adapter("ab")
    want = [
        [int(t) for t in peft.generate(input_ids=torch.tensor([p]), max_new_tokens=6,
                                       do_sample=False, pad_token_id=0)[0, len(p):]]
        for p, _ in jobs
    ]  # fmt: skip
    assert run_engine(engine, {}, jobs, max_tokens=6) == want
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "saved" / "ab"
    )
    for name, param in reloaded.named_parameters():
        if "ia3_l" in name:
            twin = peft.get_parameter(name.replace(".default", ".ab"))
            assert torch.allclose(param, twin), name
    with pytest.raises(AdapterError, match="use combination_type 'linear'"):
        merge_adapter(engine, "bad", MergeSpec(adapters=("a", "b"), weights=(1, 1)), None)


def test_export_of_virtual_token_kinds_is_refused(
    kind_adapters: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    from engine.export import write_merged

    base, paths = kind_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name in ("prompt", "prefix"):
        engine.load_lora(name, paths[name])
        adapter = engine.adapters.weights_of(engine.adapters.get(name))
        with pytest.raises(ValueError, match="adds virtual tokens, not weights"):
            write_merged(base, adapter, tmp_path / name, torch.float32)
        assert not (tmp_path / name / "model.safetensors").exists()


def test_loraserve_merge_from_disk_takes_every_kind_it_can(
    kind_adapters: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """``loraserve merge`` (offline) merges IA³ and AdaLoRA directories as the export route
    does, and refuses DoRA, whose scales need the served weights, and prefix tuning."""
    from safetensors.torch import load_file

    from engine.export import merge_checkpoint, write_merged

    base, paths = kind_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name in ("ia3", "adalora"):
        merge_checkpoint(base, paths[name], tmp_path / f"cli-{name}", torch.float32)
        engine.load_lora(name, paths[name])
        served = engine.adapters.weights_of(engine.adapters.get(name))
        write_merged(base, served, tmp_path / f"route-{name}", torch.float32)
        cli = load_file(tmp_path / f"cli-{name}" / "model.safetensors")
        route = load_file(tmp_path / f"route-{name}" / "model.safetensors")
        assert cli.keys() == route.keys()
        assert all(torch.equal(cli[k], route[k]) for k in cli), name
    with pytest.raises(AdapterError, match="POST /v1/adapters/"):
        merge_checkpoint(base, paths["dora"], tmp_path / "cli-dora", torch.float32)
    with pytest.raises(ValueError, match="adds virtual tokens"):
        merge_checkpoint(base, paths["prefix"], tmp_path / "cli-prefix", torch.float32)
