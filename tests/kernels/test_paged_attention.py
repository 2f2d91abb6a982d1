"""Paged attention: Triton kernels vs torch references vs a naive per-token loop.

The naive loop is the independent oracle: it follows the `Semantics:` block token by token,
gathers K/V page by page and uses no matmul. The references must match it to float32
round-off (they are the engine's CPU path, checked token-for-token against transformers); the
kernels must match the references. Without CUDA the kernels run under the Triton interpreter
(tests/conftest.py), so every case is kept small.
"""

import random
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor

from kernels import paged_attention as pa
from kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from kernels.triton_utils import HAS_TRITON

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@dataclass(frozen=True)
class PagedBatch:
    """Inputs of one attention call, named as in `kernels/paged_attention.py`."""

    q: Tensor  # (num_tokens, num_heads, head_dim)
    pool: Tensor  # (num_pages, num_kv_heads, head_dim)
    k_pages: Tensor  # int32 (num_seqs, table_len)
    v_pages: Tensor  # int32 (num_seqs, table_len)
    cu_seqlens_q: Tensor  # int32 (num_seqs + 1,)
    seq_lens: Tensor  # int32 (num_seqs,)
    scale: float

    def prefill_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.q, self.pool, self.k_pages, self.v_pages, self.cu_seqlens_q, self.seq_lens

    def decode_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.q, self.pool, self.k_pages, self.v_pages, self.seq_lens


def make_batch(
    chunks: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """One sequence per `(cached_len, chunk_len)`; q holds the chunks' tokens back to back.

    Every token takes two random pages of a shuffled pool (K and V interleaved, never
    contiguous); spare pages stand in for adapter weights. Slot entries past a sequence's end
    hold garbage (negative ids, ids past the pool) that the ops must never read.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [cached + chunk for cached, chunk in chunks]
    num_pages = 2 * sum(seq_lens) + 7
    table_len = max(seq_lens) + 3
    table_shape = (len(chunks), table_len)
    k_pages = torch.randint(-num_pages, 2 * num_pages, table_shape, generator=gen)
    v_pages = torch.randint(-num_pages, 2 * num_pages, table_shape, generator=gen)
    pages = torch.randperm(num_pages, generator=gen)
    next_page = 0
    for seq, seq_len in enumerate(seq_lens):
        token_pages = pages[next_page : next_page + 2 * seq_len].view(seq_len, 2)
        k_pages[seq, :seq_len], v_pages[seq, :seq_len] = token_pages[:, 0], token_pages[:, 1]
        next_page += 2 * seq_len
    chunk_lens = torch.tensor([chunk for _, chunk in chunks])
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int64), chunk_lens.cumsum(0)])
    q = torch.randn(int(cu_seqlens_q[-1]), num_heads, head_dim, generator=gen)
    pool = torch.randn(num_pages, num_kv_heads, head_dim, generator=gen)
    return PagedBatch(
        q=q.to(DEVICE, dtype),
        pool=pool.to(DEVICE, dtype),
        k_pages=k_pages.to(DEVICE, torch.int32),
        v_pages=v_pages.to(DEVICE, torch.int32),
        cu_seqlens_q=cu_seqlens_q.to(DEVICE, torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        scale=head_dim**-0.5,
    )


def make_decode_batch(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> PagedBatch:
    """A decode step: one new token per sequence, q of shape (num_seqs, num_heads, head_dim)."""
    chunks = [(seq_len - 1, 1) for seq_len in seq_lens]
    return make_batch(chunks, num_heads, num_kv_heads, head_dim, dtype)


def naive_attention(batch: PagedBatch) -> Tensor:
    """The `Semantics:` block, one query token at a time, in float32 on the CPU."""
    q, pool = batch.q.float().cpu(), batch.pool.float().cpu()
    k_pages, v_pages = batch.k_pages.cpu().long(), batch.v_pages.cpu().long()
    num_heads, num_kv_heads = q.shape[1], pool.shape[1]
    kv_head_of = torch.arange(num_heads) // (num_heads // num_kv_heads)  # (num_heads,)
    q_starts, seq_lens = batch.cu_seqlens_q.tolist(), batch.seq_lens.tolist()
    out = torch.zeros_like(q)
    for seq, seq_len in enumerate(seq_lens):
        q_len = q_starts[seq + 1] - q_starts[seq]
        for i in range(q_len):
            token, pos = q_starts[seq] + i, seq_len - q_len + i
            k = pool[k_pages[seq, : pos + 1]][:, kv_head_of]  # (pos + 1, num_heads, head_dim)
            v = pool[v_pages[seq, : pos + 1]][:, kv_head_of]
            scores = (k * q[token]).sum(-1) * batch.scale  # (pos + 1, num_heads)
            probs = torch.softmax(scores, dim=0)
            out[token] = (probs[:, :, None] * v).sum(0)
    return out


# (cached_len, chunk_len) per sequence: odd batch sizes, lengths crossing the 16-wide
# interpreter blocks, prefixes continuing a partly computed sequence.
_rng = random.Random(0)
PREFILL_LAYOUTS = {
    "one_token": [(0, 1)],
    "one_prompt": [(0, 33)],
    "one_continued": [(40, 17)],
    "three_prompts": [(0, 5), (0, 17), (0, 2)],
    "three_continued": [(16, 1), (5, 33), (63, 2)],
    "seven_mixed": [(0, 1), (1, 1), (0, 2), (3, 5), (0, 17), (15, 33), (0, 66)],
    "twenty_five_small": [(_rng.randint(0, 40), _rng.randint(1, 6)) for _ in range(25)],
}
DECODE_LAYOUTS = {
    "one": [1],
    "three": [5, 17, 2],
    "seven": [1, 2, 5, 17, 33, 64, 100],
    "thirty_three": [_rng.randint(1, 70) for _ in range(33)],
}
# (num_heads, num_kv_heads, head_dim): GQA ratios 1, 2, 4; head_dim padded or a power of two.
SHAPES = [(2, 2, 32), (4, 2, 24), (4, 1, 40), (8, 2, 64)]
SHAPE_IDS = [f"h{h}_kv{kv}_d{d}" for h, kv, d in SHAPES]
# The interpreter runs one program at a time, so the kernel tests pair each layout with two
# shapes instead of all four (every shape still meets three or four layouts).
PREFILL_KERNEL_CASES = [
    pytest.param(layout, SHAPES[i % 4], id=f"{name}-{SHAPE_IDS[i % 4]}")
    for offset in (0, 2)
    for i, (name, layout) in enumerate(PREFILL_LAYOUTS.items(), start=offset)
]
# Low-precision kernels round the softmax weights to the input dtype before P @ V, as
# FlashAttention does; the references keep them in float32.
LOW_PRECISION_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", PREFILL_LAYOUTS.values(), ids=PREFILL_LAYOUTS.keys())
def test_prefill_ref_matches_naive_loop(
    layout: list[tuple[int, int]], shape: tuple[int, int, int]
) -> None:
    batch = make_batch(layout, *shape)
    out = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    torch.testing.assert_close(out.cpu(), naive_attention(batch), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("seq_lens", DECODE_LAYOUTS.values(), ids=DECODE_LAYOUTS.keys())
def test_decode_ref_matches_naive_loop(seq_lens: list[int], shape: tuple[int, int, int]) -> None:
    batch = make_decode_batch(seq_lens, *shape)
    out = paged_decode_attention_ref(*batch.decode_args(), batch.scale)
    torch.testing.assert_close(out.cpu(), naive_attention(batch), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refs_low_precision_compute_in_float32(dtype: torch.dtype) -> None:
    batch = make_batch(PREFILL_LAYOUTS["three_continued"], 4, 2, 24, dtype)
    expected = naive_attention(batch)  # float32 math on the rounded inputs
    prefill = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    assert prefill.dtype == dtype
    torch.testing.assert_close(prefill.cpu(), expected.to(dtype))
    decode_batch = make_decode_batch(DECODE_LAYOUTS["seven"], 4, 2, 24, dtype=dtype)
    decode = paged_decode_attention_ref(*decode_batch.decode_args(), decode_batch.scale)
    torch.testing.assert_close(decode.cpu(), naive_attention(decode_batch).to(dtype))


def test_decode_ref_equals_prefill_ref_with_one_token_chunks() -> None:
    batch = make_decode_batch(DECODE_LAYOUTS["seven"], 4, 2, 40)
    decode = paged_decode_attention_ref(*batch.decode_args(), batch.scale)
    prefill = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    torch.testing.assert_close(decode, prefill, atol=1e-6, rtol=1e-5)


def test_chunked_prefill_ref_equals_one_shot_prefill() -> None:
    """Prefilling 17 tokens then 16 more gives the rows of prefilling all 33 at once."""
    whole = make_batch([(0, 33)], 4, 2, 24)
    out_whole = paged_prefill_attention_ref(*whole.prefill_args(), whole.scale)
    split_at = 17
    for cached, q_rows in ((0, slice(0, split_at)), (split_at, slice(split_at, 33))):
        q_len = q_rows.stop - q_rows.start
        chunk = replace(
            whole,
            q=whole.q[q_rows],
            cu_seqlens_q=torch.tensor([0, q_len], dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor([cached + q_len], dtype=torch.int32, device=DEVICE),
        )
        out_chunk = paged_prefill_attention_ref(*chunk.prefill_args(), chunk.scale)
        torch.testing.assert_close(out_chunk, out_whole[q_rows], atol=1e-6, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize(("layout", "shape"), PREFILL_KERNEL_CASES)
def test_prefill_kernel_matches_ref(
    layout: list[tuple[int, int]], shape: tuple[int, int, int]
) -> None:
    batch = make_batch(layout, *shape)
    out = paged_prefill_attention(*batch.prefill_args(), batch.scale)
    expected = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("seq_lens", DECODE_LAYOUTS.values(), ids=DECODE_LAYOUTS.keys())
def test_decode_kernel_matches_ref(seq_lens: list[int], shape: tuple[int, int, int]) -> None:
    batch = make_decode_batch(seq_lens, *shape)
    out = paged_decode_attention(*batch.decode_args(), batch.scale)
    expected = paged_decode_attention_ref(*batch.decode_args(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", LOW_PRECISION_TOL.keys(), ids=str)
@pytest.mark.parametrize("shape", [(4, 1, 40), (2, 2, 64)], ids=["h4_kv1_d40", "h2_kv2_d64"])
def test_kernels_low_precision(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    tol = LOW_PRECISION_TOL[dtype]
    batch = make_batch(PREFILL_LAYOUTS["seven_mixed"], *shape, dtype=dtype)
    out = paged_prefill_attention(*batch.prefill_args(), batch.scale)
    expected = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    batch = make_decode_batch(DECODE_LAYOUTS["seven"], *shape, dtype=dtype)
    out = paged_decode_attention(*batch.decode_args(), batch.scale)
    expected = paged_decode_attention_ref(*batch.decode_args(), batch.scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def _strided(batch: PagedBatch) -> PagedBatch:
    """The same inputs as views: q inside a fused QKV projection, page tables in wider ones."""
    num_rows, num_heads, head_dim = batch.q.shape
    num_kv_heads = batch.pool.shape[1]
    qkv = torch.zeros(num_rows, num_heads + 2 * num_kv_heads, head_dim, device=DEVICE)
    qkv[:, :num_heads] = batch.q  # (num_rows, q heads | k heads | v heads, head_dim)
    num_seqs, table_len = batch.k_pages.shape
    tables = torch.zeros(2, num_seqs, table_len + 9, dtype=torch.int32, device=DEVICE)
    tables[:, :, 4 : 4 + table_len] = torch.stack([batch.k_pages, batch.v_pages])
    return replace(
        batch,
        q=qkv[:, :num_heads],
        k_pages=tables[0, :, 4 : 4 + table_len],
        v_pages=tables[1, :, 4 : 4 + table_len],
    )


@pytest.mark.parametrize(
    "use_triton", [False, pytest.param(True, marks=requires_triton)], ids=["ref", "triton"]
)
def test_ops_accept_strided_views(use_triton: bool) -> None:
    prefill = paged_prefill_attention if use_triton else paged_prefill_attention_ref
    decode = paged_decode_attention if use_triton else paged_decode_attention_ref
    batch = make_batch(PREFILL_LAYOUTS["three_continued"], 4, 2, 24)
    strided = _strided(batch)
    assert not strided.q.is_contiguous() and not strided.k_pages.is_contiguous()
    out = prefill(*strided.prefill_args(), batch.scale)
    expected = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    batch = make_decode_batch(DECODE_LAYOUTS["seven"], 4, 2, 24)
    out = decode(*_strided(batch).decode_args(), batch.scale)
    expected = paged_decode_attention_ref(*batch.decode_args(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
def test_kernels_with_gpu_block_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA block table's 64-wide tiles, exercised under the interpreter."""
    monkeypatch.setitem(pa._BLOCKS, ("cpu", 256), pa._BLOCKS[("cuda", 128)])
    batch = make_batch([(0, 70), (50, 33), (3, 1)], 4, 1, 40)
    out = paged_prefill_attention(*batch.prefill_args(), batch.scale, max_seqlen_q=70)
    expected = paged_prefill_attention_ref(*batch.prefill_args(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    batch = make_decode_batch([1, 64, 65, 130], 4, 1, 40)
    out = paged_decode_attention(*batch.decode_args(), batch.scale)
    expected = paged_decode_attention_ref(*batch.decode_args(), batch.scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@requires_triton
def test_kernels_empty_batch() -> None:
    batch = make_batch([(0, 1)], 4, 2, 24)
    empty = replace(
        batch,
        q=batch.q[:0],
        k_pages=batch.k_pages[:0],
        v_pages=batch.v_pages[:0],
        cu_seqlens_q=batch.cu_seqlens_q[:1],
        seq_lens=batch.seq_lens[:0],
    )
    assert paged_prefill_attention(*empty.prefill_args(), empty.scale).shape == (0, 4, 24)
    assert paged_decode_attention(*empty.decode_args(), empty.scale).shape == (0, 4, 24)


def _bad_inputs() -> dict[str, PagedBatch]:
    batch = make_batch([(2, 3), (0, 1)], 4, 2, 24)
    return {
        "pool_dtype": replace(batch, pool=batch.pool.half()),
        "int64_pages": replace(batch, k_pages=batch.k_pages.long()),
        "page_table_rows": replace(batch, v_pages=batch.v_pages[:1]),
        "seq_lens_length": replace(batch, seq_lens=batch.seq_lens[:1]),
        "seq_lens_dtype": replace(batch, seq_lens=batch.seq_lens.long()),
        "cu_seqlens_length": replace(batch, cu_seqlens_q=batch.cu_seqlens_q[:2]),
        "heads_not_multiple": replace(batch, pool=torch.cat([batch.pool, batch.pool[:, :1]], 1)),
        "head_dim": replace(batch, pool=batch.pool[:, :, :16]),
        "head_dim_stride": replace(batch, q=batch.q.transpose(1, 2).contiguous().transpose(1, 2)),
    }


@requires_triton
@pytest.mark.parametrize("case", _bad_inputs().keys())
def test_prefill_launcher_rejects_bad_inputs(case: str) -> None:
    batch = _bad_inputs()[case]
    with pytest.raises(AssertionError):
        paged_prefill_attention(*batch.prefill_args(), batch.scale)


@requires_triton
@pytest.mark.parametrize("case", [c for c in _bad_inputs() if not c.startswith("cu_seqlens")])
def test_decode_launcher_rejects_bad_inputs(case: str) -> None:
    batch = _bad_inputs()[case]
    decode = replace(batch, q=batch.q[:2])  # one query row per sequence
    with pytest.raises(AssertionError):
        paged_decode_attention(*decode.decode_args(), batch.scale)


def test_decode_rejects_a_query_count_other_than_num_seqs() -> None:
    batch = make_decode_batch(DECODE_LAYOUTS["three"], 4, 2, 24)
    short = replace(batch, q=batch.q[:2])
    with pytest.raises(AssertionError):
        paged_decode_attention_ref(*short.decode_args(), batch.scale)
    if HAS_TRITON:
        with pytest.raises(AssertionError):
            paged_decode_attention(*short.decode_args(), batch.scale)
