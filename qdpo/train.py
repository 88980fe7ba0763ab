"""The DPO recipe: prepare data → set up the 4-bit policy/reference → train → save. Read top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from qdpo import __version__
from qdpo.assess import eval_accuracy, eval_line, small_eval_warning, verdict
from qdpo.batching import BatchStream, length_grouped_batches, make_batch, padding_share
from qdpo.checkpoint import (
    Checkpoint,
    check_resume,
    latest,
    load_adapter_weights,
    load_scaler_state,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    saved_config,
    saved_world_size,
    set_rng_state,
    world_size_note,
)
from qdpo.config import Config, absolute_paths, read_json
from qdpo.distributed import (
    SINGLE,
    World,
    data_parallel,
    device_mesh,
    full_adapter_state,
    full_optimizer_state,
    join,
    leave,
    load_optimizer_state,
    local,
    lost_peer,
    reshard,
    shard_model,
    sharded,
    unsynced,
)
from qdpo.errors import UserError
from qdpo.families import exact_settings
from qdpo.faults import crash_point
from qdpo.fs import staged, write_json, write_text
from qdpo.generate import GENERATIONS, eval_generations, training_tokens
from qdpo.model import (
    adapter_lora_settings,
    add_lora,
    compute_dtype,
    load_base_4bit,
    pick_device,
    trainable_parameters,
)
from qdpo.prepare import PreparedData, check_vocabulary, prepare_data
from qdpo.quiet import progress_bar, quiet_libraries, showing_progress, tqdm_class
from qdpo.reference import cache_key, load_or_compute
from qdpo.rundir import (
    check_run_dir,
    claim_run_dir,
    mark_stopped,
    release_lock,
    resume_command,
    run_dir_for,
    touch_lock,
)
from qdpo.step import Metrics, PreferenceLoss, interval_row, preference_loss
from qdpo.stopping import Interrupted, StoppedEarly, end_stop_at_once, stop_at_once, stop_requests
from qdpo.tiled_mlp import tile_mlps
from qdpo.timing import PhaseClock
from qdpo.tokenize import TokenizedPair, TokenizeStats
from qdpo.watch import Watch, caused_by_out_of_memory, not_finite, out_of_memory


@dataclass
class RunResult:
    """Where a finished run lives and what it reported."""

    output_dir: Path
    summary: dict[str, Any]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl: one per logged step, eval rows included (step 0 is the baseline)."""
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def total_steps(config: Config, num_micro_batches: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: max_steps, or enough for num_train_epochs over the data.

    One step takes gradient_accumulation_steps micro-batches on each of world_size ranks.
    """
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(config.num_train_epochs * num_micro_batches / per_step))


def describe_run(
    config: Config, data: PreparedData, dtype: torch.dtype, device: torch.device, status: str
) -> dict[str, Any]:
    """The self-description written as run.json: later commands read it instead of asking again."""
    config = absolute_paths(config)  # read back from other directories (init_adapter by merge, export, generate)
    return {
        "qdpo_version": __version__,
        "status": status,
        "base_model": {
            "name": data.source.name,
            "path": data.source.path,
            "gguf_file": data.source.gguf_file,
            "tokenizer": config.tokenizer,
        },
        "quantization": {
            "method": "bitsandbytes",
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": str(dtype).removeprefix("torch."),
        },
        "lora": {
            "r": config.lora_r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": config.lora_target_modules,
            "init_adapter": config.init_adapter,
        },
        "data": {
            "source": config.data,
            "eval_source": config.eval_data,
            "fingerprint": data.fingerprint,
            "train_pairs": len(data.train),
            "eval_pairs": len(data.eval),
            "dropped": {
                "empty": data.train_stats.dropped_empty,
                "identical": data.train_stats.dropped_identical,
                "too_long": data.train_stats.dropped_too_long,
            },
            "train_stats": split_stats(data.train_stats),
            "eval_stats": split_stats(data.eval_stats) if data.eval_stats else None,
        },
        "device": device.type,
        "adapter_dir": "adapter",
    }


def step_size(config: Config, train_pairs: int, world_size: int = 1) -> str:
    """What one optimizer step takes, as it really is when the data has fewer pairs than a step asks for.

    With several ranks: the global batch, and what each rank takes of it.
    """
    mb, ga = config.micro_batch_size, config.gradient_accumulation_steps * world_size
    unit = "examples" if config.unpaired else "pairs"
    if train_pairs < mb:  # every micro-batch is the whole (small) training set
        return f"{ga} x {train_pairs} {unit} (all of them)" if ga > 1 else f"{train_pairs} {unit} (all of them)"
    if world_size > 1:
        per_rank = config.gradient_accumulation_steps
        per_rank_text = f"{per_rank} micro-batches" if per_rank > 1 else "1 micro-batch"
        per_step = f"{mb * ga} {unit} (global batch: {world_size} processes x {per_rank_text} of {mb})"
    else:
        per_step = f"{mb * ga} {unit}" if ga == 1 else f"{ga} micro-batches of {mb} {unit}"
    uneven = train_pairs % mb  # length grouping leaves one smaller micro-batch per epoch
    return per_step + (f" (one micro-batch per epoch has {uneven})" if uneven else "")


def split_stats(stats: TokenizeStats) -> dict[str, int]:
    """What tokenization did to one split: rows read, kept, dropped by reason, and cut."""
    counts = {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, int)}
    dropped = stats.dropped_empty + stats.dropped_identical + stats.dropped_too_long
    return {"rows": stats.kept + dropped, **counts}


def make_optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' paged 8-bit AdamW (states 4x smaller, paged out under pressure)."""
    if config.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        # The CPU has nothing to page to: the same 8-bit states without paging (what bitsandbytes falls back to).
        kind = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
        return kind(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps: int):
    """Linear warmup over warmup_ratio of the steps, then linear/cosine decay or constant."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(
        name, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * steps), num_training_steps=steps
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def table_rows(table: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Reference log-probs of a micro-batch from the [N, 2] table, ordered like Batch rows (chosen, then rejected)."""
    rows = torch.cat([table[idx, 0], table[idx, 1]])
    if torch.isnan(rows).any():  # a bug, not a user error: the table was built for other micro-batches
        raise RuntimeError(f"the reference table has no scores for pairs {idx}")
    return rows


def desirable_labels(pairs: list[TokenizedPair], idx: list[int], config: Config) -> torch.Tensor | None:
    """KTO's desirable/undesirable labels of a micro-batch's examples; None for preference pairs."""
    return torch.tensor([pairs[j].desirable for j in idx]) if config.unpaired else None


def desirable_share(pairs: list[TokenizedPair]) -> float | None:
    """KTO: the share of examples labelled desirable; None for preference pairs."""
    if not pairs or pairs[0].desirable is None:
        return None
    return sum(1 for p in pairs if p.desirable) / len(pairs)


def evaluate(
    model,
    pairs: list[TokenizedPair],
    batches: list[list[int]],
    reference: torch.Tensor,
    config: Config,
    pad_id: int,
    world: World = SINGLE,
) -> dict[str, float]:
    """Mean metrics over the eval pairs (eval_ prefix), against the precomputed reference table.

    Each rank scores its share of the micro-batches; the sums are added up over ranks.
    """
    metrics = Metrics()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx, counts in progress_bar(world.share_evenly(batches), desc="eval", unit="batch", leave=False):
            batch = make_batch([pairs[j] for j in idx], pad_id, config.batch_layout)
            ref = table_rows(reference, idx) if reference is not None else None  # None: a reference-free method
            desirable = desirable_labels(pairs, idx, config)
            losses, cr, rr, policy = preference_loss(model, batch, config, ref, desirable)
            if counts:
                metrics.add(losses, cr, rr, policy, model.config.vocab_size, desirable)
    model.train(was_training)
    if world.size > 1:
        reshard(model)
    return Metrics.total(world.gather(metrics)).means("eval_")


@dataclass
class Training:
    """What the loop needs: the policy/reference model, its optimizer, the schedule and the reference tables."""

    model: Any
    loss: torch.nn.Module  # PreferenceLoss of the model; under DistributedDataParallel when there are several ranks
    no_sync: Callable[[], Any]  # a context in which backward accumulates gradients without reducing them over ranks
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    steps: int
    stream: "BatchStream"  # the training micro-batches, epoch after epoch
    eval_batches: list[list[int]]
    train_ref: torch.Tensor | None
    eval_ref: torch.Tensor | None
    padding_share: float = 0.0  # of the training tokens, over one epoch
    world: World = SINGLE
    # logging_steps > 1: the rows of the steps since the last logged one (the next row averages them); checkpointed
    unlogged: list[dict[str, Any]] = field(default_factory=list)
    watch: Watch = field(default_factory=lambda: Watch(0.0))  # the training-health checks; checkpointed


def _policy(config: Config, data: PreparedData, dtype: torch.dtype, device: torch.device, echo: Callable[[str], None]):
    """The 4-bit base on device with LoRA added (the reference is the same model, adapters off) and MLPs tiled."""
    model = load_base_4bit(data.source, dtype, device, config.gradient_checkpointing)
    check_vocabulary(data, model.get_input_embeddings().num_embeddings)
    model = add_lora(
        model,
        config.lora_r,
        config.lora_alpha,
        config.lora_dropout,
        config.lora_target_modules,
        config.init_adapter,
        config.seed,
        reference=config.needs_reference,
    )
    if config.tiled_mlp:
        tiled = tile_mlps(model, config.tiled_mlp)
        if tiled:
            echo(f"tiled MLP: {tiled} layers run their MLP {config.tiled_mlp} positions at a time")
        else:
            echo("tiled MLP: off (qdpo tiles the MLPs of its verified model families only)")
    return model


def setup_training(
    config: Config,
    data: PreparedData,
    device: torch.device,
    dtype: torch.dtype,
    echo: Callable[[str], None],
    score_all: bool = False,
    clock: PhaseClock | None = None,
    world: World = SINGLE,
) -> Training:
    """Load the 4-bit base, add LoRA, build optimizer and schedule, and score the reference once.

    score_all scores every training pair (a resume that regroups micro-batches may use any of them).
    """
    clock = clock or PhaseClock()
    clock.enter("load")
    sharding = world.size > 1 and config.strategy == "fsdp"
    if sharding and dtype == torch.float16:
        raise UserError(
            "strategy=fsdp with float16 compute (GPUs without bfloat16, such as the T4) is not supported: its loss "
            "scaler would judge each shard's gradients apart; use strategy=ddp."
        )
    if sharding:
        # Loaded into CPU memory first, whole, as it may not fit one GPU; FSDP moves each rank's shards over. The
        # ranks take turns, so one whole copy is in CPU memory at a time, not one per rank: each keeps its shards
        # and frees the rest before the next rank starts. FSDP replaces the parameters by their shards: the
        # optimizer must be built on those.
        mesh = device_mesh(world, device)
        for turn in range(world.size):
            if world.rank == turn:
                model = _policy(config, data, dtype, torch.device("cpu"), echo)
                roots = shard_model(model, mesh, device, config.offload_params)
                gc.collect()
            world.barrier()
    else:
        model, roots = _policy(config, data, dtype, device, echo), []
    params = trainable_parameters(model)
    if not params:  # the loss would sit at ln 2 forever
        raise UserError(
            "no parameter of the model requires a gradient after adding LoRA, so nothing would train; "
            "check lora_target_modules (and init_adapter)."
        )
    echo(
        f"model: {data.source.name} in 4-bit NF4 on {device.type} ({str(dtype).removeprefix('torch.')} compute), "
        f"{sum(p.numel() for p in params):,} trainable LoRA parameters"
    )
    optimizer = make_optimizer(config, params, device)
    # fp16 compute (T4) underflows small gradients: scale the loss; a no-op for bf16/fp32.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    epoch_batches = length_grouped_batches(data.train, config.micro_batch_size, config.seed)
    steps = total_steps(config, len(epoch_batches), world.size)
    eval_batches = length_grouped_batches(data.eval, config.micro_batch_size, config.seed)
    padding = padding_share(data.train, epoch_batches, config.batch_layout)
    echo(
        f"{steps} steps of {step_size(config, len(data.train), world.size)}; {len(data.train)} training "
        f"{'examples' if config.unpaired else 'pairs'}, "
        f"{steps * config.gradient_accumulation_steps * world.size / len(epoch_batches):.2f} epochs; "
        f"padding share {padding:.1%}"
        + {
            "plain": "",
            "shared": " (prompt computed once per pair)",
            "packed": " (prompt computed once per pair, pairs packed into one row)",
        }[config.batch_layout]
    )

    pad_id, chunk, layout = data.tokenizer.pad_token_id, config.logits_chunk_size, config.batch_layout
    clock.enter("reference")
    # The eval reference is always scored once; the train reference too unless switched off. Both tables go to the
    # cache: a rerun or a resume scores neither again.
    ld = config.ld_alpha
    extra = {
        "lora_dropout": config.lora_dropout,
        **({"ld_alpha": ld} if ld is not None else {}),
        **({"tiled_mlp": config.tiled_mlp} if config.tiled_mlp else {}),  # tiles: other float rounding
    }

    def reference_table(
        pairs: list, every: list[list[int]], needed: list[list[int]], split: str
    ) -> tuple[torch.Tensor, int]:
        # Keyed on every micro-batch the table may hold: a later run that needs more of them extends the entry.
        key = cache_key(
            data.source, config.init_adapter, pairs, dtype, config.micro_batch_size, every, chunk, layout,
            device=device, extra=extra,
        )  # fmt: skip
        damage: list[str] = []
        table, scored = load_or_compute(model, pairs, needed, pad_id, key, chunk, layout, damage, ld, world, split)
        for note in damage:
            echo(note)
        return table, scored

    scored_eval = bool(data.eval) and config.needs_reference
    eval_ref = reference_table(data.eval, eval_batches, eval_batches, "held-out")[0] if scored_eval else None
    train_ref = None
    if not config.needs_reference:
        echo(
            f"reference: none (loss_type {config.loss_types[0]} needs no reference model: "
            "no reference pass, table or cache)"
        )
    elif config.precompute_ref_log_probs:
        # Score only what the run will use: the loop pops epoch 0's micro-batches from the end.
        used = epoch_batches[-min(len(epoch_batches), steps * config.gradient_accumulation_steps * world.size) :]
        used = epoch_batches if score_all else used
        train_ref, scored = reference_table(data.train, epoch_batches, used, "train")
        if scored == 0:
            echo("reference log-probs: reused from cache")
        elif scored == len(used):
            echo("reference log-probs: computed once and cached")
        else:
            echo(
                f"reference log-probs: {len(used) - scored} of {len(used)} micro-batches reused from cache, "
                f"the other {scored} computed and cached"
            )
    stream = BatchStream(data.train, config.micro_batch_size, config.seed, epoch_batches)
    loss = PreferenceLoss(model, config)  # FSDP reduces gradients itself; DDP wraps the loss module
    loss = loss if roots else data_parallel(loss, world, device)
    return Training(
        model,
        loss,
        (lambda: unsynced(roots)) if roots else getattr(loss, "no_sync", contextlib.nullcontext),
        params,
        optimizer,
        make_scheduler(config, optimizer, steps),
        scaler,
        steps,
        stream,
        eval_batches,
        train_ref,
        eval_ref,
        padding,
        world,
        watch=Watch(config.chosen_nll_weight, paired=not config.unpaired),
    )


def train_step(
    t: Training, data: PreparedData, config: Config, stream: BatchStream, device: torch.device
) -> dict[str, Any]:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns its metrics row.

    A step whose loss or gradients are not finite changes nothing: no update, no scheduler step. The row
    says so (`skipped`) and names its pairs (`pairs`), so the loop can stop a run that keeps producing them.
    """
    start = time.time()
    metrics, tokens, pairs = Metrics(), 0, []
    world, accumulate = t.world, config.gradient_accumulation_steps
    # Every rank walks the same stream; of each world.size micro-batches in a row, rank r takes the r-th: the
    # global step is the one micro-batch sequence a single process with world.size times the accumulation sees.
    drawn = [[next(stream) for _ in range(world.size)] for _ in range(accumulate)]
    # Each pair weighs 1 / (the pairs this step really has, on all ranks): the epoch's one short micro-batch, or a
    # training set smaller than a micro-batch, must not shrink the step's gradient. Per rank the global count over
    # world.size, since DDP averages the ranks' gradients; every rank knows it, as every rank walks the stream.
    pairs_per_step = sum(len(idx) for group in drawn for idx in group) / world.size
    for k, group in enumerate(drawn):
        idx = world.share(group)[0]
        pairs += idx
        batch = make_batch([data.train[j] for j in idx], data.tokenizer.pad_token_id, config.batch_layout)
        reference = table_rows(t.train_ref, idx) if t.train_ref is not None else None
        desirable = desirable_labels(data.train, idx, config)
        # DDP reduces the accumulated gradients in the last micro-batch's backward, not in every one.
        with contextlib.nullcontext() if k == accumulate - 1 else t.no_sync():
            losses, cr, rr, policy = t.loss(batch, reference, desirable)
            # Sum / pairs-per-step: every pair of the step weighs the same, whichever micro-batch it is in.
            t.scaler.scale(losses.sum() / pairs_per_step).backward()
        metrics.add(losses, cr, rr, policy, t.model.config.vocab_size, desirable)
        tokens += batch.num_tokens
    peak = peak_memory_gb(device)
    if world.size > 1:  # the row describes the global batch: every rank's pairs and tokens, the fullest GPU
        shares = world.gather((metrics, tokens, pairs, peak))
        metrics = Metrics.total([m for m, _, _, _ in shares])
        tokens = sum(n for _, n, _, _ in shares)
        pairs = [j for _, _, share, _ in shares for j in share]
        peak = max(m for *_, m in shares)
    t.scaler.unscale_(t.optimizer)
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(t.params, clip))
    row = {**metrics.means(), "grad_norm": grad_norm}
    learning_rate = t.scheduler.get_last_lr()[0]  # the rate this step uses
    finite = math.isfinite(row["loss"]) and math.isfinite(grad_norm)
    if t.scaler.is_enabled():  # fp16: the scaler skips an overflowed update itself and backs its scale off
        scale = t.scaler.get_scale()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        skipped = t.scaler.get_scale() < scale
    else:
        skipped = not finite
        if finite:
            t.optimizer.step()
    if not skipped:  # a skipped step changed nothing, so the schedule does not advance either
        t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    row.update(
        {
            "learning_rate": learning_rate,
            "tokens": tokens,
            "tokens_per_second": tokens / (time.time() - start),  # the job's: summed over ranks
            "peak_memory_gb": peak,
        }
    )
    if skipped or t.scaler.is_enabled():
        row["skipped"] = skipped
    if not finite:
        row["pairs"] = pairs  # which training pairs, for the message that stops a run of bad steps
    return row


def run(
    config: Config,
    preset: str = "custom",
    echo: Callable[[str], None] = print,
    progress: bool = True,
    resume: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Tune LoRA adapters on a 4-bit base with DPO and write a self-describing run directory.

    resume=True continues the run in config.output_dir from its newest checkpoint (from step 1 if it has none).
    callback receives each metrics row as it is logged (the same dicts as metrics.jsonl), for live plots.
    """
    quiet_libraries()  # before any library loads: qdpo's lines and bars, not theirs
    device = pick_device()
    world = join(device.type)  # started by torchrun: one of several ranks; else a single process
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if not world.main:  # rank 0 speaks for the job
        echo, progress, callback = (lambda line: None), False, None
    # Until the loop takes over (finish the step, checkpoint), a signal stops at once; several ranks are stopped by
    # their launcher, which signals them all.
    stopping = stop_at_once() if world.size == 1 else contextlib.nullcontext()
    finished = False
    try:
        with showing_progress(progress), stopping:
            result = _run(config, preset, echo, resume, callback, device, world)
        finished = True
        return result
    finally:
        leave(finished)


def generation_prompts(pairs: list[TokenizedPair], limit: int) -> list[list[int]]:
    """The first `limit` distinct prompts of the held-out pairs (several pairs, or KTO's examples, share one)."""
    return [list(ids) for ids in dict.fromkeys(tuple(p.prompt_ids) for p in pairs)][:limit]


def _run(
    config: Config,
    preset: str,
    echo: Callable[[str], None],
    resume: bool,
    callback: Callable[[dict[str, Any]], None] | None,
    device: torch.device,
    world: World = SINGLE,
) -> RunResult:
    started = time.time()
    out = run_dir_for(config, preset) if world.main else None
    if world.main:
        check_run_dir(out, config, resume)  # before any data is read: a refusal costs nothing
    torch.manual_seed(config.seed)
    clock = PhaseClock()
    clock.enter("data")
    if world.main:  # first alone: it may convert a GGUF model into the cache, which the others then read
        data = prepare_data(config, echo)  # every input error surfaces here, before anything is written
    out = world.agree(out)  # the others wait here, and take rank 0's directory (its name may hold the time)
    if not world.main:
        data = prepare_data(config, echo)
    config, notes = exact_settings(config, data.model_config)
    config, lora_notes = adapter_lora_settings(config)
    for note in notes + lora_notes:
        echo(note)
    checkpoint = latest(out) if resume else None
    if checkpoint:
        check_resume(checkpoint, config, world.size, data.fingerprint)
        num_batches = len(length_grouped_batches(data.train, config.micro_batch_size, config.seed))
        steps = total_steps(config, num_batches, world.size)
        if checkpoint.step > steps:  # its adapter has trained past the new end: no step of this run could undo that
            raise UserError(
                f"cannot resume {out} to {steps} steps: its last checkpoint is at step {checkpoint.step}; raise "
                f"max_steps (or num_train_epochs) to at least {checkpoint.step}, or start a new run."
            )
        if checkpoint.step >= steps and (out / "summary.json").is_file():
            echo(f"{out} already finished its {steps} steps; raise max_steps (or num_train_epochs) to train on")
            return RunResult(out, read_json(out / "summary.json"))
    elif resume and read_json(out / "run.json").get("status") == "finished":  # nothing to continue from
        raise UserError(
            f"{out} finished without a checkpoint (save_steps was 0), so it cannot be continued; start a "
            f"new run, with init_adapter={out / 'adapter'} to start from its adapter."
        )
    elif resume:
        echo(f"{out} has no complete checkpoint yet: starting it again from step 1")
    dtype = compute_dtype(config.compute_dtype, device)
    if world.main:
        claim_run_dir(out, resume=checkpoint is not None)
    # Timings are this process's: a resumed run counts from the resume.

    def describe(status: str) -> dict[str, Any]:
        return {
            **describe_run(config, data, dtype, device, status),
            "processes": world.size,
            "timings": clock.as_dict(),
        }

    def announce() -> None:  # the run's own record: on a resume only once the checkpoint is back in place
        if not world.main:
            return
        write_text(out / "config.yaml", yaml.safe_dump(absolute_paths(config).to_dict(), sort_keys=False))
        write_json(out / "run.json", describe("running"))

    try:
        if checkpoint is None:
            announce()
        # Micro-batches regrouped, or another global batch: the rest of the run may use any training pair.
        regrouped = checkpoint is not None and (
            saved_config(checkpoint)["micro_batch_size"] != config.micro_batch_size
            or saved_world_size(checkpoint) != world.size
        )
        try:
            t = setup_training(config, data, device, dtype, echo, score_all=regrouped, clock=clock, world=world)
        except torch.cuda.OutOfMemoryError:  # the model loaded, then a reference or eval micro-batch did not fit
            raise UserError(
                f"out of GPU memory before the first step, scoring the reference at micro_batch_size="
                f"{config.micro_batch_size}, max_length={config.max_length}; lower one of them (`qdpo plan` shows "
                "what fits) and run again."
            ) from None
        first_step = restore(t, checkpoint, out, echo, config) + 1 if checkpoint else 1
        if checkpoint is not None:
            announce()
    except UserError:
        if world.main:
            if checkpoint is None:
                shutil.rmtree(out, ignore_errors=True)  # a run that could not start leaves nothing behind
            release_lock(out)
        raise
    except StoppedEarly as e:  # asked to stop before any step: nothing trained, nothing to keep
        fresh = checkpoint is None and not resume
        if world.main:
            if fresh:
                shutil.rmtree(out, ignore_errors=True)
            elif checkpoint is None:  # its directory was emptied to start over: keep what --resume reads
                announce()
                mark_stopped(out, describe("running"), "interrupted", e)
            release_lock(out)
        if fresh:
            raise Interrupted(
                f"{e} before the first step: nothing was trained and {out} is removed; run the command again", e.signum
            ) from None
        raise Interrupted(
            f"{e} before the first resumed step: nothing was trained; continue with: "
            f"{resume_command(out, world.size)}",
            e.signum,
        ) from None
    except BaseException as e:
        if world.main:
            if checkpoint is None:  # a resumed run's record stays as it was until its checkpoint is restored
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                mark_stopped(out, describe("running"), status, e)
            release_lock(out)
        raise
    try:  # from the first step on, a failure keeps the directory: the metrics logged so far are the user's
        summary = train_loop(t, config, data, device, out, first_step, started, describe, echo, clock, callback)
    except BaseException as e:
        if not world.main:
            raise
        if world.size > 1 and lost_peer(e):  # another rank failed: it (or the launcher) says which; keep the record
            mark_stopped(out, describe("running"), "failed", e)
            raise
        stopped_by_signal = isinstance(e, (Interrupted, KeyboardInterrupt))
        found = latest(out)
        description = describe("running")
        if found:  # what is left to use: the last checkpoint's adapter, a plain PEFT directory
            description["adapter_dir"] = str(found.path.relative_to(out) / "adapter")
        mark_stopped(out, description, "interrupted" if stopped_by_signal else "failed", e)
        kept = f"; the adapter of step {found.step} is in {found.path / 'adapter'}" if found else ""
        echo(f"the run stopped early; {out} keeps the metrics logged so far{kept}, and run.json says why")
        if isinstance(e, StoppedEarly):  # outside the loop's own stop handling (the step-0 eval, the final save)
            raise Interrupted(f"{e}: stopped at once; continue with: {resume_command(out)}", e.signum) from None
        raise
    finally:
        error = sys.exc_info()[1]
        if world.main:
            release_lock(out)
        if world.main and not isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stop now
            from qdpo.report import report_after_run  # matplotlib loads only here

            report_after_run(out, echo)  # after every run that reached its first step, finished or not
        if world.size > 1 and together(error):
            # The ranks leave together: one that exits first makes torchrun stop the others, rank 0 mid-write.
            world.barrier()
    if world.main:
        echo(format_summary(summary, out))
    return RunResult(out, summary)


def together(error: BaseException | None) -> bool:
    """Whether every rank ends the run at this point: it finished, or all stopped at the same step (a stop request,
    a run of NaN steps); not when one rank alone failed (out of memory, a lost peer, a bug)."""
    if error is None:
        return True
    return isinstance(error, UserError) and not caused_by_out_of_memory(error)


def restore(t: Training, checkpoint: Checkpoint, out: Path, echo: Callable[[str], None], config: Config) -> int:
    """Put the run back in the state of a checkpoint: adapter, optimizer, schedule, RNG, data position, metrics.

    Every rank restores the same state (they all hold the same adapter and optimizer); rank 0 the metrics too.
    """
    state = load_trainer_state(checkpoint)
    load_adapter_weights(t.model, checkpoint)
    load_optimizer_state(t.model, t.optimizer, state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    # The saved rate is the old schedule's: a resume that changed the run's length (max_steps) goes on with this
    # run's schedule at the restored step, not with the old one's last rate (0 after a finished decay). Computed as
    # LambdaLR computes it, so an unchanged schedule gives back the saved rate to the bit.
    rates = [rate(t.scheduler.last_epoch) * base for rate, base in zip(t.scheduler.lr_lambdas, t.scheduler.base_lrs)]
    for group, rate in zip(t.optimizer.param_groups, rates):
        group["lr"] = rate
    t.scheduler._last_lr = rates  # what get_last_lr() reports; LambdaLR has no public setter
    saved_rates = state["scheduler"].get("_last_lr") or rates
    if t.world.main and saved_rates[0] != rates[0]:
        echo(
            f"learning rate: this run's {t.steps}-step schedule from step {checkpoint.step + 1} ({rates[0]:.3g} now; "
            f"the checkpoint's schedule was at {saved_rates[0]:.3g})"
        )
    scaler_note = load_scaler_state(t.scaler, state["scaler"])
    if scaler_note and t.world.main:
        echo(scaler_note)
    t.stream.load_state_dict(state["stream"])
    ranks = state.get("rank_rng", [])  # a checkpoint of several ranks keeps each one's random state
    set_rng_state(ranks[t.world.rank] if t.world.rank < len(ranks) else state["rng"])
    t.unlogged = list(state.get("unlogged", []))
    if "watch" in state:  # checkpoints from before it was kept start the trend afresh
        t.watch.load_state_dict(state["watch"])
    note = world_size_note(checkpoint, config, t.world.size)
    if note:
        echo(note)
    if not t.world.main:
        return checkpoint.step
    if (checkpoint.path / "metrics.jsonl").is_file():  # the lines logged after the checkpoint are logged again
        shutil.copyfile(checkpoint.path / "metrics.jsonl", out / "metrics.jsonl")
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    echo(f"resuming from {checkpoint.path} (step {checkpoint.step} of {t.steps})")
    return checkpoint.step


def trainer_state(t: Training) -> dict[str, Any]:
    """Everything besides the adapter that the next step depends on."""
    return {
        "optimizer": full_optimizer_state(t.model, t.optimizer),  # with FSDP: gathered from the ranks' shards
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "stream": t.stream.state_dict(),
        "rng": rng_state(),
        "unlogged": list(t.unlogged),
        "watch": t.watch.state_dict(),
    }


def train_loop(
    t: Training,
    config: Config,
    data: PreparedData,
    device: torch.device,
    out: Path,
    first_step: int,
    started: float,
    describe: Callable[[str], dict[str, Any]],
    echo: Callable[[str], None],
    clock: PhaseClock | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run steps first_step..t.steps with checkpoints, stop requests and fault handling; save; return the summary."""
    tqdm = tqdm_class()

    clock = clock or PhaseClock()
    pad_id = data.tokenizer.pad_token_id

    def say(line: str) -> None:  # a line between progress-bar redraws, not through the middle of one
        with tqdm.external_write_mode():
            echo(line)

    world = t.world

    def log_row(log, row: dict[str, Any]) -> None:
        if not world.main:
            return
        log.write(json.dumps(row) + "\n")
        log.flush()
        if callback is not None:
            callback(row)

    def log_unlogged(log) -> None:  # one line for the steps since the last one, if there are any
        if t.unlogged:
            log_row(log, interval_row(t.unlogged))
            t.unlogged.clear()

    def log_step(log, row: dict[str, Any], due: bool) -> None:
        """Log a step's row when a line is due (logging_steps, an eval, the last step): the mean over the steps since
        the last line. A skipped step's row goes alone and at once (its figures may not be finite, and the run may
        stop on it); the steps before it keep waiting, unless a line is due."""
        if row.get("skipped"):
            if due:
                log_unlogged(log)
            log_row(log, row)
            return
        t.unlogged.append(row)
        if due:
            log_unlogged(log)

    def run_eval(step: int) -> dict[str, float]:
        clock.enter("eval")
        result = evaluate(t.model, data.eval, t.eval_batches, t.eval_ref, config, pad_id, world)
        say(eval_line(step, result, len(data.eval)))
        # At step 0 the policy is the reference: those answers are the "before".
        # Rank 0 writes them; with FSDP every rank generates too, as each forward needs them all.
        if config.eval_generate and (world.main or sharded(t.model)):
            clock.enter("generate")
            prompts = generation_prompts(data.eval, config.eval_generate)
            log = out / GENERATIONS if world.main else None
            budget = training_tokens(config.to_dict())
            eval_generations(t.model, data.tokenizer, prompts, config.max_new_tokens, log, step, False, budget)
            if world.size > 1:
                reshard(t.model)
        clock.enter("steps")
        return result

    def checkpoint(step: int, state: dict[str, Any] | None = None) -> Path:
        clock.enter("checkpoint")
        try:
            return write_checkpoint(step, state)
        finally:
            clock.enter("steps")

    def write_checkpoint(step: int, state: dict[str, Any] | None) -> Path:
        if state is None and world.size > 1:  # each rank's own dropout stream, so a resume draws what it would have
            state = {**trainer_state(t), "rank_rng": world.gather(rng_state())}
        adapter = full_adapter_state(t.model)  # FSDP: the shards gathered (every rank takes part)
        if not world.main:  # every rank holds the same adapter and optimizer state: rank 0's is the run's
            return out / "checkpoints" / f"step-{step:06d}"
        return save_checkpoint(
            out,
            step,
            model=t.model,
            adapter_state=adapter,
            tokenizer=data.tokenizer,
            trainer_state=state or trainer_state(t),
            config=config,
            description=describe("checkpoint"),
            keep=config.save_total_limit,
            world_size=world.size,
        )

    t.model.train()
    last_eval: dict[str, float] = {}
    nonfinite: list[dict[str, Any]] = []
    watch = t.watch
    # Enough to see whether the adapter moved (with FSDP: this rank's shards).
    start = [local(p).detach().flatten()[:64].clone() for p in t.params]

    def adapter_moved() -> bool:
        return any(not torch.equal(local(p).detach().flatten()[:64], s) for p, s in zip(t.params, start))

    baseline: dict[str, float] | None = None
    if first_step == 1 and data.eval:  # the baseline every later eval is read against
        warning = small_eval_warning(len(data.eval), "example" if config.unpaired else "pair")
        if warning:
            echo(warning)
        if t.eval_ref is not None and not config.unpaired:  # KTO's second column is the KL sample, no rival
            echo(reference_preference_line(t.eval_ref))
        try:
            baseline = run_eval(0)
        except torch.cuda.OutOfMemoryError:  # nothing trained yet: the same advice as for the reference pass
            raise UserError(
                f"out of GPU memory before the first step, evaluating the held-out pairs at micro_batch_size="
                f"{config.micro_batch_size}, max_length={config.max_length}; lower one of them (`qdpo plan` shows "
                "what fits) and run again."
            ) from None
    clock.enter("steps")
    bar = progress_bar(total=t.steps, initial=first_step - 1, desc="dpo", unit="step")
    is_sharded = sharded(t.model)
    metrics_file = (out / "metrics.jsonl").open("a") if world.main else contextlib.nullcontext()
    end_stop_at_once()  # from the first step on, a signal means: finish the step, checkpoint, stop
    with stop_requests(echo) as stop, metrics_file as log:
        if baseline is not None:
            log_row(log, {"step": 0, **baseline})
        for step in range(first_step, t.steps + 1):
            # The last good state, should memory run out mid-step (references, no copies; FSDP would gather it).
            before = trainer_state(t) if not is_sharded else None
            # The row's rewards come from this step's forward, before its update: judge them against the adapter as
            # it was then (a first step at learning rate 0, as warmup starts, leaves the adapter where it began).
            moved_before = adapter_moved()
            try:
                row = {"step": step, **train_step(t, data, config, t.stream, device)}
            except torch.cuda.OutOfMemoryError:
                t.optimizer.zero_grad(set_to_none=True)
                # With several ranks the others wait inside this step: no checkpoint (it needs them all) but the last.
                kept = checkpoint(step - 1, before) if step > 1 and world.size == 1 else None
                raise out_of_memory(config, out, step, kept, processes=world.size) from None
            crash_point("step")
            evaluating = bool(data.eval) and ((config.eval_steps and step % config.eval_steps == 0) or step == t.steps)
            if evaluating:
                try:
                    last_eval = run_eval(step)
                except torch.cuda.OutOfMemoryError:  # the step itself is done: keep it, then stop
                    log_step(log, row, due=True)
                    kept = checkpoint(step) if world.size == 1 else None
                    raise out_of_memory(config, out, step, kept, during="evaluation", processes=world.size) from None
                row.update(last_eval)
            log_step(log, row, due=evaluating or step % config.logging_steps == 0 or step == t.steps)
            for warning in watch.see(row, lambda: moved_before):
                say(warning)
            saved = bool(config.save_steps) and (step % config.save_steps == 0 or step == t.steps)
            if saved:
                checkpoint(step)
            if world.main:
                touch_lock(out)
            # fp16 overflows of the scaled gradients are the scaler's business; a NaN/Inf loss, or gradients
            # without a scaler, mean something is wrong, and a run of them stops the run.
            bad = "pairs" in row and (not math.isfinite(row["loss"]) or not t.scaler.is_enabled())
            nonfinite = nonfinite + [row] if bad else []
            if len(nonfinite) >= config.max_nonfinite_steps:
                raise not_finite(nonfinite, config, checkpoint(step), [p.origin for p in data.train])
            # All ranks stop after the same step (a rank that stopped alone would leave the others waiting forever).
            stop.signum = next((s for s in world.gather(stop.signum) if s is not None), None)
            if stop.requested:
                where = checkpoint(step) if not saved else out / "checkpoints" / f"step-{step:06d}"
                raise Interrupted(
                    f"{stop.name} at step {step} of {t.steps}: checkpoint written to {where}; "
                    f"resume with: {resume_command(out, world.size)}",
                    stop.signum,
                )
            bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                acc=f"{row['rewards/accuracies']:.2f}",
                margin=f"{row.get('rewards/margins', math.nan):.3f}",  # KTO: no margin without both kinds
                tok_s=f"{row['tokens_per_second']:.0f}",
            )
            bar.update(1)
        log_unlogged(log)  # a resume past the new end (no step ran): the steps restored with the checkpoint
    bar.close()
    adapter = full_adapter_state(t.model)
    if not world.main:
        return {"steps": t.steps}

    clock.enter("save")
    save_adapter(t.model, data.tokenizer, out / "adapter", describe("finished"), adapter)
    rows = RunResult(out, {}).metrics  # this run's rows, those before a resume included
    first_eval = next((r for r in rows if r["step"] == 0), None)
    train_rows = [r for r in rows if r["step"] > 0 and "loss" in r]
    step_seconds = sum(r["tokens"] / r["tokens_per_second"] for r in train_rows if r.get("tokens_per_second"))
    accuracy = eval_accuracy(last_eval, len(data.eval)) if last_eval else None
    summary = {
        "steps": t.steps,
        "resumed_at": first_step - 1,  # 0 for a run that started here; "seconds" counts from this process's start
        "seconds": round(time.time() - started, 1),
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "eval_rewards/accuracies": last_eval.get("eval_rewards/accuracies"),
        "eval_rewards/margins": last_eval.get("eval_rewards/margins"),
        "eval_correct": accuracy.correct if accuracy else None,
        "eval_accuracy_ci95": list(accuracy.interval) if accuracy else None,
        "step0_eval_rewards/accuracies": first_eval.get("eval_rewards/accuracies") if first_eval else None,
        "verdict": verdict(first_eval, last_eval or None, len(data.eval), desirable_share(data.eval)),
        "tokens_per_second": round(sum(r["tokens"] for r in train_rows) / step_seconds, 1) if step_seconds else None,
        "padding_share": round(t.padding_share, 4),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    summary["timings"] = clock.as_dict()
    write_json(out / "summary.json", summary)
    write_json(out / "run.json", describe("finished"))
    clock.enter(None)
    return summary


def save_adapter(
    model, tokenizer, target: Path, description: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the policy adapter as a plain PEFT directory (plus tokenizer and qdpo.json), atomically.

    state: the adapter's whole tensors when the model holds only shards of them (FSDP).
    """
    with staged(target) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "qdpo.json", description)


def reference_preference_line(table: torch.Tensor) -> str:
    """How often the reference alone already gives the chosen response the higher log-prob, before any tuning."""
    prefers = int((table[:, 0] > table[:, 1]).sum())
    return (
        f"before tuning, the reference gives the chosen response the higher log-prob on {prefers} of "
        f"{table.shape[0]} held-out pairs; reward accuracy starts at 0 (policy = reference: every margin is 0)"
    )


def format_summary(summary: dict[str, Any], out: Path) -> str:
    """The closing lines printed after a run."""
    margin = summary["eval_rewards/margins"]
    margins = f"; held-out margin {margin:.3f}" if margin is not None else ""
    resumed = summary.get("resumed_at") or 0
    ran = f" ({summary['steps'] - resumed} after resuming at step {resumed})" if resumed else ""
    return (
        f"done: {summary['steps']} steps{ran} in {summary['seconds']:.0f}s{margins}; "
        f"peak memory {summary['peak_memory_gb']:.2f} GB ({summary['peak_memory_kind']})\n"
        f"{summary['verdict']}\n"
        f"adapter: {out / 'adapter'}  (loads with peft.PeftModel.from_pretrained); report: {out / 'report.html'}"
    )
