#!/usr/bin/env python
"""qdpo against TRL's DPOTrainer: same 4-bit checkpoint, same pairs, same settings, one subprocess per tool.

    python benchmarks/compare_trl.py --shape tiny-llama --data random --steps 2 --seq-len 64
    python benchmarks/compare_trl.py --shape llama2-7b --data random --steps 6 --seq-len 1024
    python benchmarks/compare_trl.py --shape smollm2 --data builtin --epoch          # the embedded default

Each tool runs in its own Python process (peak RSS and CUDA peak memory are per tool), loads the same bf16
checkpoint in 4-bit NF4 with double quantization (quantized while loading), puts LoRA on every block linear
layer, and trains sigmoid DPO for the same steps; each process times its whole run from model load to the
saved adapter. Not part of the test suite; see benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}
os.environ.update(OFFLINE_ENV)  # before anything imports huggingface_hub: there is no network here or on the GPU box

# Named architectures with random weights: weight values change neither memory nor speed.
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
    ),
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "llama2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1408,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "small-qwen2": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=12,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # For a quick check on a laptop CPU: every code path, ~0.3M parameters.
    "micro-llama": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
        max_position_embeddings=2048,
    ),
}

# Dense bf16 tensor-core peak, TFLOP/s, no sparsity (T4: fp16, it has no bf16). First substring match wins.
GPU_PEAK_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("4090", 165.2),
    ("3090", 71.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("T4", 65.0),
    ("L4", 121.0),
]

SHARD_BYTES = 2 * 1024**3  # flush a safetensors shard once it would pass 2 GiB: peak host memory ~ one shard
WORD_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 of the word tokenizer; random ids start at 4
GIB = 1024**3


def cache_root() -> Path:
    """Where random checkpoints and run folders live (the 7B/8B checkpoints are 13-16 GB each)."""
    return Path(os.environ.get("QDPO_BENCH_CACHE", Path.home() / ".cache" / "qdpo-bench"))


# ----------------------------------------------------------------------------------------------- the checkpoint


def model_config(shape: str):
    """A transformers config for a named shape or a config.json path."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if shape in SHAPES:
        kw = dict(SHAPES[shape])
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        path = Path(shape)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise SystemExit(
                f"--shape {shape}: not one of {', '.join(['smollm2', *SHAPES])} and not a config.json file"
            )
        cfg = AutoConfig.from_pretrained(str(path))
    if not getattr(cfg, "architectures", None):  # TRL picks the model class from config.architectures
        cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    return cfg


def count_params(cfg) -> dict[str, int]:
    """Parameter counts from a meta-device model: no memory is allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    # Matmul parameters: everything but the embedding lookup (which costs no FLOPs), lm_head included.
    return {"params": total, "matmul_params": total if tied else total - embed.numel(), "tied_embeddings": tied}


def write_random_checkpoint(cfg, target: Path, seed: int) -> float:
    """Write a bf16 safetensors checkpoint of cfg with random weights, shard by shard, never holding the whole model."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)  # names and shapes only
    tensors = list(meta.named_parameters())  # tied lm_head is the embedding object: listed once, saved once
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"  # ~100x faster on a GPU for 7B
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, p) in enumerate(tensors):
        nbytes = p.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, weight_map, total = time.time(), {}, 0
    for s, idx in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for i in idx:
            key, p = tensors[i]
            if p.dim() == 1 and "norm" in key:
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            elif key.endswith(".bias"):
                t = torch.zeros(p.shape, dtype=torch.bfloat16)
            else:  # normal(0, 0.02) straight into bf16: no fp32 copy of even one tensor
                g = torch.Generator(gen_device).manual_seed(seed * 1_000_003 + i)
                t = torch.empty(p.shape, dtype=torch.bfloat16, device=gen_device).normal_(0.0, 0.02, generator=g).cpu()
            shard[key] = t.contiguous()
            weight_map[key] = name
            total += t.numel() * 2
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        del shard
        print(f"  wrote {name} ({len(idx)} tensors)", flush=True)
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(str(tmp))
    (tmp / "bench_source.json").write_text(json.dumps({"seed": seed, "init": "normal(0, 0.02); norms 1; biases 0"}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return time.time() - started


def word_tokenizer(vocab_size: int, target: Path) -> None:
    """A word-level tokenizer: id i <-> the word "w{i}", so random ids survive decode -> encode exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(WORD_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(WORD_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(target))


def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once (qdpo's own conversion and cache)."""
    sys.path.insert(0, str(REPO))
    from qdpo.model import builtin_gguf, convert_gguf

    return convert_gguf(builtin_gguf())


def tokenizer_dir(tokenizer: str, vocab_size: int) -> Path:
    """A directory holding only the tokenizer the data needs (word-level or SmolLM2's), for both tools.

    Tokenizer-only, without the model's config.json: AutoTokenizer then loads what tokenizer_config.json
    names. Next to a config.json it would pick the model type's own class (Qwen2Tokenizer for qwen2, in
    some releases LlamaTokenizer for llama), which rebuilds its own pipeline and loses the word vocabulary.
    """
    target = cache_root() / "tokenizers" / (f"words-{vocab_size}" if tokenizer == "words" else "smollm2")
    if (target / "tokenizer_config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tokenizer == "words":
        word_tokenizer(vocab_size, tmp)
    else:
        for f in smollm2_dir().iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy(f, tmp / f.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def check_tokenizer(path: Path, tokenizer: str) -> str:
    """Fail in seconds, before any checkpoint is written, if AutoTokenizer does not load the tokenizer as written."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tokenizer == "words":
        ids = tok("w4 w5 w6", add_special_tokens=False).input_ids
        if ids != [4, 5, 6]:
            raise SystemExit(
                f"the word tokenizer loads as {type(tok).__name__} and encodes 'w4 w5 w6' as {ids}, not [4, 5, 6]"
            )
    return type(tok).__name__


def prepare_model(shape: str, tokenizer: str, seed: int) -> dict[str, Any]:
    """Find or write the checkpoint for --shape, and describe it (runs in its own process)."""
    if shape == "smollm2":
        weights = smollm2_dir()
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(weights))
        write_s = 0.0
    else:
        cfg = model_config(shape)
        key = hashlib.sha256((cfg.to_json_string(use_diff=False) + f"seed={seed}").encode()).hexdigest()[:12]
        weights = cache_root() / "models" / f"{Path(shape).stem if shape not in SHAPES else shape}-{key}"
        write_s = 0.0
        if tokenizer == "words":  # before the checkpoint: a broken tokenizer should cost seconds, not a 16 GB write
            check_tokenizer(tokenizer_dir(tokenizer, cfg.vocab_size), tokenizer)
        if not (weights / "config.json").is_file():
            print(f"writing random bf16 weights for {shape} to {weights} (once)", flush=True)
            write_s = write_random_checkpoint(cfg, weights, seed)
    if tokenizer == "smollm2" and cfg.vocab_size < 49152:
        raise SystemExit(
            f"--data builtin uses the SmolLM2 tokenizer (49152 ids) but {shape} has vocab {cfg.vocab_size}: "
            "use --data random, or a shape with a vocab of at least 49152"
        )
    tok_dir = weights if (shape == "smollm2" and tokenizer == "smollm2") else tokenizer_dir(tokenizer, cfg.vocab_size)
    tokenizer_class = check_tokenizer(tok_dir, tokenizer)
    text = cfg.get_text_config()
    return {
        "model_dir": str(weights),
        "tokenizer_dir": str(tok_dir),
        "write_s": round(write_s, 1),
        "tokenizer_class": tokenizer_class,
        "model_type": cfg.model_type,
        "hidden_size": text.hidden_size,
        "num_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
        "tokenizer": tokenizer,
        **count_params(cfg),
    }


# ------------------------------------------------------------------------------------------------------ the data


def make_rows(kind: str, n_pairs: int | None, seq_len: int, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """Preference rows both tools read: qdpo's built-in pairs, or random words of exact token lengths."""
    if kind == "builtin":
        rows = [
            json.loads(line)
            for line in (REPO / "qdpo" / "builtin" / "train.jsonl").read_text().splitlines()
            if line.strip()
        ]
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        return rows[:n_pairs] if n_pairs else rows
    # prompt T/2 tokens; each response T - T/2 tokens counting the EOS both tools append (so T - T/2 - 1 words).
    rng = random.Random(seed)
    n_prompt, n_resp = seq_len // 2, seq_len - seq_len // 2 - 1
    low = len(WORD_SPECIALS)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(low, vocab_size)}" for _ in range(n))

    # Responses start with a space: TRL tokenizes prompt + response as one string.
    return [
        {"prompt": words(n_prompt), "chosen": " " + words(n_resp), "rejected": " " + words(n_resp)}
        for _ in range(n_pairs)
    ]


# --------------------------------------------------------------------------------------------- child: measuring


@contextmanager
def timed(store: dict[str, float], key: str):
    """Add the wall time of the block to store[key], with CUDA work finished on both ends."""
    sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        sync()
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_setup() -> tuple[Any, Any]:
    """(device, compute dtype) exactly as qdpo picks them: bf16 on GPUs that have it, fp16 on older, fp32 on CPU."""
    sys.path.insert(0, str(REPO))
    from qdpo.model import compute_dtype, pick_device

    device = pick_device()
    return device, compute_dtype("auto", device)


def pair_tokens(prompt: int, chosen: int, rejected: int, max_length: int) -> int:
    """Tokens the forward passes of one pair cover, counted the TRL way: prompt+chosen and prompt+rejected."""
    return min(prompt + chosen, max_length) + min(prompt + rejected, max_length)


def measures(
    spec: dict[str, Any], t: dict[str, float], step_times: list[float], tokens_per_pair: float
) -> dict[str, Any]:
    """Throughput, memory and MFU from what a child recorded."""
    import torch

    steps = len(step_times)
    tokens_per_step = tokens_per_pair * spec["micro_batch_size"]
    steady = step_times[1:] if steps >= 3 else step_times  # the first step pays for kernel selection and warm-up
    out: dict[str, Any] = {
        "steps": steps,
        "step_s_median": round(statistics.median(step_times), 4) if steps else None,
        "step_s_first": round(step_times[0], 4) if steps else None,
        "train_s": round(sum(step_times), 3),
        "tokens_per_pair": round(tokens_per_pair, 1),
        "tokens_per_s": round(tokens_per_step * steps / sum(step_times), 1) if steps else None,
        "tokens_per_s_steady": round(tokens_per_step * len(steady) / sum(steady), 1) if steps else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),  # Linux: KiB
        **{k: round(v, 3) for k, v in t.items()},
    }
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((tf for sub, tf in GPU_PEAK_TFLOPS if sub in name), None)
        out.update(
            gpu=name,
            gpu_peak_tflops=peak,
            peak_cuda_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
            peak_cuda_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3),
        )
        # 2 x params x tokens forward + 4 x params x tokens backward (the usual 6N; see README for what it leaves out).
        if peak and out["tokens_per_s_steady"]:
            out["mfu"] = round(6 * spec["matmul_params"] * out["tokens_per_s_steady"] / (peak * 1e12), 4)
    return out


def planned(spec: dict[str, Any], config, pairs) -> dict[str, Any]:
    """What `qdpo plan` predicts for this run's step, to set beside the measured peaks (same device, worst micro-batch)."""
    import torch

    from qdpo.config import read_json
    from qdpo.plan import OVERHEAD, plan_memory

    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_memory(
        read_json(Path(spec["model_dir"]) / "config.json"),
        config,
        prompt_len=min(len(p.prompt_ids) for p in pairs),
        device=device,
    )
    # max_memory_allocated sees tensors only; the plan's overhead line is the CUDA context and fragmentation.
    return {
        "plan_tensors_gib": round((plan.total - plan.bytes_of(OVERHEAD)) / GIB, 3),
        "plan_total_gib": round(plan.total / GIB, 3),
    }


def child_qdpo(spec: dict[str, Any]) -> dict[str, Any]:
    """qdpo through its Python API (build_config + train.run), its internals wrapped only to time them."""
    sys.path.insert(0, str(REPO))
    import qdpo
    import qdpo.train as qt
    from qdpo.config import build_config

    t: dict[str, float] = {}
    step_times: list[float] = []
    seen: dict[str, Any] = {}

    def wrap(name: str, key: str | None = None, keep: str | None = None):
        original = getattr(qt, name)

        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            result = original(*a, **k)
            sync()
            elapsed = time.perf_counter() - start
            if key == "step":
                step_times.append(elapsed)
            elif key:
                t[key] = t.get(key, 0.0) + elapsed
            if keep:
                seen[keep] = result
            return result

        setattr(qt, name, wrapper)

    wrap("prepare_data", "data_s", keep="data")
    wrap("load_base_4bit", "load_s")
    wrap("add_lora", keep="model")
    wrap("load_or_compute", "ref_s")
    wrap("train_step", "step")
    wrap("save_adapter", "save_s")

    overrides = {
        "model": spec["model_dir"],
        "tokenizer": spec["tokenizer_dir"],
        "data": spec["data_file"],
        "eval_fraction": 0.0,  # a file path: no builtin eval split
        "output_dir": str(Path(spec["out_dir"]) / "qdpo"),
        "overwrite": True,
        "micro_batch_size": spec["micro_batch_size"],
        "gradient_accumulation_steps": 1,
        "max_length": spec["seq_len"],
        "max_prompt_length": spec["max_prompt_length"],
        "lora_r": spec["lora_r"],
        "lora_alpha": 2 * spec["lora_r"],
        "lora_dropout": 0.0,
        "lora_target_modules": ["all-linear"],
        "learning_rate": spec["learning_rate"],
        "beta": 0.1,
        "loss_type": "sigmoid",
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw",
        "seed": spec["seed"],
        "logging_steps": 1,
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "precompute_ref_log_probs": spec["precompute_ref"],
        **({"max_steps": 0, "num_train_epochs": 1.0} if spec["epoch"] else {"max_steps": spec["steps"]}),
        **spec["qdpo_set"],
    }
    config = build_config(None, overrides)
    with timed(t, "wall_s"):
        result = qt.run(config, preset="bench", echo=print, progress=False)
    pairs = seen["data"].train
    tokens = statistics.mean(
        pair_tokens(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids), config.max_length) for p in pairs
    )
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    model = seen["model"]
    try:  # a planner error must not throw away the measured run
        plan = planned(spec, config, pairs)
    except Exception as e:  # noqa: BLE001
        plan = {"plan_error": f"{type(e).__name__}: {e}"}
    return {
        "tool": "qdpo",
        "version": qdpo.__version__,
        "train_pairs": len(pairs),
        **plan,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "adapter": str(result.output_dir / "adapter"),
        "settings": {k: v for k, v in config.to_dict().items() if k not in ("model", "data", "output_dir")},
        **measures(spec, t, step_times, tokens),
    }


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer with the equivalent DPOConfig; it loads and quantizes the model itself (model passed by path)."""
    import torch
    import trl
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device, dtype = device_setup()
    t: dict[str, float] = {}
    step_times: list[float] = []

    def wrap_function(name: str, key: str):
        original = getattr(dpo_module, name)

        def wrapper(*a, **k):
            with timed(t, key):
                return original(*a, **k)

        setattr(dpo_module, name, wrapper)

    wrap_function("create_model_from_path", "load_s")  # from_pretrained with the BitsAndBytesConfig
    wrap_function("hash_module", "ref_hash_s")  # TRL hashes every weight to key its reference cache

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            with timed(t, "ref_s"):
                return super()._precompute_ref_logps(*a, **k)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step_times.append(time.perf_counter() - self.start)

    cuda = device.type == "cuda"
    bf16, fp16 = cuda and dtype == torch.bfloat16, cuda and dtype == torch.float16
    args = DPOConfig(
        output_dir=str(Path(spec["out_dir"]) / "trl"),
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=1,
        max_length=spec["seq_len"],
        truncation_mode="keep_start",
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.1,
        loss_type=["sigmoid"],
        seed=spec["seed"],
        precompute_ref_log_probs=spec["precompute_ref"],
        precompute_ref_batch_size=spec["micro_batch_size"],  # qdpo scores the reference in training micro-batches too
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        model_init_kwargs={
            "dtype": str(dtype).removeprefix("torch."),
            "device_map": {"": str(device)} if cuda else None,
        },
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **({"num_train_epochs": 1} if spec["epoch"] else {"max_steps": spec["steps"]}),
        **spec["trl_set"],
    )
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=2 * spec["lora_r"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    with timed(t, "wall_s"):
        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
        trainer = TimedDPOTrainer(
            model=spec["model_dir"],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
            quantization_config=quant,
            callbacks=[StepTimer()],
        )
        trainer.train()
        with timed(t, "save_s"):
            trainer.save_model(str(Path(spec["out_dir"]) / "trl" / "adapter"))
    data = trainer.train_dataset
    tokens = statistics.mean(
        pair_tokens(len(p), len(c), len(r), spec["seq_len"])
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tool": "trl",
        "version": trl.__version__,
        "train_pairs": len(data),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "adapter": str(Path(spec["out_dir"]) / "trl" / "adapter"),
        "settings": {k: v for k, v in args.to_dict().items() if k in TRL_REPORTED},
        **measures(spec, t, step_times, tokens),
    }


TRL_REPORTED = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "learning_rate",
    "lr_scheduler_type",
    "optim",
    "beta",
    "loss_type",
    "precompute_ref_log_probs",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "bf16",
    "fp16",
    "use_cpu",
    "max_steps",
    "num_train_epochs",
    "seed",
)


def child_main(tool: str, spec_path: Path, result_path: Path) -> None:
    """Entry point of a tool's process: run it and write its measurements (or its error) as JSON."""
    started = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    # What both tools load anyway, imported before the clock starts: qdpo imports these lazily inside its
    # run, TRL at import time, and the whole-run time should compare work, not import order.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: F401

    import_s = time.perf_counter() - started
    try:
        result = {"qdpo": child_qdpo, "trl": child_trl}[tool](spec)
        result["ok"] = True
    except Exception as e:  # the parent reports it next to the other tool's numbers
        import traceback

        traceback.print_exc()
        result = {
            "tool": tool,
            "ok": False,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        }
    result.update(import_s=round(import_s, 2), versions=versions())
    result_path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


# ------------------------------------------------------------------------------------------------- the parent


def run_child(argv: list[str], log: Path, timeout: int, env: dict[str, str], verbose: bool) -> int:
    """Run this script in a fresh process, its output to log (and the console with --verbose)."""
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), *argv]
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO)
        )
        deadline = time.time() + timeout
        for line in proc.stdout:
            f.write(line)
            if verbose:
                print("    " + line, end="")
            if time.time() > deadline:
                proc.kill()
                f.write(f"\n[compare_trl] killed after {timeout}s\n")
                break
        return proc.wait()


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


ROWS = [  # (key, label, compare: qdpo/trl ratio printed)
    ("wall_s", "whole run s (load -> adapter saved)", True),
    ("load_s", "  load + quantize s", True),
    ("ref_hash_s", "  hash weights s (TRL ref cache key)", False),
    ("ref_s", "  reference pass s", True),
    ("train_s", "  training steps s", True),
    ("save_s", "  save adapter s", True),
    ("import_s", "python imports s (not in whole run)", False),
    ("steps", "steps", False),
    ("train_pairs", "train pairs", False),
    ("tokens_per_pair", "tokens / pair (2 sequences)", False),
    ("step_s_first", "first step s", True),
    ("step_s_median", "median step s", True),
    ("tokens_per_s", "tokens/s, all steps", True),
    ("tokens_per_s_steady", "tokens/s, steps 2..N", True),
    ("mfu", "MFU (6N, steps 2..N)", True),
    ("peak_cuda_alloc_gib", "peak CUDA allocated GiB", True),
    ("peak_cuda_reserved_gib", "peak CUDA reserved GiB", True),
    ("peak_rss_gib", "peak RSS GiB", True),
    ("plan_tensors_gib", "qdpo plan: tensors at peak GiB", False),  # vs peak CUDA allocated
    ("plan_total_gib", "qdpo plan: total GiB", False),  # vs peak CUDA reserved + context, or peak RSS on the CPU
    ("trainable_params", "trainable LoRA params", False),
    ("first_loss", "loss step 1 (ln 2 = 0.693)", False),
    ("last_loss", "loss last step", False),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    tools = list(results)
    lines = [f"{'':38}" + "".join(f"{t:>14}" for t in tools) + (f"{'qdpo/trl':>12}" if len(tools) == 2 else "")]
    for key, label, ratio in ROWS:
        vals = [results[t].get(key) for t in tools]
        if all(v is None for v in vals):
            continue
        row = f"{label:38}" + "".join(f"{fmt(v):>14}" for v in vals)
        if ratio and len(tools) == 2 and "qdpo" in results and "trl" in results:
            a, b = results["qdpo"].get(key), results["trl"].get(key)
            row += (
                f"{(a / b):>12.2f}"
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                else f"{'-':>12}"
            )
        lines.append(row)
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shape",
        default="smollm2",
        help=f"smollm2 (embedded, real weights), {', '.join(SHAPES)}, or a config.json path (random weights)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 4)")
    g.add_argument("--epoch", action="store_true", help="one epoch over the pairs instead of --steps")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="max_length = prompt + response tokens (random data: exactly this; default 256 builtin, 512 random)",
    )
    p.add_argument(
        "--micro-batch", type=int, default=1, help="pairs per forward (micro_batch_size / per_device_train_batch_size)"
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank; alpha = 2r")
    p.add_argument("--data", choices=["builtin", "random"], default="builtin")
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="number of pairs (default: steps x micro-batch, so each is seen once; --epoch: all builtin / 64 random)",
    )
    p.add_argument("--tools", default="qdpo,trl", help="comma-separated: qdpo, trl")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument(
        "--no-precompute-ref",
        dest="precompute_ref",
        action="store_false",
        help="reference forward in every step, both tools",
    )
    p.add_argument(
        "--qdpo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra qdpo setting (e.g. share_prompt=false)",
    )
    p.add_argument("--trl-set", action="append", default=[], metavar="KEY=VALUE", help="extra DPOConfig field")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per tool process")
    p.add_argument(
        "--workdir", default=None, help="run folders and logs (default: a new folder under $QDPO_BENCH_CACHE/runs)"
    )
    p.add_argument("--keep", action="store_true", help="keep run folders (adapters) after the run")
    p.add_argument("--verbose", "-v", action="store_true", help="stream the tools' output")
    p.add_argument("--_child", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = p.parse_args()

    if a._child:
        kind, spec, result = a._child
        if kind == "prepare":
            s = json.loads(Path(spec).read_text())
            Path(result).write_text(json.dumps(prepare_model(s["shape"], s["tokenizer"], s["seed"]), indent=2))
        else:
            child_main(kind, Path(spec), Path(result))
        return

    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    if not tools or set(tools) - {"qdpo", "trl"}:
        raise SystemExit("--tools takes qdpo, trl or both")
    steps = a.steps if a.steps is not None else 4
    seq_len = a.seq_len or (256 if a.data == "builtin" else 512)
    work = Path(a.workdir or cache_root() / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }

    print(f"[1/3] model {a.shape} ({'random' if a.shape != 'smollm2' else 'real'} weights)", flush=True)
    tokenizer = "smollm2" if a.data == "builtin" else "words"
    (work / "prepare.json").write_text(json.dumps({"shape": a.shape, "tokenizer": tokenizer, "seed": a.seed}))
    started = time.time()
    if (
        run_child(
            ["--_child", "prepare", str(work / "prepare.json"), str(work / "model.json")],
            work / "prepare.log",
            a.timeout,
            env,
            True,
        )
        != 0
    ):
        raise SystemExit(f"preparing the model failed; see {work / 'prepare.log'}")
    model = json.loads((work / "model.json").read_text())
    print(
        f"      {model['model_dir']}  ({model['params'] / 1e6:,.1f}M params, vocab {model['vocab_size']}, "
        f"ready in {time.time() - started:.0f}s)",
        flush=True,
    )

    n_pairs = a.pairs or (None if a.epoch and a.data == "builtin" else 64 if a.epoch else steps * a.micro_batch)
    rows = make_rows(a.data, n_pairs, seq_len, model["vocab_size"], a.seed)
    data_file = work / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"[2/3] data {a.data}: {len(rows)} pairs"
        + (f", {seq_len // 2} prompt + {seq_len - seq_len // 2} response tokens each" if a.data == "random" else ""),
        flush=True,
    )

    spec = {
        "model_dir": model["model_dir"],
        "tokenizer_dir": model["tokenizer_dir"],
        "matmul_params": model["matmul_params"],
        "data_file": str(data_file),
        "seq_len": seq_len,
        "max_prompt_length": seq_len // 2,
        "micro_batch_size": a.micro_batch,
        "lora_r": a.lora_r,
        "learning_rate": a.learning_rate,
        "steps": steps,
        "epoch": a.epoch,
        "seed": a.seed,
        "gradient_checkpointing": a.gradient_checkpointing,
        "precompute_ref": a.precompute_ref,
        "qdpo_set": parse_sets(a.qdpo_set),
        "trl_set": parse_sets(a.trl_set),
        "out_dir": str(work),
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=2))

    def summary() -> dict[str, Any]:
        return {
            "shape": a.shape,
            "model": model,
            "settings": {k: v for k, v in spec.items() if k not in ("out_dir",)},
            "data": a.data,
            "pairs": len(rows),
            "results": results,
            "ratios_qdpo_over_trl": {
                k: round(results["qdpo"][k] / results["trl"][k], 4)
                for k, _, r in ROWS
                if r
                and "qdpo" in results
                and "trl" in results
                and isinstance(results["qdpo"].get(k), (int, float))
                and isinstance(results["trl"].get(k), (int, float))
                and results["trl"][k]
            },
            "complete": len(results) == len(tools) and all(r.get("ok") for r in results.values()),
            "workdir": str(work),
            "when": datetime.now().isoformat(timespec="seconds"),
        }

    def save() -> None:
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(summary(), indent=2, default=str) + "\n")

    results: dict[str, dict[str, Any]] = {}
    for tool in tools:
        print(f"[3/3] {tool} ...", end=" ", flush=True)
        # A fresh qdpo cache per run: the reference table would otherwise be reused from an earlier run.
        child_env = {
            **env,
            "QDPO_CACHE": str(work / f"cache-{tool}"),
            "HF_DATASETS_CACHE": str(work / f"datasets-{tool}"),
        }
        rc = run_child(
            ["--_child", tool, str(work / "spec.json"), str(work / f"{tool}.json")],
            work / f"{tool}.log",
            a.timeout,
            child_env,
            a.verbose,
        )
        res_file = work / f"{tool}.json"
        results[tool] = (
            json.loads(res_file.read_text())
            if res_file.is_file()
            else {"tool": tool, "ok": False, "error": f"exit code {rc}"}
        )
        results[tool]["log"] = str(work / f"{tool}.log")
        if results[tool].get("ok"):
            print(f"done, whole run {results[tool]['wall_s']:.1f}s", flush=True)
        else:
            print(f"FAILED: {results[tool].get('error')}\n--- last lines of {work / f'{tool}.log'}:", flush=True)
            print("".join((work / f"{tool}.log").read_text().splitlines(keepends=True)[-25:]))
        save()  # after each tool: a case cut short by a timeout keeps the tools that finished

    if not a.keep:  # adapters of a 7B run are ~0.2 GB each; logs and JSON stay
        for tool in tools:
            for sub in (tool, f"cache-{tool}", f"datasets-{tool}"):
                shutil.rmtree(work / sub, ignore_errors=True)
            if "adapter" in results[tool]:
                results[tool]["adapter"] = None  # removed; --keep keeps it

    first = next(iter(results.values()))
    print(
        f"\n{a.shape} ({model['params'] / 1e9:.3g}B params) · data {a.data} · max_length {seq_len} · micro-batch "
        f"{a.micro_batch} · LoRA r={a.lora_r} · {'1 epoch' if a.epoch else f'{steps} steps'} · gradient checkpointing "
        f"{'on' if a.gradient_checkpointing else 'off'} · reference {'precomputed' if a.precompute_ref else 'every step'}"
        + (f" · {first.get('gpu')}" if first.get("gpu") else " · CPU")
    )
    print(table(results))
    save()  # again: adapters removed
    if a.out:
        print(f"results: {a.out}")
    if not all(r.get("ok") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
