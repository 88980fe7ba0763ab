"""Checking a shipped model against the one it came from: logits on a few prompts, compared position by position."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qdpo.adapter import Adapter
from qdpo.model import ModelSource, load_base_4bit, pick_device
from qdpo.tokenize import encode_prompt

CHECK_PROMPTS = [
    "What is two plus two?",
    "Name the capital of France in one sentence.",
    "Write one short sentence about the sea.",
]


@dataclass
class Deviation:
    """How far one model's logits are from another's over a few prompts."""

    max_abs: float  # largest |logit difference| at any position and vocabulary entry
    max_logit: float  # largest |logit| of the reference, for scale
    top1_agreement: float  # share of positions where both pick the same next token
    positions: int

    def describe(self) -> str:
        """One line for the user: the deviation, the logits' scale, and top-token agreement."""
        return (
            f"{self.max_abs:.3g} (logits reach {self.max_logit:.3g}; same top token at "
            f"{self.top1_agreement:.0%} of {self.positions} positions)"
        )


def check_prompts(tokenizer) -> list[list[int]]:
    """The check prompts as a user sends them: through the chat template when there is one."""
    chat = bool(tokenizer.chat_template)
    return [encode_prompt(tokenizer, [{"role": "user", "content": text}] if chat else text) for text in CHECK_PROMPTS]


@torch.no_grad()
def prompt_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every position of each prompt, as fp32 on the CPU.

    One prompt per forward: no padding to get wrong.
    """
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> Deviation:
    """Largest logit difference and top-token agreement between two models' logits on the same prompts."""
    ref, got = torch.cat(reference), torch.cat(other)
    return Deviation(
        max_abs=(ref - got).abs().max().item(),
        max_logit=ref.abs().max().item(),
        top1_agreement=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        positions=ref.shape[0],
    )


def adapter_logits(
    adapter: Adapter, source: ModelSource, compute_dtype: torch.dtype, prompts: list[list[int]]
) -> list[torch.Tensor]:
    """Logits of the adapter on the 4-bit base, the model the adapter was trained as."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_4bit(source, compute_dtype, pick_device(), False), str(adapter.path))
    return prompt_logits(model.eval(), prompts)


def merged_logits(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a plain transformers directory, loaded as any user would (its own dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map={"": str(pick_device())})
    return prompt_logits(model.eval(), prompts)
