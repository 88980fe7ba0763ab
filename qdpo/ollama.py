"""Ollama Modelfiles written beside a GGUF export: FROM the model (or the base, with ADAPTER the LoRA), stop tokens,
and the chat template as a Go TEMPLATE where it is ChatML, checked by rendering (else Ollama reads the GGUF's own)."""

from __future__ import annotations

import json
from pathlib import Path

from qdpo.adapter import Adapter
from qdpo.fs import write_text
from qdpo.model import ModelSource

# Ollama's Go template for ChatML: system, user and assistant turns alike, then the assistant's turn opened.
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_PROBES = [  # conversations the Jinja template is rendered on; sentinel texts no template would write itself
    [("user", "Q1 zebra")],
    [("system", "S1 quartz"), ("user", "Q1 zebra")],
    [("system", "S1 quartz"), ("user", "Q1 zebra"), ("assistant", "A1 violet"), ("user", "Q2 ember")],
    [("user", "Q1 zebra"), ("assistant", "A1 violet"), ("user", "Q2 ember")],
]


def modelfile_path(gguf_file: Path) -> Path:
    """The Modelfile beside a GGUF file: model.gguf -> model.Modelfile."""
    return gguf_file.with_name(gguf_file.stem + ".Modelfile")


def _chatml(turns: list[tuple[str, str]]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"


def chatml_system(tokenizer) -> tuple[bool, str | None]:
    """Whether the chat template renders exactly as ChatML on every probe, and the system text it adds by itself.

    Rendering is the test: a template matches only if its output equals CHATML_TEMPLATE's on each conversation,
    with the same default system turn (Ollama's SYSTEM) added wherever the conversation has none.
    """
    if not tokenizer.chat_template:
        return False, None
    default = None
    for turns in _PROBES:
        messages = [{"role": role, "content": text} for role, text in turns]
        try:
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template that refuses a probe (roles it does not know) is not ChatML
            return False, None
        if rendered == _chatml(turns):
            continue
        head = "<|im_start|>system\n"
        if turns[0][0] == "system" or not rendered.startswith(head):
            return False, None
        system = rendered[len(head) : rendered.find("<|im_end|>\n")]
        if rendered != _chatml([("system", system), *turns]) or default not in (None, system):
            return False, None
        default = system
    return True, default


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (Ollama's multi-line form); triple quotes inside cannot be written."""
    return f'"""{text}"""'


def template_lines(tokenizer) -> list[str]:
    """TEMPLATE/SYSTEM/stop lines for the tokenizer's chat template, or a comment saying why there is no TEMPLATE."""
    chatml, system = chatml_system(tokenizer)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if chatml:
        stops += [t for t in ("<|im_end|>", "<|im_start|>") if t not in stops]
        lines = ["# The chat template is ChatML (checked by rendering it), written as Ollama's Go template:"]
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
        if system is not None and '"""' not in system:
            lines.append(f"SYSTEM {_quoted(system)}")
    else:
        lines = [
            "# No TEMPLATE: this chat template is not ChatML, so it is not translated here; Ollama takes the",
            "# template embedded in the GGUF (tokenizer.chat_template) when it recognizes it.",
        ]
    return lines + [f"PARAMETER stop {json.dumps(s)}" for s in stops]


def model_modelfile(path: Path, gguf_file: Path, tokenizer, name: str) -> None:
    """A Modelfile for a full-model GGUF export: FROM the file beside it, its template and stop tokens."""
    lines = [
        f"# Ollama Modelfile for {name}, written by qdpo export. Create the model with:",
        f"#   ollama create {name.lower()} -f {path.name}",
        f"FROM ./{gguf_file.name}",
        *template_lines(tokenizer),
    ]
    write_text(path, "\n".join(lines) + "\n")


def lora_modelfile(path: Path, lora_file: Path, adapter: Adapter, source: ModelSource, tokenizer) -> None:
    """A Modelfile for a LoRA GGUF: FROM the base model's GGUF, ADAPTER the LoRA file beside it."""
    name = Path(adapter.run_dir or adapter.path).name
    lines = [
        f"# Ollama Modelfile for {name}, written by qdpo export. Create the model with:",
        f"#   ollama create {name.lower()} -f {path.name}",
        "# The adapter applies only to the base it was trained on.",
    ]
    if source.gguf_file and Path(source.gguf_file).is_file():
        lines.append(f"FROM {source.gguf_file}")
    else:
        lines += [
            f"# {source.name} is not a GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py and put",
            "# that file's path here, or a safetensors directory Ollama can import.",
            f"FROM {source.name}",
        ]
    lines.append(f"ADAPTER ./{lora_file.name}")
    lines += template_lines(tokenizer)
    write_text(path, "\n".join(lines) + "\n")
