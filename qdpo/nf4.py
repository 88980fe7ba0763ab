"""What the 4-bit base holds in bitsandbytes NF4, and the rounding it applies, replayed outside the model."""

from __future__ import annotations

from pathlib import Path

import torch

# Weights per first-level absmax: BitsAndBytesConfig's 4-bit default, which qdpo.model.load_base_4bit keeps.
# The planner sizes the quantization state with it and merge replays the rounding with it: one value for both.
NF4_BLOCKSIZE = 64


def nf4_round(weight: torch.Tensor, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """dequantize(quantize(weight)) as bitsandbytes does it for the 4-bit model (NF4, double-quantized scales)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.to(device), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    return bnbf.dequantize_4bit(packed, state).cpu()


def as_trained(
    weight: torch.Tensor, quantized: bool, dtype: torch.dtype, device: torch.device = torch.device("cpu")
) -> torch.Tensor:
    """The weight as the 4-bit model held it: cast to the compute dtype, and NF4-rounded if the layer is NF4."""
    weight = weight.to(dtype)  # transformers casts to the compute dtype before quantizing: the NF4 codes depend on it
    return nf4_round(weight, device) if quantized else weight


def model_layout(base_dir: Path) -> tuple[set[str], dict[str, str]]:
    """Which weights BitsAndBytesConfig makes NF4 and which are tied (lm_head → embeddings), from config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):  # shapes and module types only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    # The same rule transformers applies when it loads the base in 4-bit: every plain Linear but the
    # output embedding, tied weights and the last module stays in NF4.
    skip = get_keys_to_not_convert(model)
    quantized = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    }
    return quantized, dict(model.all_tied_weights_keys)
