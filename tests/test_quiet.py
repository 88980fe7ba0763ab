"""Quiet output: the library chatter a run, merge or export would print is silenced; qdpo's own lines are not."""

from __future__ import annotations

import importlib.util
import logging
import warnings

import qdpo.quiet
from qdpo.quiet import quiet_libraries, tqdm_class


def test_library_notes_warnings_and_loading_bars_are_silenced(monkeypatch, tiny_model_dir, capfd):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(qdpo.quiet, "_done", False)
    quiet_libraries()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn(
            "Attempting to run cuBLAS, but there was no current CUDA context! Attempting to set", UserWarning
        )
        warnings.warn("a warning qdpo did not ask to hide", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning qdpo did not ask to hide"]
    # bitsandbytes' CPU backend logs the missing `kernels` package at import, from this logger
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert "Loading weights" not in capfd.readouterr().err


def test_the_progress_bar_needs_no_ipywidgets(monkeypatch):
    from tqdm.std import tqdm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    assert tqdm_class() is tqdm  # tqdm.auto would warn "IProgress not found" in Jupyter here
