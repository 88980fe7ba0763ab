"""The memory planner against measured bytes on the CPU, and `qdpo plan` for every shipped preset.

Measured on tiny random Llama/Mistral/Qwen2-shaped models (hidden sizes multiples of 64, so every block
linear really is NF4) and on the real SmolLM2-135M, loaded exactly as a run loads them, with both batch
layouts (shared-prompt rows, chosen/rejected as two rows, and all pairs packed into one row), fp32 and (one shape) bf16:

1. resident bytes: parameter + buffer storages + bitsandbytes quant_state tensors (absmax, nested absmax,
   offset, code tables), each storage counted once, vs the plan's weight lines;
2. saved bytes: every storage autograd keeps for backward during preference_loss + backward, seen through
   torch.autograd.graph.saved_tensors_hooks and counted once per storage. Parameters, buffers and quant
   states are excluded: they are the weight lines (bitsandbytes keeps its packed weight on ctx, not through
   save_for_backward, so hooks never see it anyway). With non-reentrant checkpointing the hooks see the layer
   boundaries (checkpoint saves its inputs) but not the recomputation, which runs under checkpoint's own
   hooks; the recomputed layer is measured as layer 1's saved bytes in the same model without checkpointing;
3. peak bytes: the CPU allocator's high-water mark during the step (torch.profiler memory events), with LoRA
   gradients already allocated as under gradient accumulation, vs the plan's saved + working-memory lines.
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qdpo import attention
from qdpo import plan as P
from qdpo.batching import Batch
from qdpo.batching import make_batch as build_batch
from qdpo.cli_plan import plan as plan_command
from qdpo.config import Config, build_config, field_names
from qdpo.errors import UserError
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.presets import available, load_preset
from qdpo.shapes import BUILTIN_SHAPES
from qdpo.step import preference_loss
from qdpo.tiled_mlp import tile_mlps
from qdpo.tokenize import TokenizedPair

CPU = torch.device("cpu")
LAYOUTS = ["shared", "plain", "packed"]  # qdpo.batching.LAYOUTS, in the order the report prints them
TOLERANCE = 0.10  # plan within 10% of what was measured

# name: (architecture, sizes); hidden and MLP widths are multiples of 64 (one NF4 block)
SHAPES = {
    "llama-mha": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        ),
    ),
    "mistral-gqa": (
        "mistral",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1024,
        ),
    ),
    "qwen2-mqa": (
        "qwen2",
        dict(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            vocab_size=768,
        ),
    ),
}
BATCH = dict(pairs=2, length=80, prompt=24)  # 4 sequences x 80 tokens, responses from token 24 on


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on these small matrices a second thread only spins against whatever
    else shares the CPU (a tiny step measured 0.4 s on one thread, 16 s on two, on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settings(checkpointing: bool, dtype: str = "float32", chunk: int = 0, layout: str = "shared", **extra) -> Config:
    """The run settings the measurements use (LoRA r=8 on all block linears, full logits unless chunk > 0)."""
    extra["logits_chunk_size"] = chunk
    extra["share_prompt"] = layout != "plain"
    extra["pack_pairs"] = layout == "packed"
    return Config(
        model="x",
        data="y",
        lora_r=8,
        lora_alpha=16,
        gradient_checkpointing=checkpointing,
        compute_dtype=dtype,
        **extra,
    )


def save_tiny(name: str, tmp_path_factory, shapes: dict = SHAPES) -> tuple[str, Path, dict]:
    """A tiny random model of shape `name` saved as a transformers directory, with its config.json."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        StableLmConfig,
    )

    arch, sizes = shapes[name]
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma2": Gemma2Config}
    cls = {**classes, "stablelm": StableLmConfig}[arch]
    path = tmp_path_factory.mktemp(name)
    config = cls(
        max_position_embeddings=sizes.pop("max_position_embeddings", 256),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **sizes,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return name, path, json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module", params=list(SHAPES))
def shape_dir(request, tmp_path_factory) -> tuple[str, Path, dict]:
    """Each tiny shape in turn."""
    return save_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory) -> tuple[str, Path, dict]:
    """The Mistral-shaped (GQA) model alone, for checks one shape is enough for."""
    return save_tiny("mistral-gqa", tmp_path_factory)


def load(path: Path, config: Config):
    """The policy exactly as a run builds it: 4-bit base + LoRA, in training mode."""
    dtype = getattr(torch, config.compute_dtype)
    base = load_base_4bit(ModelSource(str(path), str(path)), dtype, CPU, config.gradient_checkpointing)
    model = add_lora(base, config.lora_r, config.lora_alpha, 0.0, config.lora_target_modules, None, seed=0)
    if config.tiled_mlp:
        tile_mlps(model, config.tiled_mlp)
    model.train()
    return model


def make_batch(pairs: int, length: int, prompt: int, vocab: int, layout: str) -> Batch:
    """Pairs of a `prompt`-token prompt and responses filling `length`, every other rejected one 5 tokens short
    (so the batch is padded, as length-grouped batches are), in the layout the run uses."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    tokenized = [
        TokenizedPair(ids(prompt), ids(length - prompt), ids(length - prompt - 5 * (i % 2 == 0))) for i in range(pairs)
    ]
    return build_batch(tokenized, 0, layout)


def batch_for(model_config: dict, config: Config, batch: dict = BATCH) -> Batch:
    """The measured micro-batch for this config."""
    return make_batch(
        batch["pairs"], batch["length"], batch["prompt"], model_config["vocab_size"], config.batch_layout
    )


def resident_bytes(model) -> tuple[dict[str, int], set[int]]:
    """Bytes per kind (4bit, quant, frozen, lora) of every storage the model holds, and those storages' addresses."""
    import bitsandbytes as bnb

    seen: dict[int, tuple[str, int]] = {}

    def add(kind: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), (kind, storage.nbytes()))

    quantized = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quantized.add(id(module.weight))
            add("4bit", module.weight)
            qs = module.weight.quant_state
            for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
                add("quant", t)
    for p in model.parameters():
        if id(p) not in quantized:
            add("lora" if p.requires_grad else "frozen", p)
    for b in model.buffers():
        add("frozen", b)
    kinds: dict[str, int] = {}
    for kind, nbytes in seen.values():
        kinds[kind] = kinds.get(kind, 0) + nbytes
    return kinds, set(seen)


def saved_bytes(model, batch: Batch, config: Config, layer: int = 1) -> tuple[int, int]:
    """Bytes of the storages autograd saves for backward in one step: all of them, and those saved inside decoder `layer`."""
    weights = resident_bytes(model)[1]
    saved: dict[int, int] = {}
    in_layer: set[int] = set()
    inside = [False]
    block = model.get_base_model().model.layers[layer]
    hooks = [
        block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
        block.register_forward_hook(lambda *a: inside.__setitem__(0, False)),
    ]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
            if inside[0]:
                in_layer.add(storage.data_ptr())
        return t

    try:
        step_with_hooks(model, batch, config, pack)
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), sum(saved[k] for k in in_layer)


def step_with_hooks(model, batch: Batch, config: Config, pack) -> None:
    """One step whose forward runs under saved_tensors_hooks(pack) (the hooks only see forward-time saves)."""
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, *_ = preference_loss(model, batch, config, torch.zeros(2 * batch.num_pairs))
    losses.sum().backward()


def peak_bytes(model, batch: Batch, config: Config) -> int:
    """High-water mark of CPU tensor memory allocated during one step, above what existed before it."""
    return step_allocations(model, batch, config)[0]


def step_allocations(model, batch: Batch, config: Config) -> tuple[int, int]:
    """One step's high-water mark of CPU tensor memory above what existed before it, and its largest allocation."""
    profiler = pytest.importorskip("torch.profiler")
    _EventType = getattr(pytest.importorskip("torch._C._profiler"), "_EventType", None)
    assert _EventType is not None, "this torch has no profiler event tree: the peak measurement needs a new way in"

    for p in model.parameters():
        if p.requires_grad:  # gradients exist before the step, as from the second accumulation micro-step on
            p.grad = torch.zeros_like(p)
    gc.collect()  # old models freed mid-step would show up as frees of blocks this step never allocated
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step_with_hooks(model, batch, config, lambda t: t)
    events = []

    def walk(nodes) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
                fields = node.extra_fields
                events.append((node.start_time_ns, fields.alloc_size, fields.ptr))  # negative size: a free
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    blocks: dict[int, int] = {}  # only blocks allocated during the step count, and so only their frees
    live = peak = largest = 0
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            blocks[ptr] = size
            live += size
            largest = max(largest, size)
        elif ptr in blocks:
            live -= blocks.pop(ptr)
        peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak, largest


def plan_for(model_config: dict, config: Config, batch: dict = BATCH) -> P.Plan:
    """The CPU plan of the measured micro-batch."""
    return P.plan_memory(
        model_config, config, batch["pairs"], batch["length"], prompt_len=batch["prompt"], device="cpu"
    )


def close(planned: int, measured: int, tolerance: float = TOLERANCE) -> bool:
    """Planned within tolerance of measured."""
    return abs(planned - measured) <= tolerance * measured


def report(name: str, rows: list[tuple[str, int, int]]) -> None:
    """Print measured vs planned (pytest -s shows it)."""
    for part, measured, planned in rows:
        print(f"{name:<40} {part:<32} measured {measured:>12,} planned {planned:>12,} ({planned / measured - 1:+.1%})")


# ---------------------------------------------------------------- 1. what the loaded model holds


def check_resident(name: str, path: Path, model_config: dict, config: Config, model=None) -> None:
    """Each weight line of the plan within 10% of the bytes the loaded model holds."""
    model = model if model is not None else load(path, config)
    measured, _ = resident_bytes(model)
    plan = plan_for(model_config, config)
    rows = [
        ("4-bit weights", measured["4bit"], plan.bytes_of(P.WEIGHTS_4BIT)),
        ("quantization state", measured["quant"], plan.bytes_of(P.QUANT_STATE)),
        ("frozen (embeddings, norms)", measured["frozen"], plan.bytes_of(P.FROZEN)),
        ("LoRA weights", measured["lora"], plan.bytes_of(P.LORA)),
        ("all resident", sum(measured.values()), plan.bytes_of(*P.RESIDENT_PARTS)),
    ]
    report(name, rows)
    for part, m, p in rows:
        assert close(p, m), f"{name} {part}: planned {p} vs measured {m}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resident_bytes_match_plan(shape_dir, dtype):
    name, path, model_config = shape_dir
    check_resident(f"{name} {dtype}", path, model_config, settings(False, dtype))


# ---------------------------------------------------------------- 2. what autograd keeps for backward


def check_saved(name: str, path: Path, model_config: dict, config: Config, model=None) -> None:
    """Saved-for-backward bytes vs the plan's activation + logits lines (and the recomputed layer)."""
    model = model if model is not None else load(path, config)
    batch = batch_for(model_config, config)
    plan = plan_for(model_config, config)
    measured, _ = saved_bytes(model, batch, config)
    planned = plan.bytes_of(P.BOUNDARIES, P.LAYERS, P.OTHER_SAVED, P.LOGITS)
    rows = [
        (
            "saved: " + ("boundaries+final+logits" if config.gradient_checkpointing else "all layers+final+logits"),
            measured,
            planned,
        )
    ]
    if config.gradient_checkpointing:
        plain = load(path, Config(**{**config.to_dict(), "gradient_checkpointing": False}))
        rows.append(
            ("saved: one layer (recomputed)", saved_bytes(plain, batch, config)[1], plan.bytes_of(P.RECOMPUTE))
        )
    report(name, rows)
    for part, m, p in rows:
        assert close(p, m), f"{name} {part}: planned {p} vs measured {m}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan(shape_dir, checkpointing, layout):
    name, path, model_config = shape_dir
    check_saved(
        f"{name} {layout} ckpt={int(checkpointing)}", path, model_config, settings(checkpointing, layout=layout)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan_in_bf16(gqa_dir, checkpointing, layout):
    """bf16 on the CPU (slow for real models, fine for tiny ones) checks the dtype accounting GPU plans rely on:
    fp32 LoRA-input copies, fp32 RMSNorm internals, bf16 attention/MLP tensors."""
    name, path, model_config = gqa_dir
    check_saved(
        f"{name} bf16 {layout} ckpt={int(checkpointing)}",
        path,
        model_config,
        settings(checkpointing, "bfloat16", layout=layout),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan_with_chunked_logits(gqa_dir, checkpointing, layout):
    name, path, model_config = gqa_dir
    check_saved(
        f"{name} chunk=16 {layout} ckpt={int(checkpointing)}",
        path,
        model_config,
        settings(checkpointing, chunk=16, layout=layout),
    )


@pytest.mark.parametrize(
    "targets", [["o_proj", "down_proj"], ["q_proj", "v_proj", "lm_head"]], ids=["o+down", "q+v+lm_head"]
)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan_for_other_lora_targets(gqa_dir, targets, checkpointing):
    """Which modules carry LoRA decides what is saved, and where gradients start in layer 0."""
    name, path, model_config = gqa_dir
    config = Config(**{**settings(checkpointing).to_dict(), "lora_target_modules": targets})
    check_resident(f"{name} {'+'.join(targets)}", path, model_config, config)
    check_saved(f"{name} {'+'.join(targets)} ckpt={int(checkpointing)}", path, model_config, config)


@pytest.mark.parametrize("layout", ["plain", "shared"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan_with_tiled_mlp(gqa_dir, checkpointing, layout):
    """tiled_mlp: each layer's MLP keeps only its input; the plan drops gate/up/act and the MLP's LoRA inputs."""
    name, path, model_config = gqa_dir
    config = settings(checkpointing, layout=layout, tiled_mlp=16)
    check_saved(f"{name} tiled_mlp=16 {layout} ckpt={int(checkpointing)}", path, model_config, config)
    untiled = plan_for(model_config, settings(checkpointing, layout=layout))
    assert plan_for(model_config, config).bytes_of(P.RECOMPUTE, P.LAYERS) < untiled.bytes_of(P.RECOMPUTE, P.LAYERS)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan_with_a_sliding_window(tmp_path_factory, checkpointing, layout, monkeypatch):
    """A window of 16 that cuts the 80-token rows, in blocks of 8 queries (qdpo.attention.windowed): every layout
    runs the blocks, and the plan counts what they save (the CPU's rejected call on its own queries only)."""
    monkeypatch.setattr(attention, "BLOCK", 8)
    arch, sizes = SHAPES["mistral-gqa"]
    name, path, model_config = save_tiny(
        "mistral-window", tmp_path_factory, {"mistral-window": (arch, {**sizes, "sliding_window": 16})}
    )
    config = settings(checkpointing, chunk=16, layout=layout)
    before = attention.calls
    check_saved(f"{name} window=16 {layout} ckpt={int(checkpointing)}", path, model_config, config)
    assert attention.calls > before  # the windowed blocks ran, not transformers' mask
    unwindowed = plan_for({**model_config, "sliding_window": None}, config).bytes_of(P.RECOMPUTE, P.LAYERS)
    assert plan_for(model_config, config).bytes_of(P.RECOMPUTE, P.LAYERS) != unwindowed or layout == "plain"


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_stablelm_takes_the_spans_without_a_mask_and_the_plan_counts_them(tmp_path_factory, layout):
    """StableLM's layers drop the attention kwargs; qdpo hands its spans on, so its shared rows (recomputed under
    checkpointing too) run the causal calls with no [T, T] mask, as the plan says."""
    from qdpo.step import DENSE_ONLY

    sizes = dict(SHAPES["llama-mha"][1])
    name, path, model_config = save_tiny("stablelm", tmp_path_factory, {"stablelm": ("stablelm", sizes)})
    config = settings(True, chunk=16, layout=layout)
    model = load(path, config)
    before = attention.calls
    check_saved(f"{name} {layout} ckpt=1", path, model_config, config, model)
    assert attention.calls > before and model.get_base_model() not in DENSE_ONLY
    assert any("no mask" in a for a in plan_for(model_config, config).assumptions)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_saved_tensors_match_plan_for_soft_capped_gemma2(tmp_path_factory, checkpointing, layout, monkeypatch):
    """Gemma-2 (soft-capped scores, a window of 16 that cuts the rows, post-attention and post-feedforward norms):
    qdpo.capped_attention's blocks save q, k, v, the output and a logsumexp, and the plan counts them and the
    extra norms, on every layout."""
    from qdpo import capped_attention

    monkeypatch.setattr(capped_attention, "SCORES_PER_BLOCK", 1)  # blocks of 16 queries
    sizes = dict(SHAPES["mistral-gqa"][1], head_dim=32, sliding_window=16)
    name, path, model_config = save_tiny("gemma2-capped", tmp_path_factory, {"gemma2-capped": ("gemma2", sizes)})
    config = settings(checkpointing, chunk=16, layout=layout)
    before = attention.calls
    check_saved(f"{name} {layout} ckpt={int(checkpointing)}", path, model_config, config)
    assert attention.calls > before  # the capped blocks ran, not the eager path


# ---------------------------------------------------------------- 3. the step's high-water mark

PEAK_TOLERANCE = 0.15  # working memory is fitted, not derived: the plan landed 4% under to 7% over on these shapes


def check_peak(name: str, path: Path, model_config: dict, config: Config) -> None:
    """The step's measured high-water mark vs the plan's saved + working-memory lines."""
    model = load(path, config)
    batch = batch_for(model_config, config)
    planned = step_peak(plan_for(model_config, config))
    measured = peak_bytes(model, batch, config)
    report(name, [("step peak above resident", measured, planned)])
    assert close(planned, measured, PEAK_TOLERANCE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_step_peak_matches_plan(shape_dir, checkpointing, layout):
    name, path, model_config = shape_dir
    check_peak(
        f"{name} {layout} ckpt={int(checkpointing)}", path, model_config, settings(checkpointing, layout=layout)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, chunk", [("bfloat16", 0), ("float32", 16), ("bfloat16", 16)])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_step_peak_matches_plan_in_bf16_and_with_chunked_logits(gqa_dir, dtype, chunk, checkpointing, layout):
    name, path, model_config = gqa_dir
    check_peak(
        f"{name} {dtype} chunk={chunk} {layout} ckpt={int(checkpointing)}",
        path,
        model_config,
        settings(checkpointing, dtype, chunk, layout),
    )


def step_peak(plan: P.Plan) -> int:
    """The plan's peak above what exists between steps (weights, LoRA grads, optimizer states, runtime)."""
    between_steps = set(P.RESIDENT_PARTS) | {P.LORA_GRADS, P.OPTIMIZER, P.OVERHEAD}
    return sum(line.bytes for line in plan.lines if line.counted and line.part not in between_steps)


# ---------------------------------------------------------------- the real SmolLM2-135M (30 layers, tied, 49k vocab)


def test_smollm2_resident_and_saved_match_plan(smollm2_dir):
    """One load (quantizing 135M params takes most of this test), then the checkpointed step (saved bytes and
    peak) and the plain one."""
    model_config = json.loads((smollm2_dir / "config.json").read_text())
    config = settings(True)
    model = load(smollm2_dir, config)
    check_resident("smollm2", smollm2_dir, model_config, config, model)
    small = dict(pairs=2, length=40, prompt=12)
    batch = batch_for(model_config, config, small)
    plan = plan_for(model_config, config, small)
    boundaries, _ = saved_bytes(model, batch, config)
    peak = peak_bytes(model, batch, config)
    model.get_base_model().gradient_checkpointing_disable()
    plain_config = settings(False)
    plain_plan = plan_for(model_config, plain_config, small)
    everything, layer = saved_bytes(model, batch, plain_config)
    rows = [
        ("saved: boundaries+final+logits", boundaries, plan.bytes_of(P.BOUNDARIES, P.OTHER_SAVED, P.LOGITS)),
        ("saved: one layer (recomputed)", layer, plan.bytes_of(P.RECOMPUTE)),
        ("saved: all layers+final+logits", everything, plain_plan.bytes_of(P.LAYERS, P.OTHER_SAVED, P.LOGITS)),
    ]
    report("smollm2", rows + [("step peak above resident (ckpt)", peak, step_peak(plan))])
    for part, m, p in rows:
        assert close(p, m), f"smollm2 {part}: planned {p} vs measured {m}"
    assert close(step_peak(plan), peak, PEAK_TOLERANCE)


# ---------------------------------------------------------------- planner rules without a model

MISTRAL = BUILTIN_SHAPES["mistralai/Mistral-7B-v0.3"][1]


def test_largest_fit_is_the_edge_of_the_budget():
    config = build_config(load_preset("7b-24gb").settings)
    batch, length = P.largest_fit(MISTRAL, config, 24)
    assert batch >= 1 and length >= config.max_length
    budget = 24e9
    assert P.plan_memory(MISTRAL, config, batch).total <= budget < P.plan_memory(MISTRAL, config, batch + 1).total
    assert (
        P.plan_memory(MISTRAL, config, 1, length).total <= budget < P.plan_memory(MISTRAL, config, 1, length + 1).total
    )
    assert P.largest_fit(MISTRAL, config, 3) == (0, 0)  # the 4-bit weights alone are 3.6 GB


def test_compute_dtype_and_optimizer_change_the_right_lines():
    base = build_config(load_preset("7b-24gb").settings)
    bf16 = P.plan_memory(MISTRAL, base)
    fp32 = P.plan_memory(MISTRAL, build_config(load_preset("7b-24gb").settings, {"compute_dtype": "float32"}))
    assert bf16.dtype == "bfloat16" and fp32.dtype == "float32"
    assert fp32.bytes_of(P.FROZEN) == pytest.approx(2 * bf16.bytes_of(P.FROZEN), rel=0.01)
    assert fp32.bytes_of(P.BOUNDARIES) == 2 * bf16.bytes_of(P.BOUNDARIES)
    assert fp32.bytes_of(P.WEIGHTS_4BIT) == bf16.bytes_of(P.WEIGHTS_4BIT)
    paged = P.plan_memory(MISTRAL, build_config(load_preset("7b-24gb").settings, {"optim": "paged_adamw_8bit"}))
    assert paged.bytes_of(P.OPTIMIZER) == pytest.approx(bf16.bytes_of(P.OPTIMIZER) / 4, rel=0.02)


@pytest.mark.skipif("offload_activations" not in field_names(), reason="this checkout has no offload_activations")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_offloaded_activations_leave_the_gpu_total(checkpointing):
    """offload_activations: what autograd saves outside checkpointed regions sits in pinned CPU memory; one
    layer's worth comes back for its backward (not measurable on a CPU-only machine: planned from the code)."""
    preset = load_preset("7b-24gb").settings
    kept = P.plan_memory(MISTRAL, build_config(preset, {"gradient_checkpointing": checkpointing}))
    moved = P.plan_memory(
        MISTRAL, build_config(preset, {"gradient_checkpointing": checkpointing, "offload_activations": True})
    )
    part = P.BOUNDARIES if checkpointing else P.LAYERS
    offloaded = [line for line in moved.lines if line.part == part]
    assert offloaded and not offloaded[0].counted and "pinned CPU memory" in offloaded[0].note
    assert moved.total < kept.total - 0.5 * kept.bytes_of(part)


def test_soft_capped_heads_are_planned_in_chunks_on_the_plain_layout_too():
    """qdpo.step applies lm_head and the family's soft cap in chunks on every layout (qdpo.families.OutputHead):
    the saved logits are the gathered hidden states, 2 x B x (max_length - 1) response positions x hidden x 2 B plus
    three int64 indices each, not [positions, vocab] fp32 logits."""
    gemma2 = {**MISTRAL, "model_type": "gemma2", "final_logit_softcapping": 30.0, "vocab_size": 256000}
    config = build_config(load_preset("7b-24gb").settings, {"share_prompt": False})
    positions = 2 * config.micro_batch_size * (config.max_length - 1)
    assert P.plan_memory(gemma2, config).bytes_of(P.LOGITS) == positions * (4096 * 2 + 3 * 8)
    whole = P.plan_memory(gemma2, replace(config, logits_chunk_size=0)).bytes_of(P.LOGITS)
    assert whole > positions * 256000 * 4  # logits_chunk_size=0: the fp32 logits themselves


def test_unknown_lora_target_is_a_user_error():
    with pytest.raises(UserError, match="planner knows LoRA targets"):
        P.plan_memory(MISTRAL, Config(model="x", data="y", lora_target_modules=["w1"]))


# ---------------------------------------------------------------- the command


def invoke(*args: str):
    return CliRunner().invoke(plan_command, list(args))


@pytest.mark.parametrize("preset", available())
def test_plan_command_for_every_preset(preset):
    result = invoke("--preset", preset)
    assert result.exit_code == 0, result.output
    total = "total (peak of one step)" if load_preset(preset).processes == 1 else "total per GPU (peak of one step)"
    assert total in result.output and "model shape from" in result.output
    if load_preset(preset).gpu_memory_gb:
        assert "largest micro_batch_size at max_length" in result.output
        assert "built-in" in result.output  # offline: the shipped shape, and the output says so
    print(result.output)


def test_plan_command_reads_a_model_directory_or_config_file(tiny_model_dir):
    by_dir = invoke("--preset", "7b-24gb", "--model", str(tiny_model_dir))
    by_file = invoke(
        "--preset", "7b-24gb", "--model", str(tiny_model_dir / "config.json"), "max_length=512", "max_prompt_length=64"
    )
    assert by_dir.exit_code == 0 and by_file.exit_code == 0, by_dir.output + by_file.output
    assert f"model shape from {tiny_model_dir / 'config.json'}" in by_dir.output
    assert "max_length 512" in by_file.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--model", "/no/such/dir"], "model path /no/such/dir does not exist"),
        (["--model", "README.md"], "model path README.md is a file, not a model"),
        (["--model", "/no/such/config.json"], "config file /no/such/config.json does not exist"),
        (["--model", "someone/unknown-model"], "no config.json for someone/unknown-model offline"),
        (["bogus=1"], "unknown setting 'bogus'"),
        (["--budget-gb", "-1"], "budget must be a positive number"),
    ],
)
def test_plan_command_user_errors_are_one_sentence(args, message):
    result = invoke(*args)
    assert isinstance(result.exception, UserError), result.output
    text = str(result.exception)
    assert message in text and "\n" not in text and text.endswith(".")


def test_plan_command_rejects_a_config_that_is_not_a_decoder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    result = invoke("--model", str(tmp_path))
    assert isinstance(result.exception, UserError) and "Llama-style decoder" in str(result.exception)


# ---------------------------------------------------------------- the presets' hand estimates


def hand_estimates(preset: str) -> dict[str, float]:
    """GB per category from the 'Where memory goes' comment block of a preset file."""
    categories = {
        "weights": ("NF4", "double-quantized"),
        "embeddings": ("embeddings",),
        "lora": ("LoRA", "AdamW states"),
        "boundaries": ("boundaries",),
        "recompute": ("recomputed",),
        "logits": ("logits:",),
        "overhead": ("CUDA",),
        "total": ("total",),
    }
    found: dict[str, float] = {}
    for line in load_preset(preset).path.read_text().splitlines():
        m = re.match(r"#\s+(.*?)\s+~?([\d.]+) GB$", line)
        if not m:
            continue
        for category, keys in categories.items():
            if any(k in m.group(1) for k in keys):
                found[category] = found.get(category, 0.0) + float(m.group(2))
                break
    return found


PLANNED_CATEGORIES = {
    "weights": (P.WEIGHTS_4BIT, P.QUANT_STATE),
    "embeddings": (P.FROZEN,),
    "lora": (P.LORA, P.LORA_GRADS, P.OPTIMIZER),
    "boundaries": (P.BOUNDARIES,),
    "recompute": (P.RECOMPUTE, P.LAYER_WORK),
    "logits": (P.LOGITS, P.LOGITS_WORK),
    "overhead": (P.OVERHEAD,),
}


@pytest.mark.parametrize("preset", ["7b-24gb", "8b-24gb", "7b-16gb"])
def test_preset_memory_comments_agree_with_the_plan(preset):
    """Each GPU preset's 'where memory goes' comment quotes the plan of its own settings: every line within 5%."""
    hand = hand_estimates(preset)
    assert {"weights", "embeddings", "lora", "boundaries", "total"} <= set(hand), hand
    model = load_preset(preset).settings["model"]
    planned = P.plan_memory(BUILTIN_SHAPES[model][1], build_config(load_preset(preset).settings))
    for category, parts in PLANNED_CATEGORIES.items():
        if category in hand:
            print(
                f"{preset} {category:<11} hand {hand[category]:6.2f} GB  planned {planned.bytes_of(*parts) / 1e9:6.2f} "
                "GB"
            )
    print(f"{preset} {'total':<11} hand {hand['total']:6.2f} GB  planned {planned.total / 1e9:6.2f} GB")
    for category in ("weights", "embeddings", "lora", "boundaries", "recompute", "overhead"):
        assert planned.bytes_of(*PLANNED_CATEGORIES[category]) / 1e9 == pytest.approx(hand[category], rel=0.05), (
            category
        )
    assert planned.total / 1e9 == pytest.approx(hand["total"], rel=0.05)


@pytest.mark.parametrize("layout", ["plain", "shared"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_step_peak_matches_plan_with_tiled_mlp(gqa_dir, checkpointing, layout):
    name, path, model_config = gqa_dir
    config = settings(checkpointing, layout=layout, tiled_mlp=16)
    check_peak(f"{name} tiled_mlp=16 {layout} ckpt={int(checkpointing)}", path, model_config, config)


# A narrow GQA model for long pairs: at these lengths the attention (and, before qdpo.attention, its [T, T] mask)
# and the MLP's [T, intermediate] tensors are what grows.
LONG_SHAPE = {
    "llama-narrow": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=16384,
        ),
    ),
}
# The same with a sliding window of 512 (Mistral v0.1 style): qdpo.attention's windowed blocks on every layout.
LONG_SHAPE["mistral-narrow-window"] = ("mistral", {**LONG_SHAPE["llama-narrow"][1], "sliding_window": 512})
LONG_LENGTHS = (2048, 4096, 8192)  # max_length: a shared-prompt row of 2 x max_length - 16 tokens, 4k to 16k


@pytest.mark.parametrize("shape", list(LONG_SHAPE))
@pytest.mark.parametrize("layout", ["shared", "plain"])
def test_long_pairs_grow_linearly_and_match_the_plan(tmp_path_factory, layout, shape, monkeypatch):
    """One pair per step from 2k to 8k tokens per response (shared: rows of 4k-16k tokens; plain: two rows of
    2k-8k, the rejected one 5 tokens short, so padded), checkpointed, chunked head, tiled MLP: the measured peak
    grows linearly with the length, the plan is within 10% at each length, and no allocation is as large as a
    [T, T] boolean mask or a [T, vocab] fp32 logits tensor. With a sliding window (512), in blocks of 256 queries:
    their one band mask, [256, 768] fp32, is the same at every length."""
    monkeypatch.setattr(attention, "BLOCK", 256)
    name, path, model_config = save_tiny(
        shape, tmp_path_factory, {k: (a, dict(v)) for k, (a, v) in LONG_SHAPE.items()}
    )
    # plain: two rows per pair, so tiles of 512 hold as many tokens as the shared row's 1024 (and on this shape, whose
    # MLP is as wide as its vocabulary, a [2, 1024, 256] tile would be as large as [2048, vocab] logits)
    config = settings(True, chunk=256, layout=layout, tiled_mlp=1024 if layout == "shared" else 512)
    model = load(path, config)
    peaks = []
    for length in LONG_LENGTHS:
        attention.full_band_mask.cache_clear()  # made in the step, as in a run's first one (then kept)
        geometry = dict(pairs=1, length=length, prompt=16)
        batch = batch_for(model_config, config, geometry)
        measured, largest = step_allocations(model, batch, config)
        planned = step_peak(plan_for(model_config, config, geometry))
        row = 2 * length - 16 if layout == "shared" else length
        report(f"{name} {layout} max_length={length}", [("step peak above resident", measured, planned)])
        assert close(planned, measured, 0.10), f"max_length {length}: planned {planned} vs measured {measured}"
        assert largest < min(row * row, row * model_config["vocab_size"] * 4), f"an allocation of {largest} B"
        peaks.append(measured)
    # Linear: each doubling of the length adds twice what the one before added (quadratic growth would add 4x).
    first, second = peaks[1] - peaks[0], peaks[2] - peaks[1]
    assert 1.8 < second / first < 2.2, peaks


def test_long_pairs_switch_on_tiling_and_offload_only_when_the_plan_needs_them(monkeypatch):
    """8b-24gb at 4096 tokens fits as set; at 12k tiling alone is enough, at 16k offloading alone (tiling is tried
    first, being cheaper); at 32k it takes both; a switch the user already turned on is not offered again; `qdpo
    run` on a GPU applies them and says so."""
    model_cfg = BUILTIN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"][1]
    preset = load_preset("8b-24gb").settings

    def switch(**changes):
        return P.memory_switches(model_cfg, build_config({**preset, **changes}), 24)

    assert switch() is None
    assert switch(max_length=12000) == {"tiled_mlp": P.LONG_TILE}
    assert switch(max_length=16384) == {"offload_activations": True}
    assert switch(max_length=32768) == {"tiled_mlp": P.LONG_TILE, "offload_activations": True}
    assert switch(max_length=32768, tiled_mlp=2048) == {"offload_activations": True}
    assert switch(max_length=131072) is None  # nothing makes it fit: the run's out-of-memory advice applies

    from qdpo.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the switch is for GPU runs; nothing loads here
    monkeypatch.setattr("qdpo.cli.host_memory_free_gb", lambda: 64.0)
    result = CliRunner().invoke(main, ["run", "--preset", "8b-24gb", "--dry-run", "max_length=32768"])
    assert result.exit_code == 0, result.output
    assert "tiled_mlp: 4096" in result.output and "offload_activations: true" in result.output
    assert "with tiled_mlp=4096 and offload_activations=true the plan is" in result.output


def test_run_on_a_gpu_goes_on_as_set_when_the_planner_cannot_plan(monkeypatch):
    """The memory switches are a convenience: a LoRA target or a shape the planner does not model (Phi-2's `dense`,
    GPT-2's config) must not stop `qdpo run`, which then runs as set, while `qdpo plan` says what it cannot plan."""
    from qdpo.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("qdpo.cli.host_memory_free_gb", lambda: 64.0)
    args = ["--preset", "8b-24gb", "lora_target_modules=[q_proj,dense]"]
    result = CliRunner().invoke(main, ["run", "--dry-run", *args])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    planned = CliRunner().invoke(main, ["plan", *args])
    assert planned.exit_code != 0 and "not 'dense'" in planned.output, planned.output


def test_run_refuses_to_pin_more_cpu_memory_than_the_machine_has_free(monkeypatch):
    """Offloaded activations (and offload_params shards) sit in pinned CPU memory: 32 layers x a 65,535-token row x
    4096 x 2 B for 8B at 32k, about 17.2 GB; `qdpo plan` shows it, and `qdpo run` refuses in one line, before
    loading anything, when the machine has less free (per process: each pins its own)."""
    from qdpo.cli import main

    pinned = 32 * 65535 * 4096 * 2 / 1e9
    shown = invoke("--preset", "8b-24gb", "max_length=32768")
    row = next(line for line in shown.output.splitlines() if line.startswith("pinned CPU memory"))
    assert float(row.split()[3]) == pytest.approx(pinned, abs=0.01)
    assert "pinned CPU memory" not in invoke("--preset", "8b-24gb").output  # nothing offloaded at 4096 tokens

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for free, ok in ((pinned + 0.5, True), (pinned - 0.5, False)):
        monkeypatch.setattr("qdpo.cli.host_memory_free_gb", lambda free=free: free)
        result = CliRunner().invoke(main, ["run", "--preset", "8b-24gb", "--dry-run", "max_length=32768"])
        assert (result.exit_code == 0) == ok, result.output
    assert result.output.count("\n") == 2  # the switch line, then the error alone
    assert f"the plan keeps {pinned:.1f} GB in pinned CPU memory" in result.output
    assert f"more than the {pinned - 0.5:.1f} GB this machine has free" in result.output
    assert "Traceback" not in result.output
    two = CliRunner().invoke(main, ["run", "--preset", "70b-2x24gb", "--dry-run", "--nproc", "2"])
    assert two.exit_code != 0 and "(offload_activations / offload_params, 2 processes)" in two.output

    # Under fsdp each process first loads the whole 4-bit model into CPU memory (in turn): the 70B's ~39.5 GB beside
    # the other process's pinned shards (~19.8 GB) is the larger need.
    view = P.planner_view(build_config(load_preset("70b-2x24gb").settings))
    per_rank = P.plan_memory(view[0], view[1], processes=2)
    whole = P.plan_memory(view[0], view[1]).bytes_of(P.WEIGHTS_4BIT, P.QUANT_STATE, P.FROZEN) / 1e9
    loading = whole + per_rank.host_bytes / 1e9
    assert 38 < whole < 41 and 2 * per_rank.host_bytes / 1e9 < loading
    for free, ok in ((loading - 1, False), (loading + 1, True)):
        monkeypatch.setattr("qdpo.cli.host_memory_free_gb", lambda free=free: free)
        two = CliRunner().invoke(main, ["run", "--preset", "70b-2x24gb", "--dry-run", "--nproc", "2"])
        assert (two.exit_code == 0) == ok, two.output
        loads = f"each of the 2 processes loads the whole 4-bit model ({whole:.1f} GB) into CPU memory"
        assert (loads in two.output) == (not ok), two.output
    # Checked once per job, before any rank loads: not again by the ranks `qdpo run --nproc` starts, nor by a
    # rank other than 0 under torchrun (a sibling may already be loading).
    monkeypatch.setattr("qdpo.cli.host_memory_free_gb", lambda: 1.0)
    for env in ({"QDPO_LAUNCHER": "1"}, {"RANK": "1", "WORLD_SIZE": "2"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            rank = CliRunner().invoke(main, ["run", "--preset", "70b-2x24gb", "--dry-run"])
            assert rank.exit_code == 0, (env, rank.output)


def test_presets_and_plan_show_the_longest_pair():
    from qdpo.cli import main

    listing = CliRunner().invoke(main, ["presets"]).output
    assert listing.count("longest pair at micro-batch 1 (planned)") == 4  # the four GPU presets
    result = invoke("--preset", "8b-24gb", "max_length=32768")
    assert "largest max_length at micro_batch_size 1 with tiled_mlp and offload_activations" in result.output
    as_set = invoke("--preset", "8b-24gb").output  # the same longest pair as set, whether or not qdpo switched
    line = "largest max_length at micro_batch_size 1: "
    assert next(x for x in result.output.splitlines() if x.startswith(line)) in as_set.splitlines()
    assert "planned with tiled_mlp=4096 and offload_activations=true: the step does not fit 24 GB" in result.output
    assert "vs a budget of 24 GB: fits" in result.output  # the goal: 8B at 32k tokens in 24 GB


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_experts_are_planned_unquantized(model_type):
    """transformers keeps a layer's experts in fused 3-D parameters, which bitsandbytes does not quantize: the plan
    counts them at the compute dtype, and as 4-bit only the block's nn.Linear layers, as transformers builds them."""
    from test_families import COMMON, FAMILY_SETTINGS
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **FAMILY_SETTINGS[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear) and m.out_features > 1)
    experts = sum(p.numel() for n, p in layers.named_parameters() if ".experts." in n)
    shape = P.ModelShape.from_config(config.to_dict())
    assert shape.expert_params == experts > 0
    assert sum(i * o for i, o in shape.linears().values()) * shape.layers == linear

    cfg = build_config({"model": "x", "data": "y", "max_length": 64})
    plan = P.plan_memory(config.to_dict(), cfg, device="cpu")
    dense = P.plan_memory({**config.to_dict(), "num_local_experts": 0, "num_experts": 0}, cfg, device="cpu")
    assert plan.bytes_of(P.FROZEN) - dense.bytes_of(P.FROZEN) == experts * 4  # fp32 on the CPU
    assert any("experts per layer kept in float32" in a for a in plan.assumptions)
