"""The `qdpo` command: thin, typed wrappers over the library."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from qdpo.errors import UserError

LAUNCHED_BY_QDPO = "QDPO_LAUNCHER"  # set by `qdpo run --nproc`, which reports a failed rank itself


def _fail(message: str, exit_code: int = 2, label: str = "error: ") -> None:
    click.echo(f"{label}{message}", err=True)
    sys.exit(exit_code)


class _Group(click.Group):
    """Turns UserError from any command into one line on stderr and exit code 2.

    On one of several ranks (torchrun), the line names the rank; a rank that only lost contact with another
    says nothing under `qdpo run --nproc` (the launcher names the rank that failed) and one line under torchrun.
    """

    def invoke(self, ctx: click.Context) -> Any:
        from qdpo.distributed import current_rank, launched_size
        from qdpo.watch import caused_by_out_of_memory

        several = launched_size() > 1
        rank = f"rank {current_rank()}: " if several else ""
        try:
            return super().invoke(ctx)
        except UserError as e:  # a stop the user asked for is not an error: it says where it stopped instead
            # Every rank reads the same settings and data, so rank 0's line speaks for all; only running out of
            # memory happens on one rank alone, and that rank says so. Rank 0 also says where a stopped run stopped.
            if several and current_rank() > 0 and not caused_by_out_of_memory(e):
                sys.exit(e.exit_code)
            stopped = e.exit_code in (130, 143)  # a stop all ranks made together: rank 0 speaks, unnamed
            _fail(("" if stopped else rank) + str(e), e.exit_code, "stopped: " if stopped else "error: ")
        except KeyboardInterrupt as e:  # outside a run's own stop handling: the shell's exit code, no "Aborted!"
            from qdpo.stopping import StoppedEarly

            if several and current_rank() > 0:  # rank 0 speaks for the job
                sys.exit(130)
            if isinstance(e, StoppedEarly):  # a run's signal before its directory was made
                click.echo(f"stopped: {e} before the run started; nothing was written.", err=True)
                sys.exit(e.exit_code)
            click.echo("stopped: interrupted.", err=True)
            sys.exit(130)
        except Exception as e:
            from qdpo.distributed import lost_peer

            if not (several and lost_peer(e)):
                raise
            if os.environ.get(LAUNCHED_BY_QDPO):
                sys.exit(1)
            message = (
                f"{rank}lost contact with another rank, which stopped the job (torchrun's report names it); the "
                "run keeps its last checkpoint: continue it with --resume RUN_DIR"
            )
            _fail(message, 1)


@click.group(cls=_Group)
@click.version_option(package_name="qdpo")
def main() -> None:
    """qdpo: DPO-tune a 4-bit model with LoRA on one GPU (or the CPU)."""
    # Library deprecation notices are for qdpo's developers, not for someone running a tune.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@main.command()
@click.option("--preset", default="smoke", show_default=True, help="Preset name (see `qdpo presets`) or a .yaml file.")
@click.option("--model", default=None, help="Base model: transformers dir, .gguf file or hub id.")
@click.option("--data", default=None, help="Preference data: .jsonl/.json/.parquet/.csv, save_to_disk dir or hub id.")
@click.option("--eval-data", default=None, help="Held-out preference data (default: eval_fraction of --data).")
@click.option("--output", "output_dir", default=None, help="Run directory (default runs/<preset>-<time>).")
@click.option("--prompt-column", default=None, help="Column holding the prompt.")
@click.option("--chosen-column", default=None, help="Column holding the preferred response.")
@click.option("--rejected-column", default=None, help="Column holding the dispreferred response.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run in the output directory.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (metrics still go to metrics.jsonl).")
@click.option(
    "--micro-batch",
    "micro_batch",
    default=None,
    help="Pairs per forward, or 'auto': the largest the memory plan fits into the preset's GPU budget.",
)
@click.option("--dry-run", is_flag=True, help="Print the resolved settings as YAML and stop (loads no model or data).")
@click.option(
    "--nproc",
    type=int,
    default=None,
    help="Run on this many processes (one per GPU) with torchrun: data parallel, or sharded with strategy=fsdp.",
)
@click.option(
    "--resume",
    "resume",
    default=None,
    is_flag=False,
    flag_value="",
    metavar="[RUN_DIR]",
    help="Continue a run from its newest checkpoint. `--resume RUN_DIR` alone takes the run's own settings; "
    "bare `--resume` with --output DIR checks the settings given against the run's.",
)
@click.argument("overrides", nargs=-1)
def run(
    preset: str,
    model: str | None,
    data: str | None,
    eval_data: str | None,
    output_dir: str | None,
    prompt_column: str | None,
    chosen_column: str | None,
    rejected_column: str | None,
    overwrite: bool | None,
    no_progress: bool,
    micro_batch: str | None,
    dry_run: bool,
    nproc: int | None,
    resume: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Tune LoRA adapters with DPO. OVERRIDES are key=value settings (see `qdpo settings`), e.g. beta=0.2.

    Later sources win: built-in defaults < preset < flags and key=value overrides. A resumed run may change
    only when things are logged, evaluated and saved, how many steps it runs, and micro_batch_size with
    gradient_accumulation_steps at the same pairs per step.
    """
    from qdpo.api import tune
    from qdpo.config import parse_override
    from qdpo.presets import load_preset, resolve_settings

    loaded = load_preset(preset)
    flags = {
        "model": model,
        "data": data,
        "eval_data": eval_data,
        "output_dir": output_dir,
        "prompt_column": prompt_column,
        "chosen_column": chosen_column,
        "rejected_column": rejected_column,
        "overwrite": overwrite,
    }
    if micro_batch is not None and micro_batch != "auto":
        flags["micro_batch_size"] = parse_override(f"micro_batch_size={micro_batch}")[1]
    if resume and "=" in resume and not Path(resume).expanduser().exists():  # `--resume key=value`: an override
        overrides, resume = (resume, *overrides), ""
    notes: list[str] = []
    if resume:  # the run's own resolved settings are the base; flags and overrides still apply on top
        from qdpo.config import build_config, load_yaml

        if click.get_current_context().get_parameter_source("preset") != click.core.ParameterSource.DEFAULT:
            raise UserError(
                "--preset does not apply to --resume: a resumed run keeps its own settings; leave --preset out "
                "(and change what a resume may change with key=value)."
            )

        run_dir = Path(resume).expanduser()
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
            raise UserError(f"cannot resume {run_dir}: it is not a qdpo run directory (no run.json); check the path.")
        flags["output_dir"] = str(run_dir)
        values = {k: v for k, v in flags.items() if v is not None}
        values.update(parse_override(text) for text in overrides)
        config = build_config(load_yaml(run_dir / "config.yaml"), values, notes)
    else:
        config = resolve_settings(preset, flags, overrides, notes)
        if resume is not None and not config.output_dir:
            raise UserError(
                "--resume without a directory needs --output DIR (the run to continue); "
                "or pass the run directory: --resume DIR."
            )
    for note in notes:
        click.echo(note, err=dry_run)  # a dry run's stdout is the YAML alone
    from qdpo.distributed import launched_size

    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc must be 1 or more (1, or left out, for one process), not {nproc}.")
    processes = nproc or launched_size()
    if processes < loaded.processes and not dry_run:
        raise UserError(
            f"preset {loaded.name} is planned for {loaded.processes} GPUs, one process each; run it with "
            f"qdpo run --nproc {loaded.processes} (or torchrun --nproc-per-node {loaded.processes} -m qdpo run)."
        )
    if micro_batch == "auto":
        config = _auto_micro_batch(config, loaded.gpu_memory_gb, processes)
    config = _memory_switches(config, loaded.gpu_memory_gb, dry_run, processes)
    if dry_run:
        import yaml

        if resume:  # the settings a resume would refuse are refused here too (the data is not read: not its check)
            from qdpo.checkpoint import check_resume, latest

            checkpoint = latest(Path(config.output_dir))
            if checkpoint is not None:
                check_resume(checkpoint, config, processes)
        click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)
        return
    if nproc is not None and nproc != 1:
        _launch(nproc, preset, config, resume)
        return
    from qdpo.stopping import outlive_readers

    outlive_readers()
    tune(loaded.name, config=config, echo=click.echo, progress=not no_progress, resume=resume is not None)
    from qdpo.distributed import end_gloo_process

    end_gloo_process()  # a rank of a finished CPU job: exit before finalization can abort it


def _launch(nproc: int, preset: str, config, resume: str | None) -> None:
    """Start this same `qdpo run` on nproc processes (torchrun) and exit with the job's code."""
    from qdpo.distributed import launched_size
    from qdpo.launch import launch
    from qdpo.rundir import run_dir_for

    if launched_size() > 1:
        raise UserError("--nproc starts torchrun itself; under torchrun, leave it out (torchrun sets the processes).")
    argv = sys.argv[sys.argv.index("run") + 1 :] if "run" in sys.argv else []
    out = str(run_dir_for(config, preset))
    if not config.output_dir and resume is None:  # every rank must write to the one directory named now
        argv += ["--output", out]
    os.environ[LAUNCHED_BY_QDPO] = "1"
    code = launch(nproc, argv, out)
    if code:
        sys.exit(code)


def _auto_micro_batch(config, budget_gb: float | None, processes: int = 1):
    """Replace micro_batch_size by the planner's largest fit for the GPU budget (preset's, else the card's)."""
    import dataclasses

    import torch

    from qdpo.plan import auto_micro_batch

    if budget_gb is None and torch.cuda.is_available():
        budget_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    if budget_gb is None:
        raise UserError("--micro-batch auto needs a GPU budget: use a GPU preset (gpu_memory_gb) or run on a GPU.")
    fits = auto_micro_batch(config, budget_gb, processes)
    # The same pairs per optimizer step as the settings ask for: auto changes memory use, not the optimization.
    per_step = config.micro_batch_size * config.gradient_accumulation_steps
    size = max(b for b in range(1, min(fits, per_step) + 1) if per_step % b == 0)
    click.echo(
        f"micro_batch_size {size} x gradient_accumulation_steps {per_step // size}: the largest micro-batch of "
        f"{per_step} pairs per step that fits {budget_gb:g} GB at max_length {config.max_length} (the plan fits "
        f"{fits}; qdpo plan)"
    )
    return dataclasses.replace(config, micro_batch_size=size, gradient_accumulation_steps=per_step // size)


def _memory_switches(config, budget_gb: float | None, dry_run: bool, processes: int = 1):
    """On a GPU, switch on tiled_mlp / offload_activations when the plan says the step fits only with them; refuse
    when what the plan keeps in pinned CPU memory is more than the machine has free."""
    import torch

    from qdpo.distributed import current_rank
    from qdpo.plan import describe_switches, memory_switches, plan_memory, planner_view

    if not torch.cuda.is_available():  # the planner plans GPU memory; a CPU run has no budget to fit
        return config
    if budget_gb is None:
        budget_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    view = planner_view(config)
    if view is None:  # a model the planner cannot read (no config.json): run as set
        return config
    model_cfg, exact = view
    try:
        switch = memory_switches(model_cfg, exact, budget_gb, processes) or {}
        plan = plan_memory(model_cfg, dataclasses.replace(exact, **switch), processes=processes)
    except UserError:  # a shape or LoRA target the planner does not model (Phi-2's `dense`, GPT-2): run as set
        return config
    if switch:
        click.echo(
            f"memory: a step of {config.micro_batch_size} x {config.max_length} tokens would not fit {budget_gb:g} GB "
            f"as set; with {describe_switches(switch)} the plan is {plan.total / 1e9:.1f} GB, so qdpo switched "
            f"{'them' if len(switch) > 1 else 'it'} on (`qdpo plan` shows the parts)",
            err=dry_run,
        )
    # Once per job, before anything loads: by `qdpo run --nproc` itself (its ranks have LAUNCHED_BY_QDPO set), or by
    # rank 0 under a plain torchrun; another rank's check could count memory a sibling has begun to use.
    if current_rank() == 0 and not os.environ.get(LAUNCHED_BY_QDPO):
        _check_host_memory(model_cfg, exact, plan, processes)
    return dataclasses.replace(config, **switch)


def _check_host_memory(model_cfg, exact, plan, processes: int) -> None:
    """Refuse a run whose pinned CPU memory, or whose loading under fsdp, needs more RAM than the machine has free."""
    from qdpo.plan import FROZEN, QUANT_STATE, WEIGHTS_4BIT, plan_memory

    free = host_memory_free_gb()
    if free is None:
        return
    pinned = plan.host_bytes * processes / 1e9  # each process pins its own
    if pinned > free:
        raise UserError(
            f"the plan keeps {pinned:.1f} GB in pinned CPU memory (offload_activations / offload_params"
            f"{f', {processes} processes' if processes > 1 else ''}), more than the {free:.1f} GB this machine has "
            "free; lower max_length or micro_batch_size (`qdpo plan` shows the parts), or free memory."
        )
    if exact.strategy == "fsdp" and processes > 1:
        whole = plan_memory(model_cfg, exact).bytes_of(WEIGHTS_4BIT, QUANT_STATE, FROZEN) / 1e9
        loading = whole + plan.host_bytes * (processes - 1) / 1e9
        if loading > free:
            raise UserError(
                f"each of the {processes} processes loads the whole 4-bit model ({whole:.1f} GB) into CPU memory "
                f"before sharding it, in turn, beside the others' pinned memory: about {loading:.1f} GB, more than "
                f"the {free:.1f} GB this machine has free; free memory, or use a machine with more (loading on one "
                "process alone is not built)."
            )


def host_memory_free_gb() -> float | None:
    """GB of memory the OS can still hand out (Linux's MemAvailable); None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        return None
    return None


@main.command()
def presets() -> None:
    """List the shipped presets with what each is for, the GPU memory it targets and the longest pair it fits."""
    from qdpo.plan import longest_pair, planner_view
    from qdpo.presets import available, load_preset, resolve_settings

    for name in available():
        p = load_preset(name)
        memory = f"{p.gpu_memory_gb:g} GB GPU" if p.gpu_memory_gb else "CPU"
        memory = f"{p.processes} x {memory}" if p.processes > 1 else memory
        click.echo(f"{name:<11} {memory:<13} {p.description}")
        view = planner_view(resolve_settings(name, {}, ())) if p.gpu_memory_gb else None
        if view is not None:
            plain, switched = longest_pair(*view, p.gpu_memory_gb, p.processes)
            click.echo(
                f"{'':<25} longest pair at micro-batch 1 (planned): {plain:,} tokens per response, "
                f"{switched:,} with tiled_mlp and offload_activations"
            )


@main.command()
def settings() -> None:
    """List every setting with its default and what it does, then every preference method (loss_type)."""
    from dataclasses import MISSING, fields

    from qdpo.config import METHODS, Config

    for f in fields(Config):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        click.echo(f"{f.name} = {default!r}\n    {f.metadata['help']}")
    click.echo("\nloss_type methods (data format; reference model):")
    for name, (what, data, reference) in METHODS.items():
        click.echo(f"  {name:<13} {what} ({data}; {'needs a reference' if reference else 'no reference'})")


from qdpo.cli_cache import cache  # noqa: E402  (commands that live in their own modules)
from qdpo.cli_generate import generate  # noqa: E402
from qdpo.cli_plan import plan  # noqa: E402
from qdpo.cli_report import report  # noqa: E402
from qdpo.cli_ship import export, merge  # noqa: E402

main.add_command(plan)
main.add_command(merge)
main.add_command(export)
main.add_command(cache)
main.add_command(generate)
main.add_command(report)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
