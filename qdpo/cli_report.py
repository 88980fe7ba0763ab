"""`qdpo report`: one run's curves and figures as report.html and report.md, or two runs compared."""

from __future__ import annotations

from pathlib import Path

import click

from qdpo.errors import UserError


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR [RUN_DIR]")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write report.html and report.md; default: the run itself, or ./qdpo-compare for two runs.",
)
def report(runs: tuple[Path, ...], out: Path | None) -> None:
    """Write report.html (one file, opens offline) and report.md for a run; with two runs, compare them.

    A comparison draws both runs' curves on the same axes and lists only the settings that differ.
    `qdpo run` writes a run's own report when it ends, finished or stopped early.
    """
    from qdpo.report import write_report

    if len(runs) > 2:
        raise UserError(f"qdpo report takes one run directory, or two to compare; got {len(runs)}.")
    target = write_report(list(runs), out)
    click.echo(f"report: {target / 'report.html'} and {target / 'report.md'}")
