"""Paged attention over the unified page pool: chunked prefill and decode.

The KV cache shares one page pool per layer with the adapter weights (S-LoRA's unified paging).
A page is one vector of `num_kv_heads * head_dim` elements holding one token's K *or* one
token's V for one layer. Per sequence, `k_pages` and `v_pages` map a token position to the page
holding its K and its V. The K/V of the tokens in this forward are in the pool before attention.

Semantics:
    G = num_heads // num_kv_heads                       (query heads sharing one KV head)
    For sequence s with context length L = seq_lens[s] (cached + new tokens) and chunk length
    Q = cu_seqlens_q[s + 1] - cu_seqlens_q[s], query row t = cu_seqlens_q[s] + i (0 <= i < Q)
    sits at position p = L - Q + i, and for every query head h:
        K[j] = pool[k_pages[s, j], h // G, :]           V[j] = pool[v_pages[s, j], h // G, :]
        score[j] = scale * dot(q[t, h, :], K[j])         for j in 0 .. p (causal, inclusive)
        out[t, h, :] = sum_j softmax(score)[j] * V[j]
    Decode is the same with Q = 1: q row s sits at position L - 1 and sees keys 0 .. L - 1.
    Products and softmax accumulate in float32; out has q's dtype. Page-table entries at positions
    >= L are never read, so they may hold anything (stale or out-of-range page ids).

Args (shared by every op here):
    q: (num_tokens, num_heads, head_dim) for prefill, (num_seqs, num_heads, head_dim) for decode;
        float32, bfloat16 or float16.
    pool: (num_pages, num_kv_heads, head_dim), q's dtype; num_heads % num_kv_heads == 0.
    k_pages, v_pages: int32 (num_seqs, table_len): page id of position j's K / V, table_len >= L.
    cu_seqlens_q: int32 (num_seqs + 1,): chunk offsets into q's rows, cu_seqlens_q[0] == 0.
    seq_lens: int32 (num_seqs,): context length after this step, 1 <= Q <= L.
    scale: softmax scale, usually 1 / sqrt(head_dim).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.triton_utils import HAS_TRITON, can_launch_triton, next_power_of_2

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Torch references (also the CPU backend)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatherPlan:
    """What the references derive from a batch's metadata alone, the same in every layer, so
    a caller running many layers over one batch computes it once (``plan_decode`` /
    ``plan_prefill``) and passes it to each call.

    Attributes:
        k_index / v_index: rows of the pool viewed as (num_pages · num_kv_heads, head_dim)
            that make K / V head-major, (num_seqs, num_kv_heads, max_len, head_dim), in one
            index_select; positions past a sequence's end point at page 0.
        mask: bool, broadcast to the scores (num_seqs, num_kv_heads, rows, max_len).
        max_len: keys per sequence after padding.
        rows: prefill only: each packed query row's row in the padded
            (num_seqs · max_q) layout.
        max_q: prefill only: query rows per sequence after padding.
    """

    k_index: torch.Tensor
    v_index: torch.Tensor
    mask: torch.Tensor
    max_len: int
    rows: torch.Tensor | None = None
    max_q: int = 1


def _head_major_index(table: torch.Tensor, valid: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(num_seqs · num_kv_heads · max_len,) pool rows for a (num_seqs, max_len) page table."""
    heads = torch.arange(num_kv_heads, device=table.device, dtype=table.dtype)
    pages = torch.where(valid, table, 0)
    return (pages[:, None, :] * num_kv_heads + heads[None, :, None]).view(-1)


def _gather(pool: torch.Tensor, index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """K or V head-major, (num_seqs, num_kv_heads, max_len, head_dim), in float32: one copy
    straight from the pool, no permute after."""
    num_kv_heads, head_dim = pool.shape[1], pool.shape[2]
    rows = pool.reshape(-1, head_dim).index_select(0, index)
    return rows.view(num_seqs, num_kv_heads, -1, head_dim).float()


def plan_decode(
    k_pages: torch.Tensor, v_pages: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int
) -> GatherPlan:
    """The decode reference's :class:`GatherPlan` (one device read: the longest context)."""
    max_len = int(seq_lens.max())
    assert int(seq_lens.min()) >= 1 and max_len <= k_pages.shape[1], "bad seq_lens"
    valid = torch.arange(max_len, device=k_pages.device)[None, :] < seq_lens[:, None]
    return GatherPlan(
        k_index=_head_major_index(k_pages[:, :max_len], valid, num_kv_heads),
        v_index=_head_major_index(v_pages[:, :max_len], valid, num_kv_heads),
        mask=valid[:, None, None, :],  # (num_seqs, 1, 1, max_len)
        max_len=max_len,
    )


def plan_prefill(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    group: int,
) -> GatherPlan:
    """The prefill reference's :class:`GatherPlan`: queries padded to the longest chunk,
    keys to the longest context, causal with each chunk's offset."""
    q_starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    num_seqs = len(lens)
    q_lens = [q_starts[s + 1] - q_starts[s] for s in range(num_seqs)]
    for q_len, seq_len in zip(q_lens, lens, strict=True):
        assert 0 <= q_len <= seq_len <= k_pages.shape[1], "bad lengths for a sequence"
    max_q, max_len = max(q_lens), max(lens)
    device = k_pages.device
    rows = torch.tensor(
        [s * max_q + i for s, q_len in enumerate(q_lens) for i in range(q_len)], device=device
    )
    kv_pos = torch.arange(max_len, device=device)
    valid = kv_pos[None, :] < seq_lens[:, None]  # (num_seqs, max_len)
    # Query i of sequence s sits at position seq_len - q_len + i: causal with that offset.
    # Padded query rows see key 0 only (their output is dropped), so no row is all -inf.
    offsets = torch.tensor([n - m for n, m in zip(lens, q_lens, strict=True)], device=device)
    steps = torch.arange(max_q, device=device)[None, :]
    q_pos = offsets[:, None] + steps  # (num_seqs, max_q)
    q_real = steps < torch.tensor(q_lens, device=device)[:, None]
    allowed = (kv_pos[None, None, :] <= q_pos[:, :, None]) & q_real[:, :, None]
    allowed[:, :, 0] |= ~q_real
    mask = allowed[:, None].expand(num_seqs, group, max_q, max_len)
    return GatherPlan(
        k_index=_head_major_index(k_pages[:, :max_len], valid, num_kv_heads),
        v_index=_head_major_index(v_pages[:, :max_len], valid, num_kv_heads),
        mask=mask.reshape(num_seqs, 1, group * max_q, max_len),
        max_len=max_len,
        rows=rows,
        max_q=max_q,
    )


def paged_prefill_attention_ref(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    plan: GatherPlan | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks over their paged context (see `Semantics`).

    Every chunk at once: queries padded to the longest chunk, keys to the longest context,
    one attention call for the batch (a loop over sequences costs more in dispatch than the
    padding costs in arithmetic at the sizes a CPU serves). ``plan``: this batch's
    :func:`plan_prefill`, computed here when None.
    """
    _check_inputs(q, pool, k_pages, v_pages, seq_lens)
    _check_int32_vector(cu_seqlens_q, k_pages.shape[0] + 1, "cu_seqlens_q")
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return torch.empty_like(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = pool.shape[1]
    group = num_heads // num_kv_heads
    if plan is None:
        assert int(cu_seqlens_q[0]) == 0 and int(cu_seqlens_q[-1]) == q.shape[0], (
            "cu_seqlens_q must span q's rows"
        )
        plan = plan_prefill(k_pages, v_pages, cu_seqlens_q, seq_lens, num_kv_heads, group)
    assert plan.rows is not None and plan.rows.shape[0] == q.shape[0], "plan of another batch"
    max_q = plan.max_q
    padded = q.new_zeros(num_seqs * max_q, num_heads, head_dim).index_copy_(0, plan.rows, q)
    # (num_seqs, num_kv_heads, group · max_q, head_dim): a kv head's query heads as its rows
    q_grouped = (
        padded.float()
        .view(num_seqs, max_q, num_kv_heads, group, head_dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    )
    k = _gather(pool, plan.k_index, num_seqs)
    v = _gather(pool, plan.v_index, num_seqs)
    out = F.scaled_dot_product_attention(q_grouped, k, v, attn_mask=plan.mask, scale=scale)
    # back to packed rows: (num_seqs · max_q, num_heads, head_dim)
    out = (
        out.view(num_seqs, num_kv_heads, group, max_q, head_dim)
        .permute(0, 3, 1, 2, 4)
        .reshape(num_seqs * max_q, num_heads, head_dim)
    )
    return out.index_select(0, plan.rows).to(q.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    plan: GatherPlan | None = None,
) -> torch.Tensor:
    """One query per sequence over its paged context, batched over sequences (see
    `Semantics`). ``plan``: this batch's :func:`plan_decode`, computed here when None."""
    _check_inputs(q, pool, k_pages, v_pages, seq_lens)
    assert q.shape[0] == k_pages.shape[0], "decode takes exactly one query row per sequence"
    if q.shape[0] == 0:
        return torch.empty_like(q)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[1]
    group = num_heads // num_kv_heads
    if plan is None:
        plan = plan_decode(k_pages, v_pages, seq_lens, num_kv_heads)
    k, v = _gather(pool, plan.k_index, num_seqs), _gather(pool, plan.v_index, num_seqs)
    # Grouped-query attention without repeating K/V: a kv head's `group` query heads are its
    # `group` query rows. (num_seqs, num_kv_heads, group, head_dim)
    q_grouped = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(q_grouped, k, v, attn_mask=plan.mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Checks shared by the references and the launchers (shapes only: no device sync)
# ----------------------------------------------------------------------------------------------


def _check_int32_vector(t: torch.Tensor, length: int, name: str) -> None:
    assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"
    assert t.shape == (length,), f"{name} must have shape ({length},), got {tuple(t.shape)}"


def _check_inputs(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    assert q.dtype in _DTYPES, f"unsupported dtype {q.dtype}"
    assert pool.dtype == q.dtype, f"pool dtype {pool.dtype} != q dtype {q.dtype}"
    assert q.dim() == 3 and pool.dim() == 3, "q and pool must be 3-D (rows, heads, head_dim)"
    assert q.shape[2] == pool.shape[2], f"head_dim differs: q {q.shape[2]}, pool {pool.shape[2]}"
    assert q.shape[1] % pool.shape[1] == 0, "num_heads must be a multiple of num_kv_heads"
    for name, table in (("k_pages", k_pages), ("v_pages", v_pages)):
        assert table.dtype == torch.int32, f"{name} must be int32, got {table.dtype}"
        assert table.dim() == 2, f"{name} must be (num_seqs, table_len)"
    assert k_pages.shape == v_pages.shape, "k_pages and v_pages shapes differ"
    _check_int32_vector(seq_lens, k_pages.shape[0], "seq_lens")


def _check_launch(q: torch.Tensor, pool: torch.Tensor, *metadata: torch.Tensor) -> None:
    """Layout the kernels rely on: unit stride along head_dim, page-table rows, 1-D metadata."""
    assert can_launch_triton(q.device), f"no Triton for {q.device} tensors: use the *_ref ops"
    assert q.stride(2) == 1 and pool.stride(2) == 1, "q and pool need a unit head_dim stride"
    for t in (pool, *metadata):
        assert t.device == q.device, f"tensors on different devices: {t.device} vs {q.device}"
    for t in metadata:
        assert t.stride(-1) == 1, "page tables and length vectors need a unit last stride"


# ----------------------------------------------------------------------------------------------
# Block sizes (tuning is data)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    block_m: int  # query rows per prefill program
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Keyed by (device type, largest padded head_dim). The CUDA rows are FlashAttention-2-style
# starting points, not yet tuned on H100. The interpreter uses the smallest tl.dot tiles (16) so
# CPU tests cross many block boundaries.
_BLOCKS: dict[tuple[str, int], _Blocks] = {
    ("cpu", 256): _Blocks(block_m=16, block_n=16, num_warps=1, num_stages=1),
    ("cuda", 64): _Blocks(block_m=64, block_n=64, num_warps=4, num_stages=2),
    ("cuda", 128): _Blocks(block_m=64, block_n=64, num_warps=4, num_stages=2),
    ("cuda", 256): _Blocks(block_m=64, block_n=32, num_warps=8, num_stages=2),
}


def _blocks_for(device: torch.device, block_d: int) -> _Blocks:
    fitting = [key for key in _BLOCKS if key[0] == device.type and block_d <= key[1]]
    assert fitting, f"no paged-attention block config for {device.type}, head_dim {block_d}"
    return _BLOCKS[min(fitting)]


# ----------------------------------------------------------------------------------------------
# Triton kernels (Linux only)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_utils import dot_operand_dtype

    # Both kernels run FlashAttention-2's online softmax in float32, on exp2 with the scale
    # folded into log2 units. tl.dot uses input_precision="ieee" so float32 inputs are never
    # rounded to tf32 on tensor-core GPUs (the float32 engine must match the reference); the
    # option is ignored for 16-bit inputs. DOT_DTYPE is the input dtype except under the
    # interpreter (see `dot_operand_dtype`), so the casts to it are no-ops on GPUs.
    @triton.jit
    def _paged_prefill_kernel(  # type: ignore[no-untyped-def]
        q_ptr, pool_ptr, k_pages_ptr, v_pages_ptr, cu_seqlens_q_ptr, seq_lens_ptr, out_ptr,
        scale_log2,  # scale * log2(e): the softmax runs on exp2
        stride_q_tok, stride_q_head, stride_pool_page, stride_pool_head,
        stride_k_pages_seq, stride_v_pages_seq, stride_out_tok, stride_out_head,
        head_dim,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M query rows of one sequence's chunk, one query head.
        q_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        if q_block * BLOCK_M >= q_len:  # the grid covers the longest chunk in the batch
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix_len = seq_len - q_len  # tokens cached before this chunk

        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the chunk
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = offs_m < q_len
        d_mask = offs_d < head_dim
        q_pos = prefix_len + offs_m  # (BLOCK_M,) absolute positions
        q_rows = q_start + offs_m  # (BLOCK_M,) rows of q and out
        md_mask = row_mask[:, None] & d_mask[None, :]
        q_ptrs = q_ptr + head * stride_q_head + q_rows[:, None] * stride_q_tok + offs_d[None, :]
        q = tl.load(q_ptrs, mask=md_mask, other=0.0).to(DOT_DTYPE)  # (BLOCK_M, BLOCK_D)

        kv_head_ptr = pool_ptr + (head // GROUP_SIZE) * stride_pool_head
        k_table = k_pages_ptr + seq * stride_k_pages_seq
        v_table = v_pages_ptr + seq * stride_v_pages_seq
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Causal: this block's last row sees keys up to its own position. Every row sees key 0,
        # so m_i is finite after the first step and the exp2 below never meets -inf - -inf.
        kv_end = tl.minimum(seq_len, prefix_len + (q_block + 1) * BLOCK_M)
        for kv_start in range(0, kv_end, BLOCK_N):
            kv_pos = kv_start + offs_n  # (BLOCK_N,)
            kv_mask = kv_pos < kv_end
            kv_d_mask = kv_mask[:, None] & d_mask[None, :]
            k_pages = tl.load(k_table + kv_pos, mask=kv_mask, other=0).to(tl.int64)
            k_ptrs = kv_head_ptr + k_pages[:, None] * stride_pool_page + offs_d[None, :]
            k = tl.load(k_ptrs, mask=kv_d_mask, other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            allowed = (kv_pos[None, :] <= q_pos[:, None]) & kv_mask[None, :]
            scores = tl.where(allowed, scores, float("-inf"))  # (BLOCK_M, BLOCK_N)

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_pages = tl.load(v_table + kv_pos, mask=kv_mask, other=0).to(tl.int64)
            v_ptrs = kv_head_ptr + v_pages[:, None] * stride_pool_page + offs_d[None, :]
            v = tl.load(v_ptrs, mask=kv_d_mask, other=0.0).to(DOT_DTYPE)
            p = p.to(pool_ptr.dtype.element_ty).to(DOT_DTYPE)  # rounded like the inputs
            acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision="ieee")
            m_i = m_new

        out = acc / l_i[:, None]
        out_ptrs = (
            out_ptr + head * stride_out_head + q_rows[:, None] * stride_out_tok + offs_d[None, :]
        )
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=md_mask)

    @triton.jit
    def _paged_decode_kernel(  # type: ignore[no-untyped-def]
        q_ptr, pool_ptr, k_pages_ptr, v_pages_ptr, seq_lens_ptr, out_ptr,
        scale_log2,  # scale * log2(e): the softmax runs on exp2
        stride_q_seq, stride_q_head, stride_pool_page, stride_pool_head,
        stride_k_pages_seq, stride_v_pages_seq, stride_out_seq, stride_out_head,
        head_dim,
        GROUP_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        # One program: one sequence, one KV head, and all GROUP_SIZE query heads reading it, so
        # each K/V page is loaded once. The heads are padded to BLOCK_H >= 16 rows for tl.dot.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)

        offs_h = tl.arange(0, BLOCK_H)  # query head within the group
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP_SIZE + offs_h
        hd_mask = (offs_h < GROUP_SIZE)[:, None] & (offs_d < head_dim)[None, :]
        q_ptrs = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :]
        q = tl.load(q_ptrs, mask=hd_mask, other=0.0).to(DOT_DTYPE)  # (BLOCK_H, BLOCK_D)

        kv_head_ptr = pool_ptr + kv_head * stride_pool_head
        k_table = k_pages_ptr + seq * stride_k_pages_seq
        v_table = v_pages_ptr + seq * stride_v_pages_seq
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        # seq_len >= 1, so the first step holds key 0 and m_i is finite from then on.
        for kv_start in range(0, seq_len, BLOCK_N):
            kv_pos = kv_start + offs_n
            kv_mask = kv_pos < seq_len
            kv_d_mask = kv_mask[:, None] & (offs_d < head_dim)[None, :]
            k_pages = tl.load(k_table + kv_pos, mask=kv_mask, other=0).to(tl.int64)
            k_ptrs = kv_head_ptr + k_pages[:, None] * stride_pool_page + offs_d[None, :]
            k = tl.load(k_ptrs, mask=kv_d_mask, other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            scores = tl.where(kv_mask[None, :], scores, float("-inf"))  # (BLOCK_H, BLOCK_N)

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_pages = tl.load(v_table + kv_pos, mask=kv_mask, other=0).to(tl.int64)
            v_ptrs = kv_head_ptr + v_pages[:, None] * stride_pool_page + offs_d[None, :]
            v = tl.load(v_ptrs, mask=kv_d_mask, other=0.0).to(DOT_DTYPE)
            p = p.to(pool_ptr.dtype.element_ty).to(DOT_DTYPE)  # rounded like the inputs
            acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision="ieee")
            m_i = m_new

        out = acc / l_i[:, None]
        out_ptrs = (
            out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :]
        )
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=hd_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def paged_prefill_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    """Triton `paged_prefill_attention_ref`: causal attention of packed chunks over paged K/V.

    `max_seqlen_q`, the longest chunk, sizes the grid; pass it when the caller knows it, since
    otherwise it is read from `cu_seqlens_q` with one device sync.
    """
    _check_inputs(q, pool, k_pages, v_pages, seq_lens)
    _check_int32_vector(cu_seqlens_q, k_pages.shape[0] + 1, "cu_seqlens_q")
    _check_launch(q, pool, k_pages, v_pages, cu_seqlens_q, seq_lens)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = k_pages.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int(torch.diff(cu_seqlens_q).max())
    block_d = max(16, next_power_of_2(head_dim))
    blocks = _blocks_for(q.device, block_d)
    grid = (triton.cdiv(max_seqlen_q, blocks.block_m), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        q, pool, k_pages, v_pages, cu_seqlens_q, seq_lens, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), pool.stride(0), pool.stride(1),
        k_pages.stride(0), v_pages.stride(0), out.stride(0), out.stride(1),
        head_dim,
        GROUP_SIZE=num_heads // pool.shape[1], BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_D=block_d, DOT_DTYPE=dot_operand_dtype(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton `paged_decode_attention_ref`: one query per sequence over its paged K/V."""
    _check_inputs(q, pool, k_pages, v_pages, seq_lens)
    _check_launch(q, pool, k_pages, v_pages, seq_lens)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[1]
    assert num_seqs == k_pages.shape[0], "decode takes exactly one query row per sequence"
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    group_size = num_heads // num_kv_heads
    block_d = max(16, next_power_of_2(head_dim))
    blocks = _blocks_for(q.device, block_d)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, pool, k_pages, v_pages, seq_lens, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), pool.stride(0), pool.stride(1),
        k_pages.stride(0), v_pages.stride(0), out.stride(0), out.stride(1),
        head_dim,
        GROUP_SIZE=group_size, BLOCK_H=max(16, next_power_of_2(group_size)),
        BLOCK_N=blocks.block_n, BLOCK_D=block_d, DOT_DTYPE=dot_operand_dtype(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out
