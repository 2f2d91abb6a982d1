"""The committed demo files (examples/demo): an artifact check, through transformers + PEFT.

loraserve does not run here. These tests check the files themselves: safetensors only and
small, a tiny GQA Llama with a byte-level tokenizer and a chat template, adapters of mixed
ranks, scalings, targets and kinds; and that the model and adapters do their tasks
(examples/demo/tasks.py) when transformers + PEFT run them: the base copies ``WORD=`` ->
``WORD``, each adapter applies its own checkable transformation, measured on held-out words
(which training never saw) with the greedy, batched code of the README's table.

loraserve's run of the same files, checked against the same tasks and threshold, is
tests/e2e/test_demo_loraserve.py (every task in one mixed batch, on the float base and on the
base quantized to NF4 at load); the live server's, for two of the adapters, is
tests/server/test_openai_api.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tests.e2e.demo import ADAPTERS_DIR, DEMO_DIR, MIN_ACCURACY, MODEL_DIR, load_module, tasks
from tests.server.conftest import demo_adapters

NUM_WORDS = 100  # held-out words per measurement; the README's table uses 200
MAX_BASE_ACCURACY_ON_ADAPTER_TASK = 0.10  # on words the task changes

# The measurement code shared with the README's table (greedy, batched, exact match).
evaluate = load_module("evaluate")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def base_model() -> PreTrainedModel:
    """The bare base model; never wrapped by PEFT (adapter tests load their own)."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.train(False)
    return model


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    words: list[str] = tasks.held_out_words(NUM_WORDS)
    assert all(tasks.is_held_out(word) for word in words)
    return words


def test_demo_files_are_safetensors_and_small() -> None:
    model_files = {path.name for path in MODEL_DIR.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= model_files
    for task in tasks.ADAPTER_TASKS:
        adapter_files = {path.name for path in (ADAPTERS_DIR / task).iterdir()}
        assert adapter_files == {"adapter_config.json", "adapter_model.safetensors"}, task
        config = json.loads((ADAPTERS_DIR / task / "adapter_config.json").read_text())
        assert not Path(config["base_model_name_or_path"]).is_absolute()
    assert not list(DEMO_DIR.rglob("*.bin"))
    total_bytes = sum(path.stat().st_size for path in DEMO_DIR.rglob("*") if path.is_file())
    assert total_bytes < 20 * 2**20


def test_demo_base_is_a_tiny_gqa_llama(base_model: PreTrainedModel) -> None:
    config = base_model.config
    assert config.model_type == "llama"
    assert config.hidden_size % 64 == 0
    assert config.intermediate_size % 64 == 0
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert sum(param.numel() for param in base_model.parameters()) <= 5_000_000
    assert base_model.generation_config.eos_token_id == config.eos_token_id


def test_demo_tokenizer_is_byte_level_with_chat_template(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt_ids = tokenizer(tasks.format_prompt("aB3"))["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert len(prompt_ids) == 1 + len("aB3=")

    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "aB3"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == f"{tokenizer.bos_token}aB3="
    chat = tokenizer.apply_chat_template(conversation, tokenize=True)
    assert not isinstance(chat, str)
    # transformers 5 returns a BatchEncoding; 4.x returned the list of ids.
    chat_ids = chat if isinstance(chat, list) else chat["input_ids"]
    assert chat_ids == prompt_ids

    text = "héllo, wörld ✓ 日本"  # multi-byte UTF-8: one token per byte
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_demo_base_copies_under_transformers(
    base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, held_out: list[str]
) -> None:
    accuracy, _ = evaluate.exact_match(base_model, tokenizer, tasks.BASE_TASK, held_out)
    assert accuracy >= MIN_ACCURACY


def test_reference_batched_generation_matches_one_at_a_time(
    base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, held_out: list[str]
) -> None:
    # Left padding must not change greedy outputs (words of mixed lengths).
    words = held_out[:8]
    batched = evaluate.greedy_completions(base_model, tokenizer, words)
    single = [evaluate.greedy_completions(base_model, tokenizer, [word])[0] for word in words]
    assert batched == single


@pytest.mark.parametrize("task", tasks.ADAPTER_TASKS)
def test_demo_adapter_does_its_task_under_peft_and_base_does_not(
    task: str,
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    held_out: list[str],
) -> None:
    changed = tasks.held_out_words(NUM_WORDS, task=task)
    base_accuracy, _ = evaluate.exact_match(base_model, tokenizer, task, changed)
    assert base_accuracy <= MAX_BASE_ACCURACY_ON_ADAPTER_TASK

    # A fresh base per adapter: PeftModel wraps its base model in place.
    fresh_base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh_base, ADAPTERS_DIR / task).eval()
    accuracy, _ = evaluate.exact_match(peft_model, tokenizer, task, held_out)
    assert accuracy >= MIN_ACCURACY


def test_demo_adapters_mix_ranks_scalings_and_targets() -> None:
    configs = [
        json.loads((ADAPTERS_DIR / task / "adapter_config.json").read_text())
        for task in tasks.ADAPTER_TASKS
    ]
    kinds = {config.get("peft_type") for config in configs}
    assert kinds == {"LORA", "PREFIX_TUNING"}  # at least one adapter is not LoRA
    configs = [config for config in configs if config["peft_type"] == "LORA"]
    ranks = [config["r"] for config in configs]
    assert len(set(ranks)) == len(ranks)
    assert any(config["use_rslora"] for config in configs)
    assert sum(config["lora_alpha"] != config["r"] for config in configs) >= 2
    target_sets = {frozenset(config["target_modules"]) for config in configs}
    assert frozenset(evaluate.ATTENTION_MODULES) in target_sets
    assert frozenset(evaluate.ALL_LINEAR_MODULES) in target_sets


def test_a_missing_demo_adapter_fails_the_server_tests_saying_how_to_restore() -> None:
    """The server tests' ``demo_adapters`` fails (never skips) on a checkout that lacks one."""
    with pytest.raises(pytest.fail.Exception) as failure:
        demo_adapters("upper", "no-such-task")
    message = str(failure.value)
    assert "examples/demo/adapters/no-such-task/adapter_config.json" in message
    assert "examples/demo/adapters/no-such-task/adapter_model.safetensors" in message
    assert "upper" not in message  # present: not listed
    assert "git checkout -- examples/demo" in message
    assert demo_adapters("upper") == {"upper": ADAPTERS_DIR / "upper"}
