"""`qdpo merge` and `qdpo export`: thin wrappers over qdpo.merge and qdpo.export (added to `qdpo` in cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from qdpo.merge import DTYPES, ONTO
from qdpo.verify import EVAL_PAIRS

_ONTO_HELP = (
    "dequantized: add the adapter to the NF4-quantized-then-dequantized weights, exactly the function the adapter "
    "was trained on; original: add it to the base's full-precision weights as they are on disk."
)
_EVAL_PAIRS_HELP = (
    "With the check: score the first N held-out pairs of the run with the trained and the shipped model and print "
    "both reward accuracies (0: skip)."
)


@click.command("merge")
@click.argument("source", metavar="RUN_DIR|ADAPTER_DIR")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write the merged model to.")
@click.option(
    "--base", default=None, help="Base model (dir, .gguf or hub id); default: the one the run was trained on."
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="dtype of the written weights; default: the base checkpoint's own.",
)
@click.option("--onto", type=click.Choice(ONTO), default=ONTO[0], show_default=True, help=_ONTO_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an earlier merged model in --out.")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Load the result back and compare it with the trained model (the adapter on the 4-bit base).",
)
@click.option("--eval-pairs", type=click.IntRange(min=0), default=EVAL_PAIRS, show_default=True, help=_EVAL_PAIRS_HELP)
def merge(
    source: str,
    out: Path,
    base: str | None,
    dtype: str | None,
    onto: str,
    overwrite: bool,
    check: bool,
    eval_pairs: int,
) -> None:
    """Merge a run's LoRA adapter into its base model and write a plain transformers directory.

    The base is streamed tensor by tensor into sharded safetensors (memory holds one tensor, not the model),
    with config, generation config, tokenizer and chat template; nothing is left under --out if it fails.
    """
    from qdpo.merge import merge as merge_adapter

    merge_adapter(
        source,
        out,
        base=base,
        dtype=dtype,
        onto=onto,
        overwrite=overwrite,
        check=check,
        echo=click.echo,
        eval_pairs=eval_pairs,
    )


@click.command("export")
@click.argument("source", metavar="RUN_DIR")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["gguf", "gguf-lora", "peft"]),
    required=True,
    help="gguf: the merged model as one GGUF file (llama, mistral, qwen2) and an Ollama Modelfile; gguf-lora: the "
    "adapter alone as a llama.cpp LoRA GGUF (--lora) and a Modelfile; peft: the adapter alone with a model card.",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="GGUF file, or adapter directory, to write."
)
@click.option(
    "--type", "qtype", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True, help="GGUF tensor type."
)
@click.option("--onto", type=click.Choice(ONTO), default=ONTO[0], show_default=True, help="gguf only: " + _ONTO_HELP)
@click.option("--base", default=None, help="GGUF only: base model; default: the one the run was trained on.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export at --out.")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="gguf only: read the file back with transformers and compare it with its merge and with the trained model.",
)
@click.option("--eval-pairs", type=click.IntRange(min=0), default=EVAL_PAIRS, show_default=True, help=_EVAL_PAIRS_HELP)
def export(
    source: str,
    fmt: str,
    out: Path,
    qtype: str,
    onto: str,
    base: str | None,
    overwrite: bool,
    check: bool,
    eval_pairs: int,
) -> None:
    """Export a run: the merged model as a GGUF file, the adapter as a llama.cpp LoRA GGUF, or a PEFT adapter."""
    from qdpo.export import export_gguf, export_peft
    from qdpo.gguf_lora import export_gguf_lora

    if fmt == "peft":
        export_peft(source, out, overwrite=overwrite, echo=click.echo)
    elif fmt == "gguf-lora":
        export_gguf_lora(source, out, qtype=qtype, base=base, overwrite=overwrite, echo=click.echo)
    else:
        export_gguf(
            source,
            out,
            qtype=qtype,
            onto=onto,
            base=base,
            overwrite=overwrite,
            check=check,
            echo=click.echo,
            eval_pairs=eval_pairs,
        )
