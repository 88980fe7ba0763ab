#!/usr/bin/env python
"""offload_activations on a GPU: exact, how much memory it frees, and whether its copies hide behind compute.

Not part of the tests (tests/test_lean_step.py checks the bookkeeping on the CPU with synchronous copies). One
training step (forward + backward, no optimizer) of a random 8-layer Llama-3-8B-wide model in 4-bit + LoRA on all
block linears, one shared-prompt pair, checkpointed, tiled_mlp=4096, logits in chunks of 1024, three ways:

- "kept": offload_activations off (every layer input stays on the GPU);
- "save_on_cpu": torch.autograd.graph.save_on_cpu(pin_memory=True), what qdpo used before qdpo.offload: copies
  on the compute stream, each brought back only when backward asks for it;
- "qdpo.offload": copies on a side stream, each layer's input brought back while the layer above runs backward.

For each: the loss and every LoRA gradient against "kept" (largest relative difference; a second "kept" step gives
the run-to-run noise floor), the median step time of 3 after a warm-up, and torch.cuda.max_memory_allocated above
what existed before the step.

    python benchmarks/offload_check.py --out offload.json              # GPU, ~2 min on an H200
    python benchmarks/offload_check.py --smoke                         # CPU dry run of the flow, tiny shape
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import qdpo.offload  # noqa: E402
import qdpo.step  # noqa: E402
from qdpo.batching import make_batch  # noqa: E402
from qdpo.config import Config  # noqa: E402
from qdpo.model import ModelSource, add_lora, load_base_4bit  # noqa: E402
from qdpo.tiled_mlp import tile_mlps  # noqa: E402
from qdpo.tokenize import TokenizedPair  # noqa: E402

SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8
)
SMOKE_SHAPE = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
VOCAB, PROMPT = 32000, 64


def write_model(folder: Path, shape: dict, device: str) -> None:
    """A random Llama of this shape in bf16 safetensors (seeded; built on the device to be quick)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=65536, pad_token_id=0, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model


def modes(device: str) -> dict[str, object]:
    """The three ways, as the context the policy forward runs in."""
    if device == "cpu":  # the flow only: on the CPU nothing is offloaded
        return {"kept": None, "qdpo.offload": None}
    return {
        "kept": None,
        "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(pin_memory=True),
        "qdpo.offload": qdpo.offload.offload_hooks,
    }


def step(model, batch, config: Config, hooks, device: str) -> tuple[float, float, int, torch.Tensor, dict]:
    """One forward + backward: seconds, loss, peak bytes above the start, and the loss and LoRA gradients."""
    model.zero_grad(set_to_none=True)
    qdpo.step.offload_hooks = hooks or qdpo.offload.offload_hooks
    cfg = dataclasses.replace(config, offload_activations=hooks is not None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    start = time.perf_counter()
    losses, *_ = qdpo.step.preference_loss(model, batch, cfg, torch.zeros(2))
    losses.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - start_bytes if device == "cuda" else 0
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return seconds, float(losses.detach().sum()), peak, losses.detach().float(), grads


def largest_difference(a: dict, b: dict) -> float:
    """The largest |a - b| / max|a| over every gradient tensor."""
    return max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp(min=1e-30)) for n in a)


def main() -> None:
    """Run the three ways, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="tokens per response (the row is 2x plus the prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the flow only)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    shape, length = (SMOKE_SHAPE, 64) if args.smoke else (SHAPE, args.length)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    folder = Path(tempfile.mkdtemp())
    write_model(folder, shape, device)
    base = load_base_4bit(ModelSource("m", str(folder)), dtype, torch.device(device), True)
    model = add_lora(base, 16, 32, 0.0, ["all-linear"], None, seed=0).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy away from the reference, so gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    tile_mlps(model, 4096)
    config = Config(model="x", data="y", lora_r=16, lora_alpha=32, logits_chunk_size=1024, tiled_mlp=4096)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    batch = make_batch([TokenizedPair(ids(PROMPT), ids(length), ids(length))], 0, "shared")
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": shape,
        "row_tokens": PROMPT + 2 * length,
    }
    print(json.dumps(env))
    _, _, _, _, reference = step(model, batch, config, None, device)  # warm-up, and the gradients to compare with
    results = {}
    for name, hooks in modes(device).items():
        runs = [step(model, batch, config, hooks, device) for _ in range(args.repeats)]
        results[name] = {
            "seconds_median": statistics.median(r[0] for r in runs),
            "seconds": [r[0] for r in runs],
            "peak_gb": max(r[2] for r in runs) / 1e9,
            "loss": runs[0][1],
            "grad_rel_diff_vs_kept": largest_difference(reference, runs[0][4]),
        }
        print(f"{name:>14}: {json.dumps(results[name])}", flush=True)
    print("| way | step s (median of 3) | peak above start (GB) | largest gradient difference vs kept |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds_median']:.3f} | {r['peak_gb']:.2f} | {r['grad_rel_diff_vs_kept']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps({"env": env, "results": results}, indent=2))
    with contextlib.suppress(OSError):
        for f in folder.iterdir():
            f.unlink()


if __name__ == "__main__":
    main()
