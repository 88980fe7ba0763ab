"""Memory planner: what one qdpo training step holds, computed from a model's config.json alone (no weights).

Every line follows what the code that runs actually allocates (checked on the CPU by tests/test_plan.py
against measured tensors):

* qdpo.model.load_base_4bit: every nn.Linear inside the decoder blocks in bitsandbytes NF4 with double
  quantization, blocksize 64; embeddings, lm_head and norms in the compute dtype.
* qdpo.model.add_lora: peft LoRA adapters in fp32 on the targeted block linears. peft casts each adapter's
  input to fp32 (a fresh copy per adapted module) when the compute dtype is not fp32, and autograd keeps
  those copies for backward.
* qdpo.step.score_batch: with share_prompt (the default) one row per pair, prompt + chosen + rejected
  (up to 2 x max_length - prompt tokens) under a custom [B, 1, W, W] mask (pack_pairs: all B runs in
  one row of up to B x W tokens under a [1, 1, BW, BW] mask), lm_head only on the M
  response-predicting positions (qdpo.logprobs.gathered_logps); without it one forward of 2B sequences
  (chosen + rejected), logits from the first response position on (logits_to_keep) or on response
  positions only in checkpointed chunks (logits_chunk_size > 0). The reference pass runs without grad,
  so it never holds more than the policy pass; offload_activations moves what autograd saves outside
  checkpointed regions to pinned CPU memory (qdpo.offload), two layer inputs staying on the GPU in backward.
* transformers' SDPA attention with a mask: GQA keys/values are repeated to all heads and the boolean
  mask is converted to a float [rows, 1, W, W] mask in every layer, and both are saved for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qdpo.attention import (
    BLOCK,
    EAGER_IMPLEMENTATION,
    IMPLEMENTATION,
    band_mask_bytes,
    blocks,
    cuts,
    softcapped,
    span_problem,
)
from qdpo.capped_attention import largest_block_scores
from qdpo.config import Config
from qdpo.errors import UserError
from qdpo.families import exact_settings, layer_windows, shared_layout_problem
from qdpo.model import resolve_model
from qdpo.nf4 import NF4_BLOCKSIZE
from qdpo.shapes import ModelShape, model_config

GB = 1e9  # the table and the budgets are in decimal GB, like GPU spec sheets
FP32 = 4  # bytes

# bitsandbytes NF4 with double quantization (bitsandbytes.functional.quantize_4bit, compress_statistics=True)
NESTED_BLOCK = 256  # first-level absmax values per fp32 second-level absmax
NF4_CODE_BYTES = 16 * FP32  # the 16-entry NF4 table, one copy per quantized layer
DYNAMIC_CODE_BYTES = 256 * FP32  # the 8-bit dynamic map that decodes the absmax, copied per layer
OFFSET_BYTES = FP32  # the mean subtracted from the absmax before their quantization

# bitsandbytes 8-bit optimizers (PagedAdamW8bit): blockwise uint8 states, fp32 absmax per 256 values,
# and plain fp32 states for tensors under 4096 values.
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096

# Runtime overhead on a GPU: CUDA context with torch and bitsandbytes kernels (lazy loading) plus cuBLAS
# workspaces ~0.75 GB (assumed: torch's counters do not see it), and what the caching allocator holds beyond
# the live tensors. Measured on an H200 (docs/benchmarks.md): max_memory_reserved exceeded max_memory_allocated
# by 14-15% for 7B at 1024/2048 tokens and by 18% for 8B at 4096 (its 0.5 GB logits chunks fragment most).
CUDA_CONTEXT_BYTES = int(0.75 * GB)
FRAGMENTATION = 0.18
CPU_RUNTIME_BYTES = int(0.5 * GB)  # torch and friends in a CPU process's resident memory

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LLAMA_STYLE = ("llama", "mistral", "qwen2", "gemma2")  # measured by tests/test_plan.py
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOWN_TARGETS = BLOCK_LINEARS + ("lm_head",)


@dataclass
class Line:
    """One row of the plan: a part, its bytes, why; `counted` is False for a peak that never meets the larger one,
    and for bytes kept in pinned CPU memory (`host`) instead of on the GPU."""

    part: str
    bytes: int
    note: str
    counted: bool = True
    host: bool = False


@dataclass
class Plan:
    """The memory table of one training step and its total."""

    lines: list[Line]
    micro_batch_size: int
    seq_len: int
    dtype: str
    device: str
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Bytes at the step's peak: every counted line."""
        return sum(line.bytes for line in self.lines if line.counted)

    def table(self) -> list[tuple[str, int, str]]:
        """(part, bytes, note) rows, counted or not."""
        return [(line.part, line.bytes, line.note) for line in self.lines]

    @property
    def host_bytes(self) -> int:
        """Bytes in pinned CPU memory (offload_activations, offload_params): RAM the machine must have free."""
        return sum(line.bytes for line in self.lines if line.host)

    def bytes_of(self, *parts: str) -> int:
        """Sum of the named lines (counted or not); 0 for a part that does not appear in this plan."""
        return sum(line.bytes for line in self.lines if line.part in parts)


# Stable part names: the CLI prints them, tests look them up.
WEIGHTS_4BIT = "4-bit block weights (NF4)"
QUANT_STATE = "quantization state (double quant)"
FROZEN = "embeddings, lm_head, norms"
LORA = "LoRA weights (fp32)"
REF_ADAPTER = "reference adapter (frozen copy)"
LORA_GRADS = "LoRA gradients (fp32)"
OPTIMIZER = "optimizer states"
BOUNDARIES = "layer boundaries (checkpointed)"
LAYERS = "saved activations, all layers"
RECOMPUTE = "one layer recomputed in backward"
LAYER_WORK = "layer backward working memory"
OTHER_SAVED = "final norm input"
LOGITS = "logits saved for backward"
LOGITS_WORK = "logits working memory"
OVERHEAD = "runtime overhead"
DDP_BUCKETS = "DDP gradient buckets"
FSDP_LAYERS = "FSDP: layers gathered whole"
FSDP_HEAD = "lm_head (not sharded)"

RESIDENT_PARTS = (WEIGHTS_4BIT, QUANT_STATE, FROZEN, LORA, REF_ADAPTER)


@dataclass(frozen=True)
class Geometry:
    """The shape of one policy forward: rows x width tokens, logits window per row, response tokens scored."""

    rows: int
    width: int
    window: int  # positions per row whose logits the plain full-logits path keeps (logits_to_keep)
    responses: int  # response tokens scored in the micro-batch (M)
    shared: bool
    # prompt, chosen, rejected tokens per pair on causal calls with no mask (the plain layout: (0, width, 0))
    span: tuple[int, int, int] | None = None
    windows: tuple[int | None, ...] = (None,)  # the sliding window of each kind of layer (None: full attention)
    capped: bool = False  # soft-capped scores in qdpo.capped_attention's blocks (Gemma-2)

    @property
    def tokens(self) -> int:
        """Positions the decoder runs (padding included)."""
        return self.rows * self.width


def geometry(b: int, t: int, prompt_len: int, layout: str) -> Geometry:
    """Worst case of a micro-batch of b pairs at max_length t whose shortest prompt has prompt_len tokens."""
    p = min(max(prompt_len, 1), t - 1)
    responses = 2 * b * (t - p)  # chosen and rejected each fill max_length
    if layout == "shared":  # one row per pair: prompt once, then chosen, then rejected
        return Geometry(b, 2 * t - p, 0, responses, True)
    if layout == "packed":  # all pairs in one row: the mask (and SDPA's float copy) spans all b runs
        return Geometry(1, b * (2 * t - p), 0, responses, True)
    return Geometry(2 * b, t, t - p + 1, responses, False)


def dtype_name(cfg: Config, device: str) -> str:
    """The compute dtype qdpo.model.compute_dtype picks: the setting, or bf16 on a GPU and fp32 on the CPU for auto."""
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    return (
        "float32" if device == "cpu" else "bfloat16"
    )  # assumes an Ampere-or-newer GPU (bf16); T4 presets say float16


def lora_targets(cfg: Config) -> list[str]:
    """The module names LoRA adapts (all-linear = the seven block linears, as peft resolves it for Llama-style)."""
    names: list[str] = []
    for name in cfg.lora_target_modules:
        if name == "all-linear":
            names += BLOCK_LINEARS
        elif name in KNOWN_TARGETS:
            names.append(name)
        else:
            raise UserError(f"the planner knows LoRA targets {', '.join(KNOWN_TARGETS)} and all-linear, not {name!r}.")
    return sorted(set(names), key=KNOWN_TARGETS.index)


def quantized_bytes(n: int) -> tuple[int, int]:
    """(packed weights, quantization state) bytes of one NF4 double-quantized matrix with n values."""
    blocks = math.ceil(n / NF4_BLOCKSIZE)  # one first-level absmax per block, uint8 after double quant
    nested = math.ceil(blocks / NESTED_BLOCK)
    state = blocks + nested * FP32 + NF4_CODE_BYTES + DYNAMIC_CODE_BYTES + OFFSET_BYTES  # absmax as uint8
    return math.ceil(n / 2), state  # two 4-bit values per byte


def lora_params(shape: ModelShape, targets: list[str], r: int) -> list[int]:
    """Parameter count of every LoRA matrix (A: r x in, B: out x r) the model gets."""
    sizes = []
    for name, (fan_in, fan_out) in shape.linears().items():
        if name in targets:
            sizes += [r * fan_in, r * fan_out] * shape.layers
    if "lm_head" in targets:
        sizes += [r * shape.hidden, r * shape.vocab]
    return sizes


def resident_lines(shape: ModelShape, cfg: Config, d: int) -> list[Line]:
    """Weights, quantization state, frozen parts and LoRA: what stays on the device for the whole run."""
    packed = state = 0
    for fan_in, fan_out in shape.linears().values():
        p, s = quantized_bytes(fan_in * fan_out)
        packed, state = packed + p * shape.layers, state + s * shape.layers
    n_quant = sum(i * o for i, o in shape.linears().values()) * shape.layers
    embed = shape.vocab * shape.hidden * d
    norms = (2 * shape.layers + 1) * shape.hidden * d
    biases = 0
    if shape.attention_bias:
        biases += (
            (shape.attn + 2 * shape.kv_heads * shape.head_dim) * shape.layers * d
        )  # q, k, v biases stay unquantized
    if shape.mlp_bias:
        biases += (2 * shape.intermediate + shape.hidden) * shape.layers * d
    rotary = 2 * (shape.head_dim // 2) * FP32  # inv_freq and original_inv_freq buffers
    frozen = embed * (1 if shape.tied else 2) + norms + biases + rotary + shape.expert_params * d
    lora = sum(lora_params(shape, lora_targets(cfg), cfg.lora_r)) * FP32
    lines = [
        Line(WEIGHTS_4BIT, packed, f"{n_quant / 1e9:.2f}e9 block params x 0.5 B"),
        Line(QUANT_STATE, state, "uint8 absmax per 64 values + fp32 absmax per 256 blocks + code tables"),
        Line(
            FROZEN,
            frozen,
            f"{'tied' if shape.tied else 'untied'} {shape.vocab} x {shape.hidden} x {d} B"
            f"{' x 2' if not shape.tied else ''}, norms{', biases' if biases else ''}"
            + (f", {shape.expert_params / 1e9:.2f}e9 MoE expert params x {d} B" if shape.experts else ""),
        ),
        Line(LORA, lora, f"r={cfg.lora_r}: {lora // FP32 / 1e6:.1f}M params x 4 B"),
    ]
    if cfg.init_adapter and getattr(cfg, "needs_reference", True):
        lines.append(Line(REF_ADAPTER, lora, "init_adapter is loaded twice: trainable policy + frozen reference"))
    return lines


def optimizer_lines(shape: ModelShape, cfg: Config) -> list[Line]:
    """LoRA gradients and optimizer states (they live across micro-steps of gradient accumulation)."""
    sizes = lora_params(shape, lora_targets(cfg), cfg.lora_r)
    grads = sum(sizes) * FP32
    if cfg.optim == "paged_adamw_8bit":
        states = sum(
            2 * n + 2 * math.ceil(n / OPT8_BLOCK) * FP32 if n >= OPT8_MIN_SIZE else 2 * n * FP32 for n in sizes
        )
        note = "2 uint8 states + fp32 absmax per 256 (paged: may spill to CPU)"
    else:
        states = 2 * sum(sizes) * FP32
        note = "AdamW: 2 fp32 states per LoRA param"
    return [Line(LORA_GRADS, grads, "one fp32 grad per LoRA param"), Line(OPTIMIZER, states, note)]


def span_attention_bytes(
    shape: ModelShape, d: int, span: tuple[int, int, int], cuda: bool, window: int | None = None, capped: bool = False
) -> float:
    """Bytes per row token that qdpo.attention's two causal calls per pair save (span = prompt, chosen, rejected).

    q, k and v once (slices are views; k/v at their own head count: enable_gqa), each call's output and
    logsumexp, the prompt+rejected keys/values (concatenated copies); on the CPU the second call is square
    over prompt+rejected, so its queries are a copy too and its output covers the prompt again. A call that a
    sliding window cuts runs in blocks of rejected queries only, and on the GPU folds each block's query heads
    onto their kv heads (qdpo.attention.windowed: a copy of those queries, and maybe of one block's mask).
    capped (Gemma-2's soft-capped scores, qdpo.capped_attention): the same saved tensors, rejected queries only.
    """
    p, c, r = span
    a, kv, heads = shape.attn, shape.kv_heads * shape.head_dim, shape.heads
    square = not cuda and not capped and not cuts(window, p + r)  # the CPU's second call, over the prompt too
    second = p + r if square else r  # query positions of the rejected call
    total = (a + 2 * kv) * d * (p + c + r)  # q, k, v
    total += (a * d + heads * FP32) * (p + c + second)  # outputs and logsumexps of both calls
    total += 2 * kv * d * (p + r) + (a * d * (p + r) if square else 0)  # concatenated keys/values (and queries)
    for queries, keys in ((p + c, p + c), (r, p + r)):
        if cuda and not capped and queries and cuts(window, keys):
            if shape.kv_heads != shape.heads:  # the queries folded onto their kv heads: a copy
                total += a * d * queries
            first, last, lo, hi = blocks(queries, keys, window)[-1]
            if lo == 0 and hi % 8:  # a last block whose corner of the band mask is not 16-byte aligned: a copy
                total += shape.heads // shape.kv_heads * (last - first) * hi * d
    return total / (p + c + r)


def attention_saved_per_token(
    shape: ModelShape,
    targets: list[str],
    d: int,
    seq_len: int,
    grad_in: bool,
    span: tuple[int, int, int] | None = None,
    cuda: bool = True,
    window: int | None = None,
    capped: bool = False,
) -> tuple[int, bool]:
    """Bytes per token the attention half of a layer saves, and whether its output needs grad.

    grad_in is False only in layer 0, whose input (the embeddings) needs no grad: there autograd saves
    nothing until the first adapted module. span (prompt, chosen, rejected tokens of a pair): the shared-prompt
    layout on qdpo.attention's causal calls instead of the dense mask; window: the layer's sliding window.
    """
    h, a = shape.hidden, shape.attn
    cast = d != FP32  # peft casts each adapter's input to the fp32 LoRA dtype: one copy per adapted module
    qkv = [t for t in ("q_proj", "k_proj", "v_proj") if t in targets]
    saved = h * FP32 + FP32 if grad_in else 0  # RMSNorm keeps its fp32 input and rsqrt
    saved += (len(qkv) if cast else min(len(qkv), 1)) * h * FP32  # fp32: q, k, v share the normed input
    needs_grad = grad_in or bool(qkv)
    if needs_grad and span is not None:
        saved += round(span_attention_bytes(shape, d, span, cuda, window, capped))
    elif needs_grad:
        # repeat_kv copies k and v to all heads, except with one kv head, where the expand stays a view
        kv = shape.head_dim if shape.kv_heads == 1 else a
        saved += (2 * a + 2 * kv) * d + shape.heads * FP32 + seq_len * d  # q, k, v, output; logsumexp; float mask row
    # the shared layout's calls, or windowed blocks: not the plain row's one call
    copied = span is not None and bool(span[0] or span[2] or cuts(window, span[1]) or capped)
    if shape.sandwich_norms and (needs_grad or "o_proj" in targets):
        saved += h * FP32 + FP32  # the post-attention RMSNorm's fp32 input and rsqrt
    if "o_proj" in targets and (cast or not needs_grad or copied):
        # o_proj's input; in fp32 with grad on one SDPA call it is SDPA's saved output itself (on the span path's
        # calls and blocks the outputs are written into one new tensor)
        saved += a * FP32
    return saved, needs_grad or "o_proj" in targets


def mlp_saved_per_token(shape: ModelShape, targets: list[str], d: int, grad_in: bool, tiled: bool = False) -> int:
    """Bytes per token the MLP half of a layer saves (grad_in: whether its input needs grad).

    tiled (tiled_mlp): the MLP keeps only its input; what it would save inside exists one tile at a time in
    backward (layer_work).
    """
    h, i = shape.hidden, shape.intermediate
    cast = d != FP32
    gate_up = [t for t in ("gate_proj", "up_proj") if t in targets]
    saved = h * FP32 + FP32 if grad_in else 0  # RMSNorm
    if shape.sandwich_norms and (grad_in or gate_up or "down_proj" in targets):
        saved += h * FP32 + FP32  # the post-feedforward RMSNorm's fp32 input and rsqrt
    if tiled:
        return saved + h * d
    saved += (len(gate_up) if cast else min(len(gate_up), 1)) * h * FP32
    if grad_in or gate_up:
        saved += 3 * i * d  # gate output (silu input), silu output, up output
    if "down_proj" in targets:
        saved += i * FP32  # the gate*up product (its fp32 copy when cast)
    return saved


MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def layer_saved_per_token(
    shape: ModelShape,
    targets: list[str],
    r: int,
    d: int,
    seq_len: int,
    first: bool = False,
    tiled: bool = False,
    span: tuple[int, int, int] | None = None,
    cuda: bool = True,
    windows: tuple[int | None, ...] = (None,),
    capped: bool = False,
) -> int:
    """Bytes one decoder layer saves for backward per token (first=True: layer 0, whose input needs no grad), for
    the costliest kind of layer (windows: each kind's sliding window)."""
    attention, grad_out = max(
        attention_saved_per_token(shape, targets, d, seq_len, not first, span, cuda, w, capped) for w in windows
    )
    lora_linears = [t for t in BLOCK_LINEARS if t in targets and not (tiled and t in MLP_LINEARS)]
    lora_mid = len(lora_linears) * r * FP32  # lora_A outputs (the MLP's stay inside a tiled MLP's tile)
    return attention + mlp_saved_per_token(shape, targets, d, grad_in=grad_out, tiled=tiled) + lora_mid


def layer_work(shape: ModelShape, d: int, tokens: int, recomputed: int, tile: tuple[int, int] | None = None) -> int:
    """Bytes of gradients and temporaries alive at once in the decoder's backward (fitted to CPU measurements).

    Two moments compete: a layer's MLP backward (~I x (d + 2) B per token, plus one weight that bitsandbytes
    dequantizes to the compute dtype for the input gradient) while that layer's saved tensors are still alive,
    and the final RMSNorm's backward (~5 fp32 [tokens, hidden] temporaries) before any layer is recomputed.
    tile = (tokens per tile, bytes the untiled MLP saves per token): a tiled MLP's backward recomputes one tile,
    whose saved tensors and gradients are the MLP's only [tokens, intermediate] memory, beside the MLP input's
    gradient ([tokens, hidden]).
    """
    largest_weight = max(i * o for i, o in shape.linears().values()) * d
    mlp = shape.intermediate * (d + 2) * tokens + largest_weight
    if tile is not None:
        tile_tokens, per_token = tile
        mlp = (shape.intermediate * (d + 2) + per_token) * tile_tokens + shape.hidden * d * tokens + largest_weight
    norm = 5 * shape.hidden * FP32 * tokens
    return max(mlp, norm - recomputed)


def activation_lines(shape: ModelShape, cfg: Config, d: int, g: Geometry, cuda: bool = True) -> list[Line]:
    """What autograd keeps between forward and backward in the decoder, with or without checkpointing/offload."""
    targets = lora_targets(cfg)
    tiled = 0 < getattr(cfg, "tiled_mlp", 0) < g.width  # one tile spanning the row is the plain MLP
    per_layer, first = (
        layer_saved_per_token(shape, targets, cfg.lora_r, d, g.width, first, tiled, g.span, cuda, g.windows, g.capped)
        * g.tokens
        for first in (False, True)
    )
    # cos and sin: one copy shared by every layer (per row when shared rows carry their own position ids)
    rotary = 2 * (g.rows if g.shared else 1) * g.width * shape.head_dim * d
    longest = g.span[0] + max(g.span[1], g.span[2]) if g.span else 0  # the longest call's keys
    if g.span and not g.capped:  # and the windowed blocks' one band mask per window (qdpo.attention.full_band_mask)
        groups = shape.heads // shape.kv_heads if cuda else 1  # stacked per folded query head on the GPU
        rotary += sum(band_mask_bytes(w, d, groups) for w in set(g.windows) if cuts(w, longest))
    offload = getattr(cfg, "offload_activations", False)
    on_cpu = " (in pinned CPU memory: offload_activations)"
    boundary = g.tokens * shape.hidden * d
    shape_note = f"{g.rows} row{'s' if g.rows != 1 else ''} x {g.width} tok x {shape.hidden} x {d} B"
    if cfg.gradient_checkpointing:
        lines = [
            Line(
                BOUNDARIES,
                shape.layers * boundary,
                f"{shape_note} x {shape.layers} layers" + (on_cpu if offload else ""),
                counted=not offload,
                host=offload,
            ),
            Line(
                RECOMPUTE,
                # offloaded: the layer's own boundary copied back, and the next one's arriving (qdpo.offload)
                per_layer + rotary + (2 * boundary if offload else 0),
                "norms, q/k/v/out, "
                + ("causal calls' copies, " if g.shared and g.span else "" if g.span else "mask, ")
                + (f"MLP input (MLP in tiles of {cfg.tiled_mlp})" if tiled else "MLP gate/up/act")
                + ", LoRA inputs and r-dim outputs"
                + (", + its boundary copied back and the next one arriving" if offload else ""),
            ),
        ]
    else:
        lines = [
            Line(
                LAYERS,
                first + per_layer * (shape.layers - 1) + rotary,
                f"{shape.layers} layers x norms, q/k/v/out, mask, MLP, LoRA inputs and r-dim outputs"
                + (on_cpu if offload else ""),
                counted=not offload,
                host=offload,
            )
        ]
        if offload:
            lines.append(Line(RECOMPUTE, per_layer + rotary, "one layer's saved tensors copied back for its backward"))
    tile = None
    if tiled:
        untiled = (
            mlp_saved_per_token(shape, targets, d, grad_in=True)
            + sum(t in targets for t in MLP_LINEARS) * cfg.lora_r * FP32
        )
        tile = (g.rows * cfg.tiled_mlp, untiled)
    work = layer_work(shape, d, g.tokens, per_layer if cfg.gradient_checkpointing or offload else 0, tile)
    if g.capped:  # a soft-capped block's backward: ~6 fp32 and 2 compute-dtype temporaries per score element
        scores = max(
            largest_block_scores(
                1 if g.shared else g.rows, shape.heads, longest, longest, w if cuts(w, longest) else None
            )
            for w in g.windows
        )
        work = max(work, scores * (6 * FP32 + 2 * d))
    mlp_work = f"one MLP tile's tensors and gradients ({tile[0]} tokens)" if tile else "MLP gradients"
    other = ", or a soft-capped attention block's backward" if g.capped else ""
    lines.append(
        Line(LAYER_WORK, work, f"{mlp_work} + one dequantized weight, or the final norm's fp32 backward{other}")
    )
    lines.append(Line(OTHER_SAVED, g.tokens * (shape.hidden * FP32 + FP32), "final RMSNorm: fp32 input and rsqrt"))
    return lines


def logits_lines(shape: ModelShape, cfg: Config, d: int, g: Geometry) -> list[Line]:
    """The logits as qdpo.logprobs computes them: saved fp32 logits, temporaries of log-softmax and its gradient."""
    v, h = shape.vocab, shape.hidden
    head_lora = "lm_head" in lora_targets(cfg)
    chunk = getattr(cfg, "logits_chunk_size", 0)
    if chunk > 0:
        rows = min(chunk, g.responses)
        saved = g.responses * (h * d + 3 * 8)  # gathered hidden states + index/label/row indices
        work = rows * v * 4 * FP32  # one chunk in backward: recomputed fp32 logits, logsumexp temporaries, grads
        return [
            Line(LOGITS, saved, f"{g.responses} response positions x {h} x {d} B (lm_head applied in chunks)"),
            Line(LOGITS_WORK, work, f"one chunk: {rows} x {v} vocab x 4 fp32 temporaries, recomputed in backward"),
        ]
    positions = g.responses if g.shared else g.rows * g.window  # gathered response positions, or the kept window
    elems = positions * v
    saved = elems * FP32 + positions * (8 + FP32 + 1)  # fp32 logits + gather index, token log-probs, mask
    saved += positions * (h + cfg.lora_r) * FP32 if head_lora else 0  # LoRA on lm_head: fp32 input, r-dim output
    # backward of log-softmax: gradients from logsumexp and from gather plus one temporary, all fp32
    # (the bf16 lm_head output and its fp32 copy in forward never exceed that)
    where = f"{g.responses} response positions" if g.shared else f"{g.rows} seq x {g.window} positions"
    return [
        Line(LOGITS, saved, f"{where} x {v} vocab x 4 B (fp32)"),
        Line(LOGITS_WORK, elems * 3 * FP32, "log-softmax gradients and temporaries: 3 fp32 tensors of that shape"),
    ]


def peak_lines(act: list[Line], logits: list[Line]) -> list[Line]:
    """Mark the smaller of the two backward peaks (logits vs one layer) as not counted: they never coincide."""
    by = {line.part: line for line in act + logits}
    layer_peak = by.get(RECOMPUTE, Line("", 0, "")).bytes + by[LAYER_WORK].bytes
    logits_peak = by[LOGITS].bytes + by[LOGITS_WORK].bytes
    smaller = [by[LAYER_WORK]] + ([by[RECOMPUTE]] if RECOMPUTE in by else [])
    if layer_peak > logits_peak:
        smaller = [by[LOGITS], by[LOGITS_WORK]]
    for line in smaller:
        if line.counted:
            line.counted = False
            line.note += " (peaks at another moment of backward; not in the total)"
    return act + logits


def per_rank_lines(shape: ModelShape, cfg: Config, d: int, lines: list[Line], processes: int) -> list[Line]:
    """What one of several processes holds: with ddp all of it plus DDP's gradient buckets; with fsdp a 1/processes
    shard of the weights, LoRA, gradients and optimizer states (in CPU memory with offload_params), lm_head whole,
    plus the layers FSDP gathers whole while they compute."""
    if processes <= 1:
        return lines
    by = {line.part: line for line in lines}
    if cfg.strategy == "ddp":
        grads = by[LORA_GRADS].bytes
        return lines + [Line(DDP_BUCKETS, grads, "a second fp32 copy of the LoRA gradients, all-reduced in buckets")]
    head = 0 if shape.tied else shape.vocab * shape.hidden * d  # tied: the embeddings stay whole too
    by[FROZEN].bytes -= head
    sharded = (WEIGHTS_4BIT, LORA, LORA_GRADS, OPTIMIZER) + (() if shape.tied else (FROZEN,))
    for part in sharded:
        line = by[part]
        line.bytes = math.ceil(line.bytes / processes)
        line.note += f"; 1/{processes} per rank" + (" (lm_head below)" if part == FROZEN else "")
        if cfg.offload_params:
            line.counted, line.host = False, True
            line.note += ", in CPU memory (offload_params)"
    by[QUANT_STATE].note += "; not a parameter: whole on every rank"
    layer = sum(quantized_bytes(i * o)[0] for i, o in shape.linears().values())
    layer += sum(lora_params(shape, lora_targets(cfg), cfg.lora_r)) * FP32 // shape.layers + 2 * shape.hidden * d
    gathered = Line(FSDP_LAYERS, 2 * layer, "the layer computing and the next one, prefetched (4-bit, LoRA, norms)")
    out = lines + [gathered]
    if head:
        out.append(Line(FSDP_HEAD, head, "whole on every rank: ranks apply it a different number of times"))
    return out


def overhead_line(tensor_bytes: int, device: str) -> Line:
    """CUDA context, workspaces and allocator fragmentation on a GPU; the runtime's own memory on the CPU."""
    if device == "cpu":
        return Line(OVERHEAD, CPU_RUNTIME_BYTES, "assumed: torch and libraries in the process (~0.5 GB)")
    extra = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * tensor_bytes)
    return Line(
        OVERHEAD,
        extra,
        "CUDA context + kernels + cuBLAS workspace 0.75 GB (assumed), +18% allocator slack (measured, H200)",
    )


def plan_memory(
    model_config: dict[str, Any],
    cfg: Config,
    micro_batch_size: int | None = None,
    seq_len: int | None = None,
    *,
    prompt_len: int = 1,
    device: str = "cuda",
    processes: int = 1,
) -> Plan:
    """The memory table of one training step of cfg on this model at (micro_batch_size, seq_len).

    prompt_len is the shortest prompt in the micro-batch: 1 (the default) is the worst case, where every
    response fills max_length (a shared-prompt row is then 2 x max_length - 1 tokens long). device="cpu"
    plans fp32 for compute_dtype auto and no CUDA context. processes > 1 plans one rank of that many
    (micro_batch_size is per rank), sharded or not as cfg.strategy says.
    """
    shape = ModelShape.from_config(model_config)
    b = cfg.micro_batch_size if micro_batch_size is None else micro_batch_size
    t = cfg.max_length if seq_len is None else seq_len
    if b < 1 or t < 2:
        raise UserError(f"the planner needs micro_batch_size >= 1 and seq_len >= 2; got {b} and {t}.")
    name = dtype_name(cfg, device)
    d = DTYPE_BYTES[name]
    g = geometry(b, t, prompt_len, cfg.batch_layout)
    decoder = model_config.get("text_config", model_config)
    loaded = loaded_config(decoder)
    windows = tuple(layer_windows(loaded).values()) if shared_layout_problem(loaded) is None else (None,)
    capped = softcapped(loaded)
    if g.shared and span_attention_applies(loaded):
        p = min(max(prompt_len, 1), t - 1)
        g = replace(g, span=(p, t - p, t - p), windows=windows, capped=capped)
    elif not g.shared and getattr(cfg, "logits_chunk_size", 0) > 0:
        # qdpo.step's right-padded rows without a padding mask: one causal call (in blocks, through spans, where a
        # window cuts the row or the scores are soft-capped)
        if span_attention_applies(loaded):
            g = replace(g, span=(0, t, 0), windows=windows, capped=capped)
    lines = resident_lines(shape, cfg, d) + optimizer_lines(shape, cfg)
    lines += peak_lines(activation_lines(shape, cfg, d, g, device == "cuda"), logits_lines(shape, cfg, d, g))
    lines = per_rank_lines(shape, cfg, d, lines, processes)
    lines.append(overhead_line(sum(line.bytes for line in lines if line.counted), device))
    layout = {
        "shared": f"shared prompt: one row of up to {g.width} tokens per pair (prompt once, "
        "then chosen, then rejected)",
        "packed": f"packed: all {b} pairs in one row of up to {g.width} tokens (prompt once per pair, no padding)",
        "plain": f"{g.rows} sequences (chosen and rejected) of {g.width} tokens",
    }[cfg.batch_layout]
    if g.span and g.shared:
        attention = "two causal SDPA calls per pair, no mask, k/v at their own head count (qdpo.attention)"
    elif g.span:
        attention = "causal SDPA, no mask (rows are right-padded), k/v at their own head count"
    else:
        attention = "masked attention (SDPA float mask per layer, GQA k/v repeated to all heads)"
    cutting = sorted({w for w in g.windows if w is not None and g.span and cuts(w, t)})
    if g.capped:
        attention = attention.replace("SDPA", "soft-capped") + " (in blocks with their own backward)"
    elif cutting:
        attention += f"; sliding window {cutting[0]} in blocks of {BLOCK} queries (one band mask)"
    assumptions = [f"compute dtype {name}", layout, attention]
    if processes > 1:
        how = "sharded (fsdp)" if cfg.strategy == "fsdp" else "each with the whole model (ddp)"
        assumptions.insert(0, f"one rank of {processes} processes, {how}")
    model_type = decoder.get("model_type")
    if shape.experts:
        assumptions.append(
            f"{shape.experts} experts per layer kept in {name} (transformers fuses them into 3-D parameters, which "
            "bitsandbytes does not quantize); their activations planned as one dense MLP"
        )
    if model_type not in LLAMA_STYLE:
        assumptions.append(
            f"model_type {model_type} planned as a Llama-style decoder (RMSNorm, rotary attention, gated MLP)"
        )
    if not getattr(cfg, "needs_reference", True):
        assumptions.append(
            f"no reference model (loss_type {cfg.loss_types[0]}): no reference pass, table or frozen adapter copy"
        )
    elif not getattr(cfg, "precompute_ref_log_probs", True):
        assumptions.append("reference forward each step (no grad: its peak stays below the policy pass)")
    return Plan(lines, b, t, name, device, assumptions)


def span_attention_applies(loaded: SimpleNamespace) -> bool:
    """Whether a step on this config (loaded_config) runs causal SDPA calls with no mask: qdpo.attention's own rule."""
    return span_problem(loaded) is None


def loaded_config(decoder: dict[str, Any]) -> SimpleNamespace:
    """A config.json as qdpo loads the model: qdpo_sdpa, or qdpo_eager for a verified soft-capped family."""
    capped = softcapped(SimpleNamespace(**decoder))
    return SimpleNamespace(**{**decoder, "_attn_implementation": EAGER_IMPLEMENTATION if capped else IMPLEMENTATION})


def fits(
    model_config: dict[str, Any], cfg: Config, budget: float, b: int, t: int, device: str, processes: int = 1
) -> bool:
    """Whether a step at (b, t) fits `budget` bytes (on each of `processes` ranks)."""
    return plan_memory(model_config, cfg, b, t, device=device, processes=processes).total <= budget


def largest_fit(
    model_config: dict[str, Any], cfg: Config, budget_gb: float, *, device: str = "cuda", processes: int = 1
) -> tuple[int, int]:
    """(largest micro_batch_size at cfg.max_length, largest seq_len at micro_batch_size 1) in budget_gb; 0 if none."""
    budget = budget_gb * GB
    b = 0
    while b < 4096 and fits(model_config, cfg, budget, b + 1, cfg.max_length, device, processes):
        b += 1  # memory grows with b (quadratically when packed): a walk of a few dozen steps at most for real budgets
    lo, hi = 1, 2
    if not fits(model_config, cfg, budget, 1, 2, device, processes):
        return b, 0
    while hi < (1 << 22) and fits(model_config, cfg, budget, 1, hi, device, processes):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: lo fits, hi does not (or is the search cap)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model_config, cfg, budget, 1, mid, device, processes) else (lo, mid)
    return b, lo


LONG_TILE = 4096  # tiled_mlp's tile when the planner switches it on: a 14336-wide MLP tile of ~0.35 GB in bf16
SWITCHES = (
    {"tiled_mlp": LONG_TILE},
    {"offload_activations": True},
    {"tiled_mlp": LONG_TILE, "offload_activations": True},
)


def memory_switches(
    model_config: dict[str, Any], cfg: Config, budget_gb: float, processes: int = 1
) -> dict[str, Any] | None:
    """The settings (tiled_mlp, offload_activations or both; the cheapest first: tiling recomputes a little,
    offloading copies every boundary) with which the planned step fits budget_gb when it does not fit as set;
    None when it fits as it is or nothing helps. A switch the user already turned on is not offered."""
    budget, b, t = budget_gb * GB, cfg.micro_batch_size, cfg.max_length
    if fits(model_config, cfg, budget, b, t, "cuda", processes):
        return None
    for switch in SWITCHES:
        if not any(getattr(cfg, k) for k in switch) and fits(
            model_config, replace(cfg, **switch), budget, b, t, "cuda", processes
        ):
            return switch
    return None


def describe_switches(switch: dict[str, Any]) -> str:
    """tiled_mlp=4096 and offload_activations=true."""
    return " and ".join(f"{k}={str(v).lower()}" for k, v in switch.items())


def all_switches(cfg: Config) -> Config:
    """cfg with tiled_mlp (its own tile, or LONG_TILE) and offload_activations on: the longest pairs it can plan."""
    return replace(cfg, tiled_mlp=cfg.tiled_mlp or LONG_TILE, offload_activations=True)


def longest_pair(model_config: dict[str, Any], cfg: Config, budget_gb: float, processes: int = 1) -> tuple[int, int]:
    """The longest max_length at micro-batch 1 in budget_gb as set, and with tiled_mlp and offload_activations on."""
    as_set = largest_fit(model_config, cfg, budget_gb, processes=processes)[1]
    return as_set, largest_fit(model_config, all_switches(cfg), budget_gb, processes=processes)[1]


def run_view(cfg: Config) -> tuple[dict[str, Any], Config]:
    """The model's config.json and cfg with the layout and head the run will take (UserError without config.json)."""
    name = cfg.model  # a .gguf file or the built-in model: the planner reads the converted directory
    if Path(name).suffix == ".gguf" or name.startswith("builtin:"):
        name = resolve_model(name).path
    config, _ = model_config(name)
    return config, exact_settings(cfg, SimpleNamespace(**config))[0]


def planner_view(cfg: Config) -> tuple[dict[str, Any], Config] | None:
    """run_view, or None for a model the planner cannot read."""
    try:
        return run_view(cfg)
    except UserError:
        return None


def auto_micro_batch(cfg: Config, budget_gb: float, processes: int = 1) -> int:
    """The largest micro_batch_size whose planned step fits budget_gb at cfg.max_length (for --micro-batch auto)."""
    config, cfg = run_view(cfg)
    b, _ = largest_fit(config, cfg, budget_gb, processes=processes)
    if b < 1:
        raise UserError(
            f"even one pair of max_length {cfg.max_length} does not fit {budget_gb:g} "
            "GB by the plan; lower max_length or see `qdpo plan`."
        )
    return b
