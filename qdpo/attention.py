"""Shared-prompt attention from causal kernels, with no [T, T] mask and no K/V repeated to every head.

A shared-prompt row holds prompt + chosen + rejected, and the rejected tokens must see the prompt but not the
chosen answer. A dense boolean mask says that, at T x T memory per row and with SDPA's slow masked path.
The same attention is two causal calls per pair: prompt+chosen causally, then the rejected queries over
prompt+rejected keys, causally aligned at the lower right (torch's `causal_lower_right`; on the CPU, whose SDPA
takes that bias only on its quadratic math path, the prompt's queries join the call as a square causal one and
their outputs are dropped). Both calls use SDPA's `enable_gqa`, so K/V stay at their own head count.

It plugs into transformers' attention-function registry as "qdpo_sdpa": each family still computes its own
q/k/v, rotary, scaling and norms, and hands them here. Without span information (the plain layout,
generation, anything else) it is transformers' own SDPA attention. Families whose attention SDPA cannot
compute (soft-capped scores) or whose sliding window would cut a pair keep the dense mask (qdpo.step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

IMPLEMENTATION = "qdpo_sdpa"
Span = tuple[int, int, int, int, int]  # row, start, prompt, chosen and rejected tokens of one pair
calls = 0  # span calls made: qdpo.step checks that every layer made one, and tests that this path ran
# Families whose decoder layers do not hand the attention kwargs on (transformers 5.24), so the spans never arrive:
# qdpo.step finds that out at the first forward and keeps the dense mask; the planner knows it beforehand.
DROPS_ATTENTION_KWARGS = ("stablelm",)


def span_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    qdpo_spans: tuple[Span, ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: [B, H, T, D] in, [B, T, H, D] out (and no weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if qdpo_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    global calls
    calls += 1
    gqa = key.shape[1] != query.shape[1]
    sdpa = dict(dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    out = query.new_zeros(query.shape)  # padding positions stay 0: nothing reads them
    for row, start, p, c, r in qdpo_spans:
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        first = slice(start, start + p + c)
        out[row : row + 1, :, first] = F.scaled_dot_product_attention(
            q[:, :, first], k[:, :, first], v[:, :, first], is_causal=True, **sdpa
        )
        if not r:
            continue
        prompt, rejected = slice(start, start + p), slice(start + p + c, start + p + c + r)
        keys = torch.cat([k[:, :, prompt], k[:, :, rejected]], dim=2)
        values = torch.cat([v[:, :, prompt], v[:, :, rejected]], dim=2)
        if lower_right_is_fast(query):
            got = F.scaled_dot_product_attention(
                q[:, :, rejected], keys, values, attn_mask=causal_lower_right(r, p + r), **sdpa
            )
        else:
            queries = torch.cat([q[:, :, prompt], q[:, :, rejected]], dim=2)
            got = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, **sdpa)[:, :, p:]
        out[row : row + 1, :, rejected] = got
    return out.transpose(1, 2).contiguous(), None


def lower_right_is_fast(query: torch.Tensor) -> bool:
    """Whether SDPA takes `causal_lower_right` on a fast kernel here (CUDA's flash/efficient kernels; the CPU's
    only on its quadratic math path)."""
    return query.is_cuda


def register() -> None:
    """Make "qdpo_sdpa" known to transformers (attention function, and SDPA's mask for the calls without spans)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, span_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_span_attention(model) -> bool:
    """Switch a model on transformers' SDPA to qdpo_sdpa (the same attention until spans are given); True if done."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(IMPLEMENTATION)
    return True


def span_problem(config, spans: tuple[Span, ...]) -> str | None:
    """Why the span attention cannot be exact for this model and micro-batch (then the dense mask is), or None."""
    from qdpo.families import layer_windows

    if getattr(config, "_attn_implementation", None) != IMPLEMENTATION:
        return f"the model's attention is {getattr(config, '_attn_implementation', None)}"
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention scores are soft-capped, which SDPA cannot do"
    longest = max((p + max(c, r) for _, _, p, c, r in spans), default=0)
    windows = [w for w in layer_windows(config).values() if w is not None and w < longest]
    if windows:
        return f"its sliding window ({windows[0]}) cuts a {longest}-token sequence"
    return None
