"""Every data format parses to the same tokenized pair; every bad input is one clear line."""

import json

import pytest

from qdpo.data import Columns, Pair, load_rows, split_shared_prompt, to_pairs
from qdpo.errors import UserError
from qdpo.tokenize import tokenize_pairs

STRING_ROWS = [
    {"prompt": "What is two plus two?", "chosen": "Two plus two is four.", "rejected": "I am not sure."},
    {"prompt": "The capital of France?", "chosen": "The capital of France is Paris.", "rejected": "Madrid."},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }
    for r in STRING_ROWS
]


def write(tmp_path, fmt: str, rows: list[dict]):
    """Write rows in one of the supported formats and return the path to pass as `data`."""
    import datasets
    import pandas as pd

    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame([{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows]).to_csv(
            path, index=False
        )
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def tokenized(tokenizer, source: str):
    rows, where = load_rows(source)
    kept, _ = tokenize_pairs(tokenizer, to_pairs(rows, Columns(), where), 128, 64)
    return kept


@pytest.mark.parametrize("rows", [STRING_ROWS, CHAT_ROWS], ids=["text", "chat"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_every_format_gives_the_same_tokenized_pairs(tmp_path, tokenizer, fmt, rows):
    expected_pairs = []
    for r in rows:  # what the tokenizer says directly, without qdpo's loaders
        if isinstance(r["prompt"], str):
            prompt = tokenizer(r["prompt"])["input_ids"]
            chosen = tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            prompt = tokenizer(
                tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            )["input_ids"]
            chosen = tokenizer(r["chosen"][0]["content"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
        expected_pairs.append((prompt, chosen))
    got = tokenized(tokenizer, write(tmp_path, fmt, rows))
    assert [(p.prompt_ids, p.chosen_ids) for p in got] == expected_pairs


def test_json_wrapped_and_jsonl_named_json(tmp_path, tokenizer):
    reference = tokenized(tokenizer, write(tmp_path, "jsonl", STRING_ROWS))
    (tmp_path / "w.json").write_text(json.dumps({"data": STRING_ROWS}))
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in STRING_ROWS))
    assert tokenized(tokenizer, str(tmp_path / "w.json")) == reference
    assert tokenized(tokenizer, str(tmp_path / "l.json")) == reference


def test_column_mapping(tmp_path, tokenizer):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in STRING_ROWS]
    rows_, where = load_rows(write(tmp_path, "jsonl", rows))
    pairs = to_pairs(rows_, Columns("question", "good", "bad"), where)
    assert pairs[0] == Pair(*[STRING_ROWS[0][k] for k in ("prompt", "chosen", "rejected")])


def test_hh_strings_split_at_last_assistant_marker():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Paris is the capital."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Pass."
    prompt, c, r = split_shared_prompt(chosen, rejected, "\n\nAssistant:", "x", 1)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant:"
    assert (c, r) == (" Paris is the capital.", " Pass.")


def test_hh_messages_split_before_the_differing_assistant_turn():
    shared = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    chosen = shared + [{"role": "assistant", "content": "Paris."}]
    rejected = shared + [{"role": "assistant", "content": "Pass."}]
    rows = [{"chosen": chosen, "rejected": rejected}]
    (pair,) = to_pairs(rows, Columns(), "x")
    assert pair.prompt == shared and pair.chosen == chosen[3:] and pair.rejected == rejected[3:]


def test_hh_same_start_of_answer_is_not_part_of_prompt():
    """Answers that start alike ("Paris ...") still split at the marker, not mid-answer."""
    prompt, c, r = split_shared_prompt(
        "\n\nHuman: Q\n\nAssistant: Paris is it.",
        "\n\nHuman: Q\n\nAssistant: Paris? No idea.",
        "\n\nAssistant:",
        "x",
        1,
    )
    assert prompt == "\n\nHuman: Q\n\nAssistant:" and c == " Paris is it." and r == " Paris? No idea."


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "chosen": "b"}\n', "row 1 has no column 'rejected'"),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n', "row 1 column 'chosen' must be a string or a list"),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b" "rejected": "c"}\n',
            "line 2 is not valid JSON",
        ),
        ("", "has no rows"),
        ('{"chosen": "b", "rejected": "c"}\n', "no shared beginning"),
    ],
)
def test_bad_rows_raise_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        rows, where = load_rows(str(path))
        to_pairs(rows, Columns(), where)
    assert "\n" not in str(info.value)


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported data file type"):
        load_rows(str(tmp_path / "d.txt"))
    with pytest.raises(UserError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_prompt_repeated_inside_the_conversations_is_not_doubled():
    """UltraFeedback-style rows: a prompt column, and chosen/rejected that start with the same user turn."""
    user = [{"role": "user", "content": "Capital of France?"}]
    rows = [
        {
            "prompt": "Capital of France?",
            "chosen": user + [{"role": "assistant", "content": "Paris."}],
            "rejected": user + [{"role": "assistant", "content": "Pass."}],
        }
    ]
    (pair,) = to_pairs(rows, Columns(), "x")
    assert pair.prompt == user
    assert pair.chosen == [{"role": "assistant", "content": "Paris."}] and pair.rejected == [
        {"role": "assistant", "content": "Pass."}
    ]


# --- ShareGPT and single-message shapes, and what is wrong with a message list

SHAREGPT_ROW = {  # LLaMA-Factory's preference layout: the prompt turns, then one {from, value} answer each
    "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"}],
    "chosen": {"from": "gpt", "value": "Paris."},
    "rejected": {"from": "gpt", "value": "Madrid."},
}
CHAT_PAIR = Pair(
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "assistant", "content": "Paris."}],
    [{"role": "assistant", "content": "Madrid."}],
)


def test_sharegpt_preference_rows_read_as_chat(tmp_path, tokenizer):
    (pair,) = to_pairs([SHAREGPT_ROW], Columns(), "x")
    assert pair == CHAT_PAIR
    # the same through a file and the tokenizer: the ids of the {role, content} form
    as_chat = {"prompt": CHAT_PAIR.prompt, "chosen": CHAT_PAIR.chosen, "rejected": CHAT_PAIR.rejected}
    assert tokenized(tokenizer, write(tmp_path, "jsonl", [SHAREGPT_ROW])) == tokenized(
        tokenizer, write(tmp_path, "json", [as_chat])
    )


def test_a_system_column_beside_sharegpt_turns_is_their_system_message():
    """LLaMA-Factory keeps the system prompt in its own column: it becomes the first message, not dropped."""
    turns = SHAREGPT_ROW["conversations"][1:]
    (pair,) = to_pairs([{**SHAREGPT_ROW, "conversations": turns, "system": "Be brief."}], Columns(), "x")
    assert pair == CHAT_PAIR
    for system in (None, "", "Be brief."):  # none, blank, or the turns' own system message again: as it was
        assert to_pairs([{**SHAREGPT_ROW, "system": system}], Columns(), "x") == [CHAT_PAIR]
    with pytest.raises(UserError, match=r"^x row 1 has a 'system' column and another system message"):
        to_pairs([{**SHAREGPT_ROW, "system": "Be long."}], Columns(), "x")
    with pytest.raises(UserError, match=r"^x row 1 column 'system' is a list; write the system prompt as a string"):
        to_pairs([{**SHAREGPT_ROW, "conversations": turns, "system": ["Be brief."]}], Columns(), "x")
    # beside a prompt column of chat turns too; a plain-text prompt stays plain text
    chat = {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.", "rejected": "Madrid."}
    assert to_pairs([{**chat, "system": "Be brief."}], Columns(), "x") == [CHAT_PAIR]
    plain = to_pairs(
        [{"prompt": "Capital?", "chosen": "Paris.", "rejected": "Madrid.", "system": "Be brief."}], Columns(), "x"
    )
    assert plain[0].prompt == "Capital?"


@pytest.mark.parametrize(
    "row",
    [
        {**SHAREGPT_ROW, "chosen": "Paris.", "rejected": "Madrid."},  # answers as strings
        {**SHAREGPT_ROW, "chosen": [SHAREGPT_ROW["chosen"]], "rejected": [SHAREGPT_ROW["rejected"]]},  # lists of one
        {"prompt": CHAT_PAIR.prompt, "chosen": CHAT_PAIR.chosen[0], "rejected": CHAT_PAIR.rejected[0]},  # one message
        {
            "chosen": SHAREGPT_ROW["conversations"]
            + [SHAREGPT_ROW["chosen"]],  # whole ShareGPT conversations, no prompt
            "rejected": SHAREGPT_ROW["conversations"] + [SHAREGPT_ROW["rejected"]],
        },
    ],
    ids=["string answers", "lists of one", "single role/content message", "whole conversations"],
)
def test_other_sharegpt_and_single_message_shapes(row):
    assert to_pairs([row], Columns(), "x") == [CHAT_PAIR]


def test_a_prompt_column_wins_over_conversations():
    row = {**SHAREGPT_ROW, "prompt": "Capital of Spain?"}
    (pair,) = to_pairs([row], Columns(), "x")
    assert pair.prompt == [{"role": "user", "content": "Capital of Spain?"}]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "q", "chosen": ["x"], "rejected": "b"},
            "row 1 column 'chosen' must be a string or a list of {role, content} messages, but message 1 is a string.",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant"}], "rejected": "b"},
            "row 1 column 'chosen' must be a string or a list of {role, content} messages, "
            "but message 2 has no 'content' "
            "(or ShareGPT 'value').",
        ),
        (
            {"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"},
            "column 'prompt' must be a string or a list of "
            "{role, content} messages, but message 1 has no 'role' (or ShareGPT 'from').",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": [{"from": "gpt", "value": None}]},
            "but the content of message 1 is null, not a string.",
        ),
        (
            {"prompt": [], "chosen": "a", "rejected": "b"},
            "column 'prompt' must be a string or a list of {role, content} messages, not an empty list.",
        ),
        (
            {"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"},
            "but message 1 has no 'role' (or ShareGPT 'from').",
        ),
        (
            {**SHAREGPT_ROW, "conversations": SHAREGPT_ROW["conversations"] + [SHAREGPT_ROW["chosen"]]},
            "column 'conversations' ends with an assistant turn, but next to 'chosen'/'rejected' "
            "it must hold only the "
            "prompt turns",
        ),
        (
            {
                "prompt": "q",
                "chosen": [{"role": "user", "content": "q!"}, {"role": "assistant", "content": "a"}],
                "rejected": "b",
            },
            "column 'chosen': the response starts with a 'user' message, not 'assistant'; put the turns "
            "before the answer in the 'prompt' column.",
        ),
        (
            {
                "prompt": "q",
                "chosen": "a",
                "rejected": [{"role": "assistant", "content": "b"}, {"from": "human", "value": "?"}],
            },
            "column 'rejected': the response ends with a 'user' message, not 'assistant'",
        ),
        (
            {"prompt": "q\ud800", "chosen": "a", "rejected": "b"},
            "column 'prompt' holds an invalid character (the lone surrogate U+D800 at position 2); fix the text.",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "assistant", "content": "\udfff"}], "rejected": "b"},
            "column 'chosen': the content of message 1 holds an invalid character (the lone surrogate U+DFFF",
        ),
        (
            {"prompt": "q", "chosen": 3, "rejected": "b"},
            "column 'chosen' must be a string or a list of {role, content} messages, not a number.",
        ),
        ({}, "row 1 has no column 'chosen' (it has no columns)"),
        ({"a\nb": 1, "c": 2}, "row 1 has no column 'chosen' (it has 'a\\nb', 'c'); map yours"),
    ],
)
def test_what_is_wrong_with_a_row_in_one_line(row, message):
    with pytest.raises(UserError) as info:
        to_pairs([row], Columns(), "x")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_prompt_column_named_by_the_user_must_be_there():
    """--prompt-column q on rows with 'prompt': a typo, refused with the row's columns, not read as rows whose
    prompt is the shared beginning of chosen and rejected (whose error named a marker the user never set)."""
    row = {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}
    with pytest.raises(UserError) as info:
        to_pairs([row], Columns(prompt="q"), "x")
    assert str(info.value) == (
        "x row 1 has no column 'q' (it has 'prompt', 'chosen', 'rejected'); fix --prompt-column, or leave it out "
        "for a 'prompt' column or a prompt shared by chosen and rejected."
    )
    assert to_pairs([row], Columns(), "x")[0].prompt == "What is 2 + 2?"


def test_same_column_for_two_roles_is_refused():
    with pytest.raises(
        UserError,
        match="prompt_column, chosen_column and rejected_column must name three different "
        "columns; got prompt_column='text', chosen_column='text'",
    ):
        to_pairs(STRING_ROWS, Columns("text", "text", "rejected"), "x")


def test_a_bad_row_after_blank_lines_is_named_with_its_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(STRING_ROWS[0]) + "\n\n\n" + json.dumps({"chosen": "a"}) + "\n")
    rows, where = load_rows(str(tmp_path / "d.jsonl"))
    with pytest.raises(UserError, match=r"d.jsonl row 2 \(line 4\) has no column 'rejected'"):
        to_pairs(rows, Columns(), where)


def test_held_out_pairs_never_share_a_prompt_with_training_pairs():
    """With several pairs per prompt, eval_fraction holds out whole prompts (else held-out accuracy measures pairs
    whose prompt was trained on); with one pair per prompt it is the split of single pairs, as before."""
    import random

    from qdpo.prepare import split_eval, trained_prompts_note

    pairs = [Pair(f"question {q}", f"good {q}.{k}", f"bad {q}.{k}") for q in range(20) for k in range(4)]
    train, held = split_eval(pairs, 0.25, seed=3)
    assert len(train) + len(held) == 80 and len(held) == 20
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(sum(p.prompt == h.prompt for p in held) == 4 for h in held)  # each held-out prompt whole
    assert split_eval(pairs, 0.25, seed=4)[1] != held  # the seed picks the prompts

    single = pairs[::4]  # one pair per prompt: the positions a seeded shuffle of the pairs puts first
    order = list(range(len(single)))
    random.Random(3).shuffle(order)
    assert split_eval(single, 0.25, seed=3)[1] == [single[i] for i in sorted(order[:5])]
    one_prompt = [Pair("q", f"good {k}", f"bad {k}") for k in range(8)]  # nothing to split by: single pairs
    train, held = split_eval(one_prompt, 0.25, seed=3)
    assert len(held) == 2 and len(train) == 6
    assert trained_prompts_note(train, held) == (
        "2 of 2 held-out pairs have a prompt that training pairs also have, so their accuracy measures answers to "
        "trained prompts"
    )


def test_a_prompt_with_many_pairs_is_not_held_out_whole():
    """One prompt with 1,000 pairs beside 19 single ones: holding it out would leave almost nothing to train on.
    Prompts with more than twice the share stay in training, whatever the seed."""
    from qdpo.prepare import split_eval, trained_prompts_note

    big = [Pair("popular", f"good {k}", f"bad {k}") for k in range(1000)]
    pairs = big + [Pair(f"q{k}", "good", "bad") for k in range(19)]
    for seed in range(20):
        train, held = split_eval(pairs, 0.05, seed)
        assert 1 <= len(held) <= 2 * round(0.05 * len(pairs)) and all(p.prompt != "popular" for p in held)
        assert trained_prompts_note(train, held) is None
    halves = [Pair(f"q{k % 2}", f"good {k}", f"bad {k}") for k in range(1000)]  # two prompts, each too big
    train, held = split_eval(halves, 0.05, seed=0)
    assert len(held) == 50 and len(train) == 950  # single pairs, and the run says their prompts are trained
    assert trained_prompts_note(train, held).startswith("50 of 50 held-out pairs have a prompt that training")


def test_chat_rows_saved_by_pandas_to_csv_are_read_as_chat(tmp_path, tokenizer):
    """pandas.to_csv writes a message list as Python's repr (single quotes), not JSON: still read as messages,
    the same ids as the JSON-lines file; a list written as text in a JSON-lines file is refused, not trained on."""
    import pandas as pd

    pd.DataFrame(CHAT_ROWS).to_csv(tmp_path / "chat.csv", index=False)
    assert "[{'role': " in (tmp_path / "chat.csv").read_text()
    assert tokenized(tokenizer, str(tmp_path / "chat.csv")) == tokenized(
        tokenizer, write(tmp_path, "jsonl", CHAT_ROWS)
    )
    as_text = [{**CHAT_ROWS[0], "chosen": str(CHAT_ROWS[0]["chosen"])}]
    with pytest.raises(UserError, match=r"^t row 1 column 'chosen' is a list of messages written as text \("):
        to_pairs(as_text, Columns(), "t")


def test_human_and_gpt_roles_are_user_and_assistant_in_either_message_form():
    (pair,) = to_pairs(
        [
            {
                "prompt": [{"role": "human", "content": "Hi?"}],
                "chosen": {"role": "gpt", "content": "Hi."},
                "rejected": "No.",
            }
        ],
        Columns(),
        "t",
    )
    assert pair.prompt == [{"role": "user", "content": "Hi?"}] and pair.chosen == [
        {"role": "assistant", "content": "Hi."}
    ]


def test_kto_rows_under_a_paired_loss_are_told_to_use_kto():
    with pytest.raises(
        UserError, match=r"^t row 1 has no column 'chosen' .*these are KTO rows .*add loss_type=kto\.$"
    ):
        to_pairs([{"prompt": "Hi?", "completion": "Hi.", "label": True}], Columns(), "t")


def test_held_out_data_that_filtering_empties_is_refused(tmp_path, tiny_model_dir):
    """--eval-data whose every pair is dropped used to train on and then ask for eval_data at the end."""
    from qdpo.config import Config
    from qdpo.prepare import prepare_data

    good = tmp_path / "train.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}) for i in range(4)))
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}) + "\n")
    config = Config(model=str(tiny_model_dir), data=str(good), eval_data=str(same))
    with pytest.raises(UserError, match=rf"^no held-out pairs are left after filtering {same} \(see the eval: line\)"):
        prepare_data(config, echo=lambda line: None)
