"""The one rule for telling a Hugging Face Hub id from a local path, shared by data, model and planner."""

from __future__ import annotations

from pathlib import PurePath

# Suffixes that name a local file, never a hub repository (ids may contain dots: "allenai/tulu-2.5-preference-data").
LOCAL_FILE_SUFFIXES = {
    ".jsonl",
    ".json",
    ".parquet",
    ".csv",
    ".gguf",
    ".yaml",
    ".yml",
    ".safetensors",
    ".bin",
    ".txt",
    ".arrow",
    ".pt",
}


def looks_like_hub_id(name: str) -> bool:
    """True for "owner/name" as the Hub spells ids (dots allowed), false for paths and file names."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~", "/")):
        return False
    if PurePath(name).suffix.lower() in LOCAL_FILE_SUFFIXES:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
