"""Greedy answers from the tuned policy and from the reference, from the same loaded 4-bit weights.

Used at eval time (`eval_generate`: generations.jsonl in the run directory) and by `qdpo generate`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from qdpo.distributed import compute_device, sharded
from qdpo.errors import UserError
from qdpo.fs import write_text
from qdpo.model import REFERENCE_ADAPTER, reference_model
from qdpo.quiet import progress_bar

GENERATIONS = "generations.jsonl"
# Prompts per generate() call at most: enough to share each forward's weight reads. A batch also holds no more
# tokens (prompt + answer, per row) than a training micro-batch did (training_tokens): a token's KV cache is about
# what a checkpointed training step keeps per token, so decoding should fit where the run's steps fit (reasoned;
# not yet measured on a GPU).
GENERATE_BATCH = 8


@dataclass
class Generation:
    """One greedy answer: its text, how many tokens it took, and whether it ended on EOS."""

    text: str  # the new tokens decoded, special tokens (EOS) left out
    tokens: int  # new tokens generated, the EOS included when it stopped on one
    stopped: bool  # True: the model ended its answer (EOS); False: it ran out of max_new_tokens
    ids: list[int] = field(default_factory=list, repr=False)  # the new token ids


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS (what training appends) and the model's own end tokens."""
    own = _inner(model).generation_config.eos_token_id
    own = [own] if isinstance(own, int) else list(own or [])
    found = [tokenizer.eos_token_id, *own]
    return [i for n, i in enumerate(found) if i is not None and i not in found[:n]]


def _inner(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _plain_greedy(model, stop: list[int], pad_id: int) -> Iterator[None]:
    """Within this block generate() does plain greedy decoding: no sampling, penalties or suppressed tokens.

    generate() fills every option it is not given from the model's generation_config (a repetition penalty,
    sampling flags, suppressed tokens), so that config is swapped for one that holds only the token ids.
    """
    from transformers import GenerationConfig

    inner = _inner(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=pad_id, bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        inner.generation_config = saved


def training_tokens(settings: dict) -> int:
    """Tokens in one training micro-batch of these settings (a config.yaml): micro_batch_size x 2 x max_length."""
    from qdpo.config import Config

    defaults = Config()
    mb = settings.get("micro_batch_size") or defaults.micro_batch_size
    return mb * 2 * (settings.get("max_length") or defaults.max_length)


def generation_batches(lengths: list[int], max_new_tokens: int, max_batch_tokens: int | None = None) -> list[range]:
    """Consecutive prompts per generate() call: at most GENERATE_BATCH, and rows x (longest prompt + max_new_tokens)
    within max_batch_tokens (None: no bound), except that a prompt too long for it still goes, alone."""
    batches, start, width = [], 0, 0
    for i, n in enumerate(lengths):
        rows, wider = i - start + 1, max(width, n)
        too_many = rows > GENERATE_BATCH or bool(
            max_batch_tokens and rows * (wider + max_new_tokens) > max_batch_tokens
        )
        if i > start and too_many:
            batches.append(range(start, i))
            start, wider = i, n
        width = wider
    return batches + [range(start, len(lengths))] if lengths else []


def greedy(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    desc: str = "greedy answers",
    max_batch_tokens: int | None = None,
) -> list[Generation]:
    """Greedy answers to prompts (token ids), in the batches generation_batches makes, one generate() call each.

    A batch is padded on the left and the padding masked, with positions counted from each prompt's first real
    token, so every answer is the one its prompt would get alone (tested in fp32 against a one-sequence argmax loop
    on every family; bf16 batch kernels may round a near-tie the other way). Batching matters most on the CPU,
    where each forward dequantizes every 4-bit weight: four prompts per call decode ~2.3x faster than one
    (SmolLM2-135M, 2 cores). The model is in eval mode meanwhile (no dropout) and goes back to the mode it was in.
    """
    device = compute_device(model)
    stop = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    was_training = model.training
    model.eval()
    out = []
    try:
        # a bar: on a CPU a pass takes minutes (bitsandbytes dequantizes every weight for each new token)
        bar = progress_bar(total=len(prompts), desc=desc, unit="prompt", leave=False)
        with _plain_greedy(model, stop, pad_id), torch.no_grad(), bar:
            for rows in generation_batches([len(ids) for ids in prompts], max_new_tokens, max_batch_tokens):
                batch = [prompts[i] for i in rows]
                width = max(len(ids) for ids in batch)
                input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
                mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,  # training loads the model with use_cache off; decoding wants the KV cache
                    synced_gpus=sharded(model),  # sharded: every rank runs as many forwards, until all are done
                )
                out += [_answer(row, stop, tokenizer) for row in generated[:, width:].tolist()]
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return out


def _answer(new: list[int], stop: list[int], tokenizer) -> Generation:
    """One row of a batch's new tokens as an answer: up to and with its first stop token; what follows is padding."""
    ends = [k for k, token in enumerate(new) if token in stop]
    new = new[: ends[0] + 1] if ends else new
    return Generation(tokenizer.decode(new, skip_special_tokens=True), len(new), bool(ends), new)


def side_by_side(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, max_batch_tokens: int | None = None
) -> list[tuple[Generation, Generation]]:
    """(policy, reference) greedy answers to each prompt: adapter on, then the reference (adapters off, or the
    frozen init adapter), from the same loaded weights."""
    policy = greedy(model, tokenizer, prompts, max_new_tokens, "policy answers", max_batch_tokens)
    with reference_model(model):
        reference = greedy(model, tokenizer, prompts, max_new_tokens, "reference answers", max_batch_tokens)
    return list(zip(policy, reference))


def log_generations(
    path: Path, step: int, prompts_text: list[str], generations: list[Generation], which: str = "policy"
) -> None:
    """Append one JSON line per answer (step, which, prompt, text, tokens, stopped) to generations.jsonl.

    Lines an earlier attempt wrote for this step and this `which`, or for any later step, are dropped first: a
    resumed run repeats the steps after its checkpoint, and their answers must not appear twice.
    """
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: the step is generated again
                continue
            if row.get("step", 0) < step or (row.get("step") == step and row.get("which") != which):
                kept.append(line)
    for prompt, g in zip(prompts_text, generations, strict=True):
        row = {"step": step, "which": which, "prompt": prompt, **asdict(g)}
        del row["ids"]
        kept.append(json.dumps(row, ensure_ascii=False))
    write_text(path, "".join(line + "\n" for line in kept))


def read_generations(path: Path) -> list[dict]:
    """The lines of a generations.jsonl file, as dicts."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_generations(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    path: Path | None,
    step: int,
    reference: bool,
    max_batch_tokens: int | None = None,
) -> list[Generation]:
    """What the training loop calls at an eval: greedy answers to the held-out prompts, logged to path.

    reference=True also logs the reference's answers (they never change during a run: once is enough).
    path None: generate without logging (a rank other than 0 of a sharded model, which must take part).
    """
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    policy = greedy(model, tokenizer, prompt_ids, max_new_tokens, "policy answers", max_batch_tokens)
    if path is not None:
        log_generations(path, step, texts, policy, "policy")
    if reference:
        with reference_model(model):
            answers = greedy(model, tokenizer, prompt_ids, max_new_tokens, "reference answers", max_batch_tokens)
            if path is not None:
                log_generations(path, step, texts, answers, "reference")
    return policy


@dataclass
class Tuned:
    """A run's adapter on its 4-bit base, loaded as the run loaded it, with what encoding prompts needs."""

    model: object  # PeftModel: the tuned adapter, and the init adapter as the reference when the run had one
    tokenizer: object
    adapter_path: Path
    settings: dict  # the run's resolved settings (config.yaml), {} for an adapter directory without a run
    reference: str  # what the reference is, in words


def find_tuned_adapter(path: str | Path, choice: str = "final"):
    """The adapter to answer with: the run's own (final), checkpoint STEP's, or an adapter directory as given."""
    from qdpo.adapter import find_adapter
    from qdpo.checkpoint import checkpoints
    from qdpo.config import read_json

    given = Path(path).expanduser()
    if choice == "final":
        run = read_json(given / "run.json") if (given / "run.json").is_file() else None
        if run is not None and not (given / run.get("adapter_dir", "adapter") / "adapter_config.json").is_file():
            steps = ", ".join(str(c.step) for c in checkpoints(given)) or "none"
            raise UserError(
                f"run {given} has no adapter yet (status: {run.get('status', 'unknown')}; checkpoints: {steps}); "
                "pass --adapter STEP to answer with a checkpoint's."
            )
        return find_adapter(given)
    if not (given / "run.json").is_file():
        raise UserError(f"--adapter {choice} picks a checkpoint of a run, but {given} is not a run directory.")
    found = {c.step: c.path for c in checkpoints(given)}
    step = choice.removeprefix("step-")
    if not step.isdigit() or int(step) not in found:
        have = ", ".join(str(s) for s in found) or "none"
        raise UserError(
            f"run {given} has no checkpoint {choice!r} (checkpoints: {have}); pass --adapter final or one of them."
        )
    return find_adapter(found[int(step)] / "adapter")


def run_settings(path: str | Path) -> dict:
    """The run's resolved settings (config.yaml): of the run directory, or of the run or checkpoint that an adapter
    directory (RUN/adapter, RUN/checkpoints/step-N/adapter) sits in; {} for an adapter directory on its own."""
    from qdpo.config import load_yaml

    given = Path(path).expanduser()
    # A run directory has run.json, a checkpoint trainer_state.pt: a stray config.yaml above an adapter is neither.
    for place in (given, given.parent):
        if (place / "config.yaml").is_file() and any((place / f).is_file() for f in ("run.json", "trainer_state.pt")):
            return load_yaml(place / "config.yaml")
    return {}


def load_tuned(adapter, settings: dict) -> Tuned:
    """The adapter on its base in 4-bit, loaded as the run loaded it (base, compute dtype, tokenizer), with the
    run's init adapter, if it had one, as the reference."""
    from peft import PeftModel

    from qdpo.adapter import resolve_base, trained_dtype
    from qdpo.model import load_base_4bit, load_tokenizer, pick_device

    run = adapter.run or {}
    source = resolve_base(adapter)
    # The adapter directory holds the tokenizer the run used (the model's own, or its tokenizer= setting).
    saved = str(adapter.path) if (adapter.path / "tokenizer_config.json").is_file() else None
    tokenizer = load_tokenizer(source, saved or (run.get("base_model") or {}).get("tokenizer"))
    model = load_base_4bit(source, trained_dtype(adapter), pick_device(), gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, str(adapter.path))
    init = (run.get("lora") or {}).get("init_adapter")
    reference = "reference (adapters off)"
    if init:  # the run's reference was its init adapter (an SFT adapter), not the bare base
        if not (Path(init).expanduser() / "adapter_config.json").is_file():
            raise UserError(
                f"the run started from init_adapter {init}, which is no longer there, so its reference "
                "cannot be rebuilt; put that adapter back at that path."
            )
        model.load_adapter(str(Path(init).expanduser()), adapter_name=REFERENCE_ADAPTER)
        model.set_adapter("default")
        reference = "reference (init adapter)"
    return Tuned(model.eval(), tokenizer, adapter.path, settings, reference)


def file_prompts(source: str, settings: dict, prompt_column: str | None = None) -> list:
    """The prompts of a preference file (as training reads it), or of a file with only a prompt column."""
    from qdpo.data import PROMPT_TURNS_COLUMN, Columns, load_rows, to_pairs

    defaults = Columns()
    columns = Columns(
        prompt_column or settings.get("prompt_column", defaults.prompt),
        settings.get("chosen_column", defaults.chosen),
        settings.get("rejected_column", defaults.rejected),
        settings.get("assistant_marker", defaults.assistant_marker),
    )
    rows, where = load_rows(source)
    first = rows[0]
    if not isinstance(first, dict) or (columns.chosen in first and columns.rejected in first):
        return [pair.prompt for pair in to_pairs(rows, columns, where)]  # to_pairs also names a row that is no object
    if columns.prompt not in first and PROMPT_TURNS_COLUMN not in first:
        raise UserError(
            f"{where} has neither a {columns.prompt!r} column nor {columns.chosen!r}/{columns.rejected!r} columns; "
            "name the prompt column with --prompt-column."
        )
    # A prompt-only file: the same checks as a preference file's prompts, with stand-in responses.
    stand_in = {columns.chosen: " ", columns.rejected: "  "}
    rows_with = type(rows)([{**row, **stand_in} if isinstance(row, dict) else row for row in rows])
    if hasattr(rows, "lines"):
        rows_with.lines = rows.lines
    return [pair.prompt for pair in to_pairs(rows_with, columns, where)]
