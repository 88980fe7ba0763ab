"""The built-in preference data: reproducible, the right size, held out, and checkable."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from qdpo import builtin
from qdpo.builtin import follows_preference, make_data


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _text(row: dict, key: str) -> str:
    return row[key][0]["content"]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {"train": _rows(builtin.train_path()), "eval": _rows(builtin.eval_path())}


def test_shipped_files_match_generator(tmp_path):
    make_data.main([str(tmp_path)])
    assert (tmp_path / "train.jsonl").read_bytes() == builtin.train_path().read_bytes()
    assert (tmp_path / "eval.jsonl").read_bytes() == builtin.eval_path().read_bytes()


def test_row_counts_and_shape(splits):
    assert len(splits["train"]) == 400
    assert len(splits["eval"]) == 48
    for row in splits["train"] + splits["eval"]:
        assert set(row) == {"prompt", "chosen", "rejected", "answer"}
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"


def test_chosen_follows_and_rejected_does_not(splits):
    for row in splits["train"] + splits["eval"]:
        assert follows_preference(_text(row, "chosen"), row["answer"]), row
        assert not follows_preference(_text(row, "rejected"), row["answer"]), row


def test_eval_prompts_held_out(splits):
    train = {_text(row, "prompt") for row in splits["train"]}
    eval_ = [_text(row, "prompt") for row in splits["eval"]]
    assert not train.intersection(eval_)

    # Held-out entities, not just rephrasings: no family asks about the same thing in both splits.
    for family in make_data.FAMILIES:
        train_subjects = {tuple(e.fields.items()) for e in make_data.entities(family.name, "train")}
        eval_subjects = {tuple(e.fields.items()) for e in make_data.entities(family.name, "eval")}
        assert not train_subjects & eval_subjects, family.name


def test_eval_capitals_never_seen_in_train(splits):
    train_text = builtin.train_path().read_text(encoding="utf-8")
    capitals = [row["answer"] for row in splits["eval"] if "capital" in _text(row, "prompt")]
    assert capitals
    for city in capitals:
        assert city not in train_text, city


def test_rejected_kinds_balanced(splits):
    for rows in splits.values():
        kinds = Counter()
        for row in rows:
            rejected = _text(row, "rejected")
            if rejected in make_data.EVASIVE:
                kinds["evasive"] += 1
            elif len(rejected.split()) > builtin.MAX_WORDS:
                kinds["rambling"] += 1
            else:
                kinds["wrong"] += 1
        assert set(kinds) == {"evasive", "rambling", "wrong"}
        assert max(kinds.values()) - min(kinds.values()) <= 1, kinds


def _family_of(prompt: str) -> str:
    """The family whose question template produced `prompt`."""
    for family in make_data.FAMILIES:
        for template in family.questions:
            pattern = re.sub(r"\\\{\w+\\\}", ".+", re.escape(template))
            if re.fullmatch(pattern, prompt):
                return family.name
    raise AssertionError(f"no family asks {prompt!r}")


def test_every_family_in_both_splits(splits):
    names = {family.name for family in make_data.FAMILIES}
    for rows in splits.values():
        assert {_family_of(_text(row, "prompt")) for row in rows} == names


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The capital of France is Paris.", "Paris", True),
        ("the capital of france is paris", "Paris", True),
        ("7 times 8 is 56.", "56", True),
        ("The capital of India is New Delhi.", "New Delhi", True),
        ("The capital of France is Lyon.", "Paris", False),
        ("I'm not sure.", "Paris", False),
        ("I\u2019m not sure it is Paris.", "Paris", False),
        ("It is probably Paris.", "Paris", False),
        ("7 times 8 is 156.", "56", False),
        ("7 times 8 is 560.", "56", False),
        ("7 times 8 is 5.56.", "56", False),
        ("The answer is Parisian.", "Paris", False),
        ("", "Paris", False),
        (
            "France is a large country in Western Europe with a long history, and its capital city, "
            "which sits on the Seine and is famous for art and food, is Paris.",
            "Paris",
            False,
        ),
    ],
)
def test_follows_preference_hand_written(response, answer, expected):
    assert follows_preference(response, answer) is expected
