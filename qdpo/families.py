"""What each model family computes around its decoder that qdpo's fast paths must reproduce.

Two fast paths bypass parts of a model's own forward:
- the shared-prompt and packed layouts hand the decoder their own attention mask, which transformers
  uses as is, so the mask must carry the family's sliding windows (per layer type where layers differ);
- the chunked head applies lm_head by hand at response positions, so it must also apply what the
  family does after lm_head (Gemma-2/3 soft-cap, Granite divides, Cohere multiplies).
Each family in FAMILIES is checked against the model's own forward by tests/test_families.py (the
conformance suite). Any other family gets the plain layout and the model's own logits: exact by
construction, at the cost of the fast paths' savings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from qdpo.config import Config
from qdpo.errors import UserError

# The implementations whose mask semantics qdpo builds for (qdpo.attention's two take SDPA's and eager's masks)
EXACT_ATTENTION = ("sdpa", "eager", "qdpo_sdpa", "qdpo_eager")


@dataclass(frozen=True)
class Family:
    """One model family: its name in messages and what follows its lm_head."""

    label: str
    # What the family's CausalLM does to lm_head's output: "none", "softcap" (tanh(x / c) * c with
    # config.final_logit_softcapping), "divide" (by config.logits_scaling) or "multiply" (by config.logit_scale).
    logits: str = "none"
    # Whether its modelling code applies config.sliding_window (the others ignore a stray one in their config).
    windowed: bool = False
    # Whether its attention soft-caps scores with config.attn_logit_softcapping (Gemma-2; Gemma-3's ignores it).
    capped_scores: bool = False


# Keyed by config.model_type. Every entry has a tiny model in tests/test_families.py; add one only with it.
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral", windowed=True),
    "mixtral": Family("Mixtral (MoE)", windowed=True),
    "qwen2": Family("Qwen2", windowed=True),
    "qwen2_moe": Family("Qwen2-MoE", windowed=True),
    "qwen3": Family("Qwen3", windowed=True),
    "gemma": Family("Gemma"),
    "gemma2": Family("Gemma-2", logits="softcap", windowed=True, capped_scores=True),
    "gemma3_text": Family("Gemma-3 (text)", logits="softcap", windowed=True),
    "phi": Family("Phi-2"),
    "phi3": Family("Phi-3", windowed=True),
    "granite": Family("Granite", logits="divide"),
    "cohere": Family("Cohere", logits="multiply"),
    "olmo2": Family("OLMo-2"),
    "stablelm": Family("StableLM"),
}


def family_of(config: Any) -> Family | None:
    """The verified family of a transformers config, or None for a family qdpo has not checked."""
    return FAMILIES.get(getattr(config, "model_type", None))


def transform_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """Apply what the family's CausalLM.forward does after lm_head (config: the loaded model's)."""
    family = family_of(config)
    kind = family.logits if family else "none"
    if kind == "softcap" and getattr(config, "final_logit_softcapping", None):
        cap = config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap
    if kind == "divide":
        return logits / config.logits_scaling
    if kind == "multiply":
        return logits * config.logit_scale
    return logits


class OutputHead(torch.nn.Module):
    """lm_head plus the family's own logit transform: the model's logits from final hidden states."""

    def __init__(self, lm_head: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits exactly as the family's CausalLM computes them."""
        return transform_logits(self.config, self.lm_head(hidden))


def layer_windows(config: Any) -> dict[str, int | None]:
    """Sliding window per layer type ({"full_attention": None, "sliding_attention": 4096}), or one "*" key.

    Families with mixed layer types take a dict of masks keyed by type; the others take one mask, so
    their single entry is keyed "*". Window semantics follow transformers: key k is visible to query q
    when position(q) - position(k) < window. A verified family whose code ignores sliding_window has none.
    """
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    family = family_of(config)
    # Not config.use_sliding_window: Qwen2/Qwen3/Qwen2-MoE fold it into sliding_window and layer_types when the
    # config loads, and Mistral, Mixtral and Phi-3 never read it (a window beside use_sliding_window=false applies).
    if family is not None and not family.windowed:
        window = None
    if not types:
        return {"*": window}
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UserError(
            f"layer type {sorted(unknown)[0]} is not supported by the shared-prompt layout; set share_prompt=false."
        )
    return {t: (window if t == "sliding_attention" else None) for t in set(types)}


def shared_layout_problem(config: Any) -> str | None:
    """Why a custom attention mask cannot reproduce this model's own, or None when it can."""
    family = family_of(config)
    if family is None:
        return f"model type {getattr(config, 'model_type', '?')} is not in qdpo's verified families"
    types = set(getattr(config, "layer_types", None) or [])
    if types - {"full_attention", "sliding_attention"}:
        return f"{family.label} has {sorted(types - {'full_attention', 'sliding_attention'})[0]} layers"
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in EXACT_ATTENTION:
        return f"its attention implementation is {impl} (qdpo builds masks for sdpa and eager only)"
    return None


def decoder_masks(config: Any, allowed: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> Any:
    """The attention mask(s) to hand the decoder: allowed ([R, 1, T, T] bool) cut to each layer type's window.

    Windows count logical positions (position ids), so a rejected token sees the same window of
    prompt and rejected tokens as in its own plain sequence. SDPA takes booleans; eager adds the mask
    to the scores. A family with mixed layer types gets {layer type: mask}, as its decoder expects.
    """
    impl = getattr(config, "_attn_implementation", None) or "sdpa"  # qdpo_sdpa takes SDPA's boolean masks
    masks = {}
    for layer_type, window in layer_windows(config).items():
        mask = allowed
        if window is not None:
            distance = positions[:, :, None] - positions[:, None, :]
            mask = allowed & (distance < window)[:, None]
        if impl in ("eager", "qdpo_eager"):
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        masks[layer_type] = mask
    return masks["*"] if "*" in masks else masks


def length_switched_rope(config: Any) -> tuple[str, int] | None:
    """("longrope" or "dynamic", N) when the model's rotary frequencies change for a whole batch once a sequence in
    it is longer than N tokens, else None.

    transformers picks them from the batch's largest position id: LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini) its
    short or long factors, dynamic NTK a rescaling it also keeps for later batches. A sequence then scores as it
    scores alone only when the whole batch is on its side of N (dynamic: at or below N).
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return None
    nested = params and all(isinstance(v, dict) for v in params.values())  # per layer type (Gemma-3)
    for entry in params.values() if nested else [params]:
        kind = str(entry.get("rope_type") or entry.get("type") or "")
        if kind == "longrope":
            limit = entry.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
            if limit:
                return "longrope", int(limit)
        if "dynamic" in kind and getattr(config, "max_position_embeddings", None):
            return "dynamic", int(config.max_position_embeddings)
    return None


def describe(config: Any) -> str:
    """A one-line name for the family of a config, for messages."""
    family = family_of(config)
    return family.label if family else f"model type {getattr(config, 'model_type', '?')} (not verified by qdpo)"


def exact_settings(config: Config, model_config: Any) -> tuple[Config, list[str]]:
    """config with each fast path this family cannot do exactly switched off, and one line naming the choice.

    Only a setting the user forced (share_prompt=true, pack_pairs=true) and that cannot be exact is
    refused, and a model that is not causal; an unset share_prompt becomes true or false here.
    """
    label = describe(model_config)
    if getattr(model_config, "use_bidirectional_attention", False):
        # Every token then sees the ones after it, the response's own next token included: its "log-probs" are
        # not a language model's, and no layout, fast or plain, can make DPO on them mean anything.
        raise UserError(
            f"{label} is configured with bidirectional attention (an embedding model), so it cannot score a response "
            "token by token; tune a causal language model."
        )
    problem = shared_layout_problem(model_config)
    if problem and config.batch_layout != "plain":
        if config.pack_pairs or config.share_prompt:
            forced = "pack_pairs" if config.pack_pairs else "share_prompt"
            raise UserError(
                f"{forced}=true cannot be exact for this model: {problem}; leave share_prompt unset "
                "(qdpo then picks the plain layout) or set share_prompt=false and pack_pairs=false."
            )
        config = replace(config, share_prompt=False)
    elif config.share_prompt is None:
        config = replace(config, share_prompt=True)
    if family_of(model_config) is None and config.logits_chunk_size:
        config = replace(config, logits_chunk_size=0)  # the model's own forward: exact for any family
    family = family_of(model_config)
    layout = {
        "plain": "plain layout (two sequences per pair)",
        "shared": "shared-prompt layout",
        "packed": "packed layout",
    }[config.batch_layout]
    windows = sorted({w for w in layer_windows(model_config).values() if w}) if problem is None else []
    if windows:
        layout += f" (sliding window {windows[0]} kept)"
    then = {
        "softcap": ", then soft-capped",
        "divide": ", then divided by logits_scaling",
        "multiply": ", then multiplied by logit_scale",
    }.get(family.logits if family else "none", "")
    head = (
        f"lm_head in chunks of {config.logits_chunk_size}{then}"
        if config.logits_chunk_size
        else "the model's own logits"
    )
    line = f"model family: {label}: {layout}, {head}"
    if problem and config.batch_layout == "plain":
        line += f" (shared prompt off: {problem})"
    return config, [line]


def family_table() -> str:
    """The README's table of verified families (regenerate with `python -m qdpo.families`)."""
    after = {
        "none": "-",
        "softcap": "soft-cap (`final_logit_softcapping`)",
        "divide": "÷ `logits_scaling`",
        "multiply": "× `logit_scale`",
    }
    rows = ["| family | `model_type` | after lm_head (applied by the chunked head) | layouts |", "|---|---|---|---|"]
    for model_type, family in FAMILIES.items():
        rows.append(f"| {family.label} | `{model_type}` | {after[family.logits]} | plain, shared prompt, packed |")
    rows.append("| any other | | the model's own forward | plain (chosen by qdpo, and printed) |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(family_table(), end="")
