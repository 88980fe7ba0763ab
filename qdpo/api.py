"""The Python API in one call: what `qdpo run` and the notebook use to tune."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from qdpo.config import Config


def tune(
    preset: str = "smoke",
    *,
    config: Config | None = None,
    overrides: Iterable[str] = (),
    resume: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    **settings: Any,
):
    """Tune LoRA adapters with DPO; returns the RunResult (output_dir, summary, metrics rows).

    Settings resolve as `qdpo run` resolves them: defaults < preset < keyword settings < "key=value" overrides.
    Pass config= instead to run a Config built elsewhere (the preset then only names the run).
    callback(row) is called with each metrics row as it is logged: step 0's baseline eval, then the steps.
    """
    from qdpo.presets import load_preset, resolve_settings
    from qdpo.train import run

    name = preset  # with config=, the caller has resolved the preset already
    if config is None:
        notes: list[str] = []
        config = resolve_settings(preset, settings, overrides, notes)
        name = load_preset(preset).name
        for note in notes:
            echo(note)
    elif settings or overrides:
        raise TypeError("tune() takes either config= or settings and overrides, not both")
    return run(config, preset=name, echo=echo, progress=progress, resume=resume, callback=callback)
