"""Built-in preference data: answer directly and correctly, in one short sentence.

Each row asks a short question whose answer a program can check (small sums and
products, capitals, opposites, plurals, the next weekday or month, unit
conversions). The chosen reply states the correct answer in one short sentence;
the rejected reply is, in equal shares, a short sentence with a wrong answer, a
rambling hedge that buries or never reaches the answer, or an evasive
non-answer. `follows_preference` checks a reply against that preference, so a
run can measure whether a tuned model moved toward it.

`train.jsonl` (400 pairs) and `eval.jsonl` (48 held-out pairs, disjoint
countries, words, days, months and number ranges) are generated, never edited
by hand. Regenerate them, byte for byte, with:

    python -m qdpo.builtin.make_data
"""

from __future__ import annotations

import re
from pathlib import Path

# A direct answer is one short sentence; the generator's longest chosen reply is far below this.
MAX_WORDS = 15

# Phrases that mark a hedge or an evasion. Every rambling or evasive reply the generator
# writes contains at least one; a few common hedges it never writes are here too, so the
# check also holds for free-form model output.
HEDGES: tuple[str, ...] = (
    "good question",
    "i think",
    "i believe",
    "honestly",
    "not completely certain",
    "let me think",
    "probably",
    "maybe",
    "perhaps",
    "depends",
    "as far as i know",
    "could be mixing",
    "rather not",
    "if i remember correctly",
    "double-check",
    "open mind",
    "not able to",
    "can't help",
    "hard to say",
    "don't know",
    "not sure",
    "another source",
    "hmm",
)

_HERE = Path(__file__).parent
_HEDGE_RE = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(h) for h in HEDGES) + r")(?!\w)", re.IGNORECASE)


def train_path() -> Path:
    """Path of the built-in training pairs (400 rows of JSON lines)."""
    return _HERE / "train.jsonl"


def eval_path() -> Path:
    """Path of the built-in held-out evaluation pairs (48 rows of JSON lines)."""
    return _HERE / "eval.jsonl"


def _answer_pattern(answer: str) -> re.Pattern[str]:
    """Regex that finds `answer` as a whole word, or as an exact number."""
    answer = answer.strip()
    if re.fullmatch(r"\d+", answer):
        # "56" must not match inside 156, 560 or 5.56, but may end a sentence ("is 56.").
        return re.compile(rf"(?<![\d.,]){answer}(?![\d]|[.,]\d)")
    body = r"\s+".join(re.escape(part) for part in answer.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def follows_preference(response: str, answer: str) -> bool:
    """True when `response` states `answer` directly, in at most MAX_WORDS words, without hedging."""
    # Models often write typographic apostrophes; the hedge list uses plain ones.
    text = response.replace("\u2019", "'").strip()
    if len(text.split()) > MAX_WORDS:
        return False
    if _HEDGE_RE.search(text):
        return False
    return _answer_pattern(answer).search(text) is not None
