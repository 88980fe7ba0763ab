"""The 4-bit policy/reference pair: step 0 is log 2, adapters switch cleanly, training moves only LoRA."""

import math

import torch

from qdpo.batching import collate
from qdpo.config import Config
from qdpo.data import Columns, to_pairs
from qdpo.model import ModelSource, add_lora, load_base_4bit, reference_model
from qdpo.step import preference_loss, score_batch
from qdpo.tokenize import tokenize_pairs

CPU = torch.device("cpu")


def load_policy(model_dir, init_adapter=None, checkpointing=True):
    base = load_base_4bit(ModelSource(str(model_dir), str(model_dir)), torch.float32, CPU, checkpointing)
    return add_lora(base, 8, 16, 0.0, ["all-linear"], init_adapter, seed=0)


def make_batch(tokenizer, rows):
    pairs = to_pairs(rows, Columns(), "test")
    tokenized, _ = tokenize_pairs(tokenizer, pairs, 128, 64)
    return collate(tokenized, tokenizer.pad_token_id)


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_base_is_really_4bit(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_policy(tiny_model_dir)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for layer in linears:
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
        assert layer.weight.dtype == torch.uint8


def test_step_zero_loss_is_log2(tiny_model_dir, tokenizer, chat_rows):
    model = load_policy(tiny_model_dir)
    batch = make_batch(tokenizer, chat_rows[:4])
    losses, cr, rr, _ = preference_loss(model, batch, Config(model="x", data="y"))
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=0, rtol=0)
    assert cr.abs().max() == 0 and rr.abs().max() == 0


def test_adapters_off_give_base_outputs_and_on_give_policy(tiny_model_dir, tokenizer, chat_rows):
    batch = make_batch(tokenizer, chat_rows[:3])
    plain = load_base_4bit(ModelSource("m", str(tiny_model_dir)), torch.float32, CPU, False)
    with torch.no_grad():
        base_logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    model = load_policy(tiny_model_dir)
    randomize_lora_b(model)
    with torch.no_grad():
        policy_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with reference_model(model):
            ref_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        again = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (policy_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the function
    assert torch.equal(ref_logits, base_logits)
    assert torch.equal(again, policy_logits)


def test_training_raises_margin_and_changes_only_lora(tiny_model_dir, tokenizer, chat_rows):
    model = load_policy(tiny_model_dir)
    model.train()
    config = Config(model="x", data="y", beta=0.5)
    batch = make_batch(tokenizer, chat_rows[:4])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    margins = []
    for _ in range(5):
        losses, cr, rr, _ = preference_loss(model, batch, config)
        margins.append(float((cr - rr).mean()))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert margins[0] == 0.0 and margins[-1] > 0.05, margins
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"LoRA parameter {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"base parameter {name} changed"
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), f"buffer {name} changed"


def test_checkpointing_gives_the_same_gradients(tiny_model_dir, tokenizer, chat_rows):
    batch = make_batch(tokenizer, chat_rows[:2])
    grads = []
    for checkpointing in (True, False):
        model = load_policy(tiny_model_dir, checkpointing=checkpointing)
        randomize_lora_b(model)
        model.train()
        losses, *_ = preference_loss(model, batch, Config(model="x", data="y"))
        losses.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_init_adapter_is_the_reference(tiny_model_dir, tokenizer, chat_rows, tmp_path):
    """Starting from an SFT adapter: step 0 is log 2 against the SFT model, not the bare base."""
    sft = load_policy(tiny_model_dir)
    randomize_lora_b(sft, seed=7)
    sft.save_pretrained(tmp_path / "sft")
    batch = make_batch(tokenizer, chat_rows[:4])
    with torch.no_grad():
        sft_scores = score_batch(sft, batch).logps
        with sft.disable_adapter():
            base_scores = score_batch(sft, batch).logps
    assert (sft_scores - base_scores).abs().max() > 0.1

    model = load_policy(tiny_model_dir, init_adapter=str(tmp_path / "sft"))
    model.train()
    losses, cr, rr, policy = preference_loss(model, batch, Config(model="x", data="y"))
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=0, rtol=0)
    torch.testing.assert_close(policy.logps.detach(), sft_scores, rtol=1e-5, atol=1e-5)
    # the frozen reference copy stays put while the policy copy trains
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference." in n}
    assert ref_before and not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        losses, *_ = preference_loss(model, batch, Config(model="x", data="y"))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if ".reference." in n:
            assert torch.equal(p, ref_before[n])
