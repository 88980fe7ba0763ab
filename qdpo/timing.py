"""Wall time per phase of a run (data, load, reference, steps, eval, checkpoint, save), for the summary and report."""

from __future__ import annotations

import time


class PhaseClock:
    """A lap clock: `enter(name)` ends the current phase and starts `name`; seconds add up per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = time.perf_counter()

    def enter(self, name: str | None) -> None:
        """Charge the time since the last call to the current phase, then switch to `name` (None: no phase)."""
        now = time.perf_counter()
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + now - self._since
        self._current, self._since = name, now

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase so far (the running phase included), rounded for the record."""
        self.enter(self._current)
        return {name: round(s, 2) for name, s in self.seconds.items()}
