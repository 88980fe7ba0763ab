"""Merge a LoRA adapter into its base model: stream the base checkpoint tensor by tensor, add scale·B@A, check the result."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from qdpo.config import read_json
from qdpo.errors import UserError
from qdpo.fs import check_output, staged
from qdpo.model import ModelSource, convert_gguf, load_base_4bit, pick_device, resolve_model
from qdpo.model import compute_dtype as auto_compute_dtype
from qdpo.tokenize import encode_prompt

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ONTO = ("original", "dequantized")
# 2 GB shards: a 7B bf16 model becomes 7 files, and no more than one tensor is ever held while writing.
SHARD_BYTES = 2 * 1024**3
NF4_BLOCKSIZE = 64  # BitsAndBytesConfig's 4-bit default, which qdpo.model.load_base_4bit uses
CHECK_PROMPTS = ["What is two plus two?", "Name the capital of France in one sentence.",
                 "Write one short sentence about the sea."]
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
_PEFT_PREFIX = "base_model.model."  # how PEFT prefixes a LoRA model's keys in adapter_model.safetensors
_LORA_SUFFIXES = {".lora_A.weight": ("a", False), ".lora_B.weight": ("b", False),
                  ".lora_embedding_A": ("a", True), ".lora_embedding_B": ("b", True),
                  ".base_layer.weight": ("weight", None)}  # PEFT saves embedding layers it wraps (save_embedding_layers)


@dataclass
class Adapter:
    """A PEFT LoRA adapter directory and, when qdpo wrote it, the run that made it."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    run: dict[str, Any] | None  # run.json, or the adapter's own copy of it (qdpo.json)
    run_dir: Path | None  # the run directory, when the adapter sits in one


@dataclass
class Lora:
    """One layer's LoRA factors: its weight changes by scale · B @ A."""

    a: torch.Tensor  # (r, in_features); for an embedding (r, num_embeddings)
    b: torch.Tensor  # (out_features, r); for an embedding (embedding_dim, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rslora
    transposed: bool = False  # embeddings and Conv1D (fan_in_fan_out) store the weight as (in, out)
    weight: torch.Tensor | None = None  # the layer's own weight, when PEFT saved it with the adapter (embedding layers)

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight this LoRA changes."""
        shape = (self.b.shape[0], self.a.shape[1])
        return (shape[1], shape[0]) if self.transposed else shape

    def delta(self) -> torch.Tensor:
        """scale · B @ A in fp32, laid out like the base weight."""
        delta = self.b.float() @ self.a.float()
        return (delta.T if self.transposed else delta) * self.scale


@dataclass
class Planned:
    """One tensor of the merged checkpoint: where it is read from and what it becomes."""

    name: str  # name in the merged checkpoint
    source: str  # name in the base checkpoint (differs only for an untied lm_head)
    file: Path  # base shard holding it
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype written
    lora: Lora | None
    quantized: bool  # held in NF4 by the 4-bit model the adapter was trained on

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class MergePlan:
    """Everything the merge will write, decided before a byte is written."""

    base_dir: Path
    tensors: list[Planned]
    untied: bool  # lm_head was tied to the embeddings and gets its own copy (LoRA changed one of them)
    onto: str  # "original" or "dequantized" base weights
    compute_dtype: torch.dtype  # what the 4-bit base computed in while training (its NF4 codes depend on it)
    device: torch.device  # where NF4 is computed: the training device when this machine has it

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the largest tensor: what config.json states."""
        return max(self.tensors, key=lambda p: p.nbytes).dtype


@dataclass
class Deviation:
    """How far one model's logits are from another's over a few prompts."""

    max_abs: float  # largest |logit difference| at any position and vocabulary entry
    max_logit: float  # largest |logit| of the reference, for scale
    top1_agreement: float  # share of positions where both pick the same next token
    positions: int

    def describe(self) -> str:
        return (f"{self.max_abs:.3g} (logits reach {self.max_logit:.3g}; same top token at "
                f"{self.top1_agreement:.0%} of {self.positions} positions)")


@dataclass
class MergeResult:
    """What merge wrote and how close it is to the adapter on the 4-bit base."""

    out: Path
    base: ModelSource
    onto: str
    deviation: Deviation | None


def find_adapter(path: str | Path) -> Adapter:
    """Accept a run directory or an adapter directory and return the adapter with its run description."""
    given = Path(path).expanduser()
    if (given / "adapter_config.json").is_file():
        adapter_dir = given
        run_dir = given.parent if (given.parent / "run.json").is_file() else None
    elif (given / "run.json").is_file():
        run_dir = given
        run = read_json(given / "run.json")
        adapter_dir = given / run.get("adapter_dir", "adapter")
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"run {given} has no adapter yet (status: {run.get('status', 'unknown')}); "
                            "merge or export it once it has finished.")
    else:
        raise UserError(f"{given} is neither a qdpo run directory (run.json) nor a PEFT adapter directory "
                        "(adapter_config.json).")
    config = read_json(adapter_dir / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir} is a {config.get('peft_type')} adapter; qdpo merges LoRA adapters only.")
    described = adapter_dir / "qdpo.json"  # the adapter's own copy of run.json travels with it
    run = read_json(described) if described.is_file() else read_json(run_dir / "run.json") if run_dir else None
    return Adapter(adapter_dir, config, run, run_dir)


def resolve_base(adapter: Adapter, base: str | None = None) -> ModelSource:
    """The base to merge into: --base, else the model the run loaded, else the adapter's base_model_name_or_path."""
    if base:
        return resolve_model(base)
    recorded = (adapter.run or {}).get("base_model")
    if recorded:
        if Path(recorded["path"]).is_dir():
            return ModelSource(recorded["name"], recorded["path"], recorded.get("gguf_file"))
        gguf = recorded.get("gguf_file")
        if gguf and Path(gguf).is_file():  # the converted checkpoint left the cache: convert the same file again
            return ModelSource(recorded["name"], str(convert_gguf(Path(gguf))), gguf)
        return resolve_model(recorded["name"])
    name = adapter.config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{adapter.path} does not say which base model it belongs to; pass --base.")
    return resolve_model(name)


def local_dir(source: ModelSource) -> Path:
    """A local directory holding the base checkpoint (a hub id is fetched, or found in the hub cache)."""
    if Path(source.path).is_dir():
        return Path(source.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except (OSError, ValueError) as e:
        raise UserError(f"could not fetch base model {source.name} ({str(e).splitlines()[0]}).") from None


def trained_dtype(adapter: Adapter) -> torch.dtype:
    """The dtype the 4-bit base computed in while the adapter trained (the run's, else qdpo's default here)."""
    recorded = ((adapter.run or {}).get("quantization") or {}).get("compute_dtype")
    if recorded:
        return getattr(torch, recorded)
    return auto_compute_dtype("auto", pick_device())


def trained_device(adapter: Adapter) -> torch.device:
    """Where the run quantized its base (so NF4 is recomputed by the same kernels), if this machine has it."""
    return torch.device("cuda") if (adapter.run or {}).get("device") == "cuda" and torch.cuda.is_available() else torch.device("cpu")


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{path} has no adapter weights (adapter_model.safetensors).")


def read_lora(adapter: Adapter) -> dict[str, Lora]:
    """The adapter's LoRA factors, keyed by the base weight each one changes ("model.layers.0.self_attn.q_proj.weight")."""
    from peft.utils.other import get_pattern_key

    config = adapter.config
    if config.get("use_dora"):
        raise UserError(f"{adapter.path} is a DoRA adapter; qdpo merges plain LoRA adapters only.")
    if config.get("lora_bias"):
        raise UserError(f"{adapter.path} trains LoRA biases; qdpo merges plain LoRA adapters only.")
    factors: dict[str, dict[str, Any]] = {}
    for key, tensor in _adapter_tensors(adapter.path).items():
        name = key.removeprefix(_PEFT_PREFIX)
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise UserError(f"{adapter.path} holds {key}, which is not a LoRA factor; qdpo merges plain LoRA adapters only.")
        part, embedding = _LORA_SUFFIXES[suffix]
        entry = factors.setdefault(name.removesuffix(suffix), {})
        entry[part] = tensor
        if embedding is not None:
            entry["embedding"] = embedding
    alphas = config.get("alpha_pattern") or {}
    loras = {}
    for module, f in factors.items():
        if "a" not in f or "b" not in f:
            raise UserError(f"{adapter.path} has only one of the two LoRA factors of {module}.")
        r = f["a"].shape[0]  # the real rank, which rank_pattern may have set per module
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha"])  # PEFT's own matching
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transposed = f["embedding"] or bool(config.get("fan_in_fan_out"))
        loras[f"{module}.weight"] = Lora(f["a"], f["b"], scale, transposed, f.get("weight"))
    return loras


def checkpoint_tensors(base_dir: Path) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Name → (file, shape, dtype) of every tensor in a safetensors checkpoint, from the headers alone."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = list(dict.fromkeys(read_json(index)["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{base_dir} has no safetensors weights (model.safetensors or its index); "
                        "qdpo merges safetensors checkpoints only.")
    found = {}
    for name in files:
        with safe_open(str(base_dir / name), "pt") as f:
            for key in f.keys():
                header = f.get_slice(key)
                found[key] = (base_dir / name, tuple(header.get_shape()), _SAFETENSORS_DTYPES[header.get_dtype()])
    return found


def model_layout(base_dir: Path) -> tuple[set[str], dict[str, str]]:
    """Which weights BitsAndBytesConfig turns into NF4, and which are tied (lm_head → embeddings), from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):  # shapes and module types only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    # The same rule transformers applies when it loads the base in 4-bit: every plain Linear but the
    # output embedding, tied weights and the last module stays in NF4.
    skip = get_keys_to_not_convert(model)
    quantized = {f"{name}.weight" for name, module in model.named_modules()
                 if type(module) is torch.nn.Linear and should_convert_module(name, skip)}
    return quantized, dict(model.all_tied_weights_keys)


def plan_merge(base_dir: Path, base_name: str, loras: dict[str, Lora], dtype: torch.dtype | None, onto: str,
               compute_dtype: torch.dtype, device: torch.device) -> MergePlan:
    """Decide every tensor of the merged checkpoint, refusing an adapter that does not fit the base."""
    tensors = checkpoint_tensors(base_dir)
    quantized, tied = model_layout(base_dir)
    # PEFT applies a LoRA on a tied lm_head (or embedding) to that one use only, so such a model
    # must come out untied: lm_head gets its own copy of the embedding matrix.
    untie = {head: emb for head, emb in tied.items()
             if head not in tensors and emb in tensors and (head in loras or emb in loras)}
    for name, lora in loras.items():
        source = untie.get(name, name)
        if source not in tensors:
            raise UserError(f"the adapter changes {name.removesuffix('.weight')}, which base model {base_name} does not have; "
                            "pass the base it was trained on with --base.")
        shape = tensors[source][1]
        got = next((s for s in (lora.shape, lora.weight.shape if lora.weight is not None else None) if s not in (None, shape)), None)
        if got is not None:
            raise UserError(f"the adapter does not fit base model {base_name}: {name} is {list(shape)} there "
                            f"but {list(got)} in the adapter; pass the base it was trained on with --base.")
    names = [(name, name) for name in tensors] + list(untie.items())
    planned = []
    for name, source in names:
        file, shape, disk_dtype = tensors[source]
        out_dtype = dtype if dtype is not None and disk_dtype.is_floating_point else disk_dtype
        planned.append(Planned(name, source, file, shape, out_dtype, loras.get(name), name in quantized))
    return MergePlan(base_dir, planned, bool(untie), onto, compute_dtype, device)


def as_trained(weight: torch.Tensor, quantized: bool, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The weight as the 4-bit model held it: cast to the compute dtype and, for NF4 layers, quantized and dequantized."""
    import bitsandbytes.functional as bnbf

    weight = weight.to(dtype)  # transformers casts to the compute dtype before quantizing: the NF4 codes depend on it
    if not quantized:
        return weight
    packed, state = bnbf.quantize_4bit(weight.to(device), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).cpu()


def merged_tensors(plan: MergePlan) -> Iterator[torch.Tensor]:
    """Each merged tensor in plan order, read from the base one at a time."""
    from safetensors import safe_open

    opened: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        for p in plan.tensors:
            if p.file not in opened:
                opened[p.file] = stack.enter_context(safe_open(str(p.file), "pt"))
            if p.lora is not None and p.lora.weight is not None:
                weight = p.lora.weight  # what PEFT loads into the layer, over the base's copy
            else:
                weight = opened[p.file].get_tensor(p.source)
            if weight.is_floating_point():
                if plan.onto == "dequantized":
                    weight = as_trained(weight, p.quantized, plan.compute_dtype, plan.device)
                if p.lora is not None:
                    weight = weight.float() + p.lora.delta()  # in fp32: the rounding happens once, on the way out
            yield weight.to(p.dtype)


def write_tensor(f, tensor: torch.Tensor) -> None:
    """Append one tensor's raw bytes to an open file."""
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: Path, planned: list[Planned], tensors: Iterable[torch.Tensor]) -> None:
    """Write one safetensors file: the header from the plan, then each tensor as it arrives (one in memory at a time)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in planned:
        header[p.name] = {"dtype": _DTYPE_CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for p, tensor in zip(planned, tensors, strict=True):
            if tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
                raise RuntimeError(f"merge produced {p.name} as {tuple(tensor.shape)} {tensor.dtype}, planned {p.shape} {p.dtype}")
            write_tensor(f, tensor)


def shards(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """Split the tensors, in order, into files of at most max_bytes (a larger single tensor gets a file of its own)."""
    groups: list[list[Planned]] = [[]]
    size = 0
    for p in planned:
        if groups[-1] and size + p.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    return groups


def write_weights(target: Path, plan: MergePlan, max_shard_bytes: int, echo: Callable[[str], None]) -> None:
    """Stream the merged weights into sharded safetensors files plus model.safetensors.index.json."""
    groups = shards(plan.tensors, max_shard_bytes)
    stream = merged_tensors(plan)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(target / name, group, (next(stream) for _ in group))
        weight_map.update({p.name: name for p in group})
        echo(f"  wrote {name} ({sum(p.nbytes for p in group) / 1e9:.2f} GB)")
    index = {"metadata": {"total_size": sum(p.nbytes for p in plan.tensors)}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_config(target: Path, plan: MergePlan) -> None:
    """config.json of the base without quantization settings, with the written dtype, and untied if lm_head was split off."""
    config = read_json(plan.base_dir / "config.json")
    config.pop("quantization_config", None)  # a merged model is plain full precision
    config.pop("torch_dtype", None)
    config["dtype"] = str(plan.dtype).removeprefix("torch.")
    if plan.untied:
        config["tie_word_embeddings"] = False
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (plan.base_dir / "generation_config.json").is_file():
        shutil.copy(plan.base_dir / "generation_config.json", target / "generation_config.json")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(target)).save_pretrained(target)


def write_tokenizer(target: Path, adapter: Adapter, base_dir: Path) -> None:
    """The tokenizer and chat template the adapter was trained with (the base's when the adapter has none)."""
    from transformers import AutoTokenizer

    source = adapter.path if (adapter.path / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(source).save_pretrained(target)


def write_merged(target: Path, adapter: Adapter, source: ModelSource, plan: MergePlan, max_shard_bytes: int,
                 echo: Callable[[str], None]) -> None:
    """Write a complete transformers directory: weights, config, generation config, tokenizer, provenance."""
    target.mkdir(exist_ok=True)
    write_weights(target, plan, max_shard_bytes, echo)
    write_config(target, plan)
    write_tokenizer(target, adapter, plan.base_dir)
    provenance = {"adapter": str(adapter.path.resolve()), "base_dir": str(plan.base_dir), "onto": plan.onto,
                  "base_model": {"name": source.name, "path": source.path, "gguf_file": source.gguf_file},
                  "compute_dtype": str(plan.compute_dtype).removeprefix("torch.") if plan.onto == "dequantized" else None,
                  "dtype": str(plan.dtype).removeprefix("torch."), "run": adapter.run}
    (target / "qdpo_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")


def check_prompts(tokenizer) -> list[list[int]]:
    """The check prompts as a user sends them: through the chat template when there is one."""
    chat = bool(tokenizer.chat_template)
    return [encode_prompt(tokenizer, [{"role": "user", "content": text}] if chat else text) for text in CHECK_PROMPTS]


@torch.no_grad()
def prompt_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every position of each prompt, one prompt per forward (no padding to get wrong), as fp32 on the CPU."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> Deviation:
    """Largest logit difference and top-token agreement between two models' logits on the same prompts."""
    ref, got = torch.cat(reference), torch.cat(other)
    return Deviation(max_abs=(ref - got).abs().max().item(), max_logit=ref.abs().max().item(),
                     top1_agreement=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(), positions=ref.shape[0])


def adapter_logits(adapter: Adapter, source: ModelSource, compute_dtype: torch.dtype, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of the adapter on the 4-bit base, the model the adapter was trained as."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_4bit(source, compute_dtype, pick_device(), False), str(adapter.path))
    return prompt_logits(model.eval(), prompts)


def merged_logits(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a plain transformers directory, loaded as any user would (its own dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map={"": str(pick_device())})
    return prompt_logits(model.eval(), prompts)


def check_merge(model_dir: Path, adapter: Adapter, source: ModelSource, plan: MergePlan) -> Deviation:
    """Load the merged directory back with plain transformers and compare its logits with the adapter on the 4-bit base.

    One model at a time: the 4-bit model's logits are kept, the model itself freed before the merged one loads.
    """
    from transformers import AutoTokenizer

    prompts = check_prompts(AutoTokenizer.from_pretrained(model_dir))
    reference = adapter_logits(adapter, source, plan.compute_dtype, prompts)
    return compare(reference, merged_logits(model_dir, prompts))


def parse_dtype(name: str | None) -> torch.dtype | None:
    """bf16/fp16/fp32 → torch dtype; None keeps the base checkpoint's own."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}.")
    return DTYPES[name]


def prepare(path: str | Path, base: str | None, dtype: str | None, onto: str) -> tuple[Adapter, ModelSource, MergePlan]:
    """Read the adapter, find its base and plan the merge: every user error surfaces here, before anything is written."""
    if onto not in ONTO:
        raise UserError(f"--onto must be one of {', '.join(ONTO)}, not {onto!r}.")
    out_dtype = parse_dtype(dtype)
    adapter = find_adapter(path)
    loras = read_lora(adapter)
    source = resolve_base(adapter, base)
    plan = plan_merge(local_dir(source), source.name, loras, out_dtype, onto, trained_dtype(adapter), trained_device(adapter))
    if plan.untied and adapter.config.get("ensure_weight_tying"):
        raise UserError(f"{adapter.path} keeps LoRA on tied embeddings tied (ensure_weight_tying); qdpo merge does not handle that.")
    return adapter, source, plan


def merge(path: str | Path, out: str | Path, base: str | None = None, dtype: str | None = None, onto: str = "original",
          overwrite: bool = False, check: bool = True, echo: Callable[[str], None] = print,
          max_shard_bytes: int = SHARD_BYTES) -> MergeResult:
    """Merge the adapter of a run (or an adapter directory) into its base and write a plain transformers directory."""
    out = Path(out).expanduser()
    check_output(out, overwrite, marker="config.json")
    adapter, source, plan = prepare(path, base, dtype, onto)
    echo(f"merging {adapter.path} into {source.name} ({onto} weights, {len(plan.tensors)} tensors) -> {out}")
    with staged(out) as tmp:
        write_merged(tmp, adapter, source, plan, max_shard_bytes, echo)
    echo(f"merged model: {out}  (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    deviation = None
    if check:
        deviation = check_merge(out, adapter, source, plan)
        expected = "float noise expected" if onto == "dequantized" else "the 4-bit quantization error shows here"
        echo(f"largest logit deviation from the adapter on the 4-bit base: {deviation.describe()}; {expected}")
    return MergeResult(out, source, onto, deviation)
