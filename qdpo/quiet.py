"""Keep library chatter out of a run's output: qdpo prints its own lines and one progress bar per phase.

Silenced, as noise for someone tuning or shipping a model: bitsandbytes' note that the optional `kernels`
package is missing (it falls back to its own CPU kernel), torch's autograd warning about a missing CUDA context
in backward, deprecation notices from transformers, peft and torch, transformers' "Loading weights" bar at every
model load, and tqdm's IProgress warning in a notebook without ipywidgets.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from contextvars import ContextVar
from typing import Any, Iterator

_done = False


def quiet_libraries() -> None:
    """Silence the libraries' notes, warnings and per-load bars (once per process; download bars stay)."""
    global _done
    if _done:
        return
    _done = True
    # Before bitsandbytes is imported: its CPU backend logs the missing `kernels` package at import time.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"Attempting to run cuBLAS, but there was no current CUDA context")
    import transformers
    from huggingface_hub.utils import enable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar of every from_pretrained
    enable_progress_bars()  # which that also turned off: a download is a phase worth a bar


def tqdm_class():
    """tqdm's notebook widget where ipywidgets can draw it, else the plain bar: never tqdm's IProgress warning."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:  # tqdm.auto would warn "IProgress not found" in Jupyter, then fall back to this one anyway
        from tqdm.std import tqdm
    return tqdm


# Whether qdpo's own bars are drawn: `qdpo run --no-progress` (and progress=False in the API) turns them off.
SHOW_PROGRESS: ContextVar[bool] = ContextVar("qdpo_show_progress", default=True)


def progress_bar(iterable: Any = None, **kwargs: Any):
    """One phase's progress bar (tqdm_class's), hidden while showing_progress(False) is in force."""
    kwargs.setdefault("disable", not SHOW_PROGRESS.get())
    return tqdm_class()(iterable, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def showing_progress(show: bool) -> Iterator[None]:
    """Within this block qdpo's progress bars are shown (True) or hidden (False)."""
    token = SHOW_PROGRESS.set(show)
    try:
        yield
    finally:
        SHOW_PROGRESS.reset(token)
