"""bitsandbytes' AVX512-BF16 CPU repack never touches a 4-bit layer qdpo trains through, whatever CPU runs this.

bitsandbytes 0.50 decides per layer, at construction, from the CPU's features (`has_avx512bf16`), whether an
eval-mode forward without grad may repack the weight for a bf16 kernel that has no backward. These tests make
every layer believe the CPU has the feature, so they exercise the trap on machines that lack it too.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from qdpo.batching import make_batch
from qdpo.config import Config
from qdpo.data import Columns, to_pairs
from qdpo.model import ModelSource, add_lora, disable_cpu_repack, load_base_4bit
from qdpo.reference import compute_reference
from qdpo.step import preference_loss
from qdpo.tokenize import tokenize_pairs
from qdpo.train import table_rows


def lora_grads(model_dir, pairs, pad_id):
    """LoRA gradients of one step after a reference pass (eval mode, no grad: the repack trigger)."""
    base = load_base_4bit(ModelSource("m", str(model_dir)), torch.float32, torch.device("cpu"), True)
    model = add_lora(base, 4, 8, 0.0, ["all-linear"], None, seed=0)
    with torch.no_grad():  # B != 0: gradients of A then flow through the frozen 4-bit layers above them
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    config = Config(model="x", data="y")
    table = compute_reference(model, pairs, [[0, 1]], pad_id, config.logits_chunk_size, config.batch_layout)
    model.train()
    losses, *_ = preference_loss(
        model, make_batch(pairs, pad_id, config.batch_layout), config, table_rows(table, [0, 1])
    )
    losses.sum().backward()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, layers, table


@pytest.fixture
def pairs(tokenizer, chat_rows):
    tokenized, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows[:2], Columns(), "t"), 128, 64)
    return tokenized


def test_gradients_survive_a_cpu_that_reports_avx512bf16(tiny_model_dir, tokenizer, pairs, monkeypatch):
    """Same reference table and LoRA gradients as on a CPU without the feature: no layer was repacked."""
    want_grads, _, want_table = lora_grads(tiny_model_dir, pairs, tokenizer.pad_token_id)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # what Zen 4 / Sapphire Rapids report
    got_grads, layers, got_table = lora_grads(tiny_model_dir, pairs, tokenizer.pad_token_id)
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    torch.testing.assert_close(got_table, want_table, rtol=0, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_trap_is_real_without_the_guard(tiny_model_dir, tokenizer, pairs, monkeypatch):
    """The forced flag does repack here when qdpo's guard is skipped, and the gradients then differ: the test above can fail."""
    want_grads, _, _ = lora_grads(tiny_model_dir, pairs, tokenizer.pad_token_id)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr("qdpo.model.disable_cpu_repack", lambda model: 0)
    got_grads, layers, _ = lora_grads(tiny_model_dir, pairs, tokenizer.pad_token_id)
    assert any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert any(not torch.allclose(got_grads[n], g, rtol=1e-3, atol=1e-4) for n, g in want_grads.items())


def test_guard_switches_every_4bit_layer(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(layer.support_avx512bf16_for_cpu for layer in layers)
    assert disable_cpu_repack(model) == len(layers) == 14  # 7 linears x 2 blocks of the tiny Llama
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
