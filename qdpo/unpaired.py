"""KTO's examples laid out as pairs, so the paired engine carries them: each answer with a KL sample beside it.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306) scores each answer alone, against a reference point z0 = KL(policy ||
reference) that it estimates from mismatched (prompt, answer-to-another-prompt) pairs. Each example gets its
mismatched answer once, when the data is read: the answer goes in a pair's chosen slot and the other prompt's
answer in the rejected slot. Micro-batching, the shared-prompt layout, the two-column reference table and its
cache then work unchanged; only the loss (qdpo.loss.kto_loss) reads the slots differently.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from qdpo.config import Config
from qdpo.data import BUILTIN_DATA, Columns, Example, Pair, load_rows, prompt_key, to_examples, unify
from qdpo.errors import UserError
from qdpo.tokenize import text_is_empty

# The KTO paper's advice for unbalanced data (TRL's KTOTrainer checks the same range):
# desirable_weight x #desirable / (undesirable_weight x #undesirable) in [1, 4/3].
BALANCE = (1.0, 4 / 3)


def read_examples(source: str, config: Config) -> list[Example]:
    """Load and validate KTO examples from one data source."""
    columns = Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.assistant_marker)
    rows, where = load_rows(source, config.data_split)
    return to_examples(rows, columns, config.completion_column, config.label_column, where)


def kto_pairs(examples: list[Example], where: str) -> list[Pair]:
    """Each example as a Pair: its answer in chosen, an answer to a different prompt in rejected (its KL sample).

    Examples are grouped by prompt and each takes the answer `largest group` places further along, cyclically:
    while no prompt has more than half the examples, every answer is exactly one example's KL sample, so the
    baseline is estimated on the same answers, matched to other prompts, as the paper describes. (TRL rotates by
    one within each batch; qdpo fixes the pairing once, so the reference table can be scored and cached before
    training.) Where that is impossible, an example takes the next answer to another prompt.
    """
    keys = [prompt_key(e.prompt) for e in examples]
    first_seen = {key: i for i, key in reversed(list(enumerate(keys)))}
    order = sorted(range(len(examples)), key=lambda i: first_seen[keys[i]])  # stable: each prompt's run in one piece
    n, shift = len(order), max(Counter(keys).values(), default=0)

    def usable(i: int, j: int) -> bool:
        return keys[j] != keys[i] and not text_is_empty(examples[j].completion)

    pairs = []
    for pos, i in enumerate(order):
        # Lazily: the shifted answer almost always does, so the fallback walk is rarely taken (and never built whole).
        candidates = (order[(pos + d) % n] for d in itertools.chain((shift,), range(1, n)))
        j = next((j for j in candidates if usable(i, j)), None)
        if j is None:
            raise UserError(
                f"KTO's KL baseline needs answers to other prompts, but {where} has no non-empty answer to a prompt "
                f"other than that of {_origin(examples[i])}; give examples with at least two different prompts."
            )
        e = examples[i]
        unified = unify(e.prompt, e.completion, examples[j].completion, e.origin)
        pairs.append((i, Pair(unified.prompt, unified.chosen, unified.rejected, e.origin, e.desirable)))
    return [pair for _, pair in sorted(pairs, key=lambda item: item[0])]


def _origin(example: Example) -> str:
    """Where an example came from, for messages."""
    return example.origin or "its first example"


def split_by_prompt(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out about `fraction` of the examples, whole prompts at a time (so no held-out prompt is trained on).

    Each side keeps at least two prompts, since every KL sample must answer another prompt of the same split;
    with fewer than four prompts nothing is held out.
    """
    keys = [prompt_key(e.prompt) for e in examples]
    sizes = Counter(keys)
    prompts = sorted(sizes)
    if fraction <= 0 or len(prompts) < 4:
        return examples, []
    random.Random(seed).shuffle(prompts)
    held, count, want = set(), 0, max(1, round(fraction * len(examples)))
    for key in prompts[:-2]:  # at least two prompts stay for training
        if count >= want and len(held) >= 2:
            break
        held.add(key)
        count += sizes[key]
    return [e for e, k in zip(examples, keys) if k not in held], [e for e, k in zip(examples, keys) if k in held]


def kto_splits(config: Config) -> tuple[list[Pair], list[Pair]]:
    """The run's training and held-out KTO examples as pairs (each split draws its KL samples from itself)."""
    train = read_examples(config.data, config)
    if config.eval_data:
        held = read_examples(config.eval_data, config)
    elif config.data == BUILTIN_DATA:
        held = read_examples(BUILTIN_DATA + ":eval", config)
    else:
        train, held = split_by_prompt(train, config.eval_fraction, config.seed)
    return kto_pairs(train, config.data), kto_pairs(held, config.eval_data or config.data) if held else []


def balance_note(pairs: list, config: Config) -> str | None:
    """A note when the desirable/undesirable weights are outside the KTO paper's advice for this data's balance."""
    desirable = sum(1 for p in pairs if p.desirable)
    undesirable = len(pairs) - desirable
    ratio = config.desirable_weight * max(desirable, 1) / (config.undesirable_weight * max(undesirable, 1))
    if BALANCE[0] <= ratio <= BALANCE[1]:
        return None
    low = config.undesirable_weight * max(undesirable, 1) / max(desirable, 1)
    return (
        f"note: {desirable} desirable and {undesirable} undesirable training examples with desirable_weight="
        f"{config.desirable_weight:g}, undesirable_weight={config.undesirable_weight:g} give a weighted ratio of "
        f"{ratio:.2f}; the KTO paper advises 1 to 1.33: for example desirable_weight={low:.2f} to {low * 4 / 3:.2f}."
    )
