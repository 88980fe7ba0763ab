"""Read preference rows from files, directories or the hub, and validate them into pairs."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qdpo.errors import UserError
from qdpo.hub import looks_like_hub_id

Text = str | list[dict[str, str]]  # a plain string, or chat messages [{"role", "content"}, ...]


@dataclass(frozen=True)
class Pair:
    """One preference: a prompt and two responses, each plain text or chat messages."""

    prompt: Text
    chosen: Text
    rejected: Text
    origin: str = field(default="", compare=False)  # where it came from ("data.jsonl row 3"), for error messages
    # KTO (qdpo.unpaired): chosen holds the one answer, rejected another prompt's answer for the KL baseline, and
    # this says whether the answer is desirable. None for a preference pair.
    desirable: bool | None = None

    @property
    def conversational(self) -> bool:
        """True when the pair is made of chat messages."""
        return isinstance(self.prompt, list)


@dataclass
class Columns:
    """Which input columns hold the prompt and the two responses."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    assistant_marker: str = "\n\nAssistant:"


BUILTIN_DATA = "builtin:answers"


def load_rows(source: str, split: str = "train") -> tuple[list[dict[str, Any]], str]:
    """Read raw rows from `source`; return them with a short name for error messages."""
    if source == BUILTIN_DATA:
        from qdpo import builtin

        return _read_jsonl(builtin.train_path()), "builtin:answers"
    if source == BUILTIN_DATA + ":eval":
        from qdpo import builtin

        return _read_jsonl(builtin.eval_path()), "builtin:answers (eval)"
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split), str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        if suffix not in readers:
            raise UserError(
                f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .parquet, "
                ".csv or a save_to_disk directory."
            )
        rows = readers[suffix](path)
        if not rows:
            raise UserError(f"{path} has no rows; give a file that holds at least one row.")
        return rows, str(path)
    if looks_like_hub_id(source):
        return _read_hub(source, split), source
    raise UserError(
        f"data {source!r} does not exist; pass a .jsonl/.json/.parquet/.csv file, "
        "a save_to_disk directory or a hub dataset id."
    )


class Rows(list):
    """Rows read from a file, with the line each started on where that is not simply its row number."""

    lines: list[int] | None = None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check the path and its permissions.") from None


def _parse_json(text: str, one_line: bool = False) -> tuple[Any, str | None]:
    """json.loads, and why it failed in words (it can also fail with ValueError or RecursionError)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if one_line else f"line {e.lineno} column {e.colno}"
        return None, f"{e.msg} at {where}"
    except ValueError:  # an integer longer than Python's int() accepts (sys.get_int_max_str_digits)
        return None, "a number with too many digits"
    except RecursionError:
        return None, "nested too deeply"


def _read_jsonl(path: Path) -> Rows:
    rows, numbers = Rows(), []
    # JSON strings cannot hold a raw CR or LF, so these are the only line breaks (str.splitlines would also
    # split at U+2028, U+0085 and others that JSON strings may hold).
    for number, raw in enumerate(re.split(rb"\r\n|\r|\n", _read_bytes(path)), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} line {number} is not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8."
            ) from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            continue
        row, error = _parse_json(line, one_line=True)
        if error:
            raise UserError(f"{path} line {number} is not valid JSON ({error}); fix or remove that line.")
        if not isinstance(row, dict):
            raise UserError(
                f"{path} line {number} is {_kind(row)}, not a JSON object with prompt/chosen/rejected "
                "keys; write one object per line."
            )
        rows.append(row)
        numbers.append(number)
    if not rows:
        raise UserError(f"{path} has no rows; give a file that holds at least one row.")
    if numbers != list(range(1, len(rows) + 1)):
        rows.lines = numbers
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        text = _read_bytes(path).decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = _read_bytes(path)[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (line {line}); save it as UTF-8 JSON.") from None
    loaded, error = _parse_json(text)
    if error:
        if error.startswith("Extra data at"):  # several objects, one per line: it is JSON lines with a .json name
            return _read_jsonl(path)
        raise UserError(f"{path} is not valid JSON ({error}); fix the file.")
    if isinstance(loaded, dict):
        lists = [v for v in loaded.values() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]} or similar wrapper
            loaded = lists[0]
        elif loaded and all(isinstance(v, list) for v in loaded.values()):  # column-oriented
            if any(isinstance(item, dict) for values in loaded.values() for item in values[:1]):
                shown = ", ".join(_show(k) for k in list(loaded)[:6])
                raise UserError(
                    f"{path} holds several lists of rows ({shown}); keep one list per file, for "
                    "example one file per split."
                )
            lengths = {key: len(values) for key, values in loaded.items()}
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{_show(k)} {n}" for k, n in list(lengths.items())[:6])
                raise UserError(
                    f"{path} holds columns of different lengths ({shown}); give every column one value per row."
                )
            keys = list(loaded)
            loaded = [dict(zip(keys, values)) for values in zip(*loaded.values())]
    if not isinstance(loaded, list):
        raise UserError(
            f"{path} holds {_kind(loaded)}; it must hold a list of objects with prompt/chosen/rejected keys."
        )
    for number, item in enumerate(loaded, start=1):
        if not isinstance(item, dict):
            raise UserError(
                f"{path} row {number} is {_kind(item)}, not an object with prompt/chosen/rejected keys; fix that row."
            )
    return loaded


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path} is not a readable Parquet file ({type(e).__name__}); re-export it.") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} has no rows; give a file that holds at least one row.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV file ({str(e).splitlines()[0]}).") from None
    rows = frame.to_dict(orient="records")
    for row in rows:  # chat messages exported to CSV arrive as JSON text, or as Python's repr (pandas.to_csv)
        for key, value in row.items():
            if isinstance(value, str) and value.startswith("[{"):
                row[key] = _parse_message_list(value)
    return rows


def _parse_message_list(text: str) -> Any:
    """A list written as JSON or as a Python literal, or the text unchanged (a literal only: nothing is run)."""
    import ast

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, list) else text


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError):
        raise UserError(
            f"{path} is a directory but not one written by datasets' save_to_disk; pass a data file instead."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path} has splits {', '.join(loaded)}; choose one with data_split=NAME.")
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise UserError(
            f"could not load dataset {name!r} split {split!r} from the hub ({type(e).__name__}); "
            "check the name, the network, or pass a local file."
        ) from None
    return loaded.to_list()


_MISSING = object()
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ShareGPT "from" -> chat role
PROMPT_TURNS_COLUMN = "conversations"  # ShareGPT preference rows (LLaMA-Factory): the prompt turns
SYSTEM_COLUMN = "system"  # beside them, LLaMA-Factory's optional system prompt


def to_pairs(rows: Iterable[dict[str, Any]], columns: Columns, where: str) -> list[Pair]:
    """Validate raw rows into Pairs, naming the row and column of the first bad value.

    Texts are strings or chat messages: {role, content}, or ShareGPT's {from, value} with human/gpt/system mapped to
    user/assistant/system; a single message may stand for a list of one. Without a prompt column, a `conversations`
    column holds the prompt turns (ShareGPT preference rows); without either, chosen and rejected are whole
    conversations that share the prompt (Anthropic-HH style).
    """
    lines = getattr(rows, "lines", None)
    rows = list(rows)
    names = {"prompt_column": columns.prompt, "chosen_column": columns.chosen, "rejected_column": columns.rejected}
    if len(set(names.values())) < 3:
        shown = ", ".join(f"{key}={value!r}" for key, value in names.items())
        raise UserError(
            f"prompt_column, chosen_column and rejected_column must name three different columns; got {shown}."
        )
    pairs = []
    for number, row in enumerate(rows, start=1):
        line = lines[number - 1] if lines else number
        at = f"{where} row {number}" + (f" (line {line})" if line != number else "")
        if not isinstance(row, dict):
            raise UserError(
                f"{at} is {_kind(row)}, not an object with {columns.chosen!r} and {columns.rejected!r} columns."
            )
        for name in (columns.chosen, columns.rejected):
            if name not in row and {"completion", "label"} <= set(row):
                raise UserError(
                    f"{at} has no column {_show(name)} ({_columns_of(row)}); these are KTO rows "
                    "(prompt/completion/label): add loss_type=kto."
                )
            if name not in row:
                raise UserError(
                    f"{at} has no column {_show(name)} ({_columns_of(row)}); map yours with "
                    "--chosen-column/--rejected-column."
                )
        if columns.prompt != Columns.prompt and columns.prompt not in row:  # named by the user: a typo, not HH-style
            raise UserError(
                f"{at} has no column {_show(columns.prompt)} ({_columns_of(row)}); fix --prompt-column, or leave it "
                "out for a "
                "'prompt' column or a prompt shared by chosen and rejected."
            )
        chosen = _check_text(row[columns.chosen], at, columns.chosen)
        rejected = _check_text(row[columns.rejected], at, columns.rejected)
        if columns.prompt in row:
            prompt = _check_text(row[columns.prompt], at, columns.prompt)
            if isinstance(prompt, list):  # chat turns: a system column beside them is their system prompt
                prompt = _with_system(prompt, row.get(SYSTEM_COLUMN), at, columns.prompt)
        elif PROMPT_TURNS_COLUMN in row:
            prompt = _check_text(row[PROMPT_TURNS_COLUMN], at, PROMPT_TURNS_COLUMN)
            if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
                raise UserError(
                    f"{at} column {PROMPT_TURNS_COLUMN!r} ends with an assistant turn, but next to "
                    f"{columns.chosen!r}/{columns.rejected!r} it must hold only the prompt turns; "
                    "drop the answer from it or name the prompt column with --prompt-column."
                )
            prompt = _with_system(prompt, row.get(SYSTEM_COLUMN), at, PROMPT_TURNS_COLUMN)
        else:
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected, columns.assistant_marker, at)
        pair = unify(prompt, chosen, rejected, at)
        for name, response in ((columns.chosen, pair.chosen), (columns.rejected, pair.rejected)):
            _check_response(response, at, name, columns.prompt)
        pairs.append(pair)
    return pairs


@dataclass(frozen=True)
class Example:
    """One answer to a prompt, labelled desirable or not (KTO's unpaired data)."""

    prompt: Text
    completion: Text
    desirable: bool
    origin: str = field(default="", compare=False)


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}  # labels as CSV and spreadsheets write them


def to_examples(
    rows: Iterable[dict[str, Any]], columns: Columns, completion_column: str, label_column: str, where: str
) -> list[Example]:
    """Validate rows into KTO examples: prompt/completion/label rows, or preference pairs split in two.

    The first row decides the format: with a completion column, every row must be prompt/completion/label
    (TRL's unpaired format); otherwise rows are preference pairs (to_pairs), and each gives a desirable example
    (chosen) and an undesirable one (rejected).
    """
    lines = getattr(rows, "lines", None)
    original, rows = rows, list(rows)
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    if completion_column not in first:
        pairs = to_pairs(original if lines else rows, columns, where)
        return [
            example
            for p in pairs
            for example in (
                Example(p.prompt, p.chosen, True, p.origin),
                Example(p.prompt, p.rejected, False, p.origin),
            )
        ]
    examples = []
    for number, row in enumerate(rows, start=1):
        line = lines[number - 1] if lines else number
        at = f"{where} row {number}" + (f" (line {line})" if line != number else "")
        if not isinstance(row, dict):
            raise UserError(f"{at} is {_kind(row)}, not an object with prompt/completion/label columns.")
        for name in (columns.prompt, completion_column, label_column):
            if name not in row:
                raise UserError(
                    f"{at} has no column {_show(name)} ({_columns_of(row)}); KTO reads prompt/completion/label rows "
                    "(the first row has a completion column); map yours with prompt_column=, completion_column=, "
                    "label_column=."
                )
        prompt = _check_text(row[columns.prompt], at, columns.prompt)
        completion = _check_text(row[completion_column], at, completion_column)
        unified = unify(prompt, completion, completion, at)
        _check_response(unified.chosen, at, completion_column, columns.prompt)
        label = row[label_column]
        if isinstance(label, str):
            label = LABEL_WORDS.get(label.strip().lower(), label)
        if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
            label = bool(label)
        if not isinstance(label, bool):
            raise UserError(
                f"{at} column {label_column!r} is {_kind(label)} {_show(label)}, not true or false; label each "
                "completion true (desirable) or false (undesirable)."
            )
        examples.append(Example(unified.prompt, unified.chosen, label, at))
    return examples


def _kind(value: Any) -> str:
    """What a JSON-ish value is, in words, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an empty list" if not value else "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _columns_of(row: dict[str, Any]) -> str:
    """The columns a row has, for a message about the one it lacks: the first 8, then '...'."""
    if not row:
        return "it has no columns"
    return f"it has {', '.join(_show(key) for key in list(row)[:8])}" + (", ..." if len(row) > 8 else "")


def _show(value: Any, limit: int = 40) -> str:
    """repr() on one line, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_chars(text: str, place: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: JSON's "\ud800" escape reads, but it is no character
        raise UserError(
            f"{place} holds an invalid character (the lone surrogate U+{ord(text[e.start]):04X} at "
            f"position {e.start + 1}); fix the text."
        ) from None
    return text


# A message list saved as text (pandas.to_csv writes Python's repr of it): '[{"role": ...' or "[{'content': ...".
_SERIALIZED_MESSAGES = re.compile(r"""\A\s*\[\s*\{\s*["'](role|content|from|value)["']\s*:""")


def _check_text(value: Any, at: str, column: str) -> Text:
    if isinstance(value, str):
        if _SERIALIZED_MESSAGES.match(value):
            raise UserError(
                f"{at} column {column!r} is a list of messages written as text ({_show(value)}); store the list "
                "itself (not its text) in .jsonl, .json or .parquet."
            )
        return _check_chars(value, f"{at} column {column!r}")
    if value is None:
        raise UserError(f"{at} column {column!r} is empty; fill it or drop the row.")
    if isinstance(value, dict):  # one message, e.g. ShareGPT's chosen {"from": "gpt", "value": ...}
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(
            f"{at} column {column!r} must be a string or a list of {{role, content}} messages, not {_kind(value)}."
        )
    return [_check_message(m, i, at, column) for i, m in enumerate(value, start=1)]


def _check_message(message: Any, i: int, at: str, column: str) -> dict[str, str]:
    """One {role, content} (or ShareGPT {from, value}) message, as {role, content}."""
    expected = f"{at} column {column!r} must be a string or a list of {{role, content}} messages"
    if not isinstance(message, dict):
        raise UserError(f"{expected}, but message {i} is {_kind(message)}.")
    if "role" in message:
        role = message["role"]
    elif "from" in message:
        role = message["from"]
    else:
        raise UserError(f"{expected}, but message {i} has no 'role' (or ShareGPT 'from').")
    role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role  # human/gpt in either form
    content = message["content"] if "content" in message else message.get("value", _MISSING)
    if content is _MISSING:
        raise UserError(f"{expected}, but message {i} has no 'content' (or ShareGPT 'value').")
    for what, value in (("role", role), ("content", content)):
        if not isinstance(value, str):
            raise UserError(f"{expected}, but the {what} of message {i} is {_kind(value)}, not a string.")
        _check_chars(value, f"{at} column {column!r}: the {what} of message {i}")
    return {"role": role, "content": content}


def _with_system(prompt: Text, system: Any, at: str, column: str) -> Text:
    """Prompt turns with the row's `system` column (LLaMA-Factory's layout) as their first message."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return prompt
    if not isinstance(system, str):
        raise UserError(f"{at} column {SYSTEM_COLUMN!r} is {_kind(system)}; write the system prompt as a string.")
    if not isinstance(prompt, list):
        prompt = [{"role": "user", "content": prompt}]
    if prompt[0]["role"] == "system":  # LLaMA-Factory reads the turns' own system message first
        if prompt[0]["content"] == system:
            return prompt
        raise UserError(f"{at} has a {SYSTEM_COLUMN!r} column and another system message in {column!r}; keep one.")
    return [{"role": "system", "content": _check_chars(system, f"{at} column {SYSTEM_COLUMN!r}")}, *prompt]


def _check_response(response: Text, at: str, column: str, prompt_column: str) -> None:
    """A response in messages must be the assistant's turn(s): start and end with an assistant message."""
    if not isinstance(response, list):
        return
    if response[0]["role"] != "assistant":
        raise UserError(
            f"{at} column {column!r}: the response starts with a {_show(response[0]['role'])} message, "
            f"not 'assistant'; put the turns before the answer in the {prompt_column!r} column."
        )
    if response[-1]["role"] != "assistant":
        raise UserError(
            f"{at} column {column!r}: the response ends with a {_show(response[-1]['role'])} message, "
            "not 'assistant'; end each response with the assistant's answer."
        )


def split_shared_prompt(chosen: Text, rejected: Text, marker: str, where: str, number: int) -> tuple[Text, Text, Text]:
    """Split whole conversations (Anthropic-HH style) into shared prompt + the two final answers."""
    return _split_shared_prompt(chosen, rejected, marker, f"{where} row {number}")


def _split_shared_prompt(chosen: Text, rejected: Text, marker: str, at: str) -> tuple[Text, Text, Text]:
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        # Back up to the start of the assistant turn the two conversations disagree on.
        while k > 0 and (k >= len(chosen) or chosen[k]["role"] != "assistant"):
            k -= 1
        if k == 0:
            raise UserError(
                f"{at}: chosen and rejected share no prompt before an assistant turn; add a prompt column."
            )
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        end = chosen.rfind(marker, 0, k)
        if end < 0 or (end + len(marker) > k):
            raise UserError(
                f"{at}: no prompt column and no shared beginning ending in {marker!r}; "
                "add a prompt column (or name yours with --prompt-column) or set assistant_marker."
            )
        cut = end + len(marker)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise UserError(f"{at}: chosen and rejected must both be strings or both be message lists.")


def unify(prompt: Text, chosen: Text, rejected: Text, origin: str = "") -> Pair:
    """Make a pair all-text or all-messages: one message list makes the whole row a chat."""
    if not any(isinstance(t, list) for t in (prompt, chosen, rejected)):
        return Pair(prompt, chosen, rejected, origin)

    def as_messages(t: Text, role: str) -> list[dict[str, str]]:
        return t if isinstance(t, list) else [{"role": role, "content": t}]

    prompt, chosen, rejected = (
        as_messages(prompt, "user"),
        as_messages(chosen, "assistant"),
        as_messages(rejected, "assistant"),
    )
    # Some sets (UltraFeedback-style) repeat the prompt at the start of both conversations: drop it there.
    n = len(prompt)
    if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
        chosen, rejected = chosen[n:], rejected[n:]
    return Pair(prompt, chosen, rejected, origin)


def prompt_key(prompt: Text) -> str:
    """A prompt (text or messages) as one string, equal for equal prompts: for grouping pairs by prompt."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def fingerprint(pairs: list[Pair]) -> str:
    """A content hash of the pairs, independent of the file format they came from."""
    digest = hashlib.sha256()
    for p in pairs:
        fields = [p.prompt, p.chosen, p.rejected] + ([p.desirable] if p.desirable is not None else [])
        digest.update(json.dumps(fields, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
