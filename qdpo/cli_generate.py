"""`qdpo generate`: a run's tuned and reference answers side by side (added to `qdpo` in cli.py)."""

from __future__ import annotations

import shutil
import textwrap
from itertools import zip_longest

import click

from qdpo.errors import UserError

SIDE_BY_SIDE_COLUMNS = 100  # narrower terminals get the two answers one after the other
DEFAULT_MAX_NEW_TOKENS = 64  # for an adapter directory without a run's settings


@click.command("generate")
@click.argument("source", metavar="RUN_DIR")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="A prompt (repeatable). It goes through the chat template when the tokenizer has one (see --raw).",
)
@click.option("--data", default=None, help="A preference or prompt file (.jsonl/.json/.parquet/.csv): its prompts.")
@click.option("--prompt-column", default=None, help="--data: the column holding the prompt (default: the run's).")
@click.option("--limit", default=10, show_default=True, help="--data: answer the first this many prompts.")
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help=f"Longest answer in new tokens (default: the run's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}).",
)
@click.option(
    "--adapter",
    "choice",
    default="final",
    show_default=True,
    help="final: the run's adapter; or a checkpoint's, by step (20 or step-000020).",
)
@click.option("--raw", is_flag=True, help="Send --prompt texts as they are, without the chat template.")
def generate(
    source: str,
    prompts: tuple[str, ...],
    data: str | None,
    prompt_column: str | None,
    limit: int,
    max_new_tokens: int | None,
    choice: str,
    raw: bool,
) -> None:
    """Answer prompts greedily with a run's tuned adapter and with its reference, side by side.

    Both come from the same 4-bit weights, loaded as the run loaded them (base, compute dtype, tokenizer); the
    reference is the base with adapters off, or the run's init adapter. --prompt texts go through the chat template
    with the generation prompt (see --raw); a file's prompts are encoded as training encodes that file (messages
    through the chat template, plain text as it is). All are cut from the left to the run's max_prompt_length.
    """
    from jinja2 import TemplateError  # chat templates are jinja (a transformers dependency)

    from qdpo.quiet import quiet_libraries

    quiet_libraries()  # before the model loads: no "Loading weights" bar or library notes between the answers

    from qdpo.generate import find_tuned_adapter, load_tuned, run_settings, side_by_side, training_tokens
    from qdpo.tokenize import encode_prompt

    if not prompts and not data:
        raise UserError("nothing to answer: give --prompt TEXT (repeatable) or --data FILE.")
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt is empty; write the prompt text after it, in quotes.")
    for name, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, not {value}.")
    adapter = find_tuned_adapter(source, choice)
    settings = run_settings(source)
    texts: list = list(prompts)
    if data:
        from qdpo.generate import file_prompts

        found = file_prompts(data, settings, prompt_column)
        if len(found) > limit:
            click.echo(f"answering the first {limit} of the {len(found)} prompts in {data} (--limit)")
        for number, prompt in enumerate(found[:limit], start=1):
            if not shown(prompt).strip():  # before the model loads: a refusal costs nothing
                raise UserError(f"prompt {number} in {data} is empty; give it some text or remove it.")
        texts += found[:limit]
    tuned = load_tuned(adapter, settings)
    tokenizer = tuned.tokenizer
    chat = bool(getattr(tokenizer, "chat_template", None)) and not raw
    if data and getattr(tokenizer, "chat_template", None) and any(isinstance(t, str) for t in texts[len(prompts) :]):
        click.echo(
            f"note: the prompts in {data} are plain text, so they go without the chat template, as training "
            "encodes plain-text prompts; --prompt TEXT applies it."
        )
    cut = settings.get("max_prompt_length")
    ids, cut_numbers = [], []
    for number, text in enumerate(texts):
        typed = number < len(prompts)  # --prompt texts are what a user types in a chat; file prompts are as trained
        try:
            encoded = encode_prompt(tokenizer, [{"role": "user", "content": text}] if typed and chat else text)
        except (ValueError, TemplateError) as e:  # messages without a chat template, roles the template refuses
            reason = " ".join(str(e).split())[:160]
            raise UserError(
                f"prompt {number + 1} cannot be encoded by the run's tokenizer ({reason}); "
                "use plain-text prompts or fix the messages."
            ) from None
        if not encoded:
            raise UserError(f"prompt {shown(text)!r} encodes to no tokens; give it some text.")
        if cut and len(encoded) > cut:
            cut_numbers.append(str(number + 1))
        ids.append(encoded[-cut:] if cut else encoded)  # training kept the end: it holds the question
    if cut_numbers:
        which = (
            f"prompt {cut_numbers[0]} cut to its"
            if len(cut_numbers) == 1
            else f"prompts {', '.join(cut_numbers)} cut to their"
        )
        click.echo(f"note: {which} last {cut} tokens (the run's max_prompt_length), as training cuts prompts.")
    new_tokens = max_new_tokens or settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    answers = side_by_side(tuned.model, tokenizer, ids, new_tokens, training_tokens(settings))
    width = shutil.get_terminal_size().columns
    for number, (text, (policy, reference)) in enumerate(zip(texts, answers), start=1):
        for line in layout(f"{number}. {shown(text)}", policy, reference, tuned.reference, width):
            click.echo(line)


def shown(prompt) -> str:
    """A prompt as the user knows it: the text, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _side(label: str, generation, width: int) -> list[str]:
    """One answer as wrapped lines: a label, the text, and its length with how it ended."""
    end = "ended" if generation.stopped else "cut at max_new_tokens"
    body = [
        line
        for paragraph in (generation.text.strip() or "(empty)").splitlines()
        for line in (textwrap.wrap(paragraph, width) or [""])
    ]
    count = f"{generation.tokens} token" + ("" if generation.tokens == 1 else "s")
    return [label, *body, f"[{count}, {end}]"]


def layout(title: str, policy, reference, reference_label: str, width: int) -> list[str]:
    """The two answers to one prompt: in two columns on a wide terminal, one after the other on a narrow one."""
    lines = textwrap.wrap("=" * 3 + " " + title, width) or ["==="]  # a long prompt wraps like the answers
    if width >= SIDE_BY_SIDE_COLUMNS:
        column = (width - 3) // 2
        left = _side("tuned (adapter on)", policy, column)
        right = _side(reference_label, reference, column)
        lines += [f"{a:<{column}} | {b}".rstrip() for a, b in zip_longest(left, right, fillvalue="")]
    else:
        lines += _side("tuned (adapter on)", policy, width) + _side(reference_label, reference, width)
    return lines + [""]
