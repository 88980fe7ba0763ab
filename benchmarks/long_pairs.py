#!/usr/bin/env python
"""Peak memory of one training step against pair length on the CPU: the dense shared-prompt mask vs qdpo.attention.

Not part of the tests (tests/test_plan.py checks the linear growth and the plan at three lengths). A narrow random
Llama (hidden 64, MLP 256, 2 layers, 4 heads, 2 KV heads, vocab 256) in 4-bit + LoRA, one pair per step, shared
prompt, checkpointed, lm_head in chunks of 256; the peak is the CPU allocator's high-water mark during the step
(torch.profiler memory events, as in tests/test_plan.py), above what existed before it.

- "dense mask": the shared-prompt layout as qdpo ran it before qdpo.attention: a [T, T] mask, SDPA's masked path;
- "causal calls": qdpo.attention's two causal SDPA calls per pair;
- "causal calls + tiled MLP": and tiled_mlp=1024.

    python benchmarks/long_pairs.py                     # ~5 min on 2 cores; writes docs/memory_vs_length.png
    python benchmarks/long_pairs.py --time              # step time with and without tiled_mlp, SmolLM2, ~8 min
    python benchmarks/long_pairs.py --window            # a sliding window of 512: dense mask vs windowed blocks
    python benchmarks/long_pairs.py --capped            # Gemma-2's soft-capped scores: eager vs capped blocks
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import qdpo.attention  # noqa: E402
import qdpo.step  # noqa: E402
from qdpo.batching import make_batch  # noqa: E402
from qdpo.config import Config  # noqa: E402
from qdpo.model import ModelSource, add_lora, load_base_4bit  # noqa: E402
from qdpo.plan import plan_memory  # noqa: E402
from qdpo.tiled_mlp import tile_mlps  # noqa: E402
from qdpo.tokenize import TokenizedPair  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VOCAB, PROMPT = 256, 16
PATHS = {  # name: (max_length values, tiled_mlp, dense mask forced)
    "dense mask": ((1024, 2048, 4096), 0, True),
    "causal calls": ((1024, 2048, 4096, 8192), 0, False),
    "causal calls + tiled MLP": ((1024, 2048, 4096, 8192), 1024, False),
}
LENGTHS = (1024, 2048, 4096)  # --window, --capped
PNG = Path(__file__).resolve().parent.parent / "docs" / "memory_vs_length.png"


def peak_bytes(model, batch, config: Config) -> int:
    """The step's allocator high-water mark above what existed before it (forward + backward, no optimizer)."""
    from torch._C._profiler import _EventType

    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        losses, *_ = qdpo.step.preference_loss(model, batch, config, torch.zeros(2))
        losses.sum().backward()
    events = []

    def walk(nodes) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    blocks, live, peak = {}, 0, 0
    for _, size, ptr in sorted(events):
        if size > 0:
            blocks[ptr] = size
            live += size
        elif ptr in blocks:
            live -= blocks.pop(ptr)
        peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak


def main() -> None:
    """Measure every path at every length, print a table, draw the PNG."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=16384, pad_token_id=0, **SIZES)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model_config = config.to_dict()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread")
    print("| path | max_length | row tokens | measured peak (MB) | planned (MB) |")
    print("|---|---|---|---|---|")
    results = {}
    original = qdpo.attention.span_problem
    for name, (lengths, tile, dense) in PATHS.items():
        qdpo.attention.span_problem = (lambda c: "dense, for comparison") if dense else original
        cfg = Config(model="x", data="y", lora_r=8, lora_alpha=16, logits_chunk_size=256, tiled_mlp=tile)
        base = load_base_4bit(ModelSource("m", str(folder)), torch.float32, torch.device("cpu"), True)
        model = add_lora(base, 8, 16, 0.0, ["all-linear"], None, seed=0).train()
        if tile:
            tile_mlps(model, tile)
        for length in lengths:
            g = torch.Generator().manual_seed(length)
            ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
            pair = TokenizedPair(ids(PROMPT), ids(length - PROMPT), ids(length - PROMPT))
            measured = peak_bytes(model, make_batch([pair], 0, "shared"), cfg)
            planned = "" if dense else f"{_planned(model_config, cfg, length) / 1e6:.1f}"
            results.setdefault(name, []).append((2 * length - PROMPT, measured))
            print(f"| {name} | {length} | {2 * length - PROMPT} | {measured / 1e6:.1f} | {planned} |", flush=True)
    qdpo.attention.span_problem = original
    draw(results)


def _planned(model_config: dict, cfg: Config, length: int) -> int:
    """The planner's step peak above what exists between steps, for one pair of this length on the CPU."""
    from qdpo import plan as P

    result = plan_memory(model_config, cfg, 1, length, prompt_len=PROMPT, device="cpu")
    between_steps = set(P.RESIDENT_PARTS) | {P.LORA_GRADS, P.OPTIMIZER, P.OVERHEAD}
    return sum(line.bytes for line in result.lines if line.counted and line.part not in between_steps)


def draw(results: dict[str, list[tuple[int, int]]]) -> None:
    """Measured peak against row length, one line per path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    ax = fig.add_subplot()
    for name, points in results.items():
        ax.plot([t for t, _ in points], [m / 1e6 for _, m in points], marker="o", label=name)
    ax.set_xlabel("tokens in the shared-prompt row (prompt + chosen + rejected)")
    ax.set_ylabel("step peak above resident (MB)")
    ax.set_title("One DPO step on the CPU, narrow Llama, one pair")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PNG)
    print(f"wrote {PNG}")


def step_seconds(model, batch, cfg: Config, repeats: int) -> list[float]:
    """Seconds of each of `repeats` steps (forward + backward of one pair, no optimizer)."""
    import time

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        losses, *_ = qdpo.step.preference_loss(model, batch, cfg, torch.zeros(2))
        losses.sum().backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return seconds


def time_tiling(repeats: int = 3) -> None:
    """Seconds per step (forward + backward) of SmolLM2-135M on one pair of 2 x 1984 response tokens, checkpointed,
    shared prompt, with and without tiled_mlp=1024: what tiling costs in time."""
    import sys

    from qdpo.model import resolve_model

    source = resolve_model("builtin:smollm2-135m-instruct")
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 40000, (n,), generator=g).tolist()  # noqa: E731
    batch = make_batch([TokenizedPair(ids(64), ids(1984), ids(1984))], 0, "shared")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", file=sys.stderr)
    for tile in (0, 1024):
        base = load_base_4bit(source, torch.float32, torch.device("cpu"), True)
        model = add_lora(base, 16, 32, 0.0, ["all-linear"], None, seed=0).train()
        if tile:
            tile_mlps(model, tile)
        cfg = Config(model="x", data="y", tiled_mlp=tile)
        seconds = step_seconds(model, batch, cfg, repeats)
        print(f"tiled_mlp={tile}: seconds per step {', '.join(f'{t:.1f}' for t in seconds)}", flush=True)


def windowed(repeats: int = 3, capped: bool = False) -> None:
    """The same narrow model as Mistral v0.1 has it, with a sliding window (512) that cuts every row: peak and seconds
    per step of the dense mask (as qdpo ran windowed families before) and of qdpo.attention's windowed blocks, on
    both layouts, one pair per step, checkpointed, lm_head in chunks of 256. capped: as Gemma-2 has it (scores
    soft-capped at 50, the same window), transformers' eager attention vs qdpo.capped_attention's blocks."""

    from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    common = dict(vocab_size=VOCAB, max_position_embeddings=16384, pad_token_id=0, sliding_window=512, **SIZES)
    if capped:
        config = Gemma2Config(**common, head_dim=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    else:
        config = MistralConfig(**common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread")
    print("| layout | max_length | path | measured peak (MB) | seconds per step (best of 3) |")
    print("|---|---|---|---|---|")
    original = qdpo.attention.span_problem
    base = load_base_4bit(ModelSource("m", str(folder)), torch.float32, torch.device("cpu"), True)
    model = add_lora(base, 8, 16, 0.0, ["all-linear"], None, seed=0).train()
    for layout in ("shared", "plain"):
        cfg = Config(
            model="x", data="y", lora_r=8, lora_alpha=16, logits_chunk_size=256, share_prompt=layout == "shared"
        )
        for length in LENGTHS:
            g = torch.Generator().manual_seed(length)
            ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
            batch = make_batch([TokenizedPair(ids(PROMPT), ids(length - PROMPT), ids(length - PROMPT))], 0, layout)
            for name, dense in (("eager" if capped else "dense mask", True), ("blocks", False)):
                qdpo.attention.span_problem = (lambda c: "dense, for comparison") if dense else original
                qdpo.attention.full_band_mask.cache_clear()
                peak = peak_bytes(model, batch, cfg)
                seconds = step_seconds(model, batch, cfg, repeats)
                print(f"| {layout} | {length} | {name} | {peak / 1e6:.1f} | {min(seconds):.2f} |", flush=True)
    qdpo.attention.span_problem = original


if __name__ == "__main__":
    import sys

    if "--time" in sys.argv:
        time_tiling()
    elif "--window" in sys.argv or "--capped" in sys.argv:
        windowed(capped="--capped" in sys.argv)
    else:
        main()
