"""A trained LoRA adapter on disk: where it is, which base it belongs to, how it trained, and its factors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qdpo.config import read_json
from qdpo.errors import UserError
from qdpo.model import ModelSource, convert_gguf, pick_device, resolve_model
from qdpo.model import compute_dtype as auto_compute_dtype

_PEFT_PREFIX = "base_model.model."  # how PEFT prefixes a LoRA model's keys in adapter_model.safetensors
_LORA_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
    ".base_layer.weight": ("weight", None),
}  # embedding layers PEFT wraps (save_embedding_layers)


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
    weight: torch.Tensor | None = None  # the layer's own weight, when PEFT saved it too (embedding layers)

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight this LoRA changes."""
        shape = (self.b.shape[0], self.a.shape[1])
        return (shape[1], shape[0]) if self.transposed else shape

    def delta(self) -> torch.Tensor:
        """scale · B @ A in fp32, laid out like the base weight."""
        delta = self.b.float() @ self.a.float()
        return (delta.T if self.transposed else delta) * self.scale


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
            raise UserError(
                f"run {given} has no adapter yet (status: {run.get('status', 'unknown')}); "
                "merge or export it once it has finished."
            )
    else:
        raise UserError(
            f"{given} is neither a qdpo run directory (run.json) nor a PEFT adapter directory (adapter_config.json)."
        )
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

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]  # weights, configs and tokenizer only
    try:
        return Path(snapshot_download(source.path, allow_patterns=patterns))
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
    on_cuda = (adapter.run or {}).get("device") == "cuda" and torch.cuda.is_available()
    return torch.device("cuda") if on_cuda else torch.device("cpu")


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter's weights file (safetensors, or PEFT's older adapter_model.bin)."""
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{path} has no adapter weights (adapter_model.safetensors or adapter_model.bin).")


def read_lora(adapter: Adapter) -> dict[str, Lora]:
    """The adapter's LoRA factors, keyed by the base weight each one changes ("model.layers.0.mlp.up_proj.weight")."""
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
            raise UserError(
                f"{adapter.path} holds {key}, which is not a LoRA factor; qdpo merges plain LoRA adapters only."
            )
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
