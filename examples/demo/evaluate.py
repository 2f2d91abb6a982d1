"""Measure the demo model and adapters with transformers + PEFT (the reference).

For the base model and each adapter under ``adapters/``, greedy-decode held-out
words (batched, left-padded) and count exact matches: the completion must be
the task's target followed by EOS. Two numbers per adapter:

- ``with adapter``: the adapter on its own task, on ``--num-words`` held-out words;
- ``base without``: the bare base model on the same task, on ``--num-words``
  held-out words that the task changes (a base that copies gets no credit for
  words such as ``123`` that ``upper`` leaves unchanged).

A third number, ``nf4``, repeats the first with the base quantized to NF4 with double
quantization by bitsandbytes and served as W = dequantize(Q) in float32 (what loraserve's
``--quantization nf4`` computes); the adapters stay as trained.

Prints a markdown table and writes ``accuracy.json`` into ``--demo-dir``
(default: this directory, the committed files).

Usage:
    python examples/demo/evaluate.py [--num-words 200]
    python examples/demo/evaluate.py --demo-dir /tmp/rerun   # a rerun's files
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
ADAPTERS_DIR = DEMO_DIR / "adapters"

ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj"}
ALL_LINEAR_MODULES = ATTENTION_MODULES | {"gate_proj", "up_proj", "down_proj"}


def load_tasks() -> ModuleType:
    """Load ``tasks.py`` from this directory by path (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("demo_tasks", DEMO_DIR / "tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tasks = load_tasks()


@dataclass(frozen=True)
class AccuracyRow:
    """One line of the accuracy table.

    ``with_adapter`` is the base model's own accuracy (on copy) for the base row;
    ``base_without`` is None there.
    """

    task: str
    adapter: str  # "rank 8, alpha 16, rsLoRA, all linear"; "-" for the base row
    num_words: int
    with_adapter: float
    base_without: float | None
    example: str  # one held-out prompt and the model's completion, for a glance
    nf4: float | None = None  # with_adapter, on the NF4 base


def quantize_base_to_nf4(model: PreTrainedModel) -> None:
    """Replace each decoder linear weight with its NF4 round trip through bitsandbytes.

    Every ``nn.Linear`` but the output head, as transformers quantizes; blocks of 64, double
    quantization of the scales. The matmuls stay float32, so this is W = dequantize(Q).
    """
    import bitsandbytes.functional as bnbf  # a development dependency

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            packed, state = bnbf.quantize_4bit(
                module.weight.data, quant_type="nf4", compress_statistics=True
            )
            module.weight.data = bnbf.dequantize_4bit(packed, state).float()


def describe_adapter(adapter_dir: Path) -> str:
    """A short description of an adapter's shape from its adapter_config.json."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") == "PREFIX_TUNING":
        return f"prefix tuning, {config['num_virtual_tokens']} virtual tokens"
    targets = set(config["target_modules"])
    if targets == ATTENTION_MODULES:
        target_text = "attention (q,k,v,o)"
    elif targets == ALL_LINEAR_MODULES:
        target_text = "all linear"
    else:
        target_text = ",".join(sorted(targets))
    rslora = ", rsLoRA" if config.get("use_rslora") else ""
    return f"rank {config['r']}, alpha {config['lora_alpha']}{rslora}, {target_text}"


def load_tokenizer(model_dir: Path = MODEL_DIR) -> PreTrainedTokenizerBase:
    """The demo tokenizer, left-padding for batched generation."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    return tokenizer


def load_base(model_dir: Path = MODEL_DIR) -> PreTrainedModel:
    """The demo base model in float32, in eval mode."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(False)
    return model


@torch.inference_mode()
def greedy_completions(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    words: list[str],
    batch_size: int = 256,
) -> list[str | None]:
    """Greedy-decode the prompt of every word; None where no EOS came in time.

    A completion is the decoded text of the generated tokens before the first
    EOS. ``max_new_tokens`` leaves room for the longest word plus EOS.
    """
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return [forward_completion(model, tokenizer, word) for word in words]
    completions: list[str | None] = []
    for start in range(0, len(words), batch_size):
        prompts = [tasks.format_prompt(word) for word in words[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        # PreTrainedModel's stubs miss generate (it comes from GenerationMixin).
        generated = model.generate(  # type: ignore[operator]
            **batch,
            do_sample=False,
            max_new_tokens=tasks.MAX_WORD_LEN + 1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]  # (batch, new_len)
        for row in new_tokens.tolist():
            if tokenizer.eos_token_id not in row:
                completions.append(None)
                continue
            completion_ids = row[: row.index(tokenizer.eos_token_id)]
            completions.append(str(tokenizer.decode(completion_ids)))
    return completions


@torch.inference_mode()
def forward_completion(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, word: str
) -> str | None:
    """Greedy decoding by PEFT's forward, one full pass per token: for prompt and prefix
    tuning, PEFT's ``generate`` disagrees with its own forward (with transformers 5 it
    drops the prefix), and the forward is what the adapter was trained as."""
    ids = tokenizer(tasks.format_prompt(word))["input_ids"]
    new: list[int] = []
    for _ in range(tasks.MAX_WORD_LEN + 1):
        logits = model(input_ids=torch.tensor([ids + new])).logits
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            return str(tokenizer.decode(new))
        new.append(token)
    return None


def exact_match(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    words: list[str],
) -> tuple[float, list[str | None]]:
    """Fraction of ``words`` whose greedy completion is exactly ``task``'s target.

    Returns the accuracy and the completions (None where no EOS was produced).
    """
    completions = greedy_completions(model, tokenizer, words)
    hits = sum(
        completion == tasks.target(task, word)
        for word, completion in zip(words, completions, strict=True)
    )
    return hits / len(words), completions


def adapter_dirs(adapters_dir: Path = ADAPTERS_DIR) -> dict[str, Path]:
    """The saved adapters, by task, in the order ``tasks.ADAPTER_TASKS`` lists them."""
    return {
        task: adapters_dir / task
        for task in tasks.ADAPTER_TASKS
        if (adapters_dir / task / "adapter_config.json").exists()
    }


def measure(num_words: int, demo_dir: Path = DEMO_DIR) -> list[AccuracyRow]:
    """The accuracy table: the base on copy, then each adapter with and without it.

    ``demo_dir`` holds ``model/`` and ``adapters/`` (train.py's ``--out-dir``).
    """
    tokenizer = load_tokenizer(demo_dir / "model")
    model = load_base(demo_dir / "model")
    words = tasks.held_out_words(num_words)

    # The bare base first: PeftModel.from_pretrained wraps the model in place.
    accuracy, completions = exact_match(model, tokenizer, tasks.BASE_TASK, words)
    rows = [
        AccuracyRow(
            task=tasks.BASE_TASK,
            adapter="- (base model)",
            num_words=num_words,
            with_adapter=accuracy,
            base_without=None,
            example=f"{tasks.format_prompt(words[0])} -> {completions[0]}",
        )
    ]
    adapters = adapter_dirs(demo_dir / "adapters")
    base_without = {
        task: exact_match(model, tokenizer, task, tasks.held_out_words(num_words, task=task))[0]
        for task in adapters
    }

    for task, adapter_dir in adapters.items():
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
        accuracy, completions = exact_match(peft_model, tokenizer, task, words)
        rows.append(
            AccuracyRow(
                task=task,
                adapter=describe_adapter(adapter_dir),
                num_words=num_words,
                with_adapter=accuracy,
                base_without=base_without[task],
                example=f"{tasks.format_prompt(words[0])} -> {completions[0]}",
            )
        )
        model = bare_base(peft_model)  # the bare base again, for the next adapter

    quantize_base_to_nf4(model)
    nf4 = {tasks.BASE_TASK: exact_match(model, tokenizer, tasks.BASE_TASK, words)[0]}
    for task, adapter_dir in adapters.items():
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
        nf4[task] = exact_match(peft_model, tokenizer, task, words)[0]
        model = bare_base(peft_model)
    return [dataclasses.replace(row, nf4=nf4[row.task]) for row in rows]


def bare_base(peft_model: PeftModel) -> PreTrainedModel:
    """The base model again: LoRA layers removed, or (prompt learning, which never changed
    the model) the wrapped model itself."""
    if peft_model.active_peft_config.is_prompt_learning:
        return peft_model.get_base_model()
    return peft_model.unload()


def markdown_table(rows: list[AccuracyRow]) -> str:
    """The rows as a markdown table, accuracies in percent."""
    lines = [
        "| task | adapter | exact match with adapter | on the NF4 base | base without "
        "adapter (words the task changes) | example |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        without = "-" if row.base_without is None else f"{100 * row.base_without:.1f}%"
        nf4 = "-" if row.nf4 is None else f"{100 * row.nf4:.1f}%"
        lines.append(
            f"| {row.task} | {row.adapter} | {100 * row.with_adapter:.1f}% | {nf4} | {without} "
            f"| `{row.example}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-words", type=int, default=200)
    parser.add_argument(
        "--demo-dir",
        type=Path,
        default=DEMO_DIR,
        help="directory with model/ and adapters/; accuracy.json is written there",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    rows = measure(args.num_words, args.demo_dir)
    print(markdown_table(rows))
    accuracy_path = args.demo_dir / "accuracy.json"
    accuracy_path.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    print(f"wrote {accuracy_path}")


if __name__ == "__main__":
    main()
