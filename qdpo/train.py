"""The DPO recipe: prepare data → set up the 4-bit policy/reference → train → save. Read top to bottom."""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from qdpo import __version__
from qdpo.batching import length_grouped_batches, make_batch, padding_share
from qdpo.config import Config
from qdpo.data import BUILTIN_DATA, Columns, Pair, fingerprint, load_rows, to_pairs
from qdpo.errors import UserError
from qdpo.families import exact_settings
from qdpo.fs import staged, write_json
from qdpo.model import (ModelSource, add_lora, adapter_lora_settings, compute_dtype, load_base_4bit, load_model_config,
                        load_tokenizer, pick_device, resolve_model, trainable_parameters)
from qdpo.reference import cache_key, compute_reference, load_or_compute
from qdpo.step import Metrics, preference_loss
from qdpo.tokenize import TokenizedPair, TokenizeStats, tokenize_pairs


@dataclass
class PreparedData:
    """Everything known before the model is loaded: tokenizer, tokenized splits and their stats."""

    source: ModelSource
    model_config: Any  # the transformers config (config.json only: no weights yet)
    tokenizer: Any
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats | None
    fingerprint: str


@dataclass
class RunResult:
    """Where a finished run lives and what it reported."""

    output_dir: Path
    summary: dict[str, Any]


def read_pairs(source: str, config: Config) -> list[Pair]:
    """Load and validate preference pairs from one data source."""
    columns = Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.assistant_marker)
    rows, where = load_rows(source, config.data_split)
    return to_pairs(rows, columns, where)


def split_eval(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out `fraction` of the pairs (at least one when fraction > 0), chosen by seed."""
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(pairs)))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def prepare_data(config: Config, echo: Callable[[str], None] = print) -> PreparedData:
    """Resolve the model, load its tokenizer and tokenize train/eval pairs: every input error surfaces here."""
    source = resolve_model(config.model)
    model_config = load_model_config(source)
    tokenizer = load_tokenizer(source, config.tokenizer)
    pairs = read_pairs(config.data, config)
    if config.eval_data:
        train_pairs, eval_pairs = pairs, read_pairs(config.eval_data, config)
    elif config.data == BUILTIN_DATA:
        train_pairs, eval_pairs = pairs, read_pairs(BUILTIN_DATA + ":eval", config)
    else:
        train_pairs, eval_pairs = split_eval(pairs, config.eval_fraction, config.seed)
    train, train_stats = tokenize_pairs(tokenizer, train_pairs, config.max_length, config.max_prompt_length)
    echo(f"train: {train_stats.describe()}")
    eval_, eval_stats = [], None
    if eval_pairs:
        eval_, eval_stats = tokenize_pairs(tokenizer, eval_pairs, config.max_length, config.max_prompt_length)
        echo(f"eval:  {eval_stats.describe()}")
    if not train:
        raise UserError(f"no training pairs are left after filtering {config.data}; check the data and max_length.")
    return PreparedData(source, model_config, tokenizer, train, eval_, train_stats, eval_stats, fingerprint(train_pairs))


def total_steps(config: Config, num_micro_batches: int) -> int:
    """Optimizer steps of the run: max_steps, or enough for num_train_epochs over the data."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * num_micro_batches / config.gradient_accumulation_steps))


def make_output_dir(config: Config, preset: str) -> Path:
    """Create the run directory, refusing to clobber anything but an earlier qdpo run (and only with overwrite)."""
    out = Path(config.output_dir or f"runs/{preset}-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not config.overwrite:
            raise UserError(f"output_dir {out} already exists and is not empty; pick another or pass --overwrite.")
        if not (out / "run.json").is_file():
            raise UserError(f"output_dir {out} is not a qdpo run directory; refusing to overwrite it, pick another.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def describe_run(config: Config, data: PreparedData, dtype: torch.dtype, device: torch.device, status: str) -> dict[str, Any]:
    """The self-description written as run.json: later commands read it instead of asking again."""
    return {
        "qdpo_version": __version__,
        "status": status,
        "base_model": {"name": data.source.name, "path": data.source.path, "gguf_file": data.source.gguf_file,
                       "tokenizer": config.tokenizer},
        "quantization": {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True, "compute_dtype": str(dtype).removeprefix("torch.")},
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                 "target_modules": config.lora_target_modules, "init_adapter": config.init_adapter},
        "data": {"source": config.data, "eval_source": config.eval_data, "fingerprint": data.fingerprint,
                 "train_pairs": len(data.train), "eval_pairs": len(data.eval),
                 "dropped": {"empty": data.train_stats.dropped_empty, "identical": data.train_stats.dropped_identical,
                             "too_long": data.train_stats.dropped_too_long}},
        "device": device.type,
        "adapter_dir": "adapter",
    }


def make_optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' paged 8-bit AdamW (states 4x smaller, paged out under pressure)."""
    if config.optim == "paged_adamw_8bit":
        if device.type != "cuda":
            raise UserError("optim=paged_adamw_8bit needs a CUDA GPU; use optim=adamw on the CPU.")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, steps: int):
    """Linear warmup over warmup_ratio of the steps, then linear/cosine decay or constant."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * steps), num_training_steps=steps)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def table_rows(table: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Reference log-probs of a micro-batch from the [N, 2] table, ordered like Batch rows (chosen, then rejected)."""
    return torch.cat([table[idx, 0], table[idx, 1]])


def evaluate(model, pairs: list[TokenizedPair], batches: list[list[int]], reference: torch.Tensor, config: Config, pad_id: int) -> dict[str, float]:
    """Mean metrics over the eval pairs (eval_ prefix), against the precomputed reference table."""
    metrics = Metrics()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in batches:
            batch = make_batch([pairs[j] for j in idx], pad_id, config.batch_layout)
            losses, cr, rr, policy = preference_loss(model, batch, config, table_rows(reference, idx))
            metrics.add(losses, cr, rr, policy, model.config.vocab_size)
    model.train(was_training)
    return metrics.means("eval_")


@dataclass
class Training:
    """What the loop needs: the policy/reference model, its optimizer, the schedule and the reference tables."""

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    steps: int
    epoch_batches: list[list[int]]
    eval_batches: list[list[int]]
    train_ref: torch.Tensor | None
    eval_ref: torch.Tensor | None


def check_vocabulary(data: PreparedData, embedding_rows: int) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer from another model), before they crash a step."""
    largest = max([max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in data.train + data.eval]
                  + [data.tokenizer.pad_token_id])  # padding is fed to the embedding too
    if largest >= embedding_rows:
        raise UserError(f"the tokenizer produces token id {largest} but {data.source.name} has only {embedding_rows} "
                        "embeddings; use the model's own tokenizer (leave `tokenizer` unset) or one made for it.")


def setup_training(config: Config, data: PreparedData, device: torch.device, dtype: torch.dtype,
                   echo: Callable[[str], None]) -> Training:
    """Load the 4-bit base, add LoRA, build optimizer and schedule, and score the reference once."""
    model = load_base_4bit(data.source, dtype, device, config.gradient_checkpointing)
    check_vocabulary(data, model.get_input_embeddings().num_embeddings)
    model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                     config.init_adapter, config.seed)
    params = trainable_parameters(model)
    echo(f"model: {data.source.name} in 4-bit NF4 on {device.type} ({str(dtype).removeprefix('torch.')} compute), "
         f"{sum(p.numel() for p in params):,} trainable LoRA parameters")
    optimizer = make_optimizer(config, params, device)
    # fp16 compute (T4) underflows small gradients: scale the loss; a no-op for bf16/fp32.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    epoch_batches = length_grouped_batches(data.train, config.micro_batch_size, config.seed)
    steps = total_steps(config, len(epoch_batches))
    eval_batches = length_grouped_batches(data.eval, config.micro_batch_size, config.seed)
    echo(f"{steps} steps of {config.micro_batch_size * config.gradient_accumulation_steps} pairs; "
         f"padding share {padding_share(data.train, epoch_batches, config.batch_layout):.1%}"
         + {"plain": "", "shared": " (prompt computed once per pair)",
            "packed": " (prompt computed once per pair, pairs packed into one row)"}[config.batch_layout])

    pad_id, chunk, layout = data.tokenizer.pad_token_id, config.logits_chunk_size, config.batch_layout
    # The eval reference is always scored once; the train reference too unless switched off.
    eval_ref = compute_reference(model, data.eval, eval_batches, pad_id, chunk, layout) if data.eval else None
    train_ref = None
    if config.precompute_ref_log_probs:
        # Score only what the run will use: the loop pops epoch 0's micro-batches from the end.
        used = epoch_batches[-min(len(epoch_batches), steps * config.gradient_accumulation_steps):]
        key = cache_key(data.source, config.init_adapter, data.train, dtype, config.micro_batch_size, used, chunk, layout,
                        device=device, extra={"lora_dropout": config.lora_dropout})
        train_ref, cached = load_or_compute(model, data.train, used, pad_id, key, chunk, layout)
        echo("reference log-probs: " + ("reused from cache" if cached else "computed once and cached"))
    return Training(model, params, optimizer, make_scheduler(config, optimizer, steps), scaler, steps,
                    epoch_batches, eval_batches, train_ref, eval_ref)


def micro_batches(data: PreparedData, config: Config, first_epoch: list[list[int]]) -> Iterator[list[int]]:
    """Pair indices of each micro-batch, epoch after epoch, each epoch regrouped with its own seed."""
    epoch, queue = 0, list(first_epoch)
    while True:
        while queue:
            yield queue.pop()
        epoch += 1
        queue = length_grouped_batches(data.train, config.micro_batch_size, config.seed + epoch)


def train_step(t: Training, data: PreparedData, config: Config, stream: Iterator[list[int]], device: torch.device) -> dict[str, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches; returns its metrics row."""
    start = time.time()
    metrics, tokens = Metrics(), 0
    pairs_per_step = config.micro_batch_size * config.gradient_accumulation_steps
    for _ in range(config.gradient_accumulation_steps):
        idx = next(stream)
        batch = make_batch([data.train[j] for j in idx], data.tokenizer.pad_token_id, config.batch_layout)
        reference = table_rows(t.train_ref, idx) if t.train_ref is not None else None
        losses, cr, rr, policy = _oom_guard(lambda: preference_loss(t.model, batch, config, reference), config)
        # Sum / pairs-per-step: every pair weighs the same across accumulated micro-batches.
        _oom_guard(lambda: t.scaler.scale(losses.sum() / pairs_per_step).backward(), config)
        metrics.add(losses, cr, rr, policy, t.model.config.vocab_size)
        tokens += batch.num_tokens
    t.scaler.unscale_(t.optimizer)
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(t.params, clip))
    learning_rate = t.scheduler.get_last_lr()[0]  # the rate this step uses
    scale = t.scaler.get_scale() if t.scaler.is_enabled() else 0.0
    t.scaler.step(t.optimizer)  # skips the update when fp16 gradients overflowed
    t.scaler.update()
    skipped = t.scaler.is_enabled() and t.scaler.get_scale() < scale  # the scaler backs off after an overflow
    if not skipped:  # a skipped step changed nothing, so the schedule does not advance either
        t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    row = {**metrics.means(), "grad_norm": grad_norm, "learning_rate": learning_rate,
           "tokens_per_second": tokens / (time.time() - start), "peak_memory_gb": peak_memory_gb(device)}
    if t.scaler.is_enabled():
        row["skipped"] = skipped  # fp16 only: the update was dropped for inf/NaN gradients
    return row


def run(config: Config, preset: str = "custom", echo: Callable[[str], None] = print, progress: bool = True) -> RunResult:
    """Tune LoRA adapters on a 4-bit base with DPO and write a self-describing run directory."""
    started = time.time()
    torch.manual_seed(config.seed)
    data = prepare_data(config, echo)  # every input error surfaces here, before anything is written
    config, notes = exact_settings(config, data.model_config)
    config, lora_notes = adapter_lora_settings(config)
    for note in notes + lora_notes:
        echo(note)
    device = pick_device()
    dtype = compute_dtype(config.compute_dtype, device)
    out = make_output_dir(config, preset)
    try:
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_json(out / "run.json", describe_run(config, data, dtype, device, "running"))
        t = setup_training(config, data, device, dtype, echo)
    except UserError:
        shutil.rmtree(out, ignore_errors=True)  # a run that could not start leaves nothing behind
        raise
    except BaseException as e:
        mark_stopped(out, describe_run(config, data, dtype, device, "failed"), e)
        raise
    try:  # from the first step on, a failure keeps the directory: the metrics logged so far are the user's
        summary = train_and_save(t, config, data, device, dtype, out, started, progress)
    except BaseException as e:
        mark_stopped(out, describe_run(config, data, dtype, device, "failed"), e)
        echo(f"the run stopped early; {out} keeps the metrics logged so far, and run.json says why")
        raise
    echo(format_summary(summary, out))
    return RunResult(out, summary)


def mark_stopped(out: Path, description: dict[str, Any], error: BaseException) -> None:
    """Record in run.json that the run stopped early (failed, or interrupted by Ctrl-C) and why, in one line."""
    status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    write_json(out / "run.json", {**description, "status": status, "error": reason})


def train_and_save(t: Training, config: Config, data: PreparedData, device: torch.device, dtype: torch.dtype,
                   out: Path, started: float, progress: bool) -> dict[str, Any]:
    """Run every step, save the adapter and write summary.json; returns the summary."""
    from tqdm.auto import tqdm

    t.model.train()
    stream = micro_batches(data, config, t.epoch_batches)
    last_eval: dict[str, float] = {}
    bar = tqdm(total=t.steps, desc="dpo", unit="step", disable=not progress, dynamic_ncols=True)
    with (out / "metrics.jsonl").open("w") as log:
        for step in range(1, t.steps + 1):
            row = {"step": step, **train_step(t, data, config, stream, device)}
            evaluating = bool(data.eval) and ((config.eval_steps and step % config.eval_steps == 0) or step == t.steps)
            if evaluating:
                last_eval = evaluate(t.model, data.eval, t.eval_batches, t.eval_ref, config, data.tokenizer.pad_token_id)
                row.update(last_eval)
            if evaluating or step % config.logging_steps == 0 or step == t.steps:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}",
                            margin=f"{row['rewards/margins']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
            bar.update(1)
    bar.close()

    save_adapter(t.model, data.tokenizer, out / "adapter", describe_run(config, data, dtype, device, "finished"))
    summary = {
        "steps": t.steps,
        "seconds": round(time.time() - started, 1),
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "final_train_loss": row["loss"],
        "eval_rewards/accuracies": last_eval.get("eval_rewards/accuracies"),
        "eval_rewards/margins": last_eval.get("eval_rewards/margins"),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    write_json(out / "summary.json", summary)
    write_json(out / "run.json", describe_run(config, data, dtype, device, "finished"))
    return summary


def _oom_guard(fn: Callable[[], Any], config: Config) -> Any:
    """Run fn, turning a CUDA out-of-memory error into advice the user can act on."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory at micro_batch_size={config.micro_batch_size}, max_length={config.max_length}; "
                        "lower one of them (or use a preset for a smaller GPU).") from None


def save_adapter(model, tokenizer, target: Path, description: dict[str, Any]) -> None:
    """Write the policy adapter as a plain PEFT directory (plus tokenizer and qdpo.json), atomically."""
    with staged(target) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "qdpo.json", description)


def format_summary(summary: dict[str, Any], out: Path) -> str:
    """The closing lines printed after a run."""
    acc, margin = summary["eval_rewards/accuracies"], summary["eval_rewards/margins"]
    evals = f"eval reward accuracy {acc:.3f}, margin {margin:.3f}" if acc is not None else "no eval split"
    return (f"done: {summary['steps']} steps in {summary['seconds']:.0f}s; {evals}; "
            f"peak memory {summary['peak_memory_gb']:.2f} GB ({summary['peak_memory_kind']})\n"
            f"adapter: {out / 'adapter'}  (loads with peft.PeftModel.from_pretrained)")
