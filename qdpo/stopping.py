"""Ctrl-C, Colab's stop button and job schedulers' SIGTERM: finish the step, checkpoint, and say how to resume.

During training the first SIGINT or SIGTERM only sets a flag the training loop reads after each optimizer step;
a second one interrupts at once (KeyboardInterrupt), leaving the last complete checkpoint as it is: checkpoints
are only ever renamed into place whole. Before the loop, either one stops at once (StoppedEarly).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from qdpo.errors import UserError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


class Interrupted(UserError):
    """The run stopped on request after writing a checkpoint; exits with the shell's code for the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 1)


class StoppedEarly(KeyboardInterrupt):
    """SIGINT or SIGTERM before the training loop: raised at once, as there is no step to finish or checkpoint.

    A KeyboardInterrupt, so that no library's `except Exception` swallows it on the way out.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 1)


def _handle_with(handler) -> dict:
    """Make handler SIGINT's and SIGTERM's; returns the handlers it replaced, for _restore."""
    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    for s in EXIT_CODES:
        signal.signal(s, handler)
    return previous


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


_before_stop_at_once: dict | None = None  # the handlers stop_at_once replaced, while it is in force


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
    """Until end_stop_at_once() (or the block's end) SIGINT and SIGTERM raise StoppedEarly: SIGTERM (Colab's stop
    button, a scheduler) would otherwise end the process on the spot, its run directory still "running" and locked."""
    global _before_stop_at_once
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise StoppedEarly(signum)

    _before_stop_at_once = _handle_with(handle)
    try:
        yield
    finally:
        end_stop_at_once()


def end_stop_at_once() -> None:
    """The training loop takes signals over from here: after it (the report, the summary) a signal is no longer
    "before the first step", so StoppedEarly must not fire again when the loop hands its handlers back."""
    global _before_stop_at_once
    if _before_stop_at_once is not None:
        _restore(_before_stop_at_once)
        _before_stop_at_once = None


class StopRequest:
    """Which signal asked the run to stop, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """True once SIGINT or SIGTERM has arrived."""
        return self.signum is not None

    @property
    def name(self) -> str:
        """The signal's name, for messages (SIGINT, SIGTERM)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def stop_requests(echo: Callable[[str], None] = print) -> Iterator[StopRequest]:
    """Within this block SIGINT/SIGTERM ask for a graceful stop; a second signal stops at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal handlers only exist on the main thread
        yield request
        return

    def handle(signum, frame):
        if request.requested:  # the second one: the user means now
            _restore(previous)
            raise KeyboardInterrupt
        request.signum = signum
        echo(
            f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
            "(press Ctrl-C again to stop at once)"
        )

    previous = _handle_with(handle)
    try:
        yield request
    finally:
        _restore(previous)


class _Outliving:
    """A text stream that goes quiet, instead of raising, once nobody reads it any more."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _gone(self) -> None:
        # The fd itself points at /dev/null from now on, so that what is still buffered, and the flush at exit,
        # go there too instead of raising again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):  # a stream without a file descriptor (a test's capture)
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def outlive_readers() -> None:
    """From now on a closed stdout or stderr is ignored: Ctrl-C on `qdpo run | tee log` ends tee as well, and the
    run's last lines (stopping, checkpoint written, the final `stopped:` line) must not turn its clean stop into a
    crash. For the rest of the process: those lines come after the run returns."""
    if not isinstance(sys.stdout, _Outliving):
        sys.stdout = _Outliving(sys.stdout)
    if not isinstance(sys.stderr, _Outliving):
        sys.stderr = _Outliving(sys.stderr)
