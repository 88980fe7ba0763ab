"""docs/troubleshooting.md explains every message qdpo prints to a user; these tests keep it that way.

The messages are found in qdpo/*.py with `ast`, never by running anything:
- errors: the first argument of every UserError(...) and Interrupted(...) call;
- notes and warnings: the first argument of every notes.append(...) / stats.notes.append(...);
- console lines: the first argument of every echo(...), click.echo(...) and print(...) that holds text;
- parts: the texts that fill a placeholder of a message above, or reach echo through a variable (PARTS).
Each message is a sequence of literal fragments and placeholders ({path}, {step}, ...). It counts as documented
when its fragments appear in the doc, in order, verbatim (runs of whitespace may differ), with anything on the
same line standing for each placeholder: so the doc may write {path} or PATH, but not reword the message.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"
SOURCES = sorted((ROOT / "qdpo").glob("*.py"))

ERRORS = {"UserError", "Interrupted"}
ECHOES = {"echo", "print"}
PLACEHOLDER = r"[^\n]*?"  # what a placeholder may stand for in the doc: anything on the same line
# Texts that end up in a printed line without being a call's first argument: (file, function) -> the variables
# they are assigned to, or "return" for what the function returns.
PARTS = {
    ("config.py", "_out_of_range"): {"return"},  # fills "{name} must {problem}; got {value}."
    ("config.py", "unknown_setting"): {"hint"},  # fills "unknown setting {name}; {hint}"
    ("families.py", "shared_layout_problem"): {"return"},  # fills the model family line and the share_prompt error
    ("families.py", "describe"): {"return"},
    ("families.py", "exact_settings"): {"line"},  # the "model family: ..." line every run prints
    ("model.py", "adapter_lora_settings"): {"note"},
    ("tokenize.py", "describe"): {"return"},  # "train: N pairs kept; dropped ..."
    ("watch.py", "_falling_chosen"): {"return"},  # the falling chosen log-probs warning
    ("watch.py", "out_of_memory"): {"where", "advice"},  # fill the out-of-memory error
    ("merge.py", "merge"): {"expected"},
    ("verify.py", "describe"): {"return"},  # the logit deviation in the merge and export checks
    ("assess.py", "small_eval_warning"): {"return"},  # printed before the step-0 eval
    ("launch.py", "failure_line"): {"return"},  # the launcher's line for a killed rank
    ("checkpoint.py", "world_size_note"): {"return"},  # resuming on another number of processes
    ("checkpoint.py", "load_scaler_state"): {"return"},  # an fp16 resume of a bf16 or CPU checkpoint
    ("cli.py", "invoke"): {"message"},  # a rank that lost contact with another
    ("assess.py", "eval_line"): {"return"},  # printed at each eval
    ("assess.py", "verdict"): {"return"},  # the closing lines' judgement
    ("train.py", "reference_preference_line"): {"return"},
    ("unpaired.py", "balance_note"): {"return"},  # KTO's note on unbalanced desirable/undesirable weights
    ("export.py", "export_gguf"): {"tokens"},
}


@dataclass(frozen=True)
class Message:
    """One message in the code: where it is, what kind, and its pieces (a str is literal, None a placeholder)."""

    file: str
    line: int
    kind: str
    pieces: tuple[str | None, ...]

    @property
    def fragments(self) -> list[str]:
        """The literal parts, stripped, without empty ones."""
        return [p.strip() for p in self.pieces if p is not None and p.strip()]

    def text(self) -> str:
        """The message with {} for each placeholder, as the failure lists it."""
        return "".join("{}" if p is None else p for p in self.pieces).strip()

    def pattern(self, whole: bool = False) -> re.Pattern[str]:
        """The fragments in order, whitespace-tolerant, with anything on one line standing for each placeholder.

        whole: the pattern of the entire message (for fullmatch); else without the placeholders at either end.
        """
        parts = []
        for piece in self.pieces:
            if piece is None:
                parts.append(PLACEHOLDER)
            elif piece.split():
                parts.append(r"\s+".join(re.escape(word) for word in piece.split()))
                if piece[-1].isspace():
                    parts.append(r"\s*")
        while not whole and parts and parts[0] in (PLACEHOLDER, r"\s*"):
            parts.pop(0)
        while not whole and parts and parts[-1] in (PLACEHOLDER, r"\s*"):
            parts.pop()
        return re.compile("".join(parts))

    def documented_in(self, doc: str) -> bool:
        """Whether the doc shows this message."""
        return self.pattern().search(doc) is not None


def _pieces(node: ast.expr) -> list[str | None] | None:
    """The literal and placeholder pieces of a text expression; None when node is no text at all."""
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _pieces(node.left), _pieces(node.right)
        if left is None and right is None:
            return None
        return (left or [None]) + (right or [None])
    return None


def _merged(pieces: list[str | None]) -> tuple[str | None, ...]:
    """Adjacent literals joined, adjacent placeholders collapsed into one."""
    out: list[str | None] = []
    for piece in pieces:
        if out and piece is None and out[-1] is None:
            continue
        if out and piece is not None and out[-1] is not None:
            out[-1] += piece
        else:
            out.append(piece)
    return tuple(out)


def _texts(node: ast.expr) -> list[ast.expr]:
    """The text expressions a value can be: itself, or each branch/element of an if-expression, list or tuple."""
    if isinstance(node, ast.IfExp):
        return _texts(node.body) + _texts(node.orelse)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [t for element in node.elts for t in _texts(element)]
    return [node] if _pieces(node) is not None else []


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _kind(call: ast.Call) -> str | None:
    name = _callee(call)
    if name in ERRORS:
        return "error"
    if name in ECHOES:
        return "echo"
    if name == "append" and isinstance(call.func, ast.Attribute):
        owner = call.func.value
        if (isinstance(owner, ast.Name) and owner.id == "notes") or (
            isinstance(owner, ast.Attribute) and owner.attr == "notes"
        ):
            return "note"
    return None


def _part_nodes(function: ast.AST, targets: set[str]) -> list[ast.expr]:
    nodes: list[ast.expr] = []
    for node in ast.walk(function):
        if isinstance(node, ast.Return) and "return" in targets and node.value is not None:
            nodes += _texts(node.value)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in targets for t in node.targets):
            nodes += _texts(node.value)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in targets:
            nodes += _texts(node.value)
    return nodes


def find_messages(paths: list[Path]) -> list[Message]:
    """Every message the given source files can print, in file order."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        candidates: list[tuple[str, ast.expr]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                kind = _kind(node)
                if kind:
                    candidates += [(kind, t) for t in _texts(node.args[0])]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (path.name, node.name) in PARTS:
                candidates += [("part", t) for t in _part_nodes(node, PARTS[path.name, node.name])]
        for kind, node in candidates:
            message = Message(path.name, node.lineno, kind, _merged(_pieces(node)))
            if message.fragments:  # a line that is all placeholder (echo(note)) is found where note is made
                found.append(message)
    return sorted(set(found), key=lambda m: (m.file, m.line, m.pieces))


def undocumented(messages: list[Message], doc: str) -> list[Message]:
    """The messages the doc does not show."""
    return [m for m in messages if not m.documented_in(doc)]


def test_the_scan_finds_the_messages():
    messages = find_messages(SOURCES)
    trees = {path.name: ast.parse(path.read_text()) for path in SOURCES}
    calls = [n for tree in trees.values() for n in ast.walk(tree) if isinstance(n, ast.Call) and _kind(n) == "error"]
    assert len(calls) > 100
    textless = [ast.unparse(call)[:80] for call in calls if not (call.args and _texts(call.args[0]))]
    assert not textless, f"errors whose message the scan cannot read: {textless}"
    for (file, function), targets in PARTS.items():  # a renamed function or variable must not hide its texts
        nodes = [n for n in ast.walk(trees[file]) if isinstance(n, ast.FunctionDef) and n.name == function]
        assert nodes and all(_part_nodes(n, targets) for n in nodes), (file, function, targets)
    assert {"error", "note", "echo", "part"} <= {m.kind for m in messages}
    for expected in ("{} has no rows; give a file that holds at least one row.", "warning: logps/chosen fell"):
        assert any(m.text().startswith(expected) for m in messages), expected


def test_every_message_is_documented():
    missing = undocumented(find_messages(SOURCES), DOC.read_text())
    listed = "\n".join(f"  qdpo/{m.file}:{m.line} [{m.kind}] {m.text()}" for m in missing)
    assert not missing, (
        f"{len(missing)} messages are not in {DOC.relative_to(ROOT)} (each placeholder shows as {{}}); add an "
        f"entry with the message as printed, what it means and what to do:\n{listed}"
    )


def _quoted(line: str) -> str | None:
    """The first code span of a quoted entry ('> `message` ...'), or None for other lines."""
    match = re.match(r"> (`+)(.+?)\1(?!`)", line)
    if not match:
        return None
    text = match.group(2)
    return text[1:-1] if text.startswith(" ") and text.endswith(" ") and text.strip() else text


def test_every_doc_entry_is_a_message_qdpo_prints():
    """Each quoted entry is one whole message of the code (errors after the CLI's 'error: '): no stale entries."""
    messages = [m for m in find_messages(SOURCES) if m.text() != "error: {}"]  # the CLI's wrapper of every error
    patterns = [m.pattern(whole=True) for m in messages]
    entries = [text for text in map(_quoted, DOC.read_text().splitlines()) if text]
    assert len(entries) > 100
    stale = []
    for entry in entries:
        text = entry.removeprefix("error: ")
        if not re.sub(r"\{[^}]*\}", "", text).strip():
            continue  # all placeholder: "error: {message}"
        if not any(p.fullmatch(text) for p in patterns):
            stale.append(entry)
    assert not stale, "doc entries that match no message in qdpo/ (reworded or removed?):\n" + "\n".join(stale)


def test_a_new_undocumented_error_fails(tmp_path):
    """The check catches an error added without documentation, and accepts one the doc shows with placeholders."""
    source = tmp_path / "new.py"
    source.write_text(
        "from qdpo.errors import UserError\n"
        "def f(path):\n"
        "    if path:\n"
        "        raise UserError(f'{path} has no rows; give a file ' 'that holds at least one row.')\n"
        "    raise UserError('a brand new message nobody documented')\n"
    )
    messages = find_messages([source])
    assert [m.text() for m in messages] == [
        "{} has no rows; give a file that holds at least one row.",
        "a brand new message nobody documented",
    ]
    assert [m.text() for m in undocumented(messages, DOC.read_text())] == ["a brand new message nobody documented"]
