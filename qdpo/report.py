"""The run report: curves, settings, data, timings, evals and generations of one run (or two, compared).

Writes report.html (one file, plots inlined, opens offline) and report.md (plots beside it in report_files/).
Everything comes from what the run wrote: run.json, config.yaml, summary.json, metrics.jsonl, generations.jsonl.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qdpo.assess import eval_accuracy
from qdpo.errors import UserError
from qdpo.fs import staged, write_text

# (file stem, title, y label, [(metric, legend label)]): the curves every report shows, against steps.
CURVES = [
    ("loss", "Loss", "loss", [("loss", "train"), ("eval_loss", "held-out")]),
    (
        "accuracy",
        "Reward accuracy",
        "share of pairs with chosen reward > rejected\n(KTO: of examples on their label's side of the KL baseline)",
        [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "held-out")],
    ),
    (
        "margins",
        "Reward margin",
        "chosen reward - rejected reward",
        [("rewards/margins", "train"), ("eval_rewards/margins", "held-out")],
    ),
    (
        "logps",
        "Policy log-probs of the responses",
        "summed log-prob",
        [
            ("logps/chosen", "chosen"),
            ("logps/rejected", "rejected"),
            ("eval_logps/chosen", "held-out chosen"),
            ("eval_logps/rejected", "held-out rejected"),
        ],
    ),
    (
        "kl",
        "KTO's KL baseline z0",
        "policy - reference log-ratio of mismatched answers",
        [("kl", "train"), ("eval_kl", "held-out")],
    ),
    ("learning_rate", "Learning rate", "learning rate", [("learning_rate", "learning rate")]),
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


@dataclass
class Run:
    """What a run directory holds, read once."""

    path: Path
    info: dict[str, Any]
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    generations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The directory's name, for legends."""
        return self.path.name


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The parseable lines of a JSON-lines file (a line cut by a crash is skipped, not fatal)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_run(path: Path) -> Run:
    """Read a run directory, or refuse in one line if it is not one."""
    if not (path / "run.json").is_file():
        raise UserError(f"{path} is not a qdpo run directory (no run.json); pass the directory `qdpo run` wrote.")
    info = json.loads((path / "run.json").read_text())
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    return Run(
        path, info, config or {}, summary, _json_lines(path / "metrics.jsonl"), _json_lines(path / "generations.jsonl")
    )


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing), so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def smoothing_weight(points: int) -> float:
    """How much to smooth a curve of this many points: none up to 8 (it would only lag), up to 0.8 for long runs."""
    return min(0.8, max(0.0, 1 - 8 / points)) if points else 0.0


def _series(rows: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    return [s for s, _ in points], [float(v) for _, v in points]


def plot(runs: list[Run], stem: str) -> bytes | None:
    """One curve as a PNG: raw points and a smoothed line per series, for one run or several; None if no data."""
    from matplotlib.figure import Figure  # Figure, not pyplot: no display and no global state needed

    _, title, ylabel, metrics = next(c for c in CURVES if c[0] == stem)
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    drawn = 0
    for r_i, run in enumerate(runs):
        for m_i, (metric, label) in enumerate(metrics):
            steps, values = _series(run.rows, metric)
            if not steps:
                continue
            colour = COLOURS[(r_i * len(metrics) + m_i) % len(COLOURS)] if len(runs) > 1 else COLOURS[m_i]
            name = f"{run.name}: {label}" if len(runs) > 1 else label
            style = "--" if len(runs) > 1 and r_i else "-"
            weight = smoothing_weight(len(steps))
            # Evals are few and each is already a mean over the held-out set; the schedule is exact: no smoothing.
            if metric.startswith("eval_") or metric == "learning_rate" or weight == 0:
                ax.plot(steps, values, style, marker="o", color=colour, label=name, markersize=3)
            else:
                ax.plot(steps, values, ".", color=colour, alpha=0.35, markersize=4)
                ax.plot(steps, smooth(values, weight), style, color=colour, label=f"{name} (smoothed)")
            drawn += 1
    if not drawn:
        return None
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if stem == "accuracy":
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="chance")
    if stem == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def curve_png(rows: list[dict[str, Any]], stem: str) -> bytes | None:
    """One of CURVES drawn from metrics rows as they arrive (a live plot), before the run has a directory to read."""
    return plot([Run(Path("run"), {}, {}, {}, rows)], stem)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):  # e.g. a 95% interval
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "-" if value is None else str(value)


@dataclass
class Section:
    """A titled block of the report: a table (header + rows), free lines, or both."""

    title: str
    header: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def overview(run: Run) -> Section:
    """Status, model, data and the verdict."""
    info, summary = run.info, run.summary
    lines = [f"status: {info.get('status', '?')}" + (f" ({info['error']})" if info.get("error") else "")]
    base = info.get("base_model", {})
    lines.append(f"model: {base.get('name')} ({info.get('quantization', {}).get('compute_dtype', '?')} compute)")
    data = info.get("data", {})
    lines.append(
        f"data: {data.get('source')}" + (f", held-out: {data['eval_source']}" if data.get("eval_source") else "")
    )
    if summary.get("verdict"):
        lines.append(summary["verdict"])
    return Section("Overview", lines=lines)


def data_section(run: Run) -> Section:
    """Rows read, kept, dropped by reason and cut, per split, and the padding share."""
    data = run.info.get("data", {})
    header = ["split", "rows read", "kept", "dropped: empty", "dropped: chosen = rejected", "dropped: too long"]
    header += ["prompts cut", "responses cut"]
    rows = []
    for split in ("train", "eval"):
        s = data.get(f"{split}_stats")
        if s:
            rows.append(
                [split, s["rows"], s["kept"], s["dropped_empty"], s["dropped_identical"], s["dropped_too_long"]]
                + [s["prompts_truncated"], s["responses_truncated"]]
            )
    lines = []
    if "padding_share" in run.summary:
        lines.append(f"padding share of the training tokens: {run.summary['padding_share']:.1%}")
    return Section("Data", header, rows, lines)


def timing_section(run: Run) -> Section:
    """Seconds per phase, tokens per second and peak memory."""
    timings = run.summary.get("timings") or run.info.get("timings") or {}
    total = sum(timings.values()) or 1.0
    rows = [[phase, f"{s:.1f}", f"{s / total:.0%}"] for phase, s in timings.items()]
    lines = []
    if run.summary.get("tokens_per_second"):
        lines.append(f"training throughput: {run.summary['tokens_per_second']:.0f} tokens/s (steps phase)")
    if run.summary.get("peak_memory_gb") is not None:
        lines.append(f"peak memory: {run.summary['peak_memory_gb']:.2f} GB ({run.summary.get('peak_memory_kind')})")
    return Section("Time and memory", ["phase", "seconds", "share"], rows, lines)


def eval_section(run: Run) -> Section:
    """Every held-out evaluation: accuracy with count and interval, margin, loss."""
    pairs = run.info.get("data", {}).get("eval_pairs") or 0
    rows = []
    for r in run.rows:
        if "eval_rewards/accuracies" in r:
            acc = eval_accuracy(r, pairs).describe() if pairs else _fmt(r["eval_rewards/accuracies"])
            rows.append([r["step"], acc, _fmt(r.get("eval_rewards/margins")), _fmt(r.get("eval_loss"))])
    lines = [] if rows else ["no held-out evaluation was logged"]
    return Section("Held-out evaluations", ["step", "reward accuracy", "margin", "loss"], rows, lines)


def generations_section(run: Run) -> Section | None:
    """Greedy answers to the same held-out prompts at the first and the last evaluation that generated."""
    if not run.generations:
        return None
    steps = sorted({g["step"] for g in run.generations})
    first, last = steps[0], steps[-1]
    by_prompt: dict[str, dict[int, str]] = {}
    for g in run.generations:
        if g.get("which", "policy") == "policy" and g["step"] in (first, last):
            cut = "" if g.get("stopped", True) else " [cut at max_new_tokens]"  # else a cut answer reads as finished
            by_prompt.setdefault(g["prompt"], {})[g["step"]] = g["text"] + cut
    # The prompt as the model saw it (chat template included), less the lines every prompt starts with (a system
    # line, the template's header): its end holds the question.
    common = os.path.commonprefix(list(by_prompt)) if len(by_prompt) > 1 else ""
    skip = common.rfind("\n") + 1

    def shown(prompt: str) -> str:
        text = ("..." if skip else "") + prompt[skip:]
        return text if len(text) <= 200 else "..." + text[-200:]

    rows = [[shown(prompt), texts.get(first, ""), texts.get(last, "")] for prompt, texts in by_prompt.items()]
    return Section("Generations", ["prompt", f"step {first}", f"step {last}"], rows)


def config_section(run: Run) -> Section:
    """The resolved settings."""
    return Section("Settings", ["setting", "value"], [[k, _fmt(v)] for k, v in run.config.items()])


def differing_settings(runs: list[Run]) -> Section:
    """Only the settings whose values differ between the runs, side by side."""
    # Where each run was written is what tells them apart, not a difference in what they computed.
    keys = [k for k in dict.fromkeys(k for run in runs for k in run.config) if k not in ("output_dir", "overwrite")]
    rows = [[k] + [_fmt(run.config.get(k)) for run in runs] for k in keys]
    rows = [row for row in rows if len(set(row[1:])) > 1]
    lines = [] if rows else ["the runs' settings are identical"]
    return Section("Settings that differ", ["setting"] + [run.name for run in runs], rows, lines)


def summary_comparison(runs: list[Run]) -> Section:
    """Headline figures of each run side by side."""
    names = [
        ("status", lambda r: r.info.get("status")),
        ("steps", lambda r: r.summary.get("steps")),
        ("held-out reward accuracy", lambda r: r.summary.get("eval_rewards/accuracies")),
        ("95% interval", lambda r: r.summary.get("eval_accuracy_ci95")),
        ("held-out margin", lambda r: r.summary.get("eval_rewards/margins")),
        ("seconds", lambda r: r.summary.get("seconds")),
        ("tokens/s", lambda r: r.summary.get("tokens_per_second")),
        ("peak memory (GB)", lambda r: r.summary.get("peak_memory_gb")),
    ]
    rows = [[label] + [_fmt(get(run)) for run in runs] for label, get in names]
    return Section("Results", ["", *[run.name for run in runs]], rows)


def sections(runs: list[Run]) -> list[Section]:
    """The report's blocks, in order, for one run or a comparison."""
    if len(runs) == 1:
        run = runs[0]
        found = [overview(run), eval_section(run), generations_section(run), data_section(run)]
        return [s for s in found + [timing_section(run), config_section(run)] if s is not None]
    return [summary_comparison(runs), differing_settings(runs)]


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list[Section], figures: dict[str, bytes]) -> str:
    """report.md: tables in Markdown, figures as report_files/<stem>.png."""
    out = [f"# {title}", ""]
    for block in blocks:
        out += [f"## {block.title}", ""]
        out += [f"- {line}" for line in block.lines] + ([""] if block.lines else [])
        if block.header and block.rows:
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        if block.title in ("Overview", "Results"):
            out += ["## Curves", ""] + [f"![{stem}](report_files/{stem}.png)" for stem in figures] + [""]
    return "\n".join(out)


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:left;vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}"
    "img{max-width:49%;margin:.2em}"
)


def render_html(title: str, blocks: list[Section], figures: dict[str, bytes]) -> str:
    """report.html: one self-contained page, figures inlined as base64 PNG."""
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"]
    out.append(f"</head><body><h1>{esc(title)}</h1>")
    for block in blocks:
        out.append(f"<h2>{esc(block.title)}</h2>")
        out += [f"<p>{esc(line)}</p>" for line in block.lines]
        if block.header and block.rows:
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in block.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block.rows]
            out.append("</table>")
        if block.title in ("Overview", "Results"):
            out.append("<h2>Curves</h2>")
            for stem, png in figures.items():
                data = base64.b64encode(png).decode()
                out.append(f"<img alt='{esc(stem)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write report.html and report.md for one run (into it) or a comparison (into out); returns the directory."""
    runs = [read_run(Path(p)) for p in run_dirs]
    target = out or (runs[0].path if len(runs) == 1 else Path.cwd() / "qdpo-compare")
    figures = {stem: png for stem, *_ in CURVES if (png := plot(runs, stem)) is not None}
    title = f"qdpo run {runs[0].name}" if len(runs) == 1 else "qdpo runs " + " vs ".join(r.name for r in runs)
    blocks = sections(runs)
    target.mkdir(parents=True, exist_ok=True)
    with staged(target / "report_files") as tmp:
        for stem, png in figures.items():
            (tmp / f"{stem}.png").write_bytes(png)
    write_text(target / "report.md", render_markdown(title, blocks, figures))
    write_text(target / "report.html", render_html(title, blocks, figures))
    return target


def report_after_run(out: Path, echo) -> None:
    """Write a run's report as it ends; failing to draw it must never hide how the run itself ended."""
    if not (out / "run.json").is_file():  # the run left nothing behind (it could not start)
        return
    try:
        write_report([out])
    except Exception as e:  # noqa: BLE001 - the report is a by-product; the run's own outcome comes first
        echo(
            f"note: could not write the report ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"`qdpo report {out}` tries again."
        )
