"""Random PEFT adapters of kinds beyond plain LoRA, and PEFT's forward as the exact reference.

``make_kind_adapter`` saves an adapter with PEFT's own ``get_peft_model`` + ``save_pretrained``,
every trainable tensor randomised (seeded) so greedy outputs differ visibly from the base model.
``peft_forward_greedy`` and ``peft_logits`` run PEFT's **forward**, teacher-forced, without a KV
cache and without ``generate``: with transformers 5 and PEFT 0.21, ``generate`` disagrees with
PEFT's own forward for prompt and prefix tuning (and for prefix tuning ignores the prefix).

All line references are to the installed packages (PEFT 0.21.2, transformers 5.24) under
``.venv/lib/python3.11/site-packages``. ``x`` is a layer's input row vector, ``W`` its weight
(out, in), and a saved key ``<m>`` is ``base_model.model.<module path>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj``. PEFT strips the adapter name from saved
keys.

dora (``LoraConfig(use_dora=True)``)
    Tensors: ``<m>.lora_A.weight`` (r, in), ``<m>.lora_B.weight`` (out, r),
    ``<m>.lora_magnitude_vector`` (out,). Config: ``r``, ``lora_alpha``, ``use_dora: true``,
    ``use_rslora``. ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), as plain LoRA.
    Forward (``peft/tuners/lora/dora.py:132-166`` via ``variants.py:230-257``; dropout 0)::

        norm = ||W + s·B@A||_2 per output row (dora.py:86-91, dim=1 of (out, in)), no grad
        m' = magnitude / norm                        (out,)
        y = W x + b + (m' - 1) ⊙ (W x) + m' ⊙ (s · B A x)
          = m' ⊙ (W x + s·B A x) + b                  (the bias is NOT scaled)

    ``base_result - bias`` at dora.py:158-161 keeps the bias out of the rescale. The magnitude
    is the trained vector; PEFT initialises it to the row norms of W (B = 0 at init).

adalora (``AdaLoraConfig``)
    Tensors: ``<m>.lora_A`` (r_m, in), ``<m>.lora_E`` (r_m, 1), ``<m>.lora_B`` (out, r_m); no
    ``.weight`` suffix (they are nn.Parameters, ``peft/tuners/adalora/layer.py:69-73``).
    ``ranknum`` is not saved (``adalora/model.py:308-309``). Config: ``peft_type: "ADALORA"``,
    ``init_r``, ``target_r``, ``lora_alpha``, ``rank_pattern`` (null or a dict); ``r`` is
    ignored. Unpruned: r_m = init_r for every module. Pruned: ``rank_pattern`` maps
    ``"<module path>.lora_E"`` (e.g. ``"model.layers.0.self_attn.q_proj.lora_E"``, no
    ``base_model.model.`` and no adapter name) to a list of ``init_r`` bools, and the saved
    tensors keep only the True rows of A and E and columns of B, in order
    (``adalora/model.py:289-303``, called from ``_get_adapter_state_dict`` at 306-315), so
    r_m = sum(mask) and may be 0 (empty tensors). On load the module is first built with
    init_r, then resized (``model.py:259-287``): ``ranknum`` keeps the **init_r** value
    (copied from the old parameter at 287). Forward (``adalora/layer.py:175-197``)::

        scaling = lora_alpha if lora_alpha > 0 else init_r     (layer.py:85; NOT alpha / r)
        ranknum = float(init_r)                                 (also after pruning)
        y = W x + b + ((x @ (A ⊙ E).T) @ B.T) · scaling / (ranknum + 1e-5)

    ``A ⊙ E`` broadcasts E (r, 1) over A's rows. So it folds to plain LoRA with
    A' = E ⊙ A (each row i of A times E[i]), B' = B, scale = lora_alpha / (init_r + 1e-5)
    (evaluated in float32 as PEFT does: ``ranknum`` is a float32 parameter). Loading a pruned
    adapter warns that the ``rank_pattern`` keys match no module: harmless (LoRA's per-module
    rank lookup; AdaLoRA builds with init_r and resizes afterwards).

ia3 (``IA3Config``)
    Tensors: ``<m>.ia3_l`` (out, 1) for a non-feedforward target, (1, in) for a feedforward
    one (``peft/tuners/ia3/layer.py:62-66``). Config: ``target_modules``,
    ``feedforward_modules`` (a subset of the targets). Forward (``ia3/layer.py:172-197``)::

        feedforward:      y = W (x ⊙ l) + b
        non-feedforward:  y = (W x + b) ⊙ l            (the bias IS scaled, e.g. Qwen2 k/v)

prompt_tuning (``PromptTuningConfig``)
    Tensor: ``prompt_embeddings`` (n, hidden) only. Config: ``num_virtual_tokens`` n,
    ``token_dim``, ``num_layers``. Forward (``peft/peft_model.py:2161-2171``, ``get_prompt``
    at 911-921): ``inputs_embeds = cat(prompt_embeddings, embed_tokens(ids))`` and the base
    model runs on that, no cache: the virtual tokens are positions 0..n-1 and the request's
    token j is at position n + j (``transformers/models/llama/modeling_llama.py:377-380``,
    position_ids = arange(len) + 0). The returned logits cover the n virtual positions too;
    the last position is the request's last token. The virtual embeddings are used raw (no
    embedding scale; Llama/Qwen2 have none).

prefix_tuning (``PrefixTuningConfig``)
    Tensor: ``prompt_embeddings`` (n, num_layers · 2 · kv_heads · head_dim) only. With
    ``prefix_projection=True`` it is the **projected** output of the MLP, not the MLP:
    ``save_pretrained`` writes ``get_prompt_embedding_to_save`` = ``prompt_encoder(tokens)``
    (``peft_model.py:744-763``), and a loaded (``inference_mode``) PrefixEncoder is a plain
    Embedding of that width (``peft/tuners/prefix_tuning/model.py:66-79``,
    ``get_prompt`` reads ``embedding.weight`` at ``peft_model.py:781-782``). So both variants
    load identically. Config: ``num_virtual_tokens`` n, ``num_layers``, and for GQA models
    ``num_attention_heads`` = num_key_value_heads and ``token_dim`` = kv_heads · head_dim
    (``peft/utils/other.py:1197-1231``). Layout (``peft_model.py:786-800``): row t viewed as
    (num_layers, 2, kv_heads, head_dim); [l, 0] is layer l's key and [l, 1] its value for
    virtual token t. They are put into a ``DynamicCache`` as-is (``peft_model.py:886-893``),
    so the prefix keys get **no RoPE** (RoPE is applied only to the new keys,
    ``modeling_llama.py:249``) and attention sees them as already-rotated cached keys. The
    request's own tokens start at position n: ``past_seen_tokens = cache.get_seq_length()``
    = n (``modeling_llama.py:377-380``; Qwen2 the same at ``modeling_qwen2.py:356-357``).
    Every query attends to all n prefix positions (causal mask over past + current).

lora_embed_head (``LoraConfig`` targeting ``embed_tokens`` and ``lm_head``)
    Tensors: ``<embed>.lora_embedding_A`` (r, vocab), ``<embed>.lora_embedding_B``
    (hidden, r) (no ``.weight``); ``<lm_head>.lora_A.weight`` (r, hidden),
    ``<lm_head>.lora_B.weight`` (vocab, r); optional q/v LoRA as usual. s = alpha / r.
    Forward: embedding ``e = E[id] + s · (A.T[id] @ B.T)`` i.e. ``s · B @ A[:, id]``
    (``peft/tuners/lora/layer.py:1487-1535``); lm_head is a LoRA Linear
    (``layer.py:1074-1116``). Tied base (``tie_word_embeddings=True``, e.g. the tiny
    ``mistral``): without ``ensure_weight_tying`` PEFT warns
    (``peft/tuners/tuners_utils.py:1454-1463``) and the two LoRAs are independent tensors on
    top of the one shared base matrix (``lm_head.base_layer.weight is
    embed_tokens.base_layer.weight`` after load). With ``ensure_weight_tying=True`` lm_head's
    LoRA *is* the embedding's, transposed (lora_A = lora_embedding_B.T, lora_B =
    lora_embedding_A.T, shared storage, ``peft/tuners/lora/model.py:314-322``), so
    ``lm_head = E + s · (B_e @ A_e).T`` and the adapted model stays tied; the saved config then
    has ``ensure_weight_tying: true`` and ``target_modules`` without ``lm_head`` (e.g.
    ``["model.embed_tokens", "embed_tokens"]``), while the file still holds the (equal)
    ``lm_head.lora_A/B.weight``. In every case ``save_pretrained`` also writes the full base
    matrices ``<embed>.base_layer.weight`` and ``<lm_head>.base_layer.weight`` (vocab, hidden)
    (``save_embedding_layers="auto"``, ``peft/utils/save_and_load.py:286-297``); PEFT loads
    them over the base weights, here they equal the base.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

KINDS = ("dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "lora_embed_head")


def make_kind_adapter(
    base_dir: Path, out_dir: Path, kind: str, *, seed: int, **options: Any
) -> Path:
    """Save a random PEFT adapter of ``kind`` for the model in ``base_dir`` (PEFT's format).

    Options per kind (defaults in brackets):

    - dora: ``r`` [4], ``alpha`` [8], ``targets`` ["all-linear"], ``std`` [0.3] for A and B;
      the magnitude is PEFT's initial row norm times ``1 + 0.3·randn``.
    - adalora: ``init_r`` [8], ``target_r`` [4], ``alpha`` [16], ``targets``
      [q/k/v/o/gate/up/down], ``std`` [0.3] for A, B and E (E also gets mean 1, so no
      triplet is near zero), ``prune`` [False]: if True, a random global budget of
      ``target_r × #modules`` triplets is kept (as ``RankAllocator.mask_to_budget`` would)
      and written as ``rank_pattern`` bool masks, so the saved ranks differ per module.
    - ia3: ``targets`` [k_proj, v_proj, down_proj], ``feedforward`` [down_proj];
      ``ia3_l = 1 + 0.5·randn``.
    - prompt_tuning: ``num_virtual_tokens`` [5], ``std`` [0.5].
    - prefix_tuning: ``num_virtual_tokens`` [5], ``prefix_projection`` [False], ``std`` [1.0]
      (for every parameter: the embedding, and with projection the MLP weights, the last
      layer scaled down by its fan-in so the projected keys/values have std ≈ ``std``).
    - lora_embed_head: ``r`` [4], ``alpha`` [8], ``targets`` [embed_tokens, lm_head],
      ``with_attention`` [False] (adds q_proj, v_proj), ``std`` [0.3],
      ``ensure_weight_tying`` [False]. With a tied base and
      ``ensure_weight_tying=True`` PEFT builds lm_head's LoRA from the embedding's (lora_A =
      lora_embedding_B.T, lora_B = lora_embedding_A.T, ``peft/tuners/lora/model.py:314-322``)
      so the head delta is the transpose of the embedding delta.
    """
    from peft import get_peft_model

    config = _peft_config(kind, options)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if kind == "dora":
                if "lora_magnitude_vector" in name:
                    param.mul_(randn(param.shape, 0.3, 1.0))
                else:
                    param.copy_(randn(param.shape, options.get("std", 0.3)))
            elif kind == "adalora":
                mean = 1.0 if "lora_E" in name else 0.0
                param.copy_(randn(param.shape, options.get("std", 0.3), mean))
            elif kind == "ia3":
                param.copy_(randn(param.shape, 0.5, 1.0))
            elif kind == "prompt_tuning":
                param.copy_(randn(param.shape, options.get("std", 0.5)))
            elif kind == "prefix_tuning":
                std = options.get("std", 1.0)
                if name.endswith("transform.2.weight"):
                    std /= param.shape[1] ** 0.5
                param.copy_(randn(param.shape, std))
            elif kind == "lora_embed_head":
                param.copy_(randn(param.shape, options.get("std", 0.3)))
        if kind == "adalora" and options.get("prune", False):
            model.peft_config["default"].rank_pattern = _random_rank_pattern(model, generator)
    model.save_pretrained(out_dir)
    return out_dir


def _peft_config(kind: str, options: dict[str, Any]) -> Any:
    """The PEFT config of ``kind`` from ``make_kind_adapter``'s options."""
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
    )

    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if kind == "dora":
        return LoraConfig(
            r=options.get("r", 4),
            lora_alpha=options.get("alpha", 8),
            target_modules=options.get("targets", "all-linear"),
            use_dora=True,
            lora_dropout=0.0,
            bias="none",
        )
    if kind == "adalora":
        return AdaLoraConfig(
            init_r=options.get("init_r", 8),
            target_r=options.get("target_r", 4),
            lora_alpha=options.get("alpha", 16),
            target_modules=options.get("targets", all_linear),
            total_step=10,
            tinit=0,
            tfinal=0,
            lora_dropout=0.0,
        )
    if kind == "ia3":
        return IA3Config(
            target_modules=options.get("targets", ["k_proj", "v_proj", "down_proj"]),
            feedforward_modules=options.get("feedforward", ["down_proj"]),
        )
    if kind == "prompt_tuning":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.get("num_virtual_tokens", 5),
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    if kind == "prefix_tuning":
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.get("num_virtual_tokens", 5),
            prefix_projection=options.get("prefix_projection", False),
        )
    if kind == "lora_embed_head":
        targets = list(options.get("targets", ["embed_tokens", "lm_head"]))
        if options.get("with_attention", False):
            targets += ["q_proj", "v_proj"]
        return LoraConfig(
            r=options.get("r", 4),
            lora_alpha=options.get("alpha", 8),
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            ensure_weight_tying=options.get("ensure_weight_tying", False),
        )
    raise ValueError(f"unknown adapter kind {kind!r}; expected one of {KINDS}")


def _random_rank_pattern(model: Any, generator: torch.Generator) -> dict[str, list[bool]]:
    """Random AdaLoRA bool masks keeping ``target_r × #modules`` triplets in all (a budget).

    Keys are as ``RankAllocator.mask_to_budget`` makes them: parameter names of the wrapped
    transformers model, e.g. ``model.layers.0.self_attn.q_proj.lora_E.default``;
    ``save_pretrained`` strips the adapter name.
    """
    config = model.peft_config["default"]
    names = [
        name
        for name, _ in model.base_model.model.named_parameters()
        if name.endswith("lora_E.default")
    ]
    budget = config.target_r * len(names)
    scores = torch.rand(len(names) * config.init_r, generator=generator)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.argsort(descending=True)[:budget]] = True
    masks = keep.view(len(names), config.init_r)
    return {name: masks[i].tolist() for i, name in enumerate(names)}


def untie_embeddings(base_dir: Path, out_dir: Path) -> Path:
    """Copy a tied-embedding model in ``base_dir`` to ``out_dir`` as an untied one.

    lm_head gets a copy of the embedding matrix and the config says
    ``tie_word_embeddings: false``, so the untied model computes the same logits. An untied
    model is copied unchanged.
    """
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # The head as the model computes it: the embedding matrix itself when tied.
    head = model.get_output_embeddings().weight.detach().clone()
    model.config.tie_word_embeddings = False
    from_config: Any = AutoModelForCausalLM.from_config
    untied: Any = from_config(model.config, dtype=torch.float32)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.get_output_embeddings().weight.copy_(head)
    untied.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base_dir / name).exists():
            (out_dir / name).write_bytes((base_dir / name).read_bytes())
    return out_dir


@functools.lru_cache(maxsize=16)
def _load(base_dir: str, adapter_dir: str | None) -> Any:
    """The base model in float32, wrapped by PEFT with the adapter unless it is None (cached)."""
    from peft import PeftModel

    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def peft_logits(base_dir: Path, adapter_dir: Path | None, tokens: list[int]) -> torch.Tensor:
    """Float32 logits (vocab,) at the last of ``tokens`` from one full PEFT forward, no cache.

    For prompt tuning the virtual tokens come first (positions 0..n-1, ``tokens`` at n..);
    for prefix tuning the n prefix KV positions are a cache, ``tokens`` again at positions n...
    """
    model = _load(str(base_dir), None if adapter_dir is None else str(adapter_dir))
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    logits: torch.Tensor = out.logits[0, -1]
    return logits.float()


def peft_forward_greedy(
    base_dir: Path, adapter_dir: Path | None, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy continuation of ``prompt`` by teacher-forced PEFT forwards, one per token.

    Each step runs the full PeftModel forward on prompt + tokens so far (no KV cache, no
    ``generate``) and appends the argmax of the last position's logits. ``adapter_dir`` None
    runs the plain base model. Positions as in ``peft_logits``.
    """
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(peft_logits(base_dir, adapter_dir, tokens).argmax()))
    return tokens[len(prompt) :]


def adapter_summary(adapter_dir: Path) -> dict[str, Any]:
    """The saved tensors' shapes by key and the adapter config (for inspection and tests)."""
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"shapes": {k: tuple(v.shape) for k, v in sorted(tensors.items())}, "config": config}
