"""The `qdpo plan` command: a preset's memory table from the model's config.json alone, before loading anything."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import click

from qdpo.errors import UserError


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f}"


def format_plan(plan, budget_gb: float | None, processes: int = 1) -> list[str]:
    """The table as printed lines: part, GB (in parentheses when not part of the peak), note; then the total."""
    width = max(len(line.part) for line in plan.lines)
    rows = [f"{'part':<{width}}  {'GB':>7}  note"]
    for line in plan.lines:
        gb = _gb(line.bytes) if line.counted else f"({_gb(line.bytes)})"
        rows.append(f"{line.part:<{width}}  {gb:>7}  {line.note}")
    label = "total (peak of one step)" if processes == 1 else "total per GPU (peak of one step)"
    width = max(width, len(label))
    total = f"{label:<{width}}  {_gb(plan.total):>7}"
    if budget_gb is None:
        rows.append(total + "  no GPU budget (CPU preset)")
    else:
        spare = budget_gb - plan.total / 1e9
        verdict = f"fits, {spare:.2f} GB to spare" if spare >= 0 else f"does NOT fit: {-spare:.2f} GB over"
        rows.append(total + f"  vs a budget of {budget_gb:g} GB: {verdict}")
    if plan.host_bytes:
        label = "pinned CPU memory" + (" per process" if processes > 1 else "")
        rows.append(
            f"{label:<{width}}  {_gb(plan.host_bytes):>7}  the machine's RAM must have this free (qdpo run checks)"
        )
    return rows


@click.command("plan")
@click.option("--preset", default="smoke", show_default=True, help="Preset name (see `qdpo presets`) or a .yaml file.")
@click.option(
    "--model",
    default=None,
    help="A model directory or config.json (default: the preset's model; built-in "
    "shapes for the shipped presets' hub ids).",
)
@click.option(
    "--budget-gb", type=float, default=None, help="GPU memory to plan for (default: the preset's gpu_memory_gb)."
)
@click.option(
    "--nproc",
    type=int,
    default=None,
    help="Plan one of this many processes, one per GPU (default: the preset's); strategy=fsdp shards the model.",
)
@click.argument("overrides", nargs=-1)
def plan(
    preset: str, model: str | None, budget_gb: float | None, nproc: int | None, overrides: tuple[str, ...]
) -> None:
    """Estimate GPU memory of a run from the model's config.json (no weights) and the largest batch/length that fit.

    OVERRIDES are key=value settings, as for `qdpo run` (e.g. micro_batch_size=4 max_length=4096).
    """
    from qdpo.families import exact_settings
    from qdpo.plan import all_switches, describe_switches, largest_fit, memory_switches, plan_memory
    from qdpo.presets import load_preset, resolve_settings
    from qdpo.shapes import ModelShape, model_config

    loaded = load_preset(preset)
    notes: list[str] = []
    config = resolve_settings(preset, {"model": model}, overrides, notes)
    for note in notes:
        click.echo(note)
    budget = loaded.gpu_memory_gb if budget_gb is None else budget_gb
    processes = loaded.processes if nproc is None else nproc
    if processes < 1:
        raise UserError(f"--nproc must be 1 or more; got {processes}.")
    if budget is not None and (not isinstance(budget, (int, float)) or budget <= 0):
        raise UserError(f"the memory budget must be a positive number of GB; got {budget!r}.")
    device = "cpu" if budget is None else "cuda"  # a preset without a GPU budget runs on the CPU
    model_cfg, source = model_config(config.model)
    config, family_notes = exact_settings(config, SimpleNamespace(**model_cfg))  # the paths the run would take
    switch = memory_switches(model_cfg, config, budget, processes) if budget is not None else None
    as_set = config
    if switch is not None:  # what `qdpo run` on a GPU does with this budget: plan that
        config = replace(config, **switch)
    shape = ModelShape.from_config(model_cfg)
    result = plan_memory(model_cfg, config, device=device, processes=processes)
    chunk = getattr(config, "logits_chunk_size", 0)
    click.echo(f"preset {loaded.name}: {config.model}")
    for note in family_notes:
        click.echo(note)
    if switch is not None:
        click.echo(
            f"planned with {describe_switches(switch)}: the step does not fit {budget:g} GB without, and "
            "qdpo run on a GPU switches that on itself"
        )
    click.echo(
        f"model shape from {source}: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads "
        f"({shape.kv_heads} kv), MLP {shape.intermediate}, vocab {shape.vocab}{' (tied)' if shape.tied else ''}"
    )
    click.echo(
        f"step: micro_batch_size {result.micro_batch_size} pairs x max_length {result.seq_len}, "
        f"{result.dtype} on {'the CPU' if device == 'cpu' else 'a GPU'}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
        f"{f'logits in chunks of {chunk}' if chunk else 'full logits'}, LoRA r={config.lora_r}, {config.optim}"
    )
    click.echo(
        "assumes: " + "; ".join(result.assumptions + ["worst case: every sequence max_length tokens, 1-token prompts"])
    )
    click.echo("")
    for row in format_plan(result, budget, processes):
        click.echo(row)
    if budget is not None:
        batch, length = largest_fit(model_cfg, config, budget, device=device, processes=processes)
        click.echo(f"largest micro_batch_size at max_length {config.max_length}: {batch}")
        if switch is not None:  # the longest pair as the user set it, before qdpo's own switches
            length = largest_fit(model_cfg, as_set, budget, device=device, processes=processes)[1]
        click.echo(f"largest max_length at micro_batch_size 1: {length}")
        switched = largest_fit(model_cfg, all_switches(config), budget, device=device, processes=processes)[1]
        click.echo(f"largest max_length at micro_batch_size 1 with tiled_mlp and offload_activations: {switched}")
