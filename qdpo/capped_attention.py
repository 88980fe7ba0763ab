"""Soft-capped causal attention (Gemma-2) one block of queries at a time, with a backward that recomputes each block.

Gemma-2 caps its attention scores (cap * tanh(score / cap)) before the softmax, which no SDPA kernel can do, so
transformers runs it eagerly: a [heads, T, T] score tensor per layer, kept for backward. Here the scores exist
one block of queries at a time, in forward and again in backward (flash attention's recomputation, written in
torch because torch has no such kernel): autograd keeps only q, k, v, the output and each query's logsumexp, so
memory grows linearly with the row. The math is the eager path's (fp32 softmax), up to summation order.
"""

from __future__ import annotations

import torch

# Score elements per block (queries x keys x heads): bounds each block's fp32 temporaries (~5 of them) to a few
# hundred MB however long the row; blocks shrink as the keys they read grow.
SCORES_PER_BLOCK = 2**24


def capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, cap: float, scale: float
) -> torch.Tensor:
    """[n, H, nq, D] queries at the last nq of the key positions, each seeing keys at or before its own (the last
    `window` of them), scores soft-capped: the [n, H, nq, D] output."""
    return _Capped.apply(q, k, v, window, cap, scale)


def block_plan(n: int, heads: int, nq: int, nk: int, window: int | None) -> list[tuple[int, int, int, int]]:
    """(first query, one past the last, first key, one past the last) per block of a call of n rows: as many
    queries per block as keep n x heads x queries x keys read under SCORES_PER_BLOCK (at least 16)."""
    from qdpo.attention import blocks

    reach = nk if window is None else min(nk, window + nq)
    rows = max(16, min(nq, SCORES_PER_BLOCK // max(1, n * heads * reach)))
    return blocks(nq, nk, window if window is not None else nk, rows)


def largest_block_scores(n: int, heads: int, nq: int, nk: int, window: int | None) -> int:
    """Score elements of the largest block of such a call (for the planner)."""
    return max(n * heads * (b - a) * (hi - lo) for a, b, lo, hi in block_plan(n, heads, nq, nk, window))


def query_blocks(q: torch.Tensor, k: torch.Tensor, window: int | None) -> list[tuple[int, int, int, int]]:
    """block_plan for these queries and keys ([n, heads, queries, dim], [n, kv heads, keys, dim])."""
    return block_plan(q.shape[0], q.shape[1], q.shape[2], k.shape[2], window)


def _visible(rows: int, cols: int, first: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[rows, cols] booleans: query i at key position first + i sees key j when 0 <= their distance < window."""
    ones = torch.ones(rows, cols, dtype=torch.bool, device=device)
    visible = ones.tril(first)
    return visible if window is None else visible & ~ones.tril(first - window)


def _scores(qg, kb, first, window, cap, scale):
    """tanh of the block's scaled scores (for backward) and the capped, masked fp32 scores.

    In place where it can: at long rows these [heads, queries, keys] temporaries are the blocks' whole cost."""
    t = torch.einsum("nhgqd,nhkd->nhgqk", qg, kb).mul_(scale / cap).tanh_()
    hidden = ~_visible(t.shape[-2], t.shape[-1], first, window, t.device)
    return t, (t * cap).float().masked_fill_(hidden, float("-inf"))


class _Capped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, cap, scale):
        n, heads, nq, dim = q.shape
        kv_heads, nk = k.shape[1], k.shape[2]
        out = q.new_empty(q.shape)
        lse = q.new_empty((n, heads, nq), dtype=torch.float32)
        plan = query_blocks(q, k, window)
        for a, b, lo, hi in plan:
            qg = q[:, :, a:b].unflatten(1, (kv_heads, heads // kv_heads))
            _, s = _scores(qg, k[:, :, lo:hi], nk - nq + a - lo, window, cap, scale)
            block_lse = s.logsumexp(-1)
            p = s.sub_(block_lse[..., None]).exp_().to(q.dtype)
            out[:, :, a:b] = torch.einsum("nhgqk,nhkd->nhgqd", p, v[:, :, lo:hi]).flatten(1, 2)
            lse[:, :, a:b] = block_lse.flatten(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (window, cap, scale, plan)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        window, cap, scale, plan = ctx.settings
        n, heads, nq, dim = q.shape
        kv_heads, nk = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O): the softmax backward's correction
        for a, b, lo, hi in plan:
            qg = q[:, :, a:b].unflatten(1, (kv_heads, groups))
            kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
            t, s = _scores(qg, kb, nk - nq + a - lo, window, cap, scale)
            p = s.sub_(lse[:, :, a:b].unflatten(1, (kv_heads, groups))[..., None]).exp_()
            dog = grad_out[:, :, a:b].unflatten(1, (kv_heads, groups))
            dv[:, :, lo:hi] += torch.einsum("nhgqk,nhgqd->nhkd", p, dog.float())
            ds = torch.einsum("nhgqd,nhkd->nhgqk", dog, vb).float()  # dP, then the softmax's and the cap's backward
            ds.sub_(delta[:, :, a:b].unflatten(1, (kv_heads, groups))[..., None]).mul_(p)
            del p
            draw = ds.mul_(t.float().square_().neg_().add_(1)).mul_(scale).to(q.dtype)  # d(cap tanh(x/cap)) = 1 - t^2
            dq[:, :, a:b] = torch.einsum("nhgqk,nhkd->nhgqd", draw, kb).flatten(1, 2)
            dk[:, :, lo:hi] += torch.einsum("nhgqk,nhgqd->nhkd", draw.float(), qg.float())
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None
