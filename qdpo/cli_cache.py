"""`qdpo cache list` and `qdpo cache clear`: what qdpo keeps on disk (added to `qdpo` with main.add_command)."""

from __future__ import annotations

import time

import click


def _count(n: int, thing: str) -> str:
    """'1 reference table', '2 reference tables'."""
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for limit, unit, per in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{seconds / per:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def _what(about: dict | None) -> str:
    if not about:
        return "(no description: written by an older qdpo)"
    pairs, scored = about.get("pairs", "?"), about.get("scored")
    count = f"{scored:,} of {pairs:,} pairs" if scored is not None and scored != pairs else f"{pairs:,} pairs"
    text = f"{about.get('model')}, {count} (data {about.get('data_sha256', '?')})"
    if about.get("init_adapter"):
        text += f", init adapter {about['init_adapter']}"
    return text


@click.group("cache")
def cache() -> None:
    """What qdpo keeps under $QDPO_CACHE (default ~/.cache/qdpo): reference tables and converted GGUF models."""


@cache.command("list")
def list_cache() -> None:
    """List the cached reference tables and converted GGUF models.

    Each table: file, size, when last used, and the model and data it was computed for.
    """
    from qdpo.reference import MAX_BYTES, converted_models, list_entries, max_entries, reference_dir

    entries = list_entries()
    now = time.time()
    limit = f"keeps the {max_entries()} most recently used, {_size(MAX_BYTES)} at most"
    if not entries:
        click.echo(f"no reference tables in {reference_dir()} ({limit})")
    else:
        click.echo(
            f"{_count(len(entries), 'reference table')}, {_size(sum(e.bytes for e in entries))}, "
            f"in {reference_dir()} ({limit}):"
        )
        width = max(len(e.path.name) for e in entries)
        for e in reversed(entries):  # most recently used first
            click.echo(f"  {e.path.name:<{width}}  {_size(e.bytes):>8}  {_age(now - e.used):>10}  {_what(e.about)}")
    models = converted_models()
    if models:
        click.echo(
            f"{_count(len(models), 'converted GGUF model')}, {_size(sum(size for _, size in models))} "
            "(removed by `qdpo cache clear --all`):"
        )
        for path, size in models:
            click.echo(f"  {path.name}  {_size(size)}")


@cache.command("clear")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also remove the GGUF models converted into transformers checkpoints (<cache>/models).",
)
def clear_cache(everything: bool) -> None:
    """Remove the cached reference tables (--all: converted models too).

    A later run computes its reference table again; a run on a GGUF model converts it again.
    """
    from qdpo.reference import clear_cache as clear

    tables, models, removed = clear(models=everything)
    click.echo(
        f"removed {_count(tables, 'reference table')}"
        + (f" and {_count(models, 'converted GGUF model')}" if everything else "")
        + f" ({_size(removed)})"
    )
