"""The decoder: one plain ``nn.Module`` for the Llama, Mistral and Qwen2 families.

Module names follow transformers', except that q, k and v run as one packed ``qkv_proj``
and gate and up as one ``gate_up_proj`` (`engine/packed.py`); the loader maps a checkpoint's
tensor names onto them. The model keeps no per-request state: every forward receives the
batch's positions, attention metadata and the page pool's per-layer tensors as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from engine.arch import ModelArch
from engine.attention import ATTENTION_BACKENDS, AttentionBackend
from engine.embed_head import HeadLora, add_embedding_lora
from engine.forward_batch import ForwardBatch
from engine.kinds import adjust_output, adjust_packed, scale_input
from engine.lora import LoraBackend
from engine.lora_backends import LORA_BACKENDS
from engine.naming import PACKED
from engine.packed import PackedLinear
from engine.parallel.group import SINGLE, Collectives
from engine.rope import RotaryEmbedding
from engine.virtual_tokens import embed_virtual_tokens
from kernels.nf4 import NF4Weight, nf4_linear_tiled
from kernels.nf4_matmul import nf4_linear

NF4Matmul = Callable[[torch.Tensor, NF4Weight], torch.Tensor]

# The dequantize-matmul of NF4 linear layers: the row-tiled torch form on the CPU, the fused
# Triton kernels on GPUs.
NF4_BACKENDS: dict[str, NF4Matmul] = {"torch": nf4_linear_tiled, "triton": nf4_linear}


@dataclass(frozen=True)
class Backends:
    """The kernel implementations a model runs (variation points, chosen once at load), and
    the collectives of its tensor-parallel group (the identity on one device)."""

    attention: AttentionBackend
    lora: LoraBackend
    nf4: NF4Matmul
    collectives: Collectives = SINGLE

    @classmethod
    def select(cls, name: str | None, device: torch.device) -> Backends:
        """By name ("torch" references, "triton" kernels); by default Triton on CUDA only."""
        name = kernel_name(name, device)
        return cls(ATTENTION_BACKENDS[name], LORA_BACKENDS[name](), NF4_BACKENDS[name])


def kernel_name(name: str | None, device: torch.device) -> str:
    """The ``kernels=`` choice resolved: the name given, else Triton on CUDA and torch
    elsewhere."""
    name = name or ("triton" if device.type == "cuda" else "torch")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown kernels {name!r}; one of {sorted(ATTENTION_BACKENDS)}")
    return name


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as transformers does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, rope: RotaryEmbedding, backends: Backends):
        super().__init__()
        self.arch = arch
        self.layer = layer
        # This worker's heads (all of them on one device): q, k and v are column-parallel.
        workers = backends.collectives.size
        self.num_heads, self.num_kv_heads = arch.num_heads // workers, arch.num_kv_heads // workers
        q_width, kv_width = self.num_heads * arch.head_dim, self.num_kv_heads * arch.head_dim
        self.qkv_widths = [q_width, kv_width, kv_width]
        qkv = tuple(zip(PACKED["qkv_proj"], self.qkv_widths, strict=True))  # ((q_proj, width), ...)
        self.qkv_proj = PackedLinear(arch.hidden_size, qkv, arch.qkv_bias)
        self.o_proj = nn.Linear(q_width, arch.hidden_size, bias=arch.o_bias)
        self.scale = arch.head_dim**-0.5
        self.rope = rope  # shared by all layers; owns no parameters
        self.backends = backends

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        arch, pool, lora, kinds = self.arch, batch.pools[self.layer], batch.lora, batch.kinds
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (num_tokens, q_width + 2 · kv_width)
        slices = self.qkv_proj.slices
        if lora is not None:
            self.backends.lora.apply_packed(
                lora, pool, self.layer, slices.names, x, qkv, slices.column_offsets
            )
        if kinds is not None:
            adjust_packed(kinds, pool, self.layer, slices.names, x, qkv, slices.column_offsets,
                          self.qkv_proj.bias, self.qkv_proj.slice_forward)  # fmt: skip
        q, k, v = qkv.split(self.qkv_widths, dim=-1)  # column views
        q = q.view(num_tokens, self.num_heads, arch.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, arch.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, arch.head_dim)
        q, k = self.rope(positions, q, k)
        kv_pool = pool.view(-1, self.num_kv_heads, arch.head_dim)  # (num_pages, kv_heads, hd)
        kv_pool[batch.attn.new_k_pages] = k
        kv_pool[batch.attn.new_v_pages] = v
        attn = self.backends.attention.forward(q, kv_pool, batch.attn, self.scale)
        attn = attn.reshape(num_tokens, self.num_heads * arch.head_dim)
        if kinds is None:
            out: torch.Tensor = self.o_proj(attn)
        else:
            out = self.o_proj(scale_input(kinds, pool, self.layer, "o_proj", attn))
        if lora is not None:
            self.backends.lora.apply(lora, pool, self.layer, "o_proj", attn, out)
        if kinds is not None:
            adjust_output(kinds, pool, self.layer, "o_proj", out, self.o_proj.bias)
        return self.backends.collectives.all_reduce(out)  # o is row-parallel


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, backends: Backends) -> None:
        super().__init__()
        # This worker's intermediate columns: gate and up column-, down row-parallel.
        h, i, bias = (
            arch.hidden_size,
            arch.intermediate_size // backends.collectives.size,
            arch.mlp_bias,
        )
        self.layer = layer
        self.intermediate_size = i
        gate_up = tuple(zip(PACKED["gate_up_proj"], (i, i), strict=True))
        self.gate_up_proj = PackedLinear(h, gate_up, bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.backends = backends

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        lora, kinds, pool = batch.lora, batch.kinds, batch.pools[self.layer]
        gate_up = self.gate_up_proj(x)  # (num_tokens, 2 · intermediate_size)
        slices = self.gate_up_proj.slices
        if lora is not None:
            self.backends.lora.apply_packed(
                lora, pool, self.layer, slices.names, x, gate_up, slices.column_offsets
            )
        if kinds is not None:
            adjust_packed(kinds, pool, self.layer, slices.names, x, gate_up,
                          slices.column_offsets, self.gate_up_proj.bias,
                          self.gate_up_proj.slice_forward)  # fmt: skip
        i = self.intermediate_size
        hidden = F.silu(gate_up[:, :i]) * gate_up[:, i:]
        if kinds is None:
            out: torch.Tensor = self.down_proj(hidden)
        else:
            out = self.down_proj(scale_input(kinds, pool, self.layer, "down_proj", hidden))
        if lora is not None:
            self.backends.lora.apply(lora, pool, self.layer, "down_proj", hidden, out)
        if kinds is not None:
            adjust_output(kinds, pool, self.layer, "down_proj", out, self.down_proj.bias)
        return self.backends.collectives.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, rope: RotaryEmbedding, backends: Backends):
        super().__init__()
        self.self_attn = Attention(arch, layer, rope, backends)
        self.mlp = MLP(arch, layer, backends)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), batch)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x), batch)
        return out


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding, backends: Backends):
        super().__init__()
        # This worker's rows of the vocabulary (all of them on one device).
        vocab = backends.collectives.shard.rows(arch.vocab_size)
        self.embed_tokens = nn.Embedding(vocab, arch.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, rope, backends) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only language model over packed, paged batches.

    Args:
        config: the transformers config of the checkpoint.
        backends: the paged-attention and LoRA ops to run.
    """

    def __init__(self, config: PretrainedConfig, backends: Backends) -> None:
        super().__init__()
        self.arch = arch = ModelArch.from_config(config)
        self.collectives = backends.collectives
        self.rotary_emb = RotaryEmbedding(config, arch.head_dim, arch.max_positions)
        self.model = DecoderModel(arch, self.rotary_emb, backends)
        vocab = self.collectives.shard.rows(arch.vocab_size)
        self.lm_head = nn.Linear(arch.hidden_size, vocab, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config ties them.

        Call again after ``to_empty``: materialising a meta model unties shared parameters.
        """
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Hidden states (num_tokens, hidden_size) of packed tokens.

        Args:
            input_ids: (num_tokens,) decodes first, then prefill chunks (see AttentionMetadata).
            positions: (num_tokens,) each token's position in its sequence.
            batch: the KV-cache and adapter metadata and the page pool.
        """
        x = self._embed(input_ids)
        if batch.kinds is not None:
            add_embedding_lora(batch.kinds, batch.pools, input_ids, x, self.arch.vocab_size)
            # prompt tuning's virtual tokens replace placeholders
            x = embed_virtual_tokens(batch.kinds, batch.pools, positions, x)
        for layer in self.model.layers:
            x = layer(positions, x, batch)
        out: torch.Tensor = self.model.norm(x)
        return out

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``input_ids``; across workers, each looks up the ids in its rows
        of the vocabulary, zeros for the rest, and an all-reduce puts the rows together."""
        table = self.model.embed_tokens
        collectives = self.collectives
        if collectives.size == 1:
            out: torch.Tensor = table(input_ids)
            return out
        rows = table.num_embeddings
        local = input_ids - collectives.shard.rank * rows
        mine = (local >= 0) & (local < rows)
        x = table(local.clamp(0, rows - 1)) * mine.unsqueeze(-1).to(table.weight.dtype)
        return collectives.all_reduce(x, "embedding")

    def compute_logits(self, hidden: torch.Tensor, head: HeadLora | None = None) -> torch.Tensor:
        """Float32 logits (num_rows, vocab_size), as transformers' ``generate`` casts them.

        Args:
            hidden: (num_rows, hidden_size) final hidden states.
            head: which of those rows get which adapter's LoRA on the head (added in the
                model's dtype, before the cast, as PEFT does); None for none.
        """
        logits: torch.Tensor = self.lm_head(hidden)
        if head is not None:
            head.add(hidden, logits)
        if self.collectives.size == 1:
            return logits.float()
        # Each worker's rows of the vocabulary side by side, less the last part's padding.
        return self.collectives.all_gather(logits)[:, : self.arch.vocab_size].float()
