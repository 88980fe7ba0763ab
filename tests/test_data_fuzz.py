"""Property-based tests of the data path, from raw rows and raw .jsonl bytes to token ids.

Every input must end in exactly one of three ways: a tokenized pair, a drop that TokenizeStats counts, or a
UserError of one line that names the row (or line). The expected ids come from an oracle written here from the
spec (README "Tokenization" and the test chat template), not from qdpo's own helpers.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st

from qdpo.data import Columns, Pair, load_rows, to_pairs
from qdpo.errors import UserError
from qdpo.tokenize import TokenizedPair, tokenize_pairs

# Deterministic (CI sees the same examples every run) and small: this file runs in about 15 s on 2 cores.
FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MARKER = "\n\nAssistant:"

# ----------------------------------------------------------------------------------------------- the oracle


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(messages: list[dict]) -> str:
    """The conftest chat template, written out by hand: BOS, then <|role|>\\ncontent EOS \\n per message."""
    return "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)


def prompt_text(prompt: list[dict]) -> str:
    """The prompt's template text: the generation prompt, or a last assistant turn (a prefilled answer) left open."""
    if prompt[-1]["role"] == "assistant":
        return render(prompt).removesuffix("</s>\n")
    return render(prompt) + "<|assistant|>\n"


def prompt_and_whole(prompt, response) -> tuple[str, str]:
    """The prompt's text and the whole sequence's text (prompt + response, ending in one EOS)."""
    if isinstance(response, list):
        before = prompt_text(prompt)
        if prompt[-1]["role"] == "assistant":  # the answer continues the prefilled turn
            joined = {"role": "assistant", "content": prompt[-1]["content"] + response[0]["content"]}
            whole = render(prompt[:-1] + [joined] + response[1:])
        else:
            whole = render(prompt + response)
        return before, re.sub(r"(</s>)+\n\Z", "</s>", whole)  # the template's text after the last EOS goes; one EOS
    before = "<s>" + re.sub(r"\A(?:<s>)+", "", prompt)  # the tokenizer's own BOS, once even if the text has some
    end = re.search(r"</s>\s*\Z", response)  # a text that already ends in EOS (and blanks) gets no second one
    return before, before + (response[: end.start() + 4] if end else response + "</s>")


def shared_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_ids(tokenizer, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """Each sequence is the encoding of its whole text; the prompt is what the prompt's own encoding shares with
    both (all of it, unless the tokenizer joins its last characters with a response's first)."""
    texts = [prompt_and_whole(pair.prompt, r) for r in (pair.chosen, pair.rejected)]
    start = ids(tokenizer, texts[0][0])
    wholes = [ids(tokenizer, whole) for _, whole in texts]
    shared = min(shared_length(start, whole) for whole in wholes)
    return start[:shared], wholes[0][shared:], wholes[1][shared:]


def blank(text) -> bool:
    return not text.strip() if isinstance(text, str) else all(not m["content"].strip() for m in text)


def oracle(tokenizer, pair: Pair, max_length: int, max_prompt_length: int):
    """What tokenizing one pair must give: a TokenizedPair, or the name of the drop counter."""
    if blank(pair.chosen) or blank(pair.rejected):
        return "dropped_empty"
    prompt, chosen, rejected = expected_ids(tokenizer, pair)
    if chosen == rejected:
        return "dropped_identical"
    prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    if chosen[:budget] == rejected[:budget]:
        return "dropped_too_long"
    return TokenizedPair(prompt, chosen[:budget], rejected[:budget])


def check_tokenized(tokenizer, pairs: list[Pair], max_length: int, max_prompt_length: int) -> None:
    """tokenize_pairs keeps exactly the pairs the oracle keeps, with its ids, and counts every drop by reason."""
    kept, stats = tokenize_pairs(tokenizer, pairs, max_length, max_prompt_length)
    outcomes = [oracle(tokenizer, p, max_length, max_prompt_length) for p in pairs]
    assert kept == [o for o in outcomes if isinstance(o, TokenizedPair)]
    assert stats.kept == len(kept)
    for counter in ("dropped_empty", "dropped_identical", "dropped_too_long"):
        assert getattr(stats, counter) == outcomes.count(counter), counter
    assert stats.kept + stats.dropped_empty + stats.dropped_identical + stats.dropped_too_long == len(pairs)
    for tp in kept:
        assert len(tp) <= max_length and tp.chosen_ids and tp.rejected_ids


def check_one_line(error: UserError) -> str:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, message
    assert message.endswith((".", "?")), message
    return message


# ----------------------------------------------------------------------------------------------- strategies

ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\t\n ",
        "</s>",
        "<s>",
        "<s><s>Hi",
        "Yes.</s>\n",
        "Yes.</s>x",
        "a\u2028b",
        "a\x85b",
        "e\u0301",
        "\U0001f600 emoji",
        "\u200b",
        "\u3000",
        "Two plus two is four.",
        "Paris.",
        "\x00",
        "{{ bos_token }}",
        "<|assistant|>\n",
        "\\ud800",
        "Hello there, how are you today? " * 12,
    ]
)
BAD_TEXT = st.sampled_from(["\ud800", "a\udfffb"])  # lone surrogates: valid JSON escapes, not encodable text
TEXT = st.one_of(ODD_TEXT, st.text(max_size=24), st.text(alphabet="ab </s>\n", max_size=24))
ROLE = st.one_of(
    st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "bot", ""]), st.text(max_size=6)
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLE, "content": TEXT | BAD_TEXT}),
    st.fixed_dictionaries({"from": ROLE, "value": TEXT}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value", "name"]), JSON | TEXT, max_size=3),
    JSON,
)
ANSWER = st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT})
ANSWERS = st.lists(ANSWER, min_size=1, max_size=2)
FIELD = st.one_of(TEXT, TEXT, TEXT, ANSWERS, ANSWERS, st.lists(MESSAGE, max_size=4), MESSAGE, JSON, BAD_TEXT)
FULL_ROW = st.fixed_dictionaries({"prompt": FIELD, "chosen": FIELD, "rejected": FIELD}, optional={"extra": JSON})
ROW = st.one_of(  # mostly rows with the columns, so that most examples get as far as tokenization
    FULL_ROW,
    FULL_ROW,
    st.fixed_dictionaries({"chosen": FIELD, "rejected": FIELD}, optional={"conversations": FIELD}),
    st.fixed_dictionaries(
        {}, optional={"prompt": FIELD, "chosen": FIELD, "rejected": FIELD, "conversations": FIELD, "extra": JSON}
    ),
)
GOOD_ROW = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}
LENGTHS = st.integers(2, 48).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1)))


# ------------------------------------------------------------------------------- 1. arbitrary rows, three ends


def through_the_data_path(tokenizer, rows: list, lengths: tuple[int, int]) -> str | None:
    """Run rows through to_pairs and tokenize_pairs; return the UserError's message, or None if none was raised."""
    try:
        pairs = to_pairs(rows, Columns(), "data.jsonl")
    except UserError as e:
        event("refused by to_pairs")
        return check_one_line(e)
    assert len(pairs) == len(rows)
    try:
        check_tokenized(tokenizer, pairs, *lengths)
    except UserError as e:
        event("refused by tokenize_pairs")
        return check_one_line(e)
    event("tokenized")
    return None


@settings(max_examples=150, **FUZZ)
@given(row=ROW, lengths=LENGTHS)
@example(row={"prompt": "\ud800", "chosen": "a", "rejected": "b"}, lengths=(32, 16))  # lone surrogate
@example(row={"a\nb": 1}, lengths=(32, 16))  # a column name with a newline, in the "no column" message
@example(
    row={
        "prompt": "Q",
        "chosen": [{"role": "user", "content": "Q "}, {"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    },
    lengths=(32, 16),
)  # response that is a chat
@example(
    row={
        "prompt": "Q",
        "chosen": [{"role": "bot", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "A"}],
    },
    lengths=(32, 16),
)  # same ids, other role
@example(row=GOOD_ROW, lengths=(32, 16))  # a duplicated pair: kept twice, as TRL does
@example(row={"prompt": "Say it: ", "chosen": "Paris.", "rejected": "two"}, lengths=(32, 16))  # a joined boundary
@example(row={"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, lengths=(32, 16))  # chosen == rejected
@example(
    row={"prompt": "Hello there, how are you today? " * 20, "chosen": "Yes.", "rejected": "No."}, lengths=(8, 4)
)  # a prompt longer than max_length
@example(
    row={"prompt": [{"role": "bot", "content": "Q"}], "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
    lengths=(32, 16),
)  # an unknown role, and a response with no assistant turn
def test_any_row_is_kept_dropped_or_refused_naming_it(tokenizer, row, lengths):
    """A good row first, then the fuzzed one: an error must name row 2, never row 1."""
    message = through_the_data_path(tokenizer, [GOOD_ROW, row], lengths)
    if message is not None:
        assert re.search(r"\brow 2\b", message) and "row 1" not in message, message


@settings(max_examples=40, **FUZZ)
@given(rows=st.lists(ROW, min_size=1, max_size=4), lengths=LENGTHS)
def test_the_first_bad_row_is_the_one_named(tokenizer, rows, lengths):
    """Of several rows, the error names the first row that fails on its own."""
    message = through_the_data_path(tokenizer, rows, lengths)
    if message is None:
        return
    named = re.search(r"\brow (\d+)\b", message)
    assert named, message
    n = int(named.group(1))
    assert through_the_data_path(tokenizer, rows[: n - 1], lengths) is None, message
    assert through_the_data_path(tokenizer, [rows[n - 1]], lengths) is not None, message


# --------------------------------------------------------------------- 2. well-formed rows in every common shape

CONTENT = st.one_of(ODD_TEXT, st.text(max_size=20))
PLAIN_CONTENT = st.text(alphabet=st.characters(exclude_characters=":"), max_size=20)  # no marker inside answers


def messages(roles: list[str]) -> st.SearchStrategy:
    return st.tuples(*[CONTENT for _ in roles]).map(
        lambda cs: [{"role": r, "content": c} for r, c in zip(roles, cs, strict=True)]
    )


PROMPT_ROLES = st.sampled_from([["user"], ["system", "user"], ["user", "assistant", "user"], ["tool", "user"]])
RESPONSE_ROLES = st.sampled_from([["assistant"], ["assistant"], ["assistant", "tool", "assistant"]])
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def sharegpt(msgs: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT_FROM.get(m["role"], m["role"]), "value": m["content"]} for m in msgs]


def as_chat(text, role: str) -> list[dict]:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


@st.composite
def shaped_rows(draw) -> tuple[dict, Pair | None]:
    """A raw row in one of the shapes qdpo reads, and the Pair it must become (None: identical, do not compare)."""
    shape = draw(
        st.sampled_from(["columns", "chat", "sharegpt", "single_message", "ultrafeedback", "hh_text", "hh_chat"])
    )
    prompt = draw(messages(draw(PROMPT_ROLES)))
    chosen, rejected = draw(messages(draw(RESPONSE_ROLES))), draw(messages(draw(RESPONSE_ROLES)))
    if shape == "columns":  # strings, or a mix of strings and messages (one list makes the whole row a chat)
        p, c, r = (draw(st.sampled_from([m[0]["content"], m])) for m in (prompt, chosen, rejected))
        if all(isinstance(t, str) for t in (p, c, r)):
            return {"prompt": p, "chosen": c, "rejected": r}, Pair(p, c, r)
        return {"prompt": p, "chosen": c, "rejected": r}, Pair(
            as_chat(p, "user"), as_chat(c, "assistant"), as_chat(r, "assistant")
        )
    if shape == "chat":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": 7}, Pair(prompt, chosen, rejected)
    if shape == "sharegpt":  # LLaMA-Factory: conversations = the prompt turns, chosen/rejected = one {from, value}
        c, r = chosen[-1:], rejected[-1:]
        row = {"conversations": sharegpt(prompt), "chosen": sharegpt(c)[0], "rejected": sharegpt(r)[0]}
        return row, Pair(prompt, c, r)
    if shape == "single_message":  # Axolotl-style: chosen/rejected are one {role, content} message each
        c, r = chosen[-1:], rejected[-1:]
        return {"prompt": prompt, "chosen": c[0], "rejected": r[0]}, Pair(prompt, c, r)
    if shape == "ultrafeedback":  # a prompt string, repeated as the first turn of both conversations
        question = [{"role": "user", "content": prompt[-1]["content"]}]
        row = {"prompt": question[0]["content"], "chosen": question + chosen, "rejected": question + rejected}
        return row, Pair(question, chosen, rejected)
    if shape == "hh_text":  # no prompt column: both texts start with the same conversation up to an assistant turn
        p = draw(st.text(max_size=20)) + MARKER
        c, r = draw(PLAIN_CONTENT), draw(PLAIN_CONTENT)
        return {"chosen": p + c, "rejected": p + r}, Pair(p, c, r)
    # hh_chat: whole conversations that share the prompt turns and differ from the first answer on
    assume(chosen[0] != rejected[0] or chosen == rejected)
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}, (
        Pair(prompt, chosen, rejected) if chosen != rejected else None
    )


@settings(max_examples=150, **FUZZ)
@given(shaped=st.lists(shaped_rows(), min_size=1, max_size=3), lengths=LENGTHS)
def test_common_shapes_become_the_expected_pairs_and_ids(tokenizer, shaped, lengths):
    rows = [row for row, _ in shaped]
    pairs = to_pairs(rows, Columns(), "data.jsonl")  # well-formed rows: no UserError allowed
    for got, (row, want) in zip(pairs, shaped, strict=True):
        if want is not None:
            assert got == want, row
        else:
            assert got.chosen == got.rejected
    check_tokenized(tokenizer, pairs, *lengths)


# ------------------------------------------------------------------------------------- 3. raw .jsonl bytes

LINE = st.one_of(
    # ensure_ascii=False with a lone surrogate writes it as (invalid) UTF-8 bytes: a file another tool could write
    st.builds(
        lambda row, ascii_only: json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
        st.one_of(st.just(GOOD_ROW), ROW),
        st.booleans(),
    ),
    st.just(json.dumps(GOOD_ROW).encode()),
    st.just(b""),
    st.builds(lambda v: json.dumps(v).encode(), JSON),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.sampled_from(
        [
            b"",
            b"  \t",
            b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',
            b"\xc3",
            b"[" * 3000,
            b'{"prompt": ' + b"1" * 5000 + b"}",
            b'{"prompt": "a\\ud800"}',
            json.dumps({"prompt": "a\u2028b\x85c", "chosen": "d", "rejected": "e"}, ensure_ascii=False).encode(),
        ]
    ),
)


def expected_jsonl(lines: list[bytes]) -> tuple[list[dict], list[int]] | str:
    """What reading these lines must give: rows and their line numbers, or the error's 'line N' / 'no rows'."""
    rows, numbers = [], []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"line {number}"
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return f"line {number}"
        if not isinstance(value, dict):
            return f"line {number}"
        rows.append(value)
        numbers.append(number)
    return (rows, numbers) if rows else "has no rows"


@settings(max_examples=100, **FUZZ)
@given(
    lines=st.lists(LINE, max_size=5),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
    trailing=st.booleans(),
    lengths=LENGTHS,
)
@example(
    lines=[json.dumps({"prompt": "a\u2028b", "chosen": "c", "rejected": "d"}, ensure_ascii=False).encode()],
    newline=b"\n",
    bom=False,
    trailing=True,
    lengths=(32, 16),
)  # U+2028 inside a string is not a line break
@example(lines=[json.dumps(GOOD_ROW).encode()], newline=b"\n", bom=True, trailing=True, lengths=(32, 16))  # BOM
@example(lines=[b"[" * 3000], newline=b"\n", bom=False, trailing=True, lengths=(32, 16))  # nested too deep
@example(
    lines=[b'{"prompt": ' + b"1" * 5000 + b"}"], newline=b"\n", bom=False, trailing=True, lengths=(32, 16)
)  # an integer too long for Python's int()
@example(
    lines=[json.dumps(GOOD_ROW).encode(), b'{"prompt": "\xff"}'],
    newline=b"\n",
    bom=False,
    trailing=True,
    lengths=(32, 16),
)  # invalid UTF-8 on line 2 only
@example(
    lines=[json.dumps(GOOD_ROW).encode(), b"", json.dumps({"chosen": "a"}).encode()],
    newline=b"\n",
    bom=False,
    trailing=True,
    lengths=(32, 16),
)  # a bad row after a blank line: "row 2 (line 3)"
def test_jsonl_bytes_load_or_fail_naming_the_line(tokenizer, lines, newline, bom, trailing, lengths):
    data = (b"\xef\xbb\xbf" if bom else b"") + newline.join(lines) + (newline if trailing and lines else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(data)
        want = expected_jsonl(lines if lines else [b""])
        try:
            rows, where = load_rows(str(path))
        except UserError as e:
            message = check_one_line(e)
            assert isinstance(want, str), message
            assert str(path) in message and (want in message), (want, message)
            return
        assert not isinstance(want, str), want
        want_rows, numbers = want
        assert json.dumps(rows) == json.dumps(want_rows)  # json.dumps: NaN compares equal to NaN here
        message = through_the_data_path(tokenizer, rows, lengths)
        if message is not None:  # a bad row is named by its row number and, where blank lines shift it, its line
            n = int(re.search(r"\brow (\d+)\b", message).group(1))
            line = f"row {n} (line {numbers[n - 1]})"
            assert (line in message) == (numbers[n - 1] != n), message


# -------------------------------------------------------------- regressions: what the properties found, one each


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[" * 3000, "is not valid JSON (nested too deeply); fix the file."),
        (b'[{"prompt": ' + b"1" * 5000 + b"}]", "is not valid JSON (a number with too many digits); fix the file."),
        (
            b'{"prompt": ["a", "b"], "chosen": ["c"], "rejected": ["d", "e"]}',  # was: zip() kept 1 row, lost one silently
            "holds columns of different lengths ('prompt' 2, 'chosen' 1, 'rejected' 2); "
            "give every column one value per "
            "row.",
        ),
        (
            b'[{"prompt": "a", "chosen": "b", "rejected": "c"}, 5]',
            "row 2 is a number, not an object with prompt/chosen/rejected keys; fix that row.",
        ),
        (b'"text"', "holds a string; it must hold a list of objects with prompt/chosen/rejected keys."),
        (
            b'{"train": [{"prompt": "a", "chosen": "b", "rejected": "c"}], "test": []}',  # was: "row 1 has no column ..."
            "holds several lists of rows ('train', 'test'); keep one list per file, for example one file per split.",
        ),
        (b'[{"prompt": "a"}]\n\xff', "is not UTF-8 text (line 2); save it as UTF-8 JSON."),
    ],
)
def test_json_file_edge_cases_are_one_line(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_rows(str(path))
    assert message in check_one_line(info.value)


def test_json_file_with_a_bom_and_columns_reads(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}).encode())
    assert load_rows(str(path))[0] == [{"prompt": "a", "chosen": "b", "rejected": "c"}]


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD_ROW))

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError) as info:
        load_rows(str(path))
    assert check_one_line(info.value) == f"cannot read {path}: Permission denied; check the path and its permissions."


def test_different_texts_with_the_same_ids_are_dropped_as_identical(tiny_model_dir):
    """Before: kept with chosen_ids == rejected_ids (nothing to prefer), because only the texts were compared.
    A normalizing tokenizer (NFKC here) maps the ligature and the two letters to the same ids."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    nfkc = AutoTokenizer.from_pretrained(tiny_model_dir)
    nfkc.backend_tokenizer.normalizer = normalizers.NFKC()
    pairs = to_pairs([{"prompt": "Q", "chosen": "\ufb01ne", "rejected": "fine"}, GOOD_ROW], Columns(), "d.jsonl")
    kept, stats = tokenize_pairs(nfkc, pairs, 64, 32)
    assert len(kept) == 1 and stats.dropped_identical == 1 and stats.kept == 1


def test_a_chat_template_that_refuses_the_roles_names_the_row(tiny_model_dir):
    """Templates such as Mistral's raise on roles they do not take; that is a UserError naming the row."""
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tiny_model_dir)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [
        GOOD_ROW,
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "chosen": "Hello.",
            "rejected": "Go away.",
        },
    ]
    pairs = to_pairs(rows, Columns(), "d.jsonl")
    with pytest.raises(UserError) as info:
        tokenize_pairs(strict, pairs, 64, 32)
    assert check_one_line(info.value) == (
        "d.jsonl row 2: the tokenizer's chat template refused the messages (Only user and assistant roles are "
        "supported!); fix the roles or set tokenizer= to one whose template takes them."
    )
    with pytest.raises(UserError, match=r"^pair 1: the tokenizer's chat template refused"):
        tokenize_pairs(strict, [Pair(*[pairs[1].prompt, pairs[1].chosen, pairs[1].rejected])], 64, 32)
