"""Find and read preset YAML files (presets/ in a checkout, qdpo.presets in an installed wheel)."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from qdpo.config import Config, build_config, load_yaml, parse_override
from qdpo.errors import UserError

# Keys a preset may carry besides Config fields: they describe the preset, they do not configure a run.
META_KEYS = ("description", "gpu_memory_gb", "processes")


@dataclass
class Preset:
    """A preset file: its name, description, the GPU memory it targets, and its settings."""

    name: str
    path: Path
    description: str
    gpu_memory_gb: float | None  # per GPU
    settings: dict[str, Any]
    processes: int = 1  # the GPUs (one process each) it is planned for


def preset_dir() -> Path:
    """The directory holding the shipped presets."""
    checkout = Path(__file__).resolve().parent.parent / "presets"
    if checkout.is_dir():
        return checkout
    return Path(str(importlib.resources.files("qdpo.presets")))


def available() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_preset(name_or_path: str) -> Preset:
    """Read a shipped preset by name, or any preset file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"preset file {path} does not exist.")
    else:
        path = preset_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(
                f"unknown preset {name_or_path!r}; choose one of {', '.join(available())} or pass a .yaml file."
            )
    raw = load_yaml(path)
    meta = {k: raw.pop(k) for k in META_KEYS if k in raw}
    budget, processes = meta.get("gpu_memory_gb"), meta.get("processes", 1)
    # bool is an int to Python: `processes: true` is as wrong as `processes: two`
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise UserError(f"preset {path}: gpu_memory_gb must be a positive number of GB (like 24); got {budget!r}.")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise UserError(f"preset {path}: processes must be a whole number of at least 1; got {processes!r}.")
    return Preset(
        name=path.stem,
        path=path,
        description=str(meta.get("description", "")),
        gpu_memory_gb=budget,
        settings=raw,
        processes=processes,
    )


def resolve_settings(
    preset: str, flags: dict[str, Any] | None = None, overrides: Iterable[str] = (), notes: list[str] | None = None
) -> Config:
    """The one way run, plan and the notebook turn a preset, flags and key=value overrides into a Config.

    Later sources win: built-in defaults < preset < flags (None means "not given") < overrides.
    """
    values = {k: v for k, v in (flags or {}).items() if v is not None}
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return build_config(load_preset(preset).settings, values, notes)
