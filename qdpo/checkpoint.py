"""Checkpoints of a run, and resuming from the newest one exactly where it stopped.

A checkpoint is a directory RUN/checkpoints/step-000123/ holding everything the loop's next step depends on:
the adapter (a plain PEFT directory, loadable on its own), the optimizer, scheduler and GradScaler states,
the RNG states, the data order and position, the metrics logged so far, and the resolved config. It is
written to a temporary directory beside its final name, flushed, and renamed (qdpo.fs.staged), so a kill at
any moment leaves either the complete checkpoint or none; checkpoint.json, written last, marks it complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from qdpo.config import PATH_SETTINGS, Config, absolute_paths, local_path
from qdpo.distributed import load_adapter_state, sharded
from qdpo.errors import UserError
from qdpo.faults import crash_point
from qdpo.fs import fsync_dir, staged, write_json, write_text

CHECKPOINTS = "checkpoints"
FORMAT = 1
# Settings a resume may change: they decide when things are logged, evaluated or saved, and how long the run
# goes on, not what a step computes. Every other difference is refused.
HARMLESS = (
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "max_steps",
    "num_train_epochs",
    "overwrite",
    "output_dir",
    "max_nonfinite_steps",
    "eval_generate",  # greedy answers at eval time: no RNG drawn, the model's mode restored
    "max_new_tokens",
    # Memory switches, the ways out of running out of GPU memory: the same computation, kept or recomputed
    # differently (a chunk size changes only the order of float sums).
    "gradient_checkpointing",
    "offload_activations",
    "logits_chunk_size",
    "tiled_mlp",
)


@dataclass
class Checkpoint:
    """A complete checkpoint on disk: where it is and the optimizer step it was taken after."""

    path: Path
    step: int


def rng_state() -> dict[str, Any]:
    """Every random state a step can draw from (LoRA dropout; python's for data order is reseeded per epoch)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved (the CUDA states only for the GPUs this machine has)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs than this one: the devices beyond this one's are not used here.
        for index, saved in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved, index)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> str | None:
    """Restore the fp16 loss scale, or say why it starts afresh (saved where compute was bf16 or fp32)."""
    if scaler.is_enabled() and not state:
        # torch refuses an empty state: the run was saved on a GPU with bf16 (or the CPU) and resumes in fp16
        # (compute_dtype auto on a T4, say). A fresh scaler is what a new fp16 run would start from.
        return "note: the checkpoint was saved without fp16 loss scaling (bf16 or CPU); the loss scale starts afresh."
    scaler.load_state_dict(state)  # a disabled scaler (bf16, CPU) ignores what an fp16 run saved
    return None


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    trainer_state: dict[str, Any],
    config: Config,
    description: dict[str, Any],
    keep: int,
    world_size: int = 1,
    adapter_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`; returns its directory.

    trainer_state holds the optimizer, scheduler, scaler, data-stream and RNG states as of the start of step + 1.
    """
    target = run_dir / CHECKPOINTS / f"step-{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged(target) as tmp:
        # adapter_state: the whole tensors, when the model holds only this rank's shards (FSDP)
        model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"], state_dict=adapter_state)
        tokenizer.save_pretrained(str(tmp / "adapter"))
        write_json(tmp / "adapter" / "qdpo.json", description)
        torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
        crash_point("checkpoint")
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copyfile(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        write_text(tmp / "config.yaml", yaml.safe_dump(absolute_paths(config).to_dict(), sort_keys=False))
        meta = {"format": FORMAT, "step": step, "saved": time.time(), "world_size": world_size}
        write_json(tmp / "checkpoint.json", meta)
    prune(run_dir, keep)
    return target


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of a run, oldest first (a directory without checkpoint.json is not one)."""
    found = []
    for path in (run_dir / CHECKPOINTS).glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / "checkpoint.json").is_file() and (path / "trainer_state.pt").is_file():
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; also clear temp directories a killed write left behind."""
    found = checkpoints(run_dir)
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in (run_dir / CHECKPOINTS).glob(".step-*.tmp-*"):
        if stale.name.rsplit("-", 1)[-1] != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)
    fsync_dir(run_dir / CHECKPOINTS)


def load_trainer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The optimizer, scheduler, scaler, RNG and data-order states of a checkpoint."""
    try:
        return torch.load(checkpoint.path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file: say which, and how to go on from the one before
        raise UserError(
            f"checkpoint {checkpoint.path} cannot be read ({type(e).__name__}); delete that directory "
            "to resume from the one before it."
        ) from None


def load_adapter_weights(model, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's policy adapter weights into the model's trainable adapter, exactly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint.path / "adapter" / "adapter_model.safetensors"))
    if sharded(model):  # FSDP: each rank keeps its shard of every tensor
        named = {n.replace(".default.", "."): n for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(named) - set(weights))
        if missing or len(weights) != len(named):
            raise UserError(
                f"checkpoint {checkpoint.path} does not match this model's adapter ({(missing or ['extra'])[0]}); "
                "resume with the settings the run was started with."
            )
        load_adapter_state(model, {named[k]: v for k, v in weights.items()})
        return
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    # PEFT saves the trainable adapter's tensors without its name ("default"): every one must be in the file.
    expected = {n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad}
    wrong = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k] + sorted(expected - set(weights))
    if wrong:
        raise UserError(
            f"checkpoint {checkpoint.path} does not match this model's adapter ({wrong[0]}); "
            "resume with the settings the run was started with."
        )


def saved_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The resolved settings a checkpoint was taken with."""
    return yaml.safe_load((checkpoint.path / "config.yaml").read_text())


def resume_conflicts(saved: dict[str, Any], config: Config, saved_world: int = 1, world: int = 1) -> list[str]:
    """Settings that differ from the checkpoint's and would change what a step computes, as 'name: old -> new'.

    micro_batch_size and gradient_accumulation_steps may change together when the pairs per optimizer step stay
    the same (the way out of running out of GPU memory, or onto another number of processes: the global batch
    counts every process's); the pairs left in the epoch are then regrouped.
    """
    now = absolute_paths(config).to_dict()
    saved = {**saved, **{name: local_path(saved.get(name)) for name in PATH_SETTINGS if name in saved}}
    regroup = ("micro_batch_size", "gradient_accumulation_steps")
    same_step = (
        saved.get(regroup[0], 0) * saved.get(regroup[1], 0) * saved_world
        == config.micro_batch_size * config.gradient_accumulation_steps * world
    )
    # A setting missing from the checkpoint came after the qdpo that wrote it, which computed what its default does.
    defaults = Config().to_dict()
    return [
        f"{f.name}: {saved.get(f.name, defaults[f.name])!r} -> {now[f.name]!r}"
        for f in fields(Config)
        if f.name not in HARMLESS
        and not (f.name in regroup and same_step)
        and saved.get(f.name, defaults[f.name]) != now[f.name]
    ]


def saved_world_size(checkpoint: Checkpoint) -> int:
    """How many processes trained the run up to this checkpoint (1 for checkpoints from before multi-GPU)."""
    return int(json.loads((checkpoint.path / "checkpoint.json").read_text()).get("world_size", 1))


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def world_size_note(checkpoint: Checkpoint, config: Config, world: int) -> str | None:
    """What changes when a run resumes on another number of processes than it was saved on; None if nothing."""
    saved = saved_world_size(checkpoint)
    if saved == world:
        return None
    before = saved_config(checkpoint)
    old = before["micro_batch_size"] * before["gradient_accumulation_steps"] * saved
    new = config.micro_batch_size * config.gradient_accumulation_steps * world
    unit = "examples" if config.unpaired else "pairs"
    head = f"resuming on {_processes(world)} a run saved on {_processes(saved)}"
    batch = "(micro_batch_size x gradient_accumulation_steps x processes)"
    if old == new:
        return f"{head}: the global batch stays {new} {unit} per step {batch}, as before"
    per_rank = config.micro_batch_size * world
    keep = f"; gradient_accumulation_steps={old // per_rank} keeps the old one" if old % per_rank == 0 else ""
    return (
        f"{head}: each optimizer step now takes {new} {unit} instead of {old} {batch} on the same learning-rate "
        f"schedule in steps{keep}"
    )


def check_resume(checkpoint: Checkpoint, config: Config, world: int = 1, data_fingerprint: str | None = None) -> None:
    """Refuse, naming the fields, a resume whose settings or training pairs would make it compute something else."""
    run = checkpoint.path.parent.parent
    conflicts = resume_conflicts(saved_config(checkpoint), config, saved_world_size(checkpoint), world)
    if conflicts:
        raise UserError(
            f"cannot resume {run}: these settings differ from the run's "
            f"({'; '.join(conflicts)}); resume with the run's own settings (qdpo run --resume DIR alone "
            "takes them from the run) or start a new run."
        )
    # The checkpoint's place in the epoch is a list of indices into the training pairs: with other pairs it would
    # point at the wrong ones (or past the end).
    saved = saved_data_fingerprint(checkpoint)
    if data_fingerprint and saved and saved != data_fingerprint:
        raise UserError(
            f"cannot resume {run}: the training pairs differ from the ones it was started with (data fingerprint "
            f"{saved} -> {data_fingerprint}: the data changed, or how its held-out share is split off, as qdpo "
            "releases before whole-prompt splits did); resume with the same data, or start a new run with "
            f"init_adapter={checkpoint.path / 'adapter'} to carry on from this checkpoint's adapter."
        )


def saved_data_fingerprint(checkpoint: Checkpoint) -> str | None:
    """The content hash of the training pairs a checkpoint was taken on (None for a checkpoint without one)."""
    try:
        return json.loads((checkpoint.path / "adapter" / "qdpo.json").read_text())["data"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
