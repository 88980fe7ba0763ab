"""Model shapes for the planner: a model's config.json from a directory, a file, the hub cache, or a built-in copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdpo.config import read_json
from qdpo.errors import UserError
from qdpo.hub import looks_like_hub_id


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2) that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    # Mixture of experts (Mixtral, Qwen2-MoE): experts per layer and each one's intermediate width. transformers
    # keeps a layer's experts in fused 3-D parameters, not nn.Linear, so bitsandbytes leaves them unquantized.
    experts: int = 0
    expert_intermediate: int = 0
    dense_intermediate: int | None = None  # width of the block's nn.Linear MLP when it differs (MoE: shared expert)
    # Gemma-2/3 also norm each sublayer's output (post-attention and post-feedforward RMSNorms): two more per layer
    sandwich_norms: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read the shape from a transformers config.json dict; UserError when a size is missing."""
        config = config.get("text_config", config)  # multimodal wrappers keep the decoder's sizes here
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in need if not isinstance(config.get(k), int)]
        if missing:
            raise UserError(
                f"the model config has no {', '.join(missing)}; the planner needs a Llama-style decoder config.json."
            )
        heads = config["num_attention_heads"]
        qwen = config.get("model_type") in ("qwen2", "qwen2_moe")  # Qwen2 always has q/k/v biases
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        moe = {}
        if experts:  # the block's nn.Linear MLP is the shared expert, if any
            moe = dict(
                experts=experts,
                expert_intermediate=config.get("moe_intermediate_size") or config["intermediate_size"],
                dense_intermediate=config.get("shared_expert_intermediate_size") or 0,
            )
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            attention_bias=qwen or bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            sandwich_norms=config.get("model_type") in ("gemma2", "gemma3_text", "gemma3"),
            **moe,
        )

    @property
    def attn(self) -> int:
        """Width of q and of the attention output (heads x head_dim)."""
        return self.heads * self.head_dim

    @property
    def expert_params(self) -> int:
        """Parameters of every layer's fused experts (gate, up and down of each), 0 for a dense model."""
        return self.layers * self.experts * 3 * self.hidden * self.expert_intermediate

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each nn.Linear in one decoder block (an MoE's experts are not)."""
        h, a, kv = self.hidden, self.attn, self.kv_heads * self.head_dim
        i = self.intermediate if self.dense_intermediate is None else self.dense_intermediate
        found = {"q_proj": (h, a), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (a, h)}
        if i:
            found |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return found


def _shape(
    model_type: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    tied: bool = False,
) -> dict[str, Any]:
    """A minimal config.json dict with the sizes the planner reads."""
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


# Shapes of the shipped presets' models (and their base/chat siblings), for when no config.json is at hand
# (the hub may be unreachable). Values from the models' published config.json files.
_MISTRAL_7B = ("Mistral-7B-v0.3", _shape("mistral", 4096, 32, 32, 8, 14336, 32768))
_LLAMA2_7B = ("Llama-2-7B", _shape("llama", 4096, 32, 32, 32, 11008, 32000))
_LLAMA3_8B = ("Meta-Llama-3-8B", _shape("llama", 4096, 32, 32, 8, 14336, 128256))
_LLAMA2_13B = ("Llama-2-13B", _shape("llama", 5120, 40, 40, 40, 13824, 32000))
_LLAMA3_70B = ("Meta-Llama-3-70B", _shape("llama", 8192, 80, 64, 8, 28672, 128256))
_SMOLLM2 = ("SmolLM2-135M", _shape("llama", 576, 30, 9, 3, 1536, 49152, tied=True))
BUILTIN_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistralai/Mistral-7B-v0.3": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat-hf": _LLAMA2_13B,
    "meta-llama/Meta-Llama-3-70B": _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.1-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.3-70B-Instruct": _LLAMA3_70B,
    "builtin:smollm2-135m-instruct": _SMOLLM2,
}


def read_config(path: Path) -> dict[str, Any]:
    """A config.json file as a dict; UserError if it is not readable JSON."""
    loaded = read_json(path)
    if not isinstance(loaded, dict):
        raise UserError(f"{path} must hold a JSON object (a transformers config.json).")
    return loaded


def _hub_cached(repo_id: str) -> Path | None:
    """config.json of a hub model if it is already in the local hub cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects, or no hub library: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def model_config(name: str) -> tuple[dict[str, Any], str]:
    """The config.json dict for a model setting and where it came from: a file, the hub cache, or a built-in shape."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; pass a transformers model directory or a config.json file.")
        return read_config(path / "config.json"), str(path / "config.json")
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"config file {path} does not exist.")
        return read_config(path), str(path)
    if path.suffix == ".gguf":
        raise UserError(
            "the planner reads a config.json, not a .gguf file; pass the converted model directory or its config.json."
        )
    is_hub_id = looks_like_hub_id(name)
    cached = _hub_cached(name) if is_hub_id else None
    if cached is not None:
        return read_config(cached), f"{cached} (hub cache)"
    if name in BUILTIN_SHAPES:
        label, config = BUILTIN_SHAPES[name]
        return dict(config), f"built-in {label} shape (no config.json for {name} available offline)"
    if is_hub_id:
        raise UserError(
            f"no config.json for {name} offline and no built-in shape; pass --model with its directory or config.json."
        )
    if path.is_file():
        raise UserError(f"model path {name} is a file, not a model; pass a model directory or a config.json file.")
    raise UserError(f"model path {name} does not exist; pass a model directory or a config.json file.")
