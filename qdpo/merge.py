"""Merge a LoRA adapter into its base model: stream the base tensor by tensor, add scale·B@A, check the result.

The jobs live in their own modules; this one decides what to write and runs them in order:
qdpo.adapter (find the adapter, its base and its factors), qdpo.nf4 (replay the 4-bit rounding),
qdpo.safetensors_io (read headers, stream sharded files), qdpo.model_files (config and tokenizer),
qdpo.verify (compare logits).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from qdpo.adapter import Adapter, Lora, find_adapter, local_dir, read_lora, resolve_base, trained_device, trained_dtype
from qdpo.errors import UserError
from qdpo.fs import check_output, staged
from qdpo.model import ModelSource
from qdpo.model_files import write_config, write_tokenizer
from qdpo.nf4 import as_trained, model_layout
from qdpo.quiet import quiet_libraries
from qdpo.safetensors_io import SHARD_BYTES, checkpoint_tensors, write_sharded
from qdpo.verify import (
    EVAL_PAIRS,
    Deviation,
    HeldOut,
    Shipped,
    check_prompts,
    held_out_pairs,
    load_merged,
    measure_shipped,
    measure_trained,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# dequantized first: the default, measured on the embedded default to keep the trained model's logits and held-out
# accuracy, where original moved the top token at half the positions (docs/merge_export.md).
ONTO = ("dequantized", "original")


@dataclass
class Planned:
    """One tensor of the merged checkpoint: where it is read from and what it becomes."""

    name: str  # name in the merged checkpoint
    source: str  # name in the base checkpoint (differs only for an untied lm_head)
    file: Path  # base shard holding it
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype written
    lora: Lora | None
    quantized: bool  # held in NF4 by the 4-bit model the adapter was trained on

    @property
    def nbytes(self) -> int:
        """Bytes it takes in the merged checkpoint."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class MergePlan:
    """Everything the merge will write, decided before a byte is written."""

    base_dir: Path
    tensors: list[Planned]
    untied: bool  # lm_head was tied to the embeddings and gets its own copy (LoRA changed one of them)
    onto: str  # "original" or "dequantized" base weights
    compute_dtype: torch.dtype  # what the 4-bit base computed in while training (its NF4 codes depend on it)
    device: torch.device  # where NF4 is computed: the training device when this machine has it

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the largest tensor: what config.json states."""
        return max(self.tensors, key=lambda p: p.nbytes).dtype


@dataclass
class MergeResult:
    """What merge wrote and how close it is to the adapter on the 4-bit base."""

    out: Path
    base: ModelSource
    onto: str
    deviation: Deviation | None  # logits against the trained model (the adapter on the 4-bit base)
    shipped: Shipped | None  # the same, with held-out reward accuracy of both


def plan_merge(
    base_dir: Path,
    base_name: str,
    loras: dict[str, Lora],
    dtype: torch.dtype | None,
    onto: str,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> MergePlan:
    """Decide every tensor of the merged checkpoint, refusing an adapter that does not fit the base."""
    tensors = checkpoint_tensors(base_dir)
    quantized, tied = model_layout(base_dir)
    # PEFT applies a LoRA on a tied lm_head (or embedding) to that one use only, so such a model
    # must come out untied: lm_head gets its own copy of the embedding matrix.
    untie = {
        head: emb
        for head, emb in tied.items()
        if head not in tensors and emb in tensors and (head in loras or emb in loras)
    }
    for name, lora in loras.items():
        source = untie.get(name, name)
        if source not in tensors:
            raise UserError(
                f"the adapter changes {name.removesuffix('.weight')}, which base model {base_name} does not have; "
                "pass the base it was trained on with --base."
            )
        shape = tensors[source][1]
        got = next(
            (
                s
                for s in (lora.shape, lora.weight.shape if lora.weight is not None else None)
                if s not in (None, shape)
            ),
            None,
        )
        if got is not None:
            raise UserError(
                f"the adapter does not fit base model {base_name}: {name} is {list(shape)} there "
                f"but {list(got)} in the adapter; pass the base it was trained on with --base."
            )
    names = [(name, name) for name in tensors] + list(untie.items())
    planned = []
    for name, source in names:
        file, shape, disk_dtype = tensors[source]
        out_dtype = dtype if dtype is not None and disk_dtype.is_floating_point else disk_dtype
        planned.append(Planned(name, source, file, shape, out_dtype, loras.get(name), name in quantized))
    return MergePlan(base_dir, planned, bool(untie), onto, compute_dtype, device)


def merged_tensors(plan: MergePlan) -> Iterator[torch.Tensor]:
    """Each merged tensor in plan order, read from the base one at a time."""
    from safetensors import safe_open

    opened: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        for p in plan.tensors:
            if p.file not in opened:
                opened[p.file] = stack.enter_context(safe_open(str(p.file), "pt"))
            if p.lora is not None and p.lora.weight is not None:
                weight = p.lora.weight  # what PEFT loads into the layer, over the base's copy
            else:
                weight = opened[p.file].get_tensor(p.source)
            if weight.is_floating_point():
                if plan.onto == "dequantized":
                    weight = as_trained(weight, p.quantized, plan.compute_dtype, plan.device)
                if p.lora is not None:
                    weight = weight.float() + p.lora.delta()  # in fp32: the rounding happens once, on the way out
            yield weight.to(p.dtype)


def write_merged(
    target: Path,
    adapter: Adapter,
    source: ModelSource,
    plan: MergePlan,
    max_shard_bytes: int,
    echo: Callable[[str], None],
) -> None:
    """Write a complete transformers directory: weights, config, generation config, tokenizer, provenance."""
    target.mkdir(exist_ok=True)
    write_sharded(target, plan.tensors, merged_tensors(plan), max_shard_bytes, echo)
    write_config(target, plan.base_dir, plan.dtype, plan.untied)
    write_tokenizer(target, adapter.path, plan.base_dir)
    provenance = {
        "adapter": str(adapter.path.resolve()),
        "base_dir": str(plan.base_dir),
        "onto": plan.onto,
        "base_model": {"name": source.name, "path": source.path, "gguf_file": source.gguf_file},
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch.") if plan.onto == "dequantized" else None,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "run": adapter.run,
    }
    (target / "qdpo_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")


def held_out_for_check(adapter: Adapter, eval_pairs: int, echo: Callable[[str], None]) -> HeldOut | None:
    """The run's held-out pairs to compare accuracies on, or None (said in one line) when there are none to use."""
    if eval_pairs <= 0:
        return None
    try:
        return held_out_pairs(adapter, eval_pairs)
    except UserError as e:
        echo(f"held-out accuracy not measured: {e}")
        return None


def check_merge(
    model_dir: Path, adapter: Adapter, source: ModelSource, plan: MergePlan, held_out: HeldOut | None
) -> Shipped:
    """Load the merged directory back with plain transformers and measure it against the adapter on 4-bit.

    One model at a time: the 4-bit model's logits and reference table are kept, the model itself freed before
    the merged one loads.
    """
    from transformers import AutoTokenizer

    prompts = check_prompts(AutoTokenizer.from_pretrained(model_dir))
    trained = measure_trained(adapter, source, plan.compute_dtype, prompts, held_out)
    return measure_shipped(load_merged(model_dir), trained, prompts)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """bf16/fp16/fp32 → torch dtype; None keeps the base checkpoint's own."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}.")
    return DTYPES[name]


def prepare(
    path: str | Path, base: str | None, dtype: str | None, onto: str
) -> tuple[Adapter, ModelSource, MergePlan]:
    """Read the adapter, find its base and plan the merge: every user error surfaces here, before any write."""
    if onto not in ONTO:
        raise UserError(f"--onto must be one of {', '.join(ONTO)}, not {onto!r}.")
    out_dtype = parse_dtype(dtype)
    adapter = find_adapter(path)
    loras = read_lora(adapter)
    source = resolve_base(adapter, base)
    plan = plan_merge(
        local_dir(source), source.name, loras, out_dtype, onto, trained_dtype(adapter), trained_device(adapter)
    )
    if plan.untied and adapter.config.get("ensure_weight_tying"):
        raise UserError(
            f"{adapter.path} keeps LoRA on tied embeddings tied (ensure_weight_tying); "
            "qdpo merge does not handle that."
        )
    return adapter, source, plan


def merge(
    path: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str | None = None,
    onto: str = ONTO[0],
    overwrite: bool = False,
    check: bool = True,
    echo: Callable[[str], None] = print,
    max_shard_bytes: int = SHARD_BYTES,
    eval_pairs: int = EVAL_PAIRS,
) -> MergeResult:
    """Merge the adapter of a run (or an adapter directory) into its base and write a plain transformers directory.

    check loads the result and compares it with the trained model (the adapter on the 4-bit base): logits on a few
    prompts and, on the first eval_pairs held-out pairs of the run (0: none), the reward accuracy of both.
    """
    quiet_libraries()
    out = Path(out).expanduser()
    check_output(out, overwrite, marker="config.json")
    adapter, source, plan = prepare(path, base, dtype, onto)
    echo(f"merging {adapter.path} into {source.name} ({onto} weights, {len(plan.tensors)} tensors) -> {out}")
    with staged(out) as tmp:
        write_merged(tmp, adapter, source, plan, max_shard_bytes, echo)
    echo(f"merged model: {out}  (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    shipped = None
    if check:
        shipped = check_merge(out, adapter, source, plan, held_out_for_check(adapter, eval_pairs, echo))
        expected = "float noise expected" if onto == "dequantized" else "the 4-bit quantization error shows here"
        echo(
            "against the trained model (the adapter on the 4-bit base): largest logit deviation "
            f"{shipped.deviation.describe()}; {expected}"
        )
        if shipped.accuracy is not None:
            echo(shipped.describe())
    return MergeResult(out, source, onto, shipped.deviation if shipped else None, shipped)
