"""Train the bundled demo model and its task adapters, reproducibly, on CPU.

Writes:
    examples/demo/model/            the base model (Llama architecture, ~0.85M
                                    parameters, fp32 safetensors) and its
                                    byte-level tokenizer; it learns ``copy``.
    examples/demo/adapters/<task>/  one PEFT adapter per task: LoRA for those
                                    in ``ADAPTERS``, prefix tuning for those in
                                    ``PREFIX_ADAPTERS`` (adapter_config.json +
                                    adapter_model.safetensors).

Every example is ``<s>WORD=`` followed by ``TASK(WORD)</s>``; the loss covers
only the completion (the prompt is masked). Data come from a ``random.Random``
seeded from ``--seed`` and the task name, weights from ``torch.manual_seed``,
so the same seed on the same software gives the same files.

Usage:
    python examples/demo/train.py                      # base, then every adapter
    python examples/demo/train.py --only caesar        # retrain one stage
    python examples/demo/train.py --out-dir /tmp/rerun # check a rerun elsewhere
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from peft import LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

DEMO_DIR = Path(__file__).resolve().parent
# Outputs go to <out-dir>/model and <out-dir>/adapters/<task>; --out-dir defaults to
# this directory (the committed files) and can point elsewhere to check a rerun.
MODEL_SUBDIR = "model"
ADAPTERS_SUBDIR = "adapters"

# The name adapters record as their base (a relative name, not a local path).
BASE_MODEL_NAME = "loraserve-demo"
DEFAULT_SEED = 0

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2; byte b is id 3 + b

# A conversation renders as BOS + its last user message + "=", so that
# apply_chat_template(conversation) tokenizes exactly like tokenizer("WORD=").
CHAT_TEMPLATE = (
    "{%- set ns = namespace(word='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.word = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.word + '=' -}}"
)

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR_MODULES = [*ATTENTION_MODULES, "gate_proj", "up_proj", "down_proj"]


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
class StageConfig:
    """Optimisation settings of one training stage (the base or one adapter)."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup_steps: int = 100
    weight_decay: float = 0.0


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter: its task, its LoRA shape and how long to train it."""

    task: str
    rank: int
    alpha: int
    use_rslora: bool
    target_modules: list[str]
    stage: StageConfig


# Copy is learned by step ~1500 (loss < 0.01); the rest polishes to 100%.
BASE_STAGE = StageConfig(steps=2000, lr=3e-3, weight_decay=0.01)

# Ranks, scalings and targets differ on purpose, so that a mixed batch of these
# adapters exercises mixed ranks, rsLoRA and attention-only vs all-linear targets.
ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("upper", 4, 8, False, ATTENTION_MODULES, StageConfig(steps=600, lr=5e-3)),
    AdapterSpec("swapcase", 8, 16, False, ALL_LINEAR_MODULES, StageConfig(steps=800, lr=5e-3)),
    AdapterSpec("caesar", 16, 16, True, ALL_LINEAR_MODULES, StageConfig(steps=800, lr=5e-3)),
    AdapterSpec("reverse", 32, 32, False, ALL_LINEAR_MODULES, StageConfig(steps=1000, lr=3e-3)),
)


@dataclass(frozen=True)
class PrefixSpec:
    """One prefix-tuning adapter: its task, its virtual tokens and how long to train it.

    Trained through PEFT's reparameterisation (``prefix_projection``: an MLP of
    ``encoder_hidden_size`` over the virtual tokens), which trains far better on this
    tiny model than free prefixes; PEFT saves the projected keys and values, so what is
    served is the plain per-layer prefix either way.
    """

    task: str
    num_virtual_tokens: int
    encoder_hidden_size: int
    stage: StageConfig


# Prefix tuning steers attention only: 16 virtual keys and values per layer, no weight
# changes, and it serves beside the LoRA adapters in the same batches.
PREFIX_ADAPTERS: tuple[PrefixSpec, ...] = (
    PrefixSpec("lower", 16, 256, StageConfig(steps=1000, lr=3e-3)),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (ByteLevel's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte, BOS prepended, no merges."""
    vocab = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in bytes_to_unicode().items():
        vocab[char] = len(SPECIAL_TOKENS) + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    # use_regex=False: no word splitting; every byte becomes its own token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The base architecture: 4 layers, hidden 128, 4 query heads over 2 KV heads (GQA)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,  # a multiple of 64: NF4 blocks of 64 tile every in_features
        intermediate_size=384,  # also a multiple of 64 (down_proj's in_features)
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )


def make_batch(
    tokenizer: PreTrainedTokenizerFast, task: str, words: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize ``words`` for ``task`` into right-padded inputs and masked labels.

    Returns:
        input_ids: ``(batch, seq_len)``, ``<s>WORD=TARGET</s>`` then padding.
        attention_mask: ``(batch, seq_len)``, 1 on real tokens.
        labels: ``(batch, seq_len)``, the completion ids, -100 on prompt and padding.
    """
    prompt_ids = tokenizer([tasks.format_prompt(word) for word in words])["input_ids"]
    targets = [tasks.target(task, word) for word in words]
    completion_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows = [
        (prompt, [*completion, tokenizer.eos_token_id])
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True)
    ]
    seq_len = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor(prompt + completion)
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(completion)
    return input_ids, attention_mask, labels


def lr_at(step: int, stage: StageConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_stage(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    task: str,
    stage: StageConfig,
    seed: int,
) -> float:
    """Train the parameters of ``model`` that require grad on ``task``.

    Returns the stage's wall time in seconds.
    """
    rng = random.Random(f"{seed}-{task}")  # str seeds are hashed deterministically
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay
    )
    model.train()
    start = time.perf_counter()
    running_loss = 0.0
    for step in range(stage.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, stage)
        words = tasks.sample_train_words(rng, stage.batch_size)
        input_ids, attention_mask, labels = make_batch(tokenizer, task, words)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running_loss += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == stage.steps:
            done = (step + 1) % 100 or 100
            print(
                f"[{task}] step {step + 1}/{stage.steps} loss {running_loss / done:.4f} "
                f"lr {lr_at(step, stage):.2e} elapsed {time.perf_counter() - start:.0f}s",
                flush=True,
            )
            running_loss = 0.0
    model.eval()
    return time.perf_counter() - start


def train_base(tokenizer: PreTrainedTokenizerFast, seed: int, out_dir: Path) -> float:
    """Train the base model on ``copy`` and save it with its tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_config(tokenizer))
    num_params = sum(param.numel() for param in model.parameters())
    print(f"[base] {num_params / 1e6:.2f}M parameters", flush=True)
    seconds = train_stage(model, tokenizer, tasks.BASE_TASK, BASE_STAGE, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=tasks.MAX_WORD_LEN + 1,
    )
    model_dir = out_dir / MODEL_SUBDIR
    model.save_pretrained(model_dir, safe_serialization=True)
    # Keep the chat template inside tokenizer_config.json (no separate .jinja file).
    tokenizer.save_pretrained(model_dir, save_jinja_files=False)
    # transformers 5 records its own class name, TokenizersBackend, which 4.x does
    # not know; PreTrainedTokenizerFast names the same tokenizer in both.
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return seconds


def load_base(out_dir: Path) -> PreTrainedModel:
    """The saved base model, frozen, in float32."""
    model = LlamaForCausalLM.from_pretrained(out_dir / MODEL_SUBDIR, dtype=torch.float32)
    model.requires_grad_(False)
    return model


def train_adapter(
    spec: AdapterSpec, tokenizer: PreTrainedTokenizerFast, seed: int, out_dir: Path
) -> float:
    """Train one LoRA adapter on the frozen base and save it in PEFT's format."""
    lora_config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        target_modules=spec.target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return train_peft(spec.task, lora_config, spec.stage, tokenizer, seed, out_dir)


def train_prefix(
    spec: PrefixSpec, tokenizer: PreTrainedTokenizerFast, seed: int, out_dir: Path
) -> float:
    """Train one prefix-tuning adapter on the frozen base and save it in PEFT's format."""
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=True,
        encoder_hidden_size=spec.encoder_hidden_size,
    )
    return train_peft(spec.task, config, spec.stage, tokenizer, seed, out_dir)


def train_peft(
    task: str,
    config: PeftConfig,
    stage: StageConfig,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    out_dir: Path,
) -> float:
    """Train a PEFT adapter of ``config`` on the frozen base for ``task``; save it."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(out_dir), config)
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    print(f"[{task}] {trainable / 1e3:.1f}K trainable adapter parameters", flush=True)
    seconds = train_stage(model, tokenizer, task, stage, seed)
    save_adapter(model, out_dir / ADAPTERS_SUBDIR / task)
    return seconds


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Save ``model``'s adapter to ``out_dir``: config and safetensors only."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for path in out_dir.iterdir():
        if path.name not in ("adapter_config.json", "adapter_model.safetensors"):
            path.unlink()  # PEFT also writes a model-card README.md
    # get_peft_model recorded this machine's path to the base; name it instead.
    # (Edited after saving: setting it before makes PEFT look the name up.)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    if config.get("target_modules") is not None:
        config["target_modules"] = sorted(config["target_modules"])  # PEFT saves a set
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEMO_DIR,
        help="where model/ and adapters/ go (default: next to this script, the committed files)",
    )
    parser.add_argument(
        "--only",
        choices=["base", *(spec.task for spec in (*ADAPTERS, *PREFIX_ADAPTERS))],
        help="train only this stage (adapters need a saved base)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    timings: dict[str, float] = {}
    if args.only in (None, "base"):
        timings["base"] = train_base(tokenizer, args.seed, args.out_dir)
    for spec in ADAPTERS:
        if args.only in (None, spec.task):
            timings[spec.task] = train_adapter(spec, tokenizer, args.seed, args.out_dir)
    for prefix in PREFIX_ADAPTERS:
        if args.only in (None, prefix.task):
            timings[prefix.task] = train_prefix(prefix, tokenizer, args.seed, args.out_dir)
    for stage, seconds in timings.items():
        print(f"{stage:>10}: {seconds / 60:.1f} min")
    print(f"{'total':>10}: {sum(timings.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
