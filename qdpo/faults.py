"""Named crash points, so tests can kill a run at an exact moment (mid-checkpoint, mid-reference pass).

A kill from outside lands at a random instruction; some moments are too short to hit that way. With
QDPO_CRASH_AT=name (or name:N for the N-th time the point is reached; a suffix @R limits it to rank R of a
multi-process run), the process sends itself SIGKILL
there: no cleanup, no atexit, exactly like a power cut or the OOM killer. Unset, a crash point costs a
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here with SIGKILL if QDPO_CRASH_AT names this point (and this is its N-th visit)."""
    wanted = os.environ.get("QDPO_CRASH_AT")
    if not wanted:
        return
    wanted, _, rank = wanted.partition("@")  # name@R: only on rank R of a multi-process run
    if rank and rank != os.environ.get("RANK", "0"):
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(count or 1):
        # QDPO_CRASH_SIGNAL=SIGTERM (or SIGINT) sends that one instead: a stop request at an exact moment.
        os.kill(os.getpid(), getattr(signal, os.environ.get("QDPO_CRASH_SIGNAL", "SIGKILL")))
