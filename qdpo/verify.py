"""Checking a shipped model against the one it came from: logits on a few prompts, compared position by position."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qdpo.adapter import Adapter
from qdpo.errors import UserError
from qdpo.model import REFERENCE_ADAPTER, ModelSource, load_base_4bit, load_tokenizer, pick_device
from qdpo.tokenize import TokenizedPair, encode_prompt, tokenize_pairs

EVAL_PAIRS = 200  # held-out pairs scored by default: seconds on a GPU, about a minute for SmolLM2 on 2 CPU cores

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


@dataclass
class HeldOut:
    """The run's held-out pairs, tokenized and grouped as the run grouped them, and their reference log-probs."""

    config: Any  # the run's qdpo.config.Config
    pairs: list[TokenizedPair]
    batches: list[list[int]]
    pad_id: int
    reference: torch.Tensor | None = None  # [N, 2], scored by the 4-bit base with adapters off; None: no reference

    def accuracy(self, model) -> float:
        """Held-out reward accuracy of model as the policy against the run's reference, as the run measured it."""
        from qdpo.train import evaluate

        metrics = evaluate(model, self.pairs, self.batches, self.reference, self.config, self.pad_id)
        return metrics["eval_rewards/accuracies"]


@dataclass
class Trained:
    """What the run trained and evaluated (the adapter on the 4-bit base): its logits and held-out accuracy."""

    logits: list[torch.Tensor]
    held_out: HeldOut | None
    accuracy: float | None


@dataclass
class Shipped:
    """A shipped model measured against the trained one: logits on the check prompts and held-out accuracy."""

    deviation: Deviation
    accuracy: float | None
    trained_accuracy: float | None
    pairs: int  # held-out pairs scored (0: accuracy not measured)

    def describe(self) -> str:
        """One line for the user: both accuracies side by side, or nothing when they were not measured."""
        if self.accuracy is None:
            return ""
        return (
            f"held-out reward accuracy on {self.pairs} pairs: trained {self.trained_accuracy:.3f}, "
            f"shipped {self.accuracy:.3f}"
        )


def held_out_pairs(adapter: Adapter, limit: int) -> HeldOut:
    """The first `limit` held-out pairs of the run that made the adapter, rebuilt from its config.yaml."""
    from qdpo.batching import length_grouped_batches
    from qdpo.config import build_config, load_yaml
    from qdpo.prepare import split_pairs

    if adapter.run_dir is None or not (adapter.run_dir / "config.yaml").is_file():
        raise UserError(f"{adapter.path} is not inside a qdpo run directory (no config.yaml beside it)")
    config = build_config(load_yaml(adapter.run_dir / "config.yaml"))
    pairs = split_pairs(config)[1][:limit]
    if not pairs:
        raise UserError(f"the run {adapter.run_dir} has no held-out pairs")
    # The adapter directory holds the tokenizer the run trained with.
    tokenizer = load_tokenizer(ModelSource(config.model, str(adapter.path)))
    tokenized, _ = tokenize_pairs(tokenizer, pairs, config.max_length, config.max_prompt_length)
    batches = length_grouped_batches(tokenized, config.micro_batch_size, config.seed)
    return HeldOut(config, tokenized, batches, tokenizer.pad_token_id)


def trained_model(adapter: Adapter, source: ModelSource, compute_dtype: torch.dtype):
    """The adapter on the 4-bit base, as the run held it (with the init adapter as the reference, if it had one)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_4bit(source, compute_dtype, pick_device(), False), str(adapter.path))
    init_adapter = ((adapter.run or {}).get("lora") or {}).get("init_adapter")
    if init_adapter:
        model.load_adapter(str(Path(init_adapter).expanduser()), adapter_name=REFERENCE_ADAPTER)
        model.set_adapter("default")
    return model.eval()


def measure_trained(
    adapter: Adapter,
    source: ModelSource,
    compute_dtype: torch.dtype,
    prompts: list[list[int]],
    held_out: HeldOut | None,
) -> Trained:
    """Logits and held-out accuracy of the trained model; fills held_out's reference (the same model, adapters off).

    The model is freed on return, before any shipped model loads.
    """
    from qdpo.reference import compute_reference

    model = trained_model(adapter, source, compute_dtype)
    logits = prompt_logits(model, prompts)
    accuracy = None
    if held_out is not None:
        config = held_out.config
        if config.needs_reference:  # as the run scored it (simpo and orpo compare with no reference)
            chunk, layout = config.logits_chunk_size, config.batch_layout
            held_out.reference = compute_reference(
                model, held_out.pairs, held_out.batches, held_out.pad_id, chunk, layout, config.ld_alpha
            )
        accuracy = held_out.accuracy(model)
    return Trained(logits, held_out, accuracy)


def measure_shipped(model, trained: Trained, prompts: list[list[int]]) -> Shipped:
    """Compare a shipped model with the trained one: logits on the check prompts, and held-out accuracy."""
    deviation = compare(trained.logits, prompt_logits(model.eval(), prompts))
    held_out = trained.held_out
    if held_out is None:
        return Shipped(deviation, None, None, 0)
    return Shipped(deviation, held_out.accuracy(model), trained.accuracy, len(held_out.pairs))


def load_merged(model_dir: Path):
    """A plain transformers directory, loaded as any user would (its own dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map={"": str(pick_device())})
    return model.eval()


def merged_logits(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a plain transformers directory, loaded as any user would (its own dtype)."""
    return prompt_logits(load_merged(model_dir), prompts)


def load_gguf(gguf_file: Path):
    """A GGUF file read back through transformers' GGUF loader, dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return model.to(pick_device()).eval()
