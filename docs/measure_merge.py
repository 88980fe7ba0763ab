"""Measure merge and GGUF export on the embedded default (SmolLM2-135M-Instruct): the numbers in docs/merge_export.md.

    python docs/measure_merge.py [WORKDIR [RUN_DIR]]      # about 15 minutes on 2 CPU cores

A DPO run (the smoke preset, as `qdpo run` makes it; or RUN_DIR, an existing one), then both merge modes and GGUF
exports, each checked the way the commands check them: against the trained model (the adapter on the 4-bit base),
logits and held-out reward accuracy on the run's 48 held-out pairs; a GGUF also against its own merge. Prints a
markdown table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

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


def base_accuracy(run_dir: Path) -> float:
    """Held-out accuracy of the fp32 base alone (no adapter) against the run's reference: the gap between the bases."""
    import torch
    from transformers import AutoModelForCausalLM

    from qdpo.adapter import find_adapter, resolve_base
    from qdpo.model import load_base_4bit
    from qdpo.reference import compute_reference
    from qdpo.verify import held_out_pairs

    adapter = find_adapter(run_dir)
    source, held = resolve_base(adapter), held_out_pairs(adapter, 200)
    nf4 = load_base_4bit(source, torch.float32, torch.device("cpu"), False).eval()
    chunk, layout = held.config.logits_chunk_size, held.config.batch_layout
    held.reference = compute_reference(nf4, held.pairs, held.batches, held.pad_id, chunk, layout)
    del nf4
    return held.accuracy(AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval())


def main(work: Path, run_dir: Path | None = None) -> None:
    from qdpo.config import build_config
    from qdpo.export import export_gguf
    from qdpo.merge import merge
    from qdpo.presets import load_preset
    from qdpo.train import run

    run_dir = run_dir or work / "run"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        config = build_config(load_preset("smoke").settings, {"output_dir": str(run_dir), "overwrite": True})
        run(config, preset="smoke", progress=False)
    trained = "trained (4-bit + adapter)"
    gap = SimpleNamespace(accuracy=base_accuracy(run_dir), trained_accuracy=0.0, pairs="all")  # the NF4 base's: 0
    rows = [("no merge: the base in fp32", "the base in NF4, no adapter", quantization_gap(run_dir), gap)]
    for onto in ("original", "dequantized"):
        result = merge(run_dir, work / f"merged-{onto}", onto=onto, overwrite=True)
        rows.append((f"`qdpo merge --onto {onto}`", trained, result.deviation, result.shipped))
    for onto, qtype in (("original", "f16"), ("dequantized", "f16"), ("dequantized", "q8_0")):
        out = work / f"model-{onto}-{qtype}.gguf"
        result = export_gguf(run_dir, out, qtype=qtype, onto=onto, overwrite=True)
        command = f"`qdpo export --format gguf --onto {onto} --type {qtype}`"
        rows.append((command, "its own merge (fp32)", result.check.deviation, None))
        rows.append((command, trained, result.check.trained.deviation, result.check.trained))
        assert not result.check.mismatched_strings and result.check.chat_template_same
    print("\n| model | compared with | max abs logit deviation | largest logit | same top token | held-out accuracy |")
    print("|---|---|---|---|---|---|")
    for command, against, d, shipped in rows:
        accuracy = (
            f"{shipped.accuracy:.3f} (the model it is compared with: {shipped.trained_accuracy:.3f})"
            if shipped is not None and shipped.accuracy is not None
            else ""
        )
        print(
            f"| {command} | {against} | {d.max_abs:.3g} | {d.max_logit:.3g} | {d.top1_agreement:.1%} "
            f"of {d.positions} | {accuracy} |"
        )


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    main(args[0] if args else Path(tempfile.mkdtemp(prefix="qdpo-measure-")), args[1] if len(args) > 1 else None)
