#!/usr/bin/env python
"""Held-out figures of finished smoke-preset runs, from their saved adapters: the length-averaged log-prob
accuracy and margin before (base model) and after (base + adapter), which is what SimPO's and ORPO's own
rewards measure, and the DPO-style accuracy of the adapter against the base (log-ratio margin > 0), which
shows learning even where the untrained model already ranks the pairs by average log-prob.

    python benchmarks/adapter_vs_base.py RUN_DIR [RUN_DIR ...]    # runs of `qdpo run --preset smoke`

Not part of the tests (docs/benchmarks.md, "Preference methods").
"""

from __future__ import annotations

import sys

import torch

from qdpo.batching import length_grouped_batches, make_batch
from qdpo.families import exact_settings
from qdpo.model import add_lora, load_base_4bit
from qdpo.prepare import prepare_data
from qdpo.presets import resolve_settings
from qdpo.step import reference_scores, score_batch


def margins(run: str, config, data) -> list[tuple[float, float, float]]:
    """Per held-out pair: average log-prob margin after, before, and the summed log-ratio margin vs the base."""
    base = load_base_4bit(data.source, torch.float32, torch.device("cpu"), False)
    model = add_lora(base, 16, 32, 0.0, ["all-linear"], f"{run}/adapter", 0, reference=False).eval()
    rows = []
    with torch.no_grad():
        for idx in length_grouped_batches(data.eval, config.micro_batch_size, config.seed):
            batch = make_batch([data.eval[i] for i in idx], data.tokenizer.pad_token_id, config.batch_layout)
            policy, base_scores = score_batch(model, batch, 1024), reference_scores(model, batch, 1024)
            b = len(idx)
            after, before = policy.logps / policy.lengths, base_scores.logps / base_scores.lengths
            ratio = policy.logps - base_scores.logps
            rows += [(float(after[i] - after[b + i]), float(before[i] - before[b + i]), float(ratio[i] - ratio[b + i]))
                     for i in range(b)]  # fmt: skip
    return rows


def main() -> None:
    """One line per run directory."""
    config = resolve_settings("smoke")
    data = prepare_data(config, echo=lambda _: None)
    config, _ = exact_settings(config, data.model_config)
    for run in sys.argv[1:]:
        rows = margins(run, config, data)
        n = len(rows)
        share = lambda k: sum(r[k] > 0 for r in rows) / n  # noqa: E731
        mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
        print(
            f"{run}: average log-prob accuracy {share(1):.3f} -> {share(0):.3f}, margin {mean(1):.3f} -> "
            f"{mean(0):.3f}; adapter vs base log-ratio accuracy {share(2):.3f}, margin {mean(2):.3f}"
        )


if __name__ == "__main__":
    main()
