"""Read preference rows from files, directories or the hub, and validate them into pairs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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
            raise UserError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .parquet, .csv or a save_to_disk directory.")
        rows = readers[suffix](path)
        if not rows:
            raise UserError(f"{path} has no rows; point data at a file with preference pairs.")
        return rows, str(path)
    if looks_like_hub_id(source):
        return _read_hub(source, split), source
    raise UserError(f"data {source!r} does not exist; pass a .jsonl/.json/.parquet/.csv file, a save_to_disk directory or a hub dataset id.")



def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 JSON lines.") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({e.msg}); fix or remove that line.") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} must be a JSON object with prompt/chosen/rejected keys.")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} has no rows; point data at a file with preference pairs.")
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 JSON.") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several objects, one per line: it is JSON lines with a .json name
            return _read_jsonl(path)
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from None
    if isinstance(loaded, dict):
        lists = [v for v in loaded.values() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]} or similar wrapper
            loaded = lists[0]
        elif loaded and all(isinstance(v, list) for v in loaded.values()):  # column-oriented
            keys = list(loaded)
            loaded = [dict(zip(keys, values)) for values in zip(*loaded.values())]
    if not isinstance(loaded, list) or not all(isinstance(r, dict) for r in loaded):
        raise UserError(f"{path} must hold a list of objects with prompt/chosen/rejected keys.")
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
        raise UserError(f"{path} has no rows; point data at a file with preference pairs.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV file ({str(e).splitlines()[0]}).") from None
    rows = frame.to_dict(orient="records")
    for row in rows:  # chat messages exported to CSV arrive as JSON text
        for key, value in row.items():
            if isinstance(value, str) and value.startswith("[{"):
                try:
                    row[key] = json.loads(value)
                except json.JSONDecodeError:
                    pass
    return rows


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError):
        raise UserError(f"{path} is a directory but not one written by datasets' save_to_disk; pass a data file instead.") from None
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
        raise UserError(f"could not load dataset {name!r} split {split!r} from the hub ({type(e).__name__}); check the name, the network, or pass a local file.") from None
    return loaded.to_list()


def to_pairs(rows: Iterable[dict[str, Any]], columns: Columns, where: str) -> list[Pair]:
    """Validate raw rows into Pairs, naming the row and column of the first bad value."""
    rows = list(rows)
    pairs = []
    for number, row in enumerate(rows, start=1):
        for name in (columns.chosen, columns.rejected):
            if name not in row:
                raise UserError(f"{where} row {number} has no column {name!r} (it has {', '.join(map(str, row))}); map yours with --chosen-column/--rejected-column.")
        chosen = _check_text(row[columns.chosen], where, number, columns.chosen)
        rejected = _check_text(row[columns.rejected], where, number, columns.rejected)
        if columns.prompt in row:
            prompt = _check_text(row[columns.prompt], where, number, columns.prompt)
        else:
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected, columns.assistant_marker, where, number)
        pairs.append(_unify(prompt, chosen, rejected))
    return pairs


def _check_text(value: Any, where: str, number: int, column: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None:
        raise UserError(f"{where} row {number} column {column!r} is empty; fill it or drop the row.")
    raise UserError(f"{where} row {number} column {column!r} must be a string or a list of {{role, content}} messages, not {type(value).__name__}.")


def split_shared_prompt(chosen: Text, rejected: Text, marker: str, where: str, number: int) -> tuple[Text, Text, Text]:
    """Split whole conversations (Anthropic-HH style) into shared prompt + the two final answers."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        # Back up to the start of the assistant turn the two conversations disagree on.
        while k > 0 and (k >= len(chosen) or chosen[k]["role"] != "assistant"):
            k -= 1
        if k == 0:
            raise UserError(f"{where} row {number}: chosen and rejected share no prompt before an assistant turn; add a prompt column.")
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        end = chosen.rfind(marker, 0, k)
        if end < 0 or (end + len(marker) > k):
            raise UserError(f"{where} row {number}: no prompt column and no shared beginning ending in {marker!r}; add a prompt column or set assistant_marker.")
        cut = end + len(marker)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise UserError(f"{where} row {number}: chosen and rejected must both be strings or both be message lists.")


def _unify(prompt: Text, chosen: Text, rejected: Text) -> Pair:
    """Make a pair all-text or all-messages: one message list makes the whole row a chat."""
    if not any(isinstance(t, list) for t in (prompt, chosen, rejected)):
        return Pair(prompt, chosen, rejected)

    def as_messages(t: Text, role: str) -> list[dict[str, str]]:
        return t if isinstance(t, list) else [{"role": role, "content": t}]

    prompt, chosen, rejected = as_messages(prompt, "user"), as_messages(chosen, "assistant"), as_messages(rejected, "assistant")
    # Some sets (UltraFeedback-style) repeat the prompt at the start of both conversations: drop it there.
    n = len(prompt)
    if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
        chosen, rejected = chosen[n:], rejected[n:]
    return Pair(prompt, chosen, rejected)


def fingerprint(pairs: list[Pair]) -> str:
    """A content hash of the pairs, independent of the file format they came from."""
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
