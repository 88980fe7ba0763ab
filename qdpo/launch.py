"""`qdpo run --nproc N`: the same command on N processes, started by torchrun's own launcher.

The launcher is torch.distributed.run (what the `torchrun` command runs), called in this process with
`--standalone`; what this module adds is the one line a user reads when a rank fails, instead of torchrun's
report and traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def worker_args(argv: list[str]) -> list[str]:
    """The `qdpo run` arguments each rank gets: this command's, without --nproc (a rank starts no one)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def failure_line(rank: int, signum: int, output_dir: str, nproc: int) -> str:
    """The one line that says which rank was killed, taking the job down, and what is left to resume from."""
    from qdpo.rundir import resume_command

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return (
        f"rank {rank} was killed by {name}, which stopped the job; the run keeps its metrics and last checkpoint: "
        f"continue with {resume_command(output_dir, nproc)}"
    )


def launch(nproc: int, argv: list[str], output_dir: str) -> int:
    """Run `python -m qdpo run ARGS` on nproc local processes with torchrun; the job's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 thread per rank (and warn); on the CPU the cores are better shared out.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # torchrun's own notes and failures: one line, below
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # torchrun passes a Ctrl-C or SIGTERM on to the ranks, then waits this long before it kills them: enough to
    # finish the step and write the checkpoint (its default, 30 s, is shorter than one step of a large model).
    shutdown = "--shutdown-timeout=900"
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", shutdown, "--module", "qdpo", "run"]
        + worker_args(argv)
    )
    try:
        run(args)
    except SignalException as e:  # the ranks got the signal too; rank 0 says where the run stopped
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        # A rank that raised said why itself (its `error:` line); one that was killed said nothing.
        if failure.exitcode < 0:
            print(f"error: {failure_line(rank, -failure.exitcode, output_dir, nproc)}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
