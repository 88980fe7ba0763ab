#!/usr/bin/env python
"""Shared-prompt attention on a GPU: qdpo's two causal SDPA calls per pair against flex_attention with a block mask.

Not part of the tests, and not a path qdpo takes: issue 13 names flex_attention as the alternative worth measuring
on CUDA (torch 2.13 has no flex backward on the CPU, so nothing here could test it in training). One attention
layer of Llama-3-8B's shape (32 query heads, 8 K/V heads, head dim 128, bf16), one shared-prompt row
(prompt + chosen + rejected; rejected sees the prompt, not chosen), forward + backward, three ways:

- "dense": SDPA with the [T, T] boolean mask (qdpo before qdpo.attention; skipped above --dense-max tokens);
- "causal calls": qdpo.attention.span_attention, what qdpo runs today;
- "flex": torch.compile(flex_attention) with a BlockMask built from the same rule (blocks of 128 that are all
  masked are skipped; GQA without repeating K/V).

For each: the output and the q/k/v gradients against a float64 reference of the dense rule (at the shortest length
only; at the longer ones against "causal calls"), the median forward + backward time of --repeats after a warm-up
(flex's compile happens in the warm-up), and torch.cuda.max_memory_allocated above what existed before.
With --window W, a sliding window of W positions (Mistral v0.1: 4096) on top of the rule: "causal calls" are then
qdpo.attention's windowed blocks as a GPU runs them (each kv head's query heads folded into one run of queries),
and "blocks, enable_gqa" the same blocks passing enable_gqa instead, which CUDA's masked kernel does not take (the
fold exists because SDPA would fall back to its math kernel: this row shows what that costs).
With --softcap C, Gemma-2's soft-capped scores (C * tanh(s / C)), which SDPA cannot compute: the row then compares
"eager" (transformers' eager attention rule, what qdpo ran for them before qdpo.capped_attention), "capped blocks"
(qdpo.capped_attention: blocks of queries with their own backward, what qdpo runs now) and "flex" (a score_mod).

    python benchmarks/flex_check.py --out flex.json                 # GPU, a few minutes on an H200 (compiles)
    python benchmarks/flex_check.py --softcap 50 --out flex-cap.json
    python benchmarks/flex_check.py --window 4096 --out flex-window.json
    python benchmarks/flex_check.py --smoke                          # CPU: forward only, tiny shape, checks the rule
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import qdpo.attention
from qdpo.attention import span_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def segments(prompt: int, chosen: int, rejected: int, device: str) -> torch.Tensor:
    """Each position's part of the row: 0 prompt, 1 chosen, 2 rejected."""
    sizes = torch.tensor([prompt, chosen, rejected], device=device)
    return torch.repeat_interleave(torch.arange(3, device=device), sizes)


def positions(part: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own sequence: the rejected answer follows the prompt, not chosen."""
    chosen = int((part == 1).sum())
    pos = torch.arange(part.shape[0], device=part.device)
    return torch.where(part == 2, pos - chosen, pos)


def rule(part: torch.Tensor, window: int | None):
    """flex's mask_mod: causal, except that rejected queries never see chosen keys (and within the window)."""
    pos = positions(part)

    def allowed(b, h, q, k):
        ok = (k <= q) & ~((part[q] == 2) & (part[k] == 1))
        return ok & (pos[q] - pos[k] < window) if window else ok

    return allowed


def dense_mask(part: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The same rule as a [T, T] boolean tensor, written out on its own (not through flex)."""
    n = part.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=part.device).tril()
    mask = causal & ~((part[:, None] == 2) & (part[None, :] == 1))
    if window:
        pos = positions(part)
        mask &= (pos[:, None] - pos[None, :]) < window
    return mask


def reference(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention by its definition, in float64, K/V repeated to every head: [1, H, T, D]."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def ways(
    part, spans, scale: float, softcap: float | None, dense_ok: bool, device: str, compiled, window: int | None = None
) -> dict:
    """Each way as a function (q, k, v) -> [1, H, T, D]."""
    n = part.shape[0]
    block = create_block_mask(rule(part, window), None, None, n, n, device=device)
    layer = SimpleNamespace(config=SimpleNamespace(sliding_window=window, layer_types=None), layer_idx=0)

    def flex(q, k, v):
        score_mod = None
        if softcap:

            def score_mod(score, b, h, qi, ki):
                return softcap * torch.tanh(score / softcap)

        return compiled(q, k, v, score_mod=score_mod, block_mask=block, scale=scale, enable_gqa=True)

    def causal_calls(q, k, v):
        return span_attention(layer, q, k, v, None, scaling=scale, qdpo_spans=spans)[0].transpose(1, 2)

    def blocks_gqa(q, k, v):  # the windowed blocks passing enable_gqa with their mask, not folded
        fold, qdpo.attention.folds_gqa = qdpo.attention.folds_gqa, lambda q: False
        try:
            return causal_calls(q, k, v)
        finally:
            qdpo.attention.folds_gqa = fold

    def dense(q, k, v):
        mask = dense_mask(part, window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def eager(q, k, v):  # transformers' eager attention with the soft cap, as Gemma-2 runs it
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~dense_mask(part), torch.finfo(scores.dtype).min)
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v

    def capped_blocks(q, k, v):
        return span_attention(layer, q, k, v, None, scaling=scale, qdpo_spans=spans, softcap=softcap)[0].transpose(
            1, 2
        )

    if softcap:
        return ({"eager": eager} if dense_ok else {}) | {"capped blocks": capped_blocks, "flex": flex}
    found = {"dense": dense} if dense_ok else {}
    found |= {"causal calls": causal_calls}
    if window and device == "cuda":
        found |= {"blocks, enable_gqa": blocks_gqa}
    return found | {"flex": flex}


def measure(fn, q, k, v, grad_out, device: str, repeats: int, backward: bool) -> tuple[float, int, list]:
    """Median seconds of forward (+ backward), peak bytes above the start, and the output and q/k/v gradients."""
    times, peak = [], 0
    result = []
    for i in range(repeats + 1):  # the first is warm-up (and compiles flex)
        for t in (q, k, v):
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn(q, k, v)
        if backward:
            (out * grad_out).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - start_bytes)
        if i:
            times.append(time.perf_counter() - start)
        result = [out.detach()] + ([t.grad.detach().clone() for t in (q, k, v)] if backward else [])
        del out
    return statistics.median(times), peak, result


def difference(a: list, b: list) -> float:
    """The largest |a - b| / max|a| over the output and each gradient."""
    return max(
        float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp(min=1e-30)) for x, y in zip(a, b)
    )


def main() -> None:
    """Run every way at every length, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,16384", help="tokens per response (row: prompt + 2x)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--softcap", type=float, default=None, help="Gemma-2's attention soft cap (50)")
    parser.add_argument("--window", type=int, default=None, help="a sliding window (Mistral v0.1: 4096)")
    parser.add_argument("--dense-max", type=int, default=20000, help="longest row the dense ways are run at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shape, forward only (flex has no CPU backward)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (HEADS, KV_HEADS, HEAD_DIM)
    lengths = [40, 72] if args.smoke else [int(x) for x in args.lengths.split(",")]
    prompt = 24 if args.smoke else args.prompt
    backward = not args.smoke
    compiled = flex_attention if args.smoke else torch.compile(flex_attention, dynamic=False)
    scale = dim**-0.5
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "heads": [heads, kv_heads, dim],
        "softcap": args.softcap,
        "window": args.window,
    }
    print(json.dumps(env), flush=True)
    results = []
    g = torch.Generator(device=device).manual_seed(0)
    for index, length in enumerate(lengths):
        n = prompt + 2 * length
        part = segments(prompt, length, length, device)
        spans = ((0, 0, prompt, length, length),)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        q = rand(1, heads, n, dim).requires_grad_(backward)
        k = rand(1, kv_heads, n, dim).requires_grad_(backward)
        v = rand(1, kv_heads, n, dim).requires_grad_(backward)
        grad_out = rand(1, heads, n, dim)
        exact = None
        if index == 0:  # float64 truth, with its own autograd for the gradients
            q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
            out64 = reference(q64, k64, v64, dense_mask(part, args.window), scale, args.softcap)
            if backward:
                (out64 * grad_out.double()).sum().backward()
            exact = [out64.detach()] + ([t.grad for t in (q64, k64, v64)] if backward else [])
            del q64, k64, v64, out64
        found = ways(part, spans, scale, args.softcap, n <= args.dense_max, device, compiled, args.window)
        row = {"row_tokens": n}
        baseline = None
        for name, fn in found.items():
            try:
                seconds, peak, got = measure(fn, q, k, v, grad_out, device, args.repeats, backward)
            except torch.OutOfMemoryError:
                row[name] = {"error": "out of memory"}
                torch.cuda.empty_cache()
                continue
            against = exact if exact is not None else baseline
            row[name] = {
                "seconds_median": seconds,
                "peak_gb": peak / 1e9,
                "rel_diff": difference(against, got) if against is not None else None,
                "against": "float64 reference" if exact is not None else "first way" if against else None,
            }
            baseline = baseline or got
            print(f"{n:>6} {name:>13}: {json.dumps(row[name])}", flush=True)
        results.append(row)
        del q, k, v, grad_out
        if device == "cuda":
            torch.cuda.empty_cache()
    names = list(dict.fromkeys(k for r in results for k in r if k != "row_tokens"))
    print("| row tokens | " + " | ".join(f"{n}: s / GB / rel. diff" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for r in results:
        cells = []
        for name in names:
            c = r.get(name)
            if c is None or "error" in c:
                cells.append(c["error"] if c else "skipped")
            else:
                diff = f"{c['rel_diff']:.1e}" if c["rel_diff"] is not None else "-"
                cells.append(f"{c['seconds_median'] * 1e3:.1f} ms / {c['peak_gb']:.2f} / {diff}")
        print(f"| {r['row_tokens']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"env": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
