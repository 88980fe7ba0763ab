"""Writing to disk so that a crash, a full disk or a kill never leaves a half-written file under its final name.

Everything qdpo writes goes to a temporary name in the same directory (so the final rename never crosses
devices, which matters on network and Drive mounts), is flushed to disk, and then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from qdpo.errors import UserError


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory entry under a directory, to disk."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems (and Windows) do not open directories; nothing more can be done there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Have write(tmp) fill a temp file beside path, flush it to disk, and rename it over path (OSError propagates)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """Replace path's content with text atomically: a temp file beside it, fsync, rename."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    """Write obj as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_output(out: Path, overwrite: bool, marker: str | None) -> None:
    """Refuse an existing output unless --overwrite, and even then anything but an earlier output of the same kind.

    marker is a file every such output directory holds (None: the output is a single GGUF file, known by its magic).
    """
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pick another --out or pass --overwrite.")
    if marker is None:
        if out.is_dir():
            raise UserError(f"{out} is a directory; --out must name a file.")
        with open(out, "rb") as f:
            start = f.read(4)
        if start and start != b"GGUF":
            raise UserError(f"{out} is not a GGUF file; refusing to overwrite it, pick another --out.")
    elif not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file()):
        raise UserError(
            f"{out} is not an earlier output of this command (no {marker}); refusing to "
            "overwrite it, pick another --out."
        )


def _swap_in(new: Path, out: Path) -> None:
    """Put new under the name out, replacing what is there (renames, so out is never half-written)."""
    if not (out.exists() or out.is_symlink()):
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def default_permissions(root: Path) -> None:
    """Give root and everything under it the modes a plain mkdir/open would (0777/0666 less the umask): mkdtemp makes
    0700 and safetensors writes 0600, which would hide an adapter or model from the other users of a server."""
    root.chmod(0o777 & ~_UMASK)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


@contextlib.contextmanager
def staged(out: Path, inner: str | None = None) -> Iterator[Path]:
    """A temp directory next to out; when the block completes, it (or its file inner) becomes out, else it is removed.

    A full disk or any other write error leaves nothing under the final name and ends as one UserError line.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise UserError(f"cannot write next to {out} ({e.strerror or e}).") from None
    try:
        yield tmp
        default_permissions(tmp)
        fsync_tree(tmp)
        _swap_in(tmp / inner if inner else tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise UserError(f"could not write {out} ({e.strerror or e}); nothing was left under that name.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
