"""Everything known before the model is loaded: the model's config, its tokenizer, and the tokenized splits.

Every input error surfaces here, before anything is written or any weight is read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from qdpo.config import Config
from qdpo.data import BUILTIN_DATA, Columns, Pair, fingerprint, load_rows, prompt_key, to_pairs
from qdpo.errors import UserError
from qdpo.families import describe, length_switched_rope
from qdpo.model import ModelSource, load_model_config, load_tokenizer, resolve_model
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


def read_pairs(source: str, config: Config) -> list[Pair]:
    """Load and validate preference pairs from one data source."""
    columns = Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.assistant_marker)
    rows, where = load_rows(source, config.data_split)
    return to_pairs(rows, columns, where)


def split_eval(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out about `fraction` of the pairs (at least one when fraction > 0), chosen by seed, whole prompts at a
    time: a held-out prompt is not trained on, so several pairs per prompt do not inflate held-out accuracy.

    A prompt with more pairs than twice the share is never held out whole; when no prompt is small enough (or
    there is one pair, or one prompt) single pairs are held out instead. With one pair per prompt the split is the
    one single pairs give.
    """
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    want = max(1, round(fraction * len(pairs)))
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(prompt_key(pair.prompt), []).append(i)
    order = [g for g in groups.values() if len(g) <= 2 * want]
    if len(groups) < 2 or not order:
        order = [[i] for i in range(len(pairs))]
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for group in order:
        if len(held) >= want:
            break
        if len(held) + len(group) <= 2 * want and len(held) + len(group) < len(pairs):  # some pair stays to train on
            held.update(group)
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def trained_prompts_note(train: list[Pair], held: list[Pair]) -> str | None:
    """A line when held-out pairs share their prompt with training pairs (their accuracy is then optimistic)."""
    trained = {prompt_key(p.prompt) for p in train}
    shared = sum(prompt_key(p.prompt) in trained for p in held)
    if not shared:
        return None
    return (
        f"{shared} of {len(held)} held-out pairs have a prompt that training pairs also have, so their accuracy "
        "measures answers to trained prompts"
    )


def split_pairs(config: Config) -> tuple[list[Pair], list[Pair]]:
    """The run's training and held-out pairs: eval_data, the built-in held-out set, or eval_fraction of data.

    For KTO (config.unpaired) they are its examples laid out as pairs (qdpo.unpaired).
    """
    if config.unpaired:
        from qdpo.unpaired import kto_splits

        return kto_splits(config)
    pairs = read_pairs(config.data, config)
    if config.eval_data:
        return pairs, read_pairs(config.eval_data, config)
    if config.data == BUILTIN_DATA:
        return pairs, read_pairs(BUILTIN_DATA + ":eval", config)
    return split_eval(pairs, config.eval_fraction, config.seed)


def prepare_data(config: Config, echo: Callable[[str], None] = print) -> PreparedData:
    """Resolve the model, load its tokenizer and tokenize train/eval pairs: every input error surfaces here."""
    train_pairs, eval_pairs = split_pairs(config)  # first: a data error must not wait for a model conversion
    source = resolve_model(config.model)
    model_config = load_model_config(source)
    tokenizer = load_tokenizer(source, config.tokenizer)
    train, train_stats = tokenize_pairs(tokenizer, train_pairs, config.max_length, config.max_prompt_length)
    echo(f"train: {train_stats.describe()}")
    if config.unpaired:
        from qdpo.unpaired import balance_note

        note = balance_note(train, config)
        if note:
            echo(note)
    for note in train_stats.notes:
        echo(f"train: {note}")
    eval_, eval_stats = [], None
    note = trained_prompts_note(train_pairs, eval_pairs) if not config.unpaired else None
    if note:
        echo(f"eval:  {note}")
    if eval_pairs:
        eval_, eval_stats = tokenize_pairs(tokenizer, eval_pairs, config.max_length, config.max_prompt_length)
        echo(f"eval:  {eval_stats.describe()}")
        for note in eval_stats.notes:
            echo(f"eval:  {note}")
    if not train:
        raise UserError(
            f"no training {train_stats.unit} are left after filtering {config.data}; check the data and max_length."
        )
    if eval_pairs and not eval_ and config.eval_data:
        raise UserError(
            f"no held-out {eval_stats.unit} are left after filtering {config.eval_data} (see the eval: line); check "
            "that file and max_length, or leave eval_data out."
        )
    if eval_pairs and not eval_:
        echo(f"eval:  every held-out {eval_stats.unit[:-1]} was dropped, so this run measures no held-out accuracy")
    data = PreparedData(
        source, model_config, tokenizer, train, eval_, train_stats, eval_stats, fingerprint(train_pairs)
    )
    check_rope_lengths(data)
    return data


def check_vocabulary(data: PreparedData, embedding_rows: int) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer from another model), before they crash a step."""
    largest = max(
        [max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in data.train + data.eval]
        + [data.tokenizer.pad_token_id]
    )  # padding is fed to the embedding too
    if largest >= embedding_rows:
        raise UserError(
            f"the tokenizer produces token id {largest} but {data.source.name} has only {embedding_rows} "
            "embeddings; use the model's own tokenizer (leave `tokenizer` unset) or one made for it."
        )


def check_rope_lengths(data: PreparedData) -> None:
    """Refuse sequences that a length-switched RoPE would score unlike the model scores each alone (see
    qdpo.families.length_switched_rope): every layout batches sequences, the plain one included."""
    switch = length_switched_rope(data.model_config)
    if switch is None:
        return
    kind, limit = switch
    for pairs in (data.train, data.eval):  # never batched together: each split on one side is enough
        _check_rope_split(pairs, kind, limit, data.model_config)


def _check_rope_split(pairs: list[TokenizedPair], kind: str, limit: int, model_config: Any) -> None:
    lengths = [len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids) if r]
    longer = sum(n > limit for n in lengths)
    if kind == "longrope" and 0 < longer < len(lengths):
        raise UserError(
            f"{describe(model_config)} uses LongRoPE, whose long-context factors apply to a whole batch once one "
            f"sequence in it is longer than {limit} tokens, and {longer} of the {len(lengths)} sequences (prompt + "
            f"response) are longer while the rest are not, so a short one would be scored unlike the model scores it "
            f"alone; set max_length={limit} to cut the long ones, or keep only pairs longer than {limit} tokens."
        )
    if kind == "dynamic" and longer:
        raise UserError(
            f"{describe(model_config)} uses dynamic RoPE scaling, which rescales a whole batch (and the batches "
            f"after it) once one sequence is longer than {limit} tokens (max_position_embeddings), and {longer} "
            f"sequences (prompt + response) are; set max_length={limit}."
        )


def preview(data: PreparedData, count: int = 3) -> list[dict[str, str]]:
    """The first training pairs as the model will see them (decoded tokens), with what truncation cut marked."""
    decode = data.tokenizer.decode
    shown = []
    for pair in data.train[:count]:
        prompt_cut, chosen_cut, rejected_cut = pair.cut
        shown.append(
            {
                "prompt": (f"[... {prompt_cut} tokens cut] " if prompt_cut else "") + decode(pair.prompt_ids),
                "chosen": decode(pair.chosen_ids) + (f" [... {chosen_cut} tokens cut]" if chosen_cut else ""),
                "rejected": decode(pair.rejected_ids) + (f" [... {rejected_cut} tokens cut]" if rejected_cut else ""),
            }
        )
    return shown
