"""Measure merge and GGUF export on the embedded default (SmolLM2-135M-Instruct): the numbers in docs/merge_export.md.

    python docs/measure_merge.py [WORKDIR]      # about 5 minutes on 2 CPU cores

A short DPO run (the smoke preset, 4 steps), then both merge modes and both GGUF types, each checked the way the
commands check them; prints a markdown table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def quantization_gap(run_dir: Path):
    """The base alone, full precision vs NF4: what `--onto original` inherits on top of the adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdpo.adapter import find_adapter, resolve_base
    from qdpo.model import load_base_4bit
    from qdpo.verify import check_prompts, compare, prompt_logits

    source = resolve_base(find_adapter(run_dir))
    prompts = check_prompts(AutoTokenizer.from_pretrained(source.path))
    nf4 = prompt_logits(load_base_4bit(source, torch.float32, torch.device("cpu"), False).eval(), prompts)
    full = prompt_logits(AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval(), prompts)
    return compare(nf4, full)


def main(work: Path) -> None:
    from qdpo.config import build_config
    from qdpo.export import export_gguf
    from qdpo.merge import merge
    from qdpo.presets import load_preset
    from qdpo.train import run

    run_dir = work / "run"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        config = build_config(
            load_preset("smoke").settings,
            {"max_steps": 4, "eval_steps": 0, "output_dir": str(run_dir), "overwrite": True},
        )
        run(config, preset="smoke", progress=False)
    rows = [("no merge: the base in fp32", "the base in NF4, no adapter", quantization_gap(run_dir))]
    for onto in ("original", "dequantized"):
        result = merge(run_dir, work / f"merged-{onto}", onto=onto, overwrite=True)
        rows.append((f"`qdpo merge --onto {onto}`", "adapter on the 4-bit base", result.deviation))
    for qtype in ("f16", "q8_0"):
        result = export_gguf(run_dir, work / f"model-{qtype}.gguf", qtype=qtype, overwrite=True)
        rows.append((f"`qdpo export --format gguf --type {qtype}`", "merged model (fp32)", result.check.deviation))
        assert not result.check.mismatched_strings and result.check.chat_template_same
    print("\n| model | compared with | max abs logit deviation | largest logit | same top token |")
    print("|---|---|---|---|---|")
    for command, against, d in rows:
        print(
            f"| {command} | {against} | {d.max_abs:.3g} | {d.max_logit:.3g} | {d.top1_agreement:.1%} "
            f"of {d.positions} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qdpo-measure-")))
