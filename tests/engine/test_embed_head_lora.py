"""LoRA on the embeddings and the head, in mixed batches, equals transformers + PEFT.

Each request runs in one engine beside plain LoRA, DoRA, IA³ and base requests, and must
produce the greedy tokens (and prompt log-probabilities) of the same request run alone
through PEFT; the pool is audited after every step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.test_adapter_kinds import (
    assert_mixed_batch_matches_peft,
    mixed_jobs,
    peft_greedy,
    run_engine,
)
from tests.peft_kinds import make_kind_adapter, peft_forward_greedy
from tests.tiny_models import make_adapter

EMBED_HEAD: dict[str, dict[str, Any]] = {
    "embed": {"kind": "lora_embed_head", "targets": ["embed_tokens"], "r": 4},
    "head": {"kind": "lora_embed_head", "targets": ["lm_head"], "r": 8, "alpha": 4},
    "embed-head-qv": {"kind": "lora_embed_head", "with_attention": True, "r": 4},
}
OTHERS: dict[str, dict[str, Any]] = {
    "dora": {"kind": "dora", "r": 4, "targets": ["q_proj", "v_proj"]},
    "ia3": {"kind": "ia3"},
}


def make_adapters(base: Path, root: Path, specs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting save_embedding_layers to True"
        return {
            name: make_kind_adapter(base, root / name, seed=i, **spec)
            for i, (name, spec) in enumerate(specs.items())
        }


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def adapters(
    request: pytest.FixtureRequest,
    model_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Path]]:
    base = model_dirs[request.param]
    root = tmp_path_factory.mktemp(f"embed-head-{request.param}")
    paths = make_adapters(base, root, {**EMBED_HEAD, **OTHERS})
    paths["lora"] = make_adapter(base, root / "lora", r=8, alpha=16, targets="all-linear", seed=9)
    return base, paths


def test_embed_and_head_lora_in_one_mixed_batch_match_peft(
    adapters: tuple[Path, dict[str, Path]],
) -> None:
    base, paths = adapters
    assert_mixed_batch_matches_peft(base, paths, changed=list(EMBED_HEAD))


def test_embed_and_head_lora_survive_preemption(
    adapters: tuple[Path, dict[str, Path]],
) -> None:
    """A pool too small for every request at once: requests are preempted and recomputed,
    adapters evicted and placed again (their spread rows on other pages), tokens unchanged."""
    base, paths = adapters
    jobs = mixed_jobs(list(paths), 12, seed=5)
    expected = peft_greedy(base, paths, jobs, max_tokens=10)
    engine = LLMEngine(
        EngineConfig.create(base, dtype="float32", num_pages=700, max_num_batched_tokens=48)
    )
    assert run_engine(engine, paths, jobs, max_tokens=10, join_per_step=12) == expected
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.adapter_evictions > 0


def test_embed_and_head_rows_take_their_pages(adapters: tuple[Path, dict[str, Path]]) -> None:
    """A and Bᵀ of both LoRAs are spread over the layers: ceil(rank / layers) rows each, of
    ceil(features / page_width) pages (lm_head's Bᵀ is rank × vocab)."""
    base, paths = adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", num_pages=4000))
    arch, width = engine.model.arch, engine.pool.page_width
    r = EMBED_HEAD["embed-head-qv"]["r"]
    rows = math.ceil(r / arch.num_layers)
    pages = 2 * rows * (math.ceil(arch.vocab_size / width) + math.ceil(arch.hidden_size / width))
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.kv_width
    # q_proj and v_proj: r rows of A and of Bᵀ (a page is a row of every layer's tensor)
    lora = r * (
        2 * math.ceil(arch.hidden_size / width) + math.ceil(q_out / width)
        + math.ceil(kv_out / width)
    )  # fmt: skip
    engine.load_lora("eh", paths["embed-head-qv"])
    entry = engine.adapters.get("eh")
    assert entry.pages == pages + lora
    before = engine.pool.num_free
    engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=1), lora="eh")
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()
    assert before - engine.pool.num_free == entry.pages


def test_prompt_logprobs_use_each_rows_head(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Prompt log-probabilities of embedding / head LoRA requests, beside a base request in
    the same step, equal PEFT's log-softmax at those positions."""
    from tests.peft_kinds import _load

    base = model_dirs["llama"]
    paths = make_adapters(base, tmp_path, {k: EMBED_HEAD[k] for k in ("head", "embed-head-qv")})
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name, path in paths.items():
        engine.load_lora(name, path)
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1, logprobs=1)
    prompt = [11, 42, 7, 99, 250, 3, 64]
    names: list[str | None] = [*paths, None]
    for name in names:
        engine.add_request(prompt, params, request_id=str(name), lora=name)
    outputs: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        engine.check_integrity()
    for name in names:
        out = outputs[str(name)]
        model = _load(str(base), None if name is None else str(paths[name]))
        with torch.inference_mode():
            ids = torch.tensor([prompt + out.token_ids])
            reference = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        for j, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert entry.logprob == pytest.approx(float(reference[j - 1, prompt[j]]), abs=1e-4)
        for i, entry in enumerate(out.logprobs):
            row = reference[len(prompt) - 1 + i]
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)


@pytest.mark.parametrize("ensure_weight_tying", [False, True])
def test_tied_embeddings_serve_what_peft_computes(
    model_dirs: dict[str, Path], tmp_path: Path, ensure_weight_tying: bool
) -> None:
    """On the tied tiny mistral: independent LoRAs on the one matrix, or (with
    ensure_weight_tying) lm_head's LoRA the embedding's transposed."""
    base = model_dirs["mistral"]
    spec = {**EMBED_HEAD["embed-head-qv"], "ensure_weight_tying": ensure_weight_tying}
    paths = make_adapters(base, tmp_path, {"tied": spec})
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    engine.load_lora("tied", paths["tied"])
    weights = engine.adapters.weights_of(engine.adapters.get("tied"))
    assert weights.embedding is not None and weights.head is not None
    same = torch.equal(weights.head.lora_a, weights.embedding.lora_b.T)
    assert same == ensure_weight_tying
    prompts = [[5, 17, 33, 80, 9], [200, 3, 3, 41]]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"a{i}", lora="tied")
        engine.add_request(prompt, params, request_id=f"b{i}")
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    for i, prompt in enumerate(prompts):
        assert done[f"a{i}"] == peft_forward_greedy(base, paths["tied"], prompt, 6)
        assert done[f"b{i}"] == peft_forward_greedy(base, None, prompt, 6)


def test_embed_and_head_lora_on_an_nf4_base(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """On an NF4 base (embeddings and head stay float, as bitsandbytes leaves them), tokens
    equal PEFT on the bitsandbytes-dequantized model."""
    from tests.engine.test_nf4_model import bitsandbytes_dequantized, save_with_bitsandbytes

    base = model_dirs["qwen2"]
    quantized = save_with_bitsandbytes(base, tmp_path / "bnb")
    oracle = bitsandbytes_dequantized(quantized, tmp_path / "oracle")
    paths = make_adapters(base, tmp_path, {**EMBED_HEAD, "ia3": OTHERS["ia3"]})
    paths["lora"] = make_adapter(
        base, tmp_path / "lora", r=4, alpha=8, targets="all-linear", seed=4
    )
    jobs = mixed_jobs(list(paths), 10, seed=7)
    expected = peft_greedy(oracle, paths, jobs, max_tokens=8)
    engine = LLMEngine(EngineConfig.create(quantized, dtype="float32", max_num_batched_tokens=40))
    assert run_engine(engine, paths, jobs, max_tokens=8) == expected


def test_static_decode_path_leaves_embed_head_steps_eager(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base = model_dirs["llama"]
    paths = make_adapters(base, tmp_path, {"embed-head-qv": EMBED_HEAD["embed-head-qv"]})
    paths["lora"] = make_adapter(
        base, tmp_path / "lora", r=4, alpha=8, targets="all-linear", seed=4
    )
    jobs = mixed_jobs(list(paths), 6, seed=9)
    expected = peft_greedy(base, paths, jobs, max_tokens=6)
    engine = LLMEngine(
        EngineConfig.create(base, dtype="float32", graph_mode="static", max_num_seqs=8)
    )
    assert run_engine(engine, paths, jobs, max_tokens=6, join_per_step=8) == expected


def test_mixtures_and_merges_refuse_embedding_and_head_lora(
    adapters: tuple[Path, dict[str, Path]],
) -> None:
    """A mixture routes rows through LoRA kernels only, and add_weighted_adapter combines the
    decoder's linear layers only: both refuse an adapter with a LoRA on the vocabulary."""
    from adapters.errors import AdapterError
    from adapters.merge import MergeSpec, check_merge

    base, paths = adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    for name in ("head", "lora"):
        engine.load_lora(name, paths[name])
    with pytest.raises(AdapterError) as info:
        engine.adapters.register_mixture("mix", [("head", 0.5), ("lora", 0.5)])
    assert info.value.code == "invalid_merge"
    assert info.value.message == (
        "'head' has a LoRA on embed_tokens or lm_head; a mixture combines LoRA on the "
        "decoder's linear layers only"
    )
    weights = [engine.adapters.weights_of(engine.adapters.get(n)) for n in ("head", "lora")]
    spec = MergeSpec(adapters=("head", "lora"), weights=(0.5, 0.5), combination_type="cat")
    with pytest.raises(AdapterError) as info:
        check_merge(weights, spec, engine.adapters.layout)
    assert info.value.code == "invalid_merge"
    assert info.value.message == (
        "'head' has a LoRA on embed_tokens or lm_head: merges here combine LoRA on the "
        "decoder's linear layers only"
    )


def test_export_merges_embedding_and_head_as_peft(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The exported untied model's weights are PEFT's ``merge_and_unload``'s; on a tied
    base, independent updates of the one matrix are refused."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.export import merge_checkpoint, write_merged

    base = model_dirs["llama"]
    paths = make_adapters(base, tmp_path, {"eh": EMBED_HEAD["embed-head-qv"]})
    engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
    engine.load_lora("eh", paths["eh"])
    adapter = engine.adapters.weights_of(engine.adapters.get("eh"))
    write_merged(base, adapter, tmp_path / "merged", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    want = PeftModel.from_pretrained(hf, paths["eh"]).merge_and_unload().state_dict()
    got = load_file(tmp_path / "merged" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    for key, tensor in got.items():
        assert torch.allclose(tensor, want[key], atol=1e-6, rtol=1e-5), key
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(got[key], original[key]), key
    # loraserve merge, from the adapter's files: the same tensors
    merge_checkpoint(base, paths["eh"], tmp_path / "cli", torch.float32)
    from_disk = load_file(tmp_path / "cli" / "model.safetensors")
    assert all(torch.equal(from_disk[key], tensor) for key, tensor in got.items())

    tied = model_dirs["mistral"]
    tied_paths = make_adapters(tied, tmp_path / "tied", {"eh": EMBED_HEAD["embed-head-qv"]})
    engine = LLMEngine(EngineConfig.create(tied, dtype="float32"))
    engine.load_lora("eh", tied_paths["eh"])
    adapter = engine.adapters.weights_of(engine.adapters.get("eh"))
    with pytest.raises(ValueError, match="the base ties lm_head to embed_tokens"):
        write_merged(tied, adapter, tmp_path / "tied-merged", torch.float32)
