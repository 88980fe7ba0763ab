"""Export a run's adapter alone as a llama.cpp LoRA GGUF file, applied at load time (`--lora`, Ollama's ADAPTER).

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads: general.type
"adapter", adapter.type "lora", adapter.lora.alpha (llama.cpp scales B·A by alpha / rank), and for each changed
weight two tensors named after the base tensor's GGUF name, `<name>.lora_a` (rank × in) and `<name>.lora_b`
(out × rank). Where the full-model export permutes Q/K rows for llama.cpp's rotary layout, B's rows get the same
permutation (it acts on output rows only, so B·A permutes with it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qdpo.adapter import Adapter, Lora, find_adapter, local_dir, read_lora, resolve_base
from qdpo.errors import UserError
from qdpo.export import GGUF_ARCHS, GGUF_TYPES, ROPE_PERMUTED, check_exportable, gguf_array, gguf_type, llama_permute
from qdpo.fs import check_output, staged
from qdpo.ollama import lora_modelfile, modelfile_path
from qdpo.quiet import quiet_libraries


@dataclass
class LoraTensors:
    """One weight's LoRA factors as llama.cpp takes them: GGUF base name, A and B (scale folded in where needed)."""

    name: str  # the base tensor's GGUF name, e.g. blk.0.attn_q.weight
    a: torch.Tensor  # (rank, in); for token_embd (vocab, rank), as llama.cpp's input-embedding LoRA wants it
    b: torch.Tensor  # (out, rank)


def lora_alpha(loras: dict[str, Lora]) -> float:
    """The alpha to write: llama.cpp scales every pair by alpha / rank, so alpha = scale · rank of the first pair."""
    first = loras[min(loras)]
    return first.scale * first.a.shape[0]


def gguf_lora_tensors(loras: dict[str, Lora], config) -> list[LoraTensors]:
    """Each LoRA pair under its GGUF base name, B permuted where llama.cpp's graph permutes Q/K, in name order."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == GGUF_ARCHS[config.model_type])
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    alpha = lora_alpha(loras)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for hf_name, lora in sorted(loras.items()):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name == "output.weight" and tied:
            raise UserError(
                "the adapter changes lm_head, which this model ties to its embeddings and llama.cpp LoRA files "
                "cannot untie; use --format gguf (the merged model) instead."
            )
        if gguf_name == "token_embd.weight" and tied:
            # llama.cpp's output layer of a tied model is token_embd.weight under the same name, so its LoRA lookup
            # (by tensor name) would apply the embedding's factors at the output too, where PEFT applies none.
            raise UserError(
                "the adapter changes embed_tokens, which this model ties to lm_head: llama.cpp would apply it at "
                "the output layer as well; use --format gguf (the merged model) instead."
            )
        if gguf_name is None or lora.weight is not None:
            raise UserError(
                f"the adapter changes {hf_name}, which a llama.cpp LoRA file cannot carry; "
                "use --format gguf (the merged model) instead."
            )
        embedding = gguf_name == "token_embd.weight"
        if lora.transposed and not embedding:
            raise UserError(f"{hf_name} is stored transposed (fan_in_fan_out); use --format gguf instead.")
        rank = lora.a.shape[0]
        # alpha / rank is what llama.cpp applies; a pair trained with another scale (alpha_pattern, rslora with
        # several ranks) carries the difference in B, which leaves B·A·scale exactly the adapter's change.
        factor = lora.scale / (alpha / rank)
        b = lora.b.float() if factor == 1 else lora.b.float() * factor
        if config.model_type in ROPE_PERMUTED and re.search(r"\.(q|k)_proj\.weight$", hf_name):
            kv_heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
            b = llama_permute(b, config.num_attention_heads, kv_heads)
        # llama.cpp's input embedding looks rows up in A, so it takes A transposed (convert_lora_to_gguf.py does so).
        a = lora.a.float().T.contiguous() if embedding else lora.a.float()
        out.append(LoraTensors(gguf_name, a, b))
    return out


def write_gguf_lora(adapter: Adapter, base_dir: Path, out_file: Path, qtype: str, name: str) -> int:
    """Write the adapter as a llama.cpp LoRA GGUF for the base in base_dir; returns the number of LoRA pairs."""
    from gguf import GGUFType, GGUFWriter, Keys
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    check_exportable(config)
    loras = read_lora(adapter)
    tensors = gguf_lora_tensors(loras, config)
    writer = GGUFWriter(out_file, GGUF_ARCHS[config.model_type])
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, lora_alpha(loras))
    writer.add_name(name)
    for t in tensors:
        for suffix, tensor in (("lora_a", t.a), ("lora_b", t.b)):
            kind = gguf_type(tuple(tensor.shape), qtype)
            writer.add_tensor(f"{t.name}.{suffix}", gguf_array(tensor, kind), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return len(tensors)


def export_gguf_lora(
    path: str | Path,
    out: str | Path,
    qtype: str = "f16",
    base: str | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Write a run's adapter as a llama.cpp LoRA GGUF file, and an Ollama Modelfile (FROM the base, ADAPTER it)."""
    quiet_libraries()
    out = Path(out).expanduser()
    if qtype not in GGUF_TYPES:
        raise UserError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {qtype!r}.")
    check_output(out, overwrite, marker=None)
    adapter = find_adapter(path)
    source = resolve_base(adapter, base)
    from transformers import AutoTokenizer

    base_dir = local_dir(source)
    name = Path(adapter.run_dir or adapter.path).name
    with staged(out, inner="adapter.gguf") as tmp:
        pairs = write_gguf_lora(adapter, base_dir, tmp / "adapter.gguf", qtype, name)
    # The run's adapter directory holds the tokenizer it trained with; a bare adapter uses the base's.
    has_tokenizer = any((adapter.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    modelfile = modelfile_path(out)
    lora_modelfile(
        modelfile, out, adapter, source, AutoTokenizer.from_pretrained(adapter.path if has_tokenizer else base_dir)
    )
    echo(f"GGUF LoRA: {out} ({pairs} LoRA pairs, {qtype}); apply it to the base GGUF with llama.cpp's --lora")
    echo(f"Ollama Modelfile: {modelfile}  (ollama create NAME -f {modelfile})")
    return out
