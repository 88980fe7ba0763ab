"""One dataclass that holds every knob of a run, plus the strict preset + override loader."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qdpo.errors import UserError

LOSS_TYPES = (
    "sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down", "simpo", "orpo", "kto", "sft"
)  # fmt: skip
# Each preference method: what it is, the data it reads, and whether it compares against a reference model
# (`qdpo settings` and the README print this table).
METHODS = {
    "sigmoid": ("DPO (Rafailov et al. 2023); label_smoothing gives cDPO", "pairs", True),
    "ipo": ("IPO (Azar et al. 2023): squared loss on per-token-averaged log-ratios", "pairs", True),
    "hinge": ("SLiC-HF (Zhao et al. 2023): hinge loss on the log-ratio margin", "pairs", True),
    "robust": ("rDPO (Chowdhury et al. 2024): DPO unbiased under label_smoothing flipped labels", "pairs", True),
    "sigmoid_norm": ("length-normalised DPO: DPO on per-token-averaged log-ratios", "pairs", True),
    "apo_zero": ("APO-zero (D'Oosterlinck et al. 2024): push chosen up, rejected down", "pairs", True),
    "apo_down": ("APO-down (D'Oosterlinck et al. 2024): push both down, rejected more", "pairs", True),
    "simpo": ("SimPO (Meng et al. 2024): length-averaged log-prob margin with target simpo_gamma", "pairs", False),
    "orpo": ("ORPO (Hong et al. 2024): chosen NLL + orpo_alpha x odds-ratio loss", "pairs", False),
    "kto": (
        "KTO (Ethayarajh et al. 2024): each answer alone, desirable or not, against a KL baseline",
        "prompt/completion/label rows, or pairs split in two",
        True,
    ),
    "sft": ("an NLL term on the chosen response, added to another loss (RPO)", "pairs (chosen side)", False),
}
REFERENCE_FREE = ("simpo", "orpo")  # whole methods that never look at a reference model
SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its help text, and its valid values: choices=..., or a range given by
    min/max (inclusive) and gt/lt (exclusive) bounds, checked in one place (Config.validate)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _out_of_range(value: Any, meta: Any) -> str | None:
    """What a number must be, as words ("be at least 1", "be in [0, 0.5)"), when value breaks meta's bounds."""
    bounds = {k: meta[k] for k in ("min", "gt", "max", "lt") if k in meta}
    if not bounds or not isinstance(value, (int, float)):
        return None
    low = ("[", bounds["min"]) if "min" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["max"]) if "max" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if not math.isfinite(value):
        return "be a finite number"
    ok = low is None or (value >= low[1] if low[0] == "[" else value > low[1])
    ok = ok and (high is None or (value <= high[1] if high[0] == "]" else value < high[1]))
    if ok:
        return None
    if high is not None:
        return f"be in {low[0] if low else '('}{low[1] if low else '-inf'}, {high[1]}{high[0]}"
    if low == ("[", 0):
        return "not be negative"
    return "be positive" if low == ("(", 0) else f"be at least {low[1]}" if low[0] == "[" else f"be above {low[1]}"


@dataclass
class Config:
    """Every setting of a qdpo run; names follow TRL/transformers where one exists."""

    # --- what to tune on
    model: str = _f(
        "builtin:smollm2-135m-instruct",
        "Base model: local transformers dir, .gguf file, hub id, or builtin:smollm2-135m-instruct.",
    )
    data: str = _f(
        "builtin:answers",
        "Preference data: .jsonl/.json/.parquet/.csv file, save_to_disk dir, hub id, or builtin:answers.",
    )
    data_split: str = _f("train", "Split to read when `data` is a hub dataset or a DatasetDict directory.")
    eval_data: str | None = _f(
        None, "Held-out preference data (same formats as `data`); if unset, `eval_fraction` of `data` is held out."
    )
    eval_fraction: float = _f(
        0.05,
        "Share of `data` held out for evaluation when `eval_data` is unset, by whole prompts (0 disables eval).",
        min=0,
        lt=1,
    )
    prompt_column: str = _f("prompt", "Column with the prompt (string or chat messages).")
    chosen_column: str = _f("chosen", "Column with the preferred response.")
    rejected_column: str = _f("rejected", "Column with the dispreferred response.")
    completion_column: str = _f("completion", "KTO's unpaired rows: column with the response (loss_type=kto).")
    label_column: str = _f(
        "label", "KTO's unpaired rows: column saying whether the response is desirable (true/false; loss_type=kto)."
    )
    assistant_marker: str = _f(
        "\n\nAssistant:", "For rows without a prompt column (Anthropic-HH style): text that opens an assistant turn."
    )
    output_dir: str | None = _f(
        None, "Where the run writes config, metrics and the adapter; default runs/<preset>-<time>."
    )
    overwrite: bool = _f(False, "Replace an existing, non-empty output_dir.")

    # --- model and adapters
    compute_dtype: str = _f(
        "auto",
        "Matmul dtype for 4-bit layers: auto = bfloat16 on GPUs of compute capability 8.0 "
        "or newer, float16 on older ones (T4, V100), float32 on CPU (bf16 is ~10x slower there).",
        choices=COMPUTE_DTYPES,
    )
    lora_r: int = _f(
        16,
        "LoRA rank. Memory: r x (in + out) params per adapted matrix, x4 bytes for weights+grads+2 Adam states each.",
        min=1,
    )
    lora_alpha: int = _f(32, "LoRA scale numerator (scale = alpha / r).", min=1)
    lora_dropout: float = _f(
        0.0, "Dropout on the LoRA input; 0 keeps the step-0 policy identical to the reference.", min=0, lt=1
    )
    lora_target_modules: list[str] = _f(
        ["all-linear"], "Module names to adapt; all-linear = every linear layer of the blocks (not lm_head)."
    )
    tokenizer: str | None = _f(
        None,
        "Load the tokenizer (and chat template) from this directory or hub id instead "
        "of the model's; its ids must fit the model's vocabulary.",
    )
    init_adapter: str | None = _f(
        None, "Start from this PEFT adapter (e.g. an SFT adapter); it is also the reference model."
    )
    logits_chunk_size: int = _f(
        1024,
        "Apply lm_head only at response positions, this many at a time, recomputing "
        "in backward (0 = build the full [2B, T, vocab] logits). Memory: chunk x "
        "vocab x 4 B instead of 2B x T x vocab x 4 B.",
        min=0,
    )
    offload_activations: bool = _f(
        False,
        "Keep the tensors saved for backward (with checkpointing: the layer-boundary "
        "activations) in pinned CPU memory, copied on a side stream and brought back a layer "
        "ahead in backward; saves ~2B x T x hidden x 2 B x layers of GPU memory for PCIe traffic.",
    )
    tiled_mlp: int = _f(
        0,
        "Run each layer's MLP over tiles of this many sequence positions (0 = off): its [tokens, intermediate] "
        "activations then exist one tile at a time, in forward, recomputation and backward, for about one more "
        "MLP forward per layer. Pays off for long sequences (e.g. 4096 at 16k+ tokens).",
        min=0,
    )
    share_prompt: bool | None = _f(
        None,
        "Pack each pair as one row prompt+chosen+rejected (rejected masked off the "
        "chosen part): the prompt is computed once, not twice. Unset (auto): on for "
        "every model family where it is exact (qdpo.families), off otherwise; true "
        "forces it and is refused where it cannot be exact.",
    )
    pack_pairs: bool = _f(
        False,
        "With share_prompt: put all pairs of a micro-batch back to back in one row, "
        "no padding (attention per pair). It saves the last few percent of padding; on the "
        "CPU it measured as fast as share_prompt alone. Families that keep the dense mask "
        "(qdpo.attention) then attend over the whole row, which costs more than it saves.",
    )
    precompute_ref_log_probs: bool = _f(
        True,
        "Score every pair with the reference once before training (cached on disk) "
        "instead of a reference forward in every step.",
    )
    gradient_checkpointing: bool = _f(
        True,
        "Recompute each block's activations in backward (non-reentrant). True cuts "
        "activation memory ~L-fold for ~30% more compute.",
    )

    # --- data shaping
    max_length: int = _f(1024, "Longest prompt+response in tokens; longer responses are cut from the right.", min=2)
    max_prompt_length: int = _f(
        512,
        "Longest prompt in tokens; longer prompts are cut from the left (the end "
        "is kept). When only max_length is set below it, it becomes max_length // "
        "2.",
        min=1,
    )
    micro_batch_size: int = _f(
        1, "Pairs per forward pass (each pair is 2 sequences). Memory grows linearly with it.", min=1
    )
    gradient_accumulation_steps: int = _f(
        8, "Micro-batches summed per optimizer step; pairs per step = micro_batch_size x this.", min=1
    )

    # --- the objective
    beta: float = _f(0.1, "How far the policy may drift from the reference (higher = stay closer).", gt=0)
    loss_type: str | list[str] = _f(
        "sigmoid",
        "One loss or a list summed with loss_weights (e.g. [sigmoid, sft]): "
        + ", ".join(LOSS_TYPES)
        + "; `qdpo settings` lists what each is. simpo and orpo need no reference model.",
    )
    loss_weights: list[float] | None = _f(
        None, "Weight of each loss in a loss_type list, in the same order; unset = 1 for each (TRL's loss_weights)."
    )
    label_smoothing: float = _f(
        0.0,
        "Assumed share of flipped labels (cDPO for sigmoid, rDPO for robust, conservative SimPO); in [0, 0.5).",
        min=0,
        lt=0.5,
    )
    sft_weight: float = _f(
        0.0,
        "Deprecated: the same as adding sft to loss_type with this weight (loss_type=[sigmoid, sft] "
        "loss_weights=[1, W]); 0 disables it.",
        min=0,
    )
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma (loss_type=simpo).", min=0)
    orpo_alpha: float = _f(
        0.1, "ORPO's lambda: weight of the odds-ratio term against the chosen NLL (loss_type=orpo).", gt=0
    )
    desirable_weight: float = _f(
        1.0,
        "KTO's lambda_D: weight of the loss on desirable examples. With unbalanced data, desirable_weight x "
        "#desirable / (undesirable_weight x #undesirable) should lie in [1, 4/3] (the KTO paper's advice).",
        gt=0,
    )
    undesirable_weight: float = _f(1.0, "KTO's lambda_U: weight of the loss on undesirable examples.", gt=0)
    ld_alpha: float | None = _f(
        None,
        "LD-DPO (Liu et al. 2024): response tokens past the shorter response of a pair count with this "
        "weight in [0, 1], for policy and reference; unset = plain sums.",
        min=0,
        max=1,
    )
    use_weighting: bool = _f(
        False,
        "WPO (Zhou et al. 2024): weight each pair's loss by the policy's own length-normalised, "
        "aligned probabilities of both responses (detached).",
    )

    # --- optimisation
    learning_rate: float = _f(5e-5, "Peak learning rate of the LoRA parameters.", gt=0)
    lr_scheduler_type: str = _f("linear", "Decay after warmup: linear, cosine or constant.", choices=SCHEDULERS)
    warmup_ratio: float = _f(0.1, "Share of steps spent warming the learning rate up from 0.", min=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA parameters.", min=0)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 disables clipping).", min=0)
    optim: str = _f(
        "adamw",
        "adamw (torch) or paged_adamw_8bit (bitsandbytes; 8-bit states: 4x smaller; paged on a GPU).",
        choices=OPTIMIZERS,
    )
    num_train_epochs: float = _f(1.0, "Passes over the training pairs (ignored when max_steps > 0).", min=0)
    max_steps: int = _f(0, "Optimizer steps to run; 0 = derive from num_train_epochs.", min=0)
    seed: int = _f(42, "Seed for data order, eval split and LoRA init.", min=0, max=2**32 - 1)
    strategy: str = _f(
        "ddp",
        "With several processes (qdpo run --nproc N, or torchrun): ddp keeps the whole 4-bit model on every GPU "
        "and averages the LoRA gradients (faster); fsdp shards the 4-bit base, the LoRA weights and the optimizer "
        "states across the GPUs (torch FSDP2), for a model that does not fit one. One process ignores it.",
        choices=("ddp", "fsdp"),
    )
    offload_params: bool = _f(
        False,
        "strategy=fsdp: keep each GPU's shard of the weights, LoRA, gradients and optimizer states in CPU memory "
        "(FSDP's CPU offload; the optimizer steps on the CPU): the GPU holds only the layers it is computing, "
        "for PCIe traffic every step. How a 70B model trains on 24 GB cards.",
    )

    # --- what the run reports
    logging_steps: int = _f(
        1, "Write a metrics line every this many optimizer steps: the means over those steps, as TRL logs.", min=1
    )
    eval_steps: int = _f(0, "Score the eval split every this many steps (0 = only at the end).", min=0)
    eval_generate: int = _f(
        0,
        "At each eval, greedy-generate answers to the first this many held-out prompts and log them with their "
        "length to generations.jsonl (0 = off); step 0's are the model before tuning. Costs max_new_tokens "
        "forwards per batch of up to 8 prompts.",
        min=0,
    )
    max_new_tokens: int = _f(64, "Longest greedy answer, in new tokens, for eval_generate and `qdpo generate`.", min=1)
    save_steps: int = _f(
        0,
        "Write a checkpoint (adapter, optimizer, RNG, data position, metrics) every "
        "this many optimizer steps and at the last one; `qdpo run --resume DIR` continues "
        "from the newest. 0: none, except on Ctrl-C/SIGTERM.",
        min=0,
    )
    save_total_limit: int = _f(
        2, "Keep only the newest this many checkpoints (each holds the adapter and the optimizer state).", min=1
    )
    max_nonfinite_steps: int = _f(
        5, "Skip an update whose loss or gradients are NaN/Inf; stop the run after this many in a row.", min=1
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's range and the cross-field rules; raise UserError naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}.")
            problem = _out_of_range(value, f.metadata)
            if problem:
                raise UserError(f"{f.name} must {problem}; got {value!r}.")
        if self.max_steps == 0 and self.num_train_epochs <= 0:
            raise UserError("set max_steps or a positive num_train_epochs; both say zero steps.")
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"max_prompt_length ({self.max_prompt_length}) must be less than max_length "
                f"({self.max_length}) to leave room for the response."
            )
        self._check_losses()
        if self.pack_pairs and self.share_prompt is False:
            raise UserError("pack_pairs packs prompt+chosen+rejected runs, so it needs share_prompt=true.")
        if not self.lora_target_modules:
            raise UserError("lora_target_modules must name at least one module (or all-linear).")
        if self.strategy == "fsdp" and self.optim != "adamw":
            raise UserError(
                f"strategy=fsdp shards torch's AdamW states across the GPUs; {self.optim} cannot hold sharded "
                "parameters: set optim=adamw."
            )
        if self.strategy == "fsdp" and "lm_head" in self.lora_target_modules:  # found here, not after loading
            raise UserError("strategy=fsdp keeps lm_head whole and frozen: take lm_head out of lora_target_modules.")
        if self.offload_params and self.strategy != "fsdp":
            raise UserError("offload_params offloads FSDP's shards, so it needs strategy=fsdp.")
        if self.strategy == "fsdp" and self.init_adapter:
            raise UserError(
                "strategy=fsdp does not take init_adapter yet (its frozen reference copy is not sharded); use "
                "strategy=ddp, or start from the merged SFT model."
            )

    def _check_losses(self) -> None:
        """The rules a loss_type (list), its weights and the method settings must follow."""
        types = self.loss_types
        for name in types:
            if name == "dpo":  # what people call it; TRL names DPO's own loss sigmoid too
                raise UserError(
                    "loss_type dpo is called sigmoid (DPO's loss, as TRL names it); set loss_type=sigmoid."
                )
            if name not in LOSS_TYPES:
                raise UserError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {_show(name)}.")
        if len(set(types)) < len(types):
            raise UserError(f"loss_type lists a loss twice ({', '.join(types)}); give each once.")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise UserError(
                f"loss_weights has {len(self.loss_weights)} weights for {len(types)} losses in loss_type; "
                "give one weight per loss."
            )
        if any(not math.isfinite(w) or w < 0 for w in self.loss_weights or []):
            raise UserError(f"loss_weights must be finite and not negative; got {self.loss_weights}.")
        if types == ["sft"]:
            raise UserError("loss_type sft is an extra term on another loss; use e.g. loss_type=[sigmoid, sft].")
        free = [t for t in types if t in REFERENCE_FREE]
        if free and len([t for t in types if t != "sft"]) > 1:
            raise UserError(
                f"loss_type {free[0]} combines only with sft (it needs no reference model); got {', '.join(types)}."
            )
        if "sft" in types and self.sft_weight:
            raise UserError(
                "sft_weight and sft in loss_type both add the chosen NLL; keep only sft with loss_weights."
            )
        if self.label_smoothing and not set(types) & {"sigmoid", "robust", "simpo"}:
            raise UserError(f"label_smoothing applies to loss_type sigmoid, robust or simpo, not {', '.join(types)}.")
        if "kto" in types:
            self._check_kto(types)
        if free and (self.ld_alpha is not None or self.use_weighting):
            which = "ld_alpha" if self.ld_alpha is not None else "use_weighting"
            raise UserError(f"{which} weighs DPO-style losses; loss_type {free[0]} does not take it.")

    def _check_kto(self, types: list[str]) -> None:
        """KTO scores answers one at a time: the options that compare a pair's two responses cannot apply."""
        if types != ["kto"] or self.sft_weight:
            raise UserError(
                f"loss_type kto scores answers one at a time and combines with no other loss; got "
                f"{', '.join(types + (['sft_weight'] if self.sft_weight else []))}. Use loss_type=kto alone."
            )
        paired = [
            name
            for name, on in (
                ("ld_alpha", self.ld_alpha is not None),
                ("use_weighting", self.use_weighting),
                ("label_smoothing", self.label_smoothing > 0),
            )
            if on
        ]
        if paired:
            raise UserError(
                f"{paired[0]} weighs the two responses of a pair, but loss_type kto scores answers one at a time; "
                f"unset {paired[0]}."
            )

    @property
    def unpaired(self) -> bool:
        """Whether the method reads single answers with a desirable/undesirable label (KTO) instead of pairs."""
        return self.loss_types == ["kto"]

    @property
    def loss_types(self) -> list[str]:
        """loss_type as a list (one loss or several)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weighted_losses(self) -> list[tuple[str, float]]:
        """(loss, weight) for every term the loss sums, the deprecated sft_weight included as an sft term."""
        terms = list(zip(self.loss_types, self.loss_weights or [1.0] * len(self.loss_types)))
        return terms + [("sft", self.sft_weight)] if self.sft_weight > 0 else terms

    @property
    def needs_reference(self) -> bool:
        """Whether any loss term compares against the reference model (simpo and orpo, alone or with sft, do not)."""
        return any(t not in REFERENCE_FREE and t != "sft" for t in self.loss_types)

    @property
    def chosen_nll_weight(self) -> float:
        """How much NLL on the chosen response the loss carries (sft terms; orpo has one of weight 1)."""
        return sum(w for t, w in self.weighted_losses if t == "sft") + (1.0 if "orpo" in self.loss_types else 0.0)

    @property
    def batch_layout(self) -> str:
        """How micro-batches are laid out (qdpo.batching.LAYOUTS): plain, shared or packed."""
        return "packed" if self.pack_pairs else "plain" if self.share_prompt is False else "shared"

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able values."""
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    """Names of all Config fields, in declaration order."""
    return [f.name for f in fields(Config)]


def _type_of(name: str) -> Any:
    return typing.get_type_hints(Config)[name]


# Names other tools use for a setting qdpo calls differently (TRL/transformers, axolotl, common shorthand).
ALIASES = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "lora_rank": "lora_r",
    "rank": "lora_r",
    "optimizer": "optim",
    "warmup_steps": "warmup_ratio",
}


def unknown_setting(name: Any) -> UserError:
    """The error for a setting qdpo does not have: the closest known name if one is close, else where to look."""
    normal = str(name).strip().lower().replace("-", "_")
    known = field_names()
    guess = normal if normal in known else ALIASES.get(normal)
    if guess is None:
        close = difflib.get_close_matches(normal, known, n=1, cutoff=0.75)
        containing = [k for k in known if len(normal) >= 4 and normal in k]
        guess = close[0] if close else containing[0] if len(containing) == 1 else None
    hint = f"did you mean {guess}?" if guess else "see `qdpo settings` for the list."
    return UserError(f"unknown setting {_show(name)}; {hint}")


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr() on one line, long ones cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, str) and len(value) > limit:
        return f"{value[: limit - 20]!r}... ({len(value)} characters)"
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 5] + " ..." + text[-1] if text[-1] in ")]}" else text[: limit - 3] + "..."


def coerce(name: str, value: Any) -> Any:
    """Convert a preset/CLI value to field `name`'s type, strictly; raise UserError on a mismatch."""
    hints = typing.get_type_hints(Config)
    if not isinstance(name, str) or name not in hints:
        raise unknown_setting(name)
    typ = hints[name]
    if name == "loss_type":  # one name or a list of them (TRL 1.x): neither an optional nor a plain list
        return _coerce_loss_type(value)
    optional = False
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional, typ = True, args[0]
    want = _describe(typ)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "", "auto")):
        if optional:
            return None
        raise UserError(f"{name} cannot be empty; set it to {want}.")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                raise UserError(f"{name} must be {want} within float range; got {_show(value)}.") from None
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string; users mean a number.
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{name} must be a finite number; got {_show(value)}.")
            return number
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(typ) is list and typing.get_args(typ) == (float,):
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        try:
            numbers = [coerce_number(v) for v in items]
        except (TypeError, ValueError, OverflowError):
            numbers = None
        if numbers and all(math.isfinite(n) for n in numbers):
            return numbers
    elif typing.get_origin(typ) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise UserError(f"{name} must be {want}; got {_show(value)}.")


def coerce_number(value: Any) -> float:
    """A float from a number or a numeric string (not a bool); ValueError/TypeError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _coerce_loss_type(value: Any) -> str | list[str]:
    """loss_type from a name, "a,b" or a list of names; one name stays a plain string."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise UserError(f"loss_type must be a loss name or a list of them (e.g. [sigmoid, sft]); got {_show(value)}.")
    return items[0] if len(items) == 1 else list(items)


def _describe(typ: Any) -> str:
    if typing.get_origin(typ) is list and typing.get_args(typ) == (float,):
        return "a list of numbers (comma-separated on the command line)"
    if typing.get_origin(typ) is list:
        return "a list of names (comma-separated on the command line)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def parse_override(text: str) -> tuple[str, Any]:
    """Split one `key=value` command-line override, with the value read as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value (for example beta=0.2).")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int too long for int(); RecursionError: deep
        value = raw
    kinds = (_type_of(key), *typing.get_args(_type_of(key))) if key in field_names() else ()
    takes_lists = any(typing.get_origin(kind) is list for kind in kinds)
    if takes_lists and raw.lstrip().startswith("[") and not raw.rstrip().endswith("]"):  # unquoted a=[b, c]
        raise UserError(
            f"{key} got {_show(raw)}, a list cut short (the shell splits unquoted words at spaces); quote the whole "
            f"setting, as in '{key}=[a, b]', or write it without spaces."
        )
    # Keep strings that YAML would turn into other things when the field is a string (e.g. a path "123").
    if (
        key in field_names()
        and _type_of(key) in (str, str | None)
        and not isinstance(value, str)
        and value is not None
    ):
        value = raw
    return key, coerce(key, value)


def build_config(
    preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, notes: list[str] | None = None
) -> Config:
    """Resolve dataclass defaults < preset < overrides into one validated Config.

    A value the user did not set (absent from overrides) gives way to one they did: lowering only
    max_length below max_prompt_length derives max_prompt_length = max_length // 2, and says so in notes.
    """
    values: dict[str, Any] = {}
    for source in (preset or {}, overrides or {}):
        for key, value in source.items():
            values[key] = coerce(key, value)
    types = _coerce_loss_type(values.get("loss_type", Config.loss_type))
    types = [types] if isinstance(types, str) else types
    if values.get("sft_weight") and notes is not None:
        weights = values.get("loss_weights") or [1.0] * len(types)
        notes.append(
            f"sft_weight is deprecated; it computes the same as loss_type=[{', '.join(types + ['sft'])}] "
            f"loss_weights=[{', '.join(f'{w:g}' for w in weights + [values['sft_weight']])}], which is the way to "
            "write it"
        )
    free = [t for t in types if t in REFERENCE_FREE]
    if free:  # no reference model at all: nothing to precompute, and forcing it is a contradiction
        if values.get("precompute_ref_log_probs"):
            raise UserError(
                f"loss_type {free[0]} needs no reference model, so precompute_ref_log_probs=true cannot apply; "
                "leave it unset."
            )
        values["precompute_ref_log_probs"] = False
    max_length = values.get("max_length", Config.max_length)
    max_prompt = values.get("max_prompt_length", Config.max_prompt_length)
    if max_prompt >= max_length and "max_prompt_length" not in (overrides or {}) and max_length >= 2:
        values["max_prompt_length"] = max_length // 2
        if notes is not None:
            notes.append(
                f"max_prompt_length {max_prompt} does not fit max_length {max_length}: "
                f"using max_prompt_length {max_length // 2} (set it to choose another)"
            )
    return Config(**values)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a preset/config YAML file into a dict; UserError if it is not a mapping."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}; fix the file and retry.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path} must be a mapping of setting: value.")
    return loaded


def read_json(path: Path) -> Any:
    """Parse a JSON file (config.json, run.json, ...), turning an unreadable or broken one into a UserError."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


PATH_SETTINGS = ("model", "tokenizer", "data", "eval_data", "init_adapter")


def local_path(value: Any) -> Any:
    """An existing local path made absolute; anything else (a hub id, a built-in name, None) as it is."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return os.path.abspath(Path(value).expanduser())
    return value


def absolute_paths(config: Config) -> Config:
    """config with its local paths absolute: what config.yaml records, so a resume, merge or export run from another
    directory still finds them (messages keep the paths as the user typed them)."""
    return dataclasses.replace(config, **{name: local_path(getattr(config, name)) for name in PATH_SETTINGS})
