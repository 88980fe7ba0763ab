"""The files of a transformers model directory besides its weights: config, generation config, tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qdpo.config import read_json


def write_config(target: Path, base_dir: Path, dtype: torch.dtype, untied: bool) -> None:
    """config.json of the base without quantization settings, with the written dtype, untied if lm_head was split off.

    The base's generation_config.json comes along; a base without one gets transformers' default for its config.
    """
    config = read_json(base_dir / "config.json")
    config.pop("quantization_config", None)  # a merged model is plain full precision
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    if untied:
        config["tie_word_embeddings"] = False
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", target / "generation_config.json")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(target)).save_pretrained(target)


def tokenizer_dir(adapter_dir: Path, base_dir: Path) -> Path:
    """Where the tokenizer the adapter was trained with lives: the adapter's own, else the base model's."""
    return adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir


def write_tokenizer(target: Path, adapter_dir: Path, base_dir: Path) -> None:
    """The tokenizer and chat template the adapter was trained with (the base's when the adapter has none)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir(adapter_dir, base_dir)).save_pretrained(target)
