"""Shared-prompt attention from causal kernels, with no [T, T] mask and no K/V repeated to every head.

A shared-prompt row holds prompt + chosen + rejected, and the rejected tokens must see the prompt but not the
chosen answer. A dense boolean mask says that, at T x T memory per row and with SDPA's slow masked path.
The same attention is two causal calls per pair: prompt+chosen causally, then the rejected queries over
prompt+rejected keys, causally aligned at the lower right (torch's `causal_lower_right`; on the CPU, whose SDPA
takes that bias only on its quadratic math path, the prompt's queries join the call as a square causal one and
their outputs are dropped). Both calls use SDPA's `enable_gqa`, so K/V stay at their own head count.

A sliding window that cuts a call (Mistral v0.1, Gemma-3's local layers, Phi-3) has no causal kernel, so that
call runs one block of queries at a time, each over only the keys its window reaches, with a small band mask
shared by every block: memory grows with length x window, never with length squared.

It plugs into transformers' attention-function registry as "qdpo_sdpa": each family still computes its own
q/k/v, rotary, scaling, norms and window, and hands them here. Without span information (generation, anything
else) it is transformers' own SDPA attention. Gemma-2's soft-capped scores, which no SDPA kernel computes, take
qdpo.capped_attention's blocks instead (registered as "qdpo_eager": without spans, the family's own eager attention).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from qdpo.capped_attention import capped_attention

IMPLEMENTATION = "qdpo_sdpa"
# The same for a verified family that transformers runs eagerly because SDPA cannot soft-cap its scores (Gemma-2):
# without spans it is the family's own eager attention, with them capped_attention's blocks.
EAGER_IMPLEMENTATION = "qdpo_eager"
Span = tuple[int, int, int, int, int]  # row, start, prompt, chosen and rejected tokens of one pair
calls = 0  # span calls made: qdpo.step checks that every layer made one, and tests that this path ran
_maskless = False  # inside `no_mask()`: transformers builds no mask, since span_attention needs none
# Families whose decoder layers do not hand the attention kwargs on (transformers 5.24): hand_spans_on makes them.
DROPS_ATTENTION_KWARGS = ("stablelm",)
# Queries per block of a windowed call: each reads BLOCK + window keys, and the one band mask they share is
# BLOCK x (BLOCK + window) scores (per query head of a kv head on the GPU); smaller blocks waste fewer masked
# scores but make more calls.
BLOCK = 1024


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
        if module.config._attn_implementation == EAGER_IMPLEMENTATION:  # the family's own eager attention
            eager = sys.modules[type(module).__module__].eager_attention_forward
            return eager(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    global calls
    calls += 1
    window = layer_window(module)
    sdpa = dict(dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    if kwargs.get("softcap"):  # Gemma-2: soft-capped scores, in blocks with their own backward (capped_attention)
        if dropout:  # qdpo.model.disable_dropout sets every dropout to 0 before training
            raise RuntimeError("qdpo's soft-capped attention blocks have no dropout; attention dropout must be 0")
        sdpa = dict(softcap=kwargs["softcap"], scale=scaling if scaling is not None else query.shape[-1] ** -0.5)
    rows, width = query.shape[0], query.shape[2]
    if qdpo_spans == tuple((row, 0, width, 0, 0) for row in range(rows)):  # whole rows (the plain layout): batched
        return causal(query, key, value, window, sdpa).transpose(1, 2).contiguous(), None
    out = query.new_zeros(query.shape)  # padding positions stay 0: nothing reads them
    for row, start, p, c, r in qdpo_spans:
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        first = slice(start, start + p + c)
        out[row : row + 1, :, first] = causal(q[:, :, first], k[:, :, first], v[:, :, first], window, sdpa)
        if not r:
            continue
        prompt, rejected = slice(start, start + p), slice(start + p + c, start + p + c + r)
        keys = torch.cat([k[:, :, prompt], k[:, :, rejected]], dim=2)
        values = torch.cat([v[:, :, prompt], v[:, :, rejected]], dim=2)
        if "softcap" in sdpa or lower_right_is_fast(query) or cuts(window, p + r):
            got = causal(q[:, :, rejected], keys, values, window, sdpa)
        else:
            queries = torch.cat([q[:, :, prompt], q[:, :, rejected]], dim=2)
            got = causal(queries, keys, values, window, sdpa)[:, :, p:]
        out[row : row + 1, :, rejected] = got
    return out.transpose(1, 2).contiguous(), None


def layer_window(module: torch.nn.Module) -> int | None:
    """The sliding window of an attention module's layer (None: full attention), as its own mask would have it.

    From the config, as qdpo.families builds the dense masks, not from the attention function's `sliding_window`
    argument: some families (Qwen2-MoE) keep the window in their mask only and never pass it."""
    from qdpo.families import layer_windows

    if getattr(module, "config", None) is None:  # called outside a model (benchmarks/flex_check.py): no window
        return None
    windows = layer_windows(module.config)
    return windows["*"] if "*" in windows else windows[module.config.layer_types[module.layer_idx]]


def cuts(window: int | None, length: int) -> bool:
    """Whether a sliding window hides some earlier key from some query of a `length`-token causal call."""
    return window is not None and window < length


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, sdpa: dict) -> torch.Tensor:
    """Causal attention for queries at the last q.shape[2] of the key positions (lower-right aligned), each seeing
    the keys at or before its own position, and with a window only the last `window` of them."""
    nq, nk = q.shape[2], k.shape[2]
    if "softcap" in sdpa:
        return capped_attention(q, k, v, window if cuts(window, nk) else None, sdpa["softcap"], sdpa["scale"])
    if cuts(window, nk):
        return windowed(q, k, v, window, sdpa)
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk), **sdpa)


def windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sdpa: dict) -> torch.Tensor:
    """Sliding-window causal attention one block of queries at a time, each over the keys its window reaches."""
    n, heads, nq, dim = q.shape
    nk, kv_heads = k.shape[2], k.shape[1]
    groups = heads // kv_heads
    fold = groups > 1 and folds_gqa(q)
    outs = []
    for a, b, lo, hi in blocks(nq, nk, window):
        queries, keys, values = q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi]
        mask = band_mask(b - a, hi - lo, window, q.device, q.dtype, groups if fold else 1)
        if q.is_cuda and mask.data_ptr() % 16:
            mask = mask.contiguous()  # CUDA's masked kernel reads the mask from a 16-byte aligned address only
        if fold:  # each kv head's query heads as one longer run of queries, their mask rows stacked to match
            queries = queries.reshape(n, kv_heads, groups * (b - a), dim)
        got = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, **{**sdpa, "enable_gqa": groups > 1 and not fold}
        )
        # reshape, not view: CUDA's kernel returns its output as a transposed [n, queries, heads, dim] tensor
        outs.append(got.reshape(n, heads, b - a, dim))
    return torch.cat(outs, dim=2)


def folds_gqa(q: torch.Tensor) -> bool:
    """Whether windowed calls fold GQA's query heads onto their kv head instead of passing enable_gqa.

    CUDA's one fused kernel that takes a mask (memory-efficient attention) does not take enable_gqa: SDPA would fall
    back to its math kernel, which saves every block's [heads, queries, keys] weights. Folded, each kv head meets
    its query heads as one run of queries: a copy of q instead of k and v copied to every head. The CPU's flash
    kernel takes the mask and enable_gqa together."""
    return q.is_cuda


def blocks(nq: int, nk: int, window: int, size: int | None = None) -> list[tuple[int, int, int, int]]:
    """(first query, one past the last query, first key, one past the last key) of each block of a windowed call.

    Blocks end at multiples of `size` (BLOCK) in key positions (the last at the call's end), and a block that
    reaches back to key 0 then reads a multiple of 8 keys: its corner of the band mask starts 16-byte aligned, as
    CUDA's masked kernel needs (only a call's last block can miss that, and is then copied)."""
    size = size or BLOCK
    out = []
    offset, a = nk - nq, 0
    while a < nq:
        hi = min(nk, (offset + a) // size * size + size)  # one past the key position of the block's last query
        b = hi - offset
        lo = max(0, hi - round_up(b - a + window - 1, 8))  # an 8-aligned key count: what CUDA's kernel reads fastest
        out.append((a, b, lo, hi))
        a = b
    return out


def window_cuts(config, length: int) -> bool:
    """Whether some layer's sliding window hides earlier tokens of a `length`-token row of this model."""
    from qdpo.families import layer_windows, shared_layout_problem

    if shared_layout_problem(config):  # layer types qdpo does not know: it leaves the mask to transformers
        return False
    return any(cuts(w, length) for w in layer_windows(config).values())


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple."""
    return -(-n // multiple) * multiple


def band_mask(
    rows: int, cols: int, window: int, device: torch.device, dtype: torch.dtype, groups: int = 1
) -> torch.Tensor:
    """[groups x rows, cols] additive mask: query i (at key position cols - rows + i) sees key j when 0 <= its
    distance < window (0 there, -inf elsewhere), stacked `groups` times: the lower-right corner of the window's one
    full-block mask (a view of it, except for a folded block of fewer than BLOCK queries)."""
    full = full_band_mask(window, BLOCK, groups, device, dtype)
    return full[:, BLOCK - rows :, full.shape[2] - cols :].reshape(groups * rows, cols)


@functools.lru_cache(maxsize=4)
def full_band_mask(window: int, block: int, groups: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The mask of a full block (`block` queries over the most keys one reads, `groups` times), shared by every
    windowed call.

    Additive in the compute dtype, not boolean: SDPA turns a boolean mask into a new float one at every call and
    saves that for backward. Every block's mask is a corner of this one, so autograd saves views of one tensor."""
    rows, cols = block, round_up(block + window - 1, 8)
    ones = torch.ones(rows, cols, dtype=torch.bool, device=device)
    visible = ones.tril(cols - rows) & ~ones.tril(cols - rows - window)  # 0 <= distance < window
    mask = torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return mask.expand(groups, rows, cols).contiguous()


def band_mask_bytes(window: int, dtype_bytes: int, groups: int = 1) -> int:
    """Bytes of full_band_mask (for the planner)."""
    return groups * BLOCK * round_up(BLOCK + window - 1, 8) * dtype_bytes


def lower_right_is_fast(query: torch.Tensor) -> bool:
    """Whether SDPA takes `causal_lower_right` on a fast kernel here (CUDA's flash/efficient kernels; the CPU's
    only on its quadratic math path)."""
    return query.is_cuda


def register() -> None:
    """Make "qdpo_sdpa" known to transformers (attention function, and SDPA's mask for the calls without spans)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    def mask(*args, **kwargs):
        return None if _maskless else sdpa_mask(*args, **kwargs)

    def additive_mask(*args, **kwargs):
        return None if _maskless else eager_mask(*args, **kwargs)

    AttentionInterface.register(IMPLEMENTATION, span_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, mask)
    AttentionInterface.register(EAGER_IMPLEMENTATION, span_attention)
    AttentionMaskInterface.register(EAGER_IMPLEMENTATION, additive_mask)


@contextlib.contextmanager
def no_mask() -> Iterator[None]:
    """Inside, transformers builds no attention mask for qdpo_sdpa models: a forward with spans needs none, and with
    a window that cuts the row transformers would build a [rows, 1, T, T] one."""
    global _maskless
    before, _maskless = _maskless, True
    try:
        yield
    finally:
        _maskless = before


def use_span_attention(model) -> bool:
    """Switch a model on transformers' SDPA to qdpo_sdpa, or a verified soft-capped family on eager to qdpo_eager
    (the same attention until spans are given); True if done."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa":
        register()
        model.set_attn_implementation(IMPLEMENTATION)
    elif impl == "eager" and softcapped(config):
        register()
        model.set_attn_implementation(EAGER_IMPLEMENTATION)
    else:
        return False
    hand_spans_on(model)
    return True


def hand_spans_on(model) -> int:
    """Make each decoder layer of a family in DROPS_ATTENTION_KWARGS hand its spans to its attention; returns how
    many layers now do.

    Such a layer takes **kwargs but calls its attention without them (StableLM's, transformers 5.24), so the spans
    would never arrive and the shared and packed layouts would need the dense mask. Each layer becomes an instance of
    a subclass whose forward notes its spans on the attention module, and a pre-hook on the attention adds them to
    its call. A forward, not a hook on the layer: gradient checkpointing replays the layer's forward (with the same
    kwargs) in backward, but not its hooks, so only a forward notes the right spans for the recomputation too.
    """
    if getattr(model.config, "model_type", None) not in DROPS_ATTENTION_KWARGS:
        return 0
    layers = [layer for layer in model.get_decoder().layers if hasattr(layer, "self_attn")]
    for layer in layers:
        if not isinstance(layer, _HandsSpansOn):
            layer.__class__ = _spans_handing_class(type(layer))
            layer.self_attn.register_forward_pre_hook(_add_noted_spans, with_kwargs=True)
    return len(layers)


class _HandsSpansOn:
    """Marks a decoder layer class made by _spans_handing_class."""


@functools.lru_cache(maxsize=None)
def _spans_handing_class(cls: type) -> type:
    """A subclass of the decoder layer class cls whose forward notes its spans on its attention module first."""

    def forward(self, *args, **kwargs):
        self.self_attn._qdpo_spans = kwargs.get("qdpo_spans")  # None when this call has none: nothing stale
        return cls.forward(self, *args, **kwargs)

    # transformers wraps a subclass's forward for checkpointing too; the outermost wrapper checkpoints this one.
    return type(cls.__name__, (_HandsSpansOn, cls), {"forward": forward, "__module__": cls.__module__})


def _add_noted_spans(attn: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The attention's forward pre-hook: the spans its layer noted, where the layer's call did not pass them."""
    spans = getattr(attn, "_qdpo_spans", None)
    if spans is None or "qdpo_spans" in kwargs:
        return None
    return args, {**kwargs, "qdpo_spans": spans}


def softcapped(config) -> bool:
    """Whether a verified family soft-caps this model's attention scores (then qdpo.step hands even plain rows to
    the blocks)."""
    from qdpo.families import family_of

    family = family_of(config)
    return bool(family and family.capped_scores and getattr(config, "attn_logit_softcapping", None))


def span_problem(config) -> str | None:
    """Why the span attention cannot be exact for this model (then the dense mask is), or None."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (IMPLEMENTATION, EAGER_IMPLEMENTATION):
        return f"the model's attention is {impl}"
    if softcapped(config) and impl != EAGER_IMPLEMENTATION:
        return "its attention scores are soft-capped, which SDPA cannot do"
    return None
