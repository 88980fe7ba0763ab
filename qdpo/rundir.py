"""The run directory: claiming it (refuse what is not ours, one run at a time), and what it says about itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from qdpo.config import Config
from qdpo.errors import UserError
from qdpo.fs import write_json

LOCK = ".lock"
# A lock from another machine (a dead Colab runtime, with the run directory on Drive) cannot be checked by pid.
# The owner touches the lock after every step; one untouched this long is taken to be stale.
FOREIGN_LOCK_STALE_SECONDS = 15 * 60


def resume_command(out: Path, processes: int = 1) -> str:
    """The command that continues the run in out, on as many processes as it ran on."""
    return f"qdpo run --nproc {processes} --resume {out}" if processes > 1 else f"qdpo run --resume {out}"


def run_dir_for(config: Config, preset: str) -> Path:
    """Where the run writes: output_dir, or runs/<preset>-<time>."""
    return Path(config.output_dir or f"runs/{preset}-{datetime.now():%Y%m%d-%H%M%S}").expanduser()


def check_run_dir(out: Path, config: Config, resume: bool) -> None:
    """Refuse, before any data is read, an output directory this run may not use."""
    if resume:
        if not (out / "run.json").is_file():
            raise UserError(f"cannot resume {out}: it is not a qdpo run directory (no run.json); check the path.")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a directory; pick another path.")
    _check_creatable(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "run.json").is_file():  # neither --overwrite nor --resume applies: say only what does
            raise UserError(f"output_dir {out} is not a qdpo run directory; refusing to overwrite it, pick another.")
        if not config.overwrite:
            raise UserError(
                f"output_dir {out} already exists and is not empty; pick another, pass --overwrite, "
                "or continue it with --resume."
            )


def _check_creatable(out: Path) -> None:
    """Refuse an output_dir that cannot be made: its nearest existing parent is a file, or not writable."""
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if parent == out.absolute():
        parent = out  # exists already: it must be writable itself
    if not parent.is_dir():
        raise UserError(f"output_dir {out} cannot be created: {parent} is a file; pick another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out} cannot be created: {parent} is not writable; pick another path.")


def claim_run_dir(out: Path, resume: bool) -> None:
    """Create (or, with overwrite, empty) the run directory and take its lock."""
    take_lock(out)  # before clearing anything: another live run's directory is never touched
    if not resume:
        for child in out.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def take_lock(out: Path) -> None:
    """Mark the directory as this process's (pid + host); refuse a live owner, take over a stale lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a path check passed, then the disk disagreed (a read-only mount, /proc)
        raise UserError(f"cannot create output_dir {out} ({e.strerror or e}); pick another path.") from None
    lock = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: two starting runs cannot both win
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            here = host == socket.gethostname()
            fresh = time.time() - lock.stat().st_mtime < FOREIGN_LOCK_STALE_SECONDS
            if isinstance(pid, int) and pid != os.getpid() and (_alive(pid) if here else fresh):
                where = "this machine" if here else f"host {host}"
                raise UserError(
                    f"{out} is in use by another qdpo run (pid {pid} on {where}); wait for it to end, "
                    f"pick another output_dir, or delete {lock} if that run is gone."
                )
            lock.unlink(missing_ok=True)  # stale: its owner was killed; take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return


def touch_lock(out: Path) -> None:
    """Show that the owner is alive (for runs on other machines sharing the directory)."""
    try:
        os.utime(out / LOCK)
    except OSError:
        pass


def release_lock(out: Path) -> None:
    """Drop the lock if this process holds it."""
    lock = out / LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def mark_stopped(out: Path, description: dict[str, Any], status: str, error: BaseException) -> None:
    """Record in run.json that the run stopped early (failed or interrupted) and why, in one line."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    write_json(out / "run.json", {**description, "status": status, "error": reason})
