"""Time the policy step (forward + backward) in each micro-batch layout on the same pairs: plain, shared, packed.

Not part of the test suite. Loads a model as `qdpo run` does (4-bit NF4 + LoRA) and runs the same
micro-batches in each layout, reporting the padding share, the positions the decoder actually runs, and
seconds per micro-batch. The reference log-probs are left out (a run precomputes them once).

    python benchmarks/layouts.py                              # the smoke preset: SmolLM2 on the built-in pairs
    python benchmarks/layouts.py --micro-batches 12 --ungrouped --set micro_batch_size=16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qdpo.batching import LAYOUTS, length_grouped_batches, make_batch, padding_share  # noqa: E402
from qdpo.config import build_config, parse_override  # noqa: E402
from qdpo.model import add_lora, compute_dtype, load_base_4bit, pick_device  # noqa: E402
from qdpo.prepare import prepare_data  # noqa: E402
from qdpo.presets import load_preset  # noqa: E402
from qdpo.step import preference_loss  # noqa: E402


def main() -> None:
    """Parse arguments, time every layout, print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, as in qdpo run"
    )
    ap.add_argument("--micro-batches", type=int, default=10, help="micro-batches timed per layout (after one warm-up)")
    ap.add_argument("--ungrouped", action="store_true", help="random micro-batches instead of length-grouped ones")
    args = ap.parse_args()

    overrides = dict(parse_override(s) for s in args.set)
    config = build_config(load_preset(args.preset).settings, overrides)
    data = prepare_data(config, echo=lambda _: None)
    device = pick_device()
    dtype = compute_dtype(config.compute_dtype, device)
    model = load_base_4bit(data.source, dtype, device, config.gradient_checkpointing)
    model = add_lora(model, config.lora_r, config.lora_alpha, 0.0, config.lora_target_modules, None, config.seed)
    model.train()

    b = config.micro_batch_size
    if args.ungrouped:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        batches = [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
    else:
        batches = [idx for idx in length_grouped_batches(data.train, b, config.seed) if len(idx) == b]
    batches = batches[: args.micro_batches + 1]
    if len(batches) < 2:
        raise SystemExit(
            f"need at least 2 full micro-batches of {b} pairs (one is warm-up); the data gives {len(batches)}."
        )
    pad_id = data.tokenizer.pad_token_id
    reference = torch.zeros(2 * b)  # the loss value does not matter here, only the work

    print(
        f"# {args.preset} {' '.join(args.set)} | {len(batches) - 1} micro-batches of {b} pairs"
        f"{' (ungrouped)' if args.ungrouped else ' (length-grouped)'} | {device.type} "
        f"{platform.processor() or platform.machine()}"
        f" x{torch.get_num_threads()} threads | torch {torch.__version__}"
    )
    print(f"{'layout':<8} {'padding':>8} {'positions/mb':>13} {'s/mb':>7} {'(min..max)':>14} {'vs plain':>9}")
    base = None
    for layout in LAYOUTS:
        times, positions = [], []
        cfg = dataclasses.replace(config, share_prompt=layout != "plain", pack_pairs=layout == "packed")
        for k, idx in enumerate(batches):
            batch = make_batch([data.train[j] for j in idx], pad_id, layout)
            start = time.perf_counter()
            losses, *_ = preference_loss(model, batch, cfg, reference)
            losses.sum().backward()
            model.zero_grad(set_to_none=True)
            if k:  # the first micro-batch warms up allocator and kernels
                times.append(time.perf_counter() - start)
                positions.append(batch.input_ids.numel())
        mean = statistics.mean(times)
        base = base or mean
        print(
            f"{layout:<8} {padding_share(data.train, batches[1:], layout):>8.1%} {statistics.mean(positions):>13.0f} "
            f"{mean:>7.2f} {min(times):>6.2f}..{max(times):<6.2f} {mean / base:>8.2f}x"
        )


if __name__ == "__main__":
    main()
