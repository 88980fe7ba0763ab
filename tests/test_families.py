"""Conformance suite: every fast path gives the model's own log-probs, on every family qdpo accepts.

The oracle is the model's own forward: `model(input_ids).logits` of the same loaded 4-bit model, in eval
mode, one sequence at a time, log-softmax in float64. Whatever a family does after the output embedding
(soft-capping, logit scaling) or with its attention (sliding windows, local and global layers), the oracle
has it. Each tiny model has a sliding window of 8 where the family has one, and the pairs are longer.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

from qdpo.batching import make_batch
from qdpo.config import Config
from qdpo.data import Columns, to_pairs
from qdpo.errors import UserError
from qdpo.families import FAMILIES, family_table
from qdpo.model import ModelSource, add_lora, load_base_4bit, reference_model
from qdpo.reference import compute_reference
from qdpo.step import preference_loss, reference_scores, score_batch
from qdpo.tokenize import tokenize_pairs
from qdpo.train import table_rows

WINDOW = 8
# The suite runs on the CPU; QDPO_TEST_DEVICE=cuda runs the same checks on a GPU (fp32 compute, CUDA kernels).
DEVICE = torch.device(os.environ.get("QDPO_TEST_DEVICE", "cpu"))
# Per family: the settings that make its tiny model exercise what differs (windows, soft-caps, scales, dropout, MoE).
FAMILY_SETTINGS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, router_jitter_noise=0.1),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=WINDOW,
        final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi": dict(resid_pdrop=0.3, embd_pdrop=0.3, attention_dropout=0.3),  # dropout in the config (Phi-2 style)
    "phi3": dict(sliding_window=WINDOW),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": dict(logit_scale=0.5),
    "olmo2": {},
    "stablelm": {},
}
COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
LN2 = math.log(2)
# On the CPU the policy and reference passes run the same kernels: exactly ln 2. CUDA picks other kernels
# with and without grad, so fp32 rounding differs there by a few 1e-6.
LN2_ATOL = 1e-6 if DEVICE.type == "cpu" else 5e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds synchronisation (50x slower per call on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_verified_family_has_a_tiny_model_here():
    assert set(FAMILY_SETTINGS) == set(FAMILIES)


def make_family_model(path: Path, model_type: str, **changes) -> None:
    """A tiny random model of the family, fp32, with the test tokenizer, saved to path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **{**FAMILY_SETTINGS[model_type], **changes})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights large enough that 4-bit rounding, windows and LoRA all move the numbers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    make_tokenizer(path)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for model_type in FAMILY_SETTINGS:
        path = tmp_path_factory.mktemp(model_type)
        make_family_model(path, model_type)
        dirs[model_type] = path
    return dirs


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """Pairs longer than every window: prompts ~20 tokens, responses 10-30 tokens, lengths differ."""
    rows = []
    for i in range(5):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus two? Answer briefly and correctly please."}],
                "chosen": [
                    {
                        "role": "assistant",
                        "content": f"{i} plus two is {i + 2}, I think." + " The answer is four." * (i % 3),
                    }
                ],
                "rejected": [
                    {"role": "assistant", "content": "I am not sure about that, let me think about it for a while."}
                ],
            }
        )
    tokenized, _ = tokenize_pairs(tokenizer, to_pairs(rows, Columns(), "t"), 96, 48)
    assert min(len(p.chosen_ids) for p in tokenized) > WINDOW and min(len(p.prompt_ids) for p in tokenized) > WINDOW
    return tokenized


def oracle(model, pairs, reference: bool) -> torch.Tensor:
    """Summed response log-probs, chosen then rejected, each from the model's own logits of one sequence."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for side in ("chosen_ids", "rejected_ids"):
            for p in pairs:
                ids = torch.tensor([p.prompt_ids + getattr(p, side)], device=DEVICE)
                if reference:
                    with reference_model(model):
                        logits = model(input_ids=ids).logits[0]
                else:
                    logits = model(input_ids=ids).logits[0]
                logps = torch.log_softmax(logits.double(), -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0].cpu()
                out.append(float(logps[len(p.prompt_ids) - 1 :].sum()))
    model.train(was_training)
    return torch.tensor(out, dtype=torch.float64)


def load(model_dir: Path, init_adapter: str | None = None):
    base = load_base_4bit(ModelSource("m", str(model_dir)), torch.float32, DEVICE, True)
    return add_lora(base, 4, 8, 0.0, ["all-linear"], init_adapter, seed=0)


def perturb_policy(model, seed: int = 3) -> None:
    """Move the trained adapter away from the reference, so policy and reference scores differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.3)


@pytest.fixture(scope="module")
def sft_adapters(family_dirs, tmp_path_factory) -> dict[str, str]:
    """Per family, an 'SFT' adapter with nonzero B and lora_dropout 0.2 in its own config (peft allows none on MoE experts)."""
    out = {}
    for model_type, model_dir in family_dirs.items():
        base = load_base_4bit(ModelSource("m", str(model_dir)), torch.float32, DEVICE, False)
        dropout = 0.0 if "num_experts_per_tok" in FAMILY_SETTINGS[model_type] else 0.2
        sft = add_lora(base, 4, 8, dropout, ["all-linear"], None, seed=1)
        perturb_policy(sft, seed=11)
        path = tmp_path_factory.mktemp(f"sft-{model_type}")
        sft.save_pretrained(path)
        out[model_type] = str(path)
    return out


LAYOUTS = ("plain", "shared", "packed")
CHUNKS = (0, 5)


def scores_by_path(model, pairs, pad_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layout and chunk size: policy scores (train mode), precomputed reference, in-step reference."""
    batches = [[0, 1], [2, 3, 4]]
    result = {}
    for layout in LAYOUTS:
        for chunk in CHUNKS:
            model.train()
            policy, in_step = torch.zeros(2 * len(pairs)), torch.zeros(2 * len(pairs))
            for idx in batches:
                batch = make_batch([pairs[i] for i in idx], pad_id, layout)
                b = len(idx)
                p = score_batch(model, batch, chunk).logps.detach().cpu()
                r = reference_scores(model, batch, chunk).logps.cpu()
                for k, i in enumerate(idx):
                    policy[i], policy[len(pairs) + i] = p[k], p[b + k]
                    in_step[i], in_step[len(pairs) + i] = r[k], r[b + k]
            table = compute_reference(model, pairs, batches, pad_id, chunk, layout)
            result[f"{layout}/chunk{chunk}"] = (policy, torch.cat([table[:, 0], table[:, 1]]), in_step)
    return result


@pytest.mark.parametrize("with_init_adapter", [False, True], ids=["fresh-lora", "init-adapter"])
@pytest.mark.parametrize("model_type", list(FAMILY_SETTINGS))
def test_every_path_matches_the_models_own_forward(
    model_type, with_init_adapter, family_dirs, sft_adapters, pairs, tokenizer
):
    """Plain, shared and packed layouts, chunked logits on and off, reference precomputed and in-step: all equal the oracle."""
    model = load(family_dirs[model_type], sft_adapters[model_type] if with_init_adapter else None)
    pad = tokenizer.pad_token_id

    # Step 0, train mode: policy == reference, so every pair's loss is exactly ln 2 and the margins are 0.
    config = Config(model="x", data="y", logits_chunk_size=5)
    model.train()
    for layout in LAYOUTS:
        batch = make_batch(pairs[:3], pad, layout)
        table = compute_reference(model, pairs, [[0, 1, 2]], pad, 5, layout)
        for reference in (table_rows(table, [0, 1, 2]), None):
            losses, chosen_rewards, rejected_rewards, _ = preference_loss(model, batch, config, reference)
            torch.testing.assert_close(losses.detach(), torch.full_like(losses, LN2), rtol=0, atol=LN2_ATOL)
            assert chosen_rewards.abs().max() < LN2_ATOL and rejected_rewards.abs().max() < LN2_ATOL

    perturb_policy(model)
    want_policy, want_reference = oracle(model, pairs, reference=False), oracle(model, pairs, reference=True)
    assert (want_policy - want_reference).abs().max() > 0.05  # the test can tell policy from reference
    for path, (policy, precomputed, in_step) in scores_by_path(model, pairs, pad).items():
        for name, got, want in (
            ("policy", policy, want_policy),
            ("precomputed reference", precomputed, want_reference),
            ("in-step reference", in_step, want_reference),
        ):
            error = (got.double() - want).abs().max().item()
            assert error < 2e-3, f"{model_type} {path} {name}: off the oracle by {error:.4g} nats"


def test_windows_and_scales_matter_for_the_oracle(family_dirs, pairs):
    """The suite can fail: without the window (Mistral) or the logit scale (Granite) the scores move by far more than the tolerance."""
    from transformers import AutoModelForCausalLM

    p = pairs[0]
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    for model_type, setting, other in (("mistral", "sliding_window", 10_000), ("granite", "logits_scaling", 1.0)):
        model = AutoModelForCausalLM.from_pretrained(family_dirs[model_type]).eval()
        with torch.no_grad():
            before = torch.log_softmax(model(ids).logits.double(), -1)
            setattr(model.config, setting, other)
            after = torch.log_softmax(model(ids).logits.double(), -1)
        assert (before - after).abs().max() > 0.1, model_type


@pytest.mark.parametrize("model_type", list(FAMILY_SETTINGS))
def test_qdpo_run_end_to_end_with_defaults(model_type, family_dirs, tmp_path, chat_rows):
    """`qdpo run` with default settings finishes on each family, step 1 is ln 2, and the adapter loads with PEFT."""
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qdpo.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--preset",
            "smoke",
            "--model",
            str(family_dirs[model_type]),
            "--data",
            str(data),
            "--output",
            str(out),
            "--no-progress",
            "max_steps=2",
            "micro_batch_size=4",
            "max_length=64",
            "eval_fraction=0.25",
            "loss_type=sigmoid",  # plain DPO (the smoke preset adds an NLL term): step 1's loss is ln 2
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"model family: {FAMILIES[model_type].label}" in result.output
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])  # [0] is step 0's held-out baseline
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    base = AutoModelForCausalLM.from_pretrained(family_dirs[model_type])
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in n for n, _ in tuned.named_parameters())


def test_an_unverified_family_takes_the_exact_paths(tmp_path, chat_rows):
    """A family qdpo has not verified (GPT-2 here) runs the plain layout with the model's own logits, and says so."""
    from click.testing import CliRunner
    from transformers import GPT2Config, GPT2LMHeadModel

    from qdpo.cli import main

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    ).save_pretrained(tmp_path / "gpt2")
    make_tokenizer(tmp_path / "gpt2")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    args = [
        "run",
        "--preset",
        "smoke",
        "--model",
        str(tmp_path / "gpt2"),
        "--data",
        str(data),
        "--no-progress",
        "max_steps=1",
        "micro_batch_size=4",
        "max_length=64",
        "eval_fraction=0.25",
    ]
    result = CliRunner().invoke(main, args + ["--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "not verified by qdpo" in result.output and "plain layout" in result.output
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "share_prompt: false" in resolved and "logits_chunk_size: 0" in resolved
    forced = CliRunner().invoke(main, args + ["--output", str(tmp_path / "run2"), "share_prompt=true"])
    assert forced.exit_code == 2 and "share_prompt=true cannot be exact" in forced.output
    assert not (tmp_path / "run2").exists()


def test_readme_family_table_is_the_suites():
    """The README's table of supported families is generated from qdpo.families, which this suite checks."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- families:start -->\n(.*?)<!-- families:end -->", readme, re.S)
    assert block, "README.md lacks the generated family table (python -m qdpo.families)"
    assert block.group(1) == family_table()


# The shared-prompt layout without a dense mask (qdpo.attention), windows and Gemma-2's soft-capped scores included;
# StableLM's decoder layers drop the attention kwargs, and qdpo hands the spans on (attention.hand_spans_on).
WINDOWED = ("mistral", "mixtral", "qwen2", "qwen2_moe", "gemma3_text", "phi3")
SPAN_ATTENTION = {"llama", "qwen3", "gemma", "phi", "granite", "cohere", "olmo2", "gemma2", "stablelm", *WINDOWED}


def takes_span_attention(model, pairs, pad_id: int) -> bool:
    from qdpo import attention
    from qdpo.step import DENSE_ONLY

    before = attention.calls
    with torch.no_grad():
        score_batch(model, make_batch(pairs, pad_id, "shared"), 5)
    return attention.calls > before and model.get_base_model() not in DENSE_ONLY


def test_which_families_take_the_span_attention(family_dirs, pairs, tokenizer):
    took = {
        t for t, path in family_dirs.items() if takes_span_attention(load(path), pairs[:2], tokenizer.pad_token_id)
    }
    assert took == SPAN_ATTENTION


def test_a_layer_whose_attention_never_sees_the_spans_falls_back_to_the_dense_mask(family_dirs, pairs, tokenizer):
    """StableLM without the hook that hands its spans on is what a family whose layers drop the attention kwargs looks like: the
    first forward finds a layer that made no span call, throws that forward away and keeps the dense mask, exactly."""
    from qdpo.step import DENSE_ONLY

    model = load(family_dirs["stablelm"])
    for layer in model.get_base_model().get_decoder().layers:
        layer.self_attn._forward_pre_hooks.clear()
    span_layouts_match_the_oracle(model, pairs, tokenizer.pad_token_id, spans=False)
    assert model.get_base_model() in DENSE_ONLY


@pytest.mark.parametrize("layout", ("shared", "packed"))
def test_handed_on_spans_give_stablelms_gradients_through_checkpointed_layers(layout, family_dirs, pairs, tokenizer):
    """The hooks that hand StableLM's spans to its attention also act when gradient checkpointing replays a layer in
    backward: the LoRA gradients of a DPO loss equal those through the dense mask, to fp32 rounding."""
    from qdpo.step import DENSE_ONLY

    batch = make_batch(pairs[:3], tokenizer.pad_token_id, layout)
    config = Config(model="x", data="y", logits_chunk_size=5)
    grads = {}
    for path in ("spans", "dense"):
        model = load(family_dirs["stablelm"])
        assert model.get_base_model().is_gradient_checkpointing
        if path == "dense":
            DENSE_ONLY.add(model.get_base_model())
        perturb_policy(model)
        model.train()
        losses, _, _, _ = preference_loss(model, batch, config)
        losses.sum().backward()
        assert (model.get_base_model() in DENSE_ONLY) == (path == "dense")
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(grads["spans"], grads["dense"])


@pytest.mark.parametrize("model_type", WINDOWED)
def test_span_attention_where_the_window_does_not_cut(model_type, tmp_path, pairs, tokenizer):
    """A window longer than every pair leaves the span path exact for the windowed families too (MoE included)."""
    make_family_model(tmp_path, model_type, sliding_window=10_000)
    span_layouts_match_the_oracle(load(tmp_path), pairs, tokenizer.pad_token_id)


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same LoRA parameters have gradients, none all zero, each within 1e-4 of its largest entry (fp32 rounding)."""
    assert got.keys() == want.keys() and len(want) > 4
    for name, expected in want.items():
        scale = expected.abs().max().item()
        error = (got[name] - expected).abs().max().item()
        assert scale > 0 and error <= 1e-4 * scale, f"{name}: {error:.3g} off, of {scale:.3g}"


def span_layouts_match_the_oracle(model, pairs, pad_id: int, spans: bool = True) -> None:
    """With the adapter moved off the reference: the span path runs (or not), and both shared layouts equal the
    oracle."""
    perturb_policy(model)
    assert takes_span_attention(model, pairs[:2], pad_id) == spans
    want = oracle(model, pairs[:3], reference=False)
    for layout in ("shared", "packed"):
        model.train()
        got = score_batch(model, make_batch(pairs[:3], pad_id, layout), 5).logps.detach().double()
        error = (got - want).abs().max().item()
        assert error < 2e-3, f"{model.config.model_type} {layout}: off the oracle by {error:.4g} nats"


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_the_gpus_lower_right_call_matches_the_oracle(model_type, family_dirs, pairs, tokenizer, monkeypatch):
    """The branch a GPU takes (rejected queries only, `causal_lower_right` over prompt+rejected keys), run here on
    the CPU's math kernel: the same scores as the model's own forward."""
    from qdpo import attention

    monkeypatch.setattr(attention, "lower_right_is_fast", lambda query: True)
    span_layouts_match_the_oracle(load(family_dirs[model_type]), pairs, tokenizer.pad_token_id)


def count_windowed_calls(monkeypatch) -> list[int]:
    """Count qdpo.attention.windowed's query blocks from now on (one list entry per block)."""
    from qdpo import attention

    blocks, original = [], attention.blocks

    def counted(*args):
        out = original(*args)
        blocks.extend(b - a for a, b, _, _ in out)
        return out

    monkeypatch.setattr(attention, "blocks", counted)
    return blocks


WINDOWED_CASES = [(t, 5, False) for t in ("mistral", "qwen2_moe", "gemma3_text", "phi3")]
WINDOWED_CASES += [
    ("mistral", 1024, False),
    ("gemma3_text", 1024, False),
    ("mistral", 5, True),
    ("qwen2_moe", 5, True),
]


@pytest.mark.parametrize("model_type, block, fold", WINDOWED_CASES)
def test_windowed_attention_matches_the_oracle(model_type, block, fold, family_dirs, pairs, tokenizer, monkeypatch):
    """Where the window (8) cuts the pairs, every layout runs qdpo.attention's windowed blocks, no mask: blocks of 5
    queries (shorter than the window, so each reaches back into earlier blocks; the last one partial) and one block
    per call give the model's own scores, and so does the GPU's way of running them (fold: each kv head's query
    heads folded into one run of queries, the mask rows stacked). Qwen2-MoE keeps its window in its mask only (no
    `sliding_window` argument reaches the attention function); Gemma-3 mixes local and global layers."""
    from qdpo import attention

    monkeypatch.setattr(attention, "BLOCK", block)
    monkeypatch.setattr(attention, "folds_gqa", lambda q: fold)
    blocks = count_windowed_calls(monkeypatch)
    model = load(family_dirs[model_type])
    perturb_policy(model)
    want = oracle(model, pairs[:3], reference=False)
    for layout in LAYOUTS:
        model.train()
        blocks.clear()
        got = score_batch(model, make_batch(pairs[:3], tokenizer.pad_token_id, layout), 5).logps.detach().double()
        error = (got - want).abs().max().item()
        assert error < 2e-3, f"{model_type} {layout}: off the oracle by {error:.4g} nats"
        assert blocks and max(blocks) == min(block, max(blocks)) and (block > 100 or min(blocks) < block), blocks


@pytest.mark.parametrize("fold", [False, True], ids=["enable_gqa", "folded"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_windowed_attention_gradients_match_the_dense_mask(layout, fold, family_dirs, pairs, tokenizer, monkeypatch):
    """The LoRA gradients of a DPO loss through the windowed blocks (blocks of 5; with GQA passed to SDPA as the CPU
    runs them, or folded as the GPU does) equal those through the dense mask (transformers' own for plain rows,
    qdpo's for shared and packed ones), to fp32 rounding."""
    from qdpo import attention

    batch = make_batch(pairs[:3], tokenizer.pad_token_id, layout)
    config = Config(model="x", data="y", logits_chunk_size=5)
    grads = {}
    for path in ("blocks", "dense"):
        with monkeypatch.context() as m:
            m.setattr(attention, "BLOCK", 5)
            m.setattr(attention, "folds_gqa", lambda q: fold)
            blocks = count_windowed_calls(m)
            if path == "dense":
                m.setattr(attention, "span_problem", lambda config: "dense, for comparison")
            model = load(family_dirs["mistral"])
            perturb_policy(model)
            model.train()
            losses, _, _, _ = preference_loss(model, batch, config)
            losses.sum().backward()
            assert bool(blocks) == (path == "blocks")
            grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(grads["blocks"], grads["dense"])


def errors_by_layout(model, pairs, pad_id: int, chunks=(5,)) -> dict[str, float]:
    """Per layout and chunk size, the largest distance of the policy's scores (one micro-batch) from the oracle."""
    perturb_policy(model)
    want = oracle(model, pairs, reference=False)
    errors = {}
    for layout in LAYOUTS:
        for chunk in chunks:
            model.train()
            got = score_batch(model, make_batch(pairs, pad_id, layout), chunk).logps.detach().double().cpu()
            errors[f"{layout}/chunk{chunk}"] = (got - want).abs().max().item()
    return errors


@pytest.mark.parametrize("model_type", ["llama", "cohere"])
def test_a_stray_sliding_window_is_ignored_as_the_model_ignores_it(model_type, tmp_path, pairs, tokenizer):
    """A config.json of a family whose code has no sliding window may still carry a `sliding_window` key (8 here,
    shorter than every pair): the model ignores it, and so does every layout."""
    make_family_model(tmp_path, model_type, sliding_window=8)
    model = load(tmp_path)
    assert model.config.sliding_window == 8
    for path, error in errors_by_layout(model, pairs[:3], tokenizer.pad_token_id).items():
        assert error < 2e-3, f"{model_type} {path}: off the oracle by {error:.4g} nats"


@pytest.mark.parametrize("model_type", ["mistral", "phi3"])
def test_a_window_beside_use_sliding_window_false_still_applies(model_type, tmp_path, pairs, tokenizer):
    """Mistral's and Phi-3's code never reads `use_sliding_window` (Qwen's configs fold it into the window): with it
    false beside a window of 8, the model's own forward still windows, and so must every layout (qdpo used to take
    the flag at its word: full attention, 13-16 nats off)."""
    make_family_model(tmp_path, model_type, use_sliding_window=False)
    model = load(tmp_path)
    assert model.config.use_sliding_window is False and model.config.sliding_window == WINDOW
    for path, error in errors_by_layout(model, pairs[:3], tokenizer.pad_token_id, CHUNKS).items():
        assert error < 2e-3, f"{model_type} {path}: off the oracle by {error:.4g} nats"


def longrope(limit: int) -> dict:
    """Phi-3.5-style LongRoPE on the tiny model (head_dim 16: 8 factors), switching past `limit` tokens."""
    return dict(
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [1.0 + 3 * i for i in range(8)],
            "original_max_position_embeddings": limit,
        },
        original_max_position_embeddings=limit,
    )


def test_longrope_is_exact_when_every_sequence_is_past_its_switch_and_refused_across_it(tmp_path, pairs, tokenizer):
    """transformers picks LongRoPE's short or long factors for a whole batch from its largest position: sequences
    62-86 tokens long. With the switch at 40 all take the long factors, alone or batched, so every layout equals the
    oracle; at 70 a batch mixes them, the short ones score unlike alone (the plain layout, the model's own batched
    forward, too), and qdpo refuses the data before loading the model."""
    from types import SimpleNamespace

    from qdpo.families import length_switched_rope
    from qdpo.prepare import check_rope_lengths

    lengths = sorted(len(p.prompt_ids) + len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids))
    assert lengths[0] <= 70 < lengths[-1] and lengths[0] > 40
    make_family_model(tmp_path / "past", "phi3", **longrope(40))
    model = load(tmp_path / "past")
    assert length_switched_rope(model.config) == ("longrope", 40)
    for path, error in errors_by_layout(model, pairs, tokenizer.pad_token_id, CHUNKS).items():
        assert error < 2e-3, f"longrope past its switch {path}: off the oracle by {error:.4g} nats"
    check_rope_lengths(SimpleNamespace(model_config=model.config, train=pairs[:3], eval=pairs[3:]))

    make_family_model(tmp_path / "across", "phi3", **longrope(70))
    model = load(tmp_path / "across")
    errors = errors_by_layout(model, pairs, tokenizer.pad_token_id)
    assert min(errors.values()) > 0.1, errors  # why it is refused: every layout batches a short one with a long one
    with pytest.raises(UserError, match=r"Phi-3 uses LongRoPE.* set max_length=70 to cut the long ones"):
        check_rope_lengths(SimpleNamespace(model_config=model.config, train=pairs[:3], eval=pairs[3:]))
    model.config.rope_parameters["original_max_position_embeddings"] = lengths[-1]  # all on the short side
    check_rope_lengths(SimpleNamespace(model_config=model.config, train=pairs[:3], eval=pairs[3:]))


def test_dynamic_rope_is_refused_past_max_position_embeddings(pairs):
    """Dynamic NTK rescales a whole batch once a sequence passes max_position_embeddings, and keeps the rescaling for
    the batches after it: a sequence's score would depend on the batches before it."""
    from types import SimpleNamespace

    from qdpo.prepare import check_rope_lengths

    def config(limit: int):
        return SimpleNamespace(
            model_type="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=limit
        )

    check_rope_lengths(SimpleNamespace(model_config=config(86), train=pairs, eval=[]))  # the longest is 86 tokens
    with pytest.raises(UserError, match=r"Llama uses dynamic RoPE scaling.*set max_length=85\.$"):
        check_rope_lengths(SimpleNamespace(model_config=config(85), train=pairs, eval=[]))


def test_a_bidirectional_model_is_refused_before_loading():
    """EmbeddingGemma-style configs: every token sees the next one, so there is no response log-prob to tune."""
    from types import SimpleNamespace

    from qdpo.families import exact_settings

    config = SimpleNamespace(model_type="gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(UserError, match=r"^Gemma-3 \(text\) is configured with bidirectional attention"):
        exact_settings(Config(model="x", data="y"), config)
    exact_settings(
        Config(model="x", data="y"), SimpleNamespace(model_type="gemma3_text", use_bidirectional_attention=False)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_soft_capped_attention_gradients_match_the_eager_path(layout, family_dirs, pairs, tokenizer, monkeypatch):
    """Gemma-2 (scores soft-capped at 5, window 8): the LoRA gradients of a DPO loss through qdpo's capped blocks (their
    own backward, blocks of at least 16 queries) equal those through transformers' eager attention with the dense
    mask, to fp32 rounding."""
    from qdpo import attention, capped_attention

    batch = make_batch(pairs[:3], tokenizer.pad_token_id, layout)
    config = Config(model="x", data="y", logits_chunk_size=5)
    grads = {}
    for path in ("blocks", "eager"):
        with monkeypatch.context() as m:
            m.setattr(capped_attention, "SCORES_PER_BLOCK", 1)  # the smallest blocks: 16 queries
            if path == "eager":
                m.setattr(attention, "span_problem", lambda config: "dense, for comparison")
            before = attention.calls
            model = load(family_dirs["gemma2"])
            perturb_policy(model)
            model.train()
            losses, _, _, _ = preference_loss(model, batch, config)
            losses.sum().backward()
            assert (attention.calls > before) == (path == "blocks")
            grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(grads["blocks"], grads["eager"])


def test_gemma3_ignores_attn_logit_softcapping_and_so_does_qdpo(tmp_path, pairs, tokenizer):
    """Gemma-3's attention never passes the config's attn_logit_softcapping on (unlike Gemma-2's): with one set, its
    scores are still uncapped, so qdpo keeps it on the span path, on every layout, and the plan agrees."""
    from qdpo import attention
    from qdpo.plan import loaded_config

    make_family_model(tmp_path, "gemma3_text", attn_logit_softcapping=5.0)
    model = load(tmp_path)
    assert model.config.attn_logit_softcapping == 5.0 and not attention.softcapped(model.config)
    assert loaded_config(model.config.to_dict())._attn_implementation == model.config._attn_implementation
    span_layouts_match_the_oracle(model, pairs, tokenizer.pad_token_id)
    want = oracle(model, pairs[:3], reference=False)
    got = score_batch(model, make_batch(pairs[:3], tokenizer.pad_token_id, "plain"), 5).logps.detach().double()
    assert (got - want).abs().max().item() < 2e-3


@pytest.mark.parametrize("model_type", list(FAMILY_SETTINGS))
def test_batched_greedy_answers_are_each_prompts_own(model_type, family_dirs, pairs, tokenizer):
    """Eval answers decode prompts in left-padded batches: each answer must be what its prompt alone gets from an
    argmax loop over the model's own logits (no cache, no padding), prompts longer than every window."""
    from test_generate import argmax_loop

    from qdpo.generate import greedy

    model = load(family_dirs[model_type])
    perturb_policy(model)
    prompts = [p.prompt_ids + p.chosen_ids[:k] for p, k in zip(pairs, (0, 7, 3))]  # three lengths
    prompts.append(pairs[3].prompt_ids[:4])  # padded by more than the window (8) in its batch
    assert len({len(ids) for ids in prompts}) == 4 and max(map(len, prompts)) - 4 > WINDOW
    got = greedy(model, tokenizer, prompts, max_new_tokens=6)
    for ids, answer in zip(prompts, got):
        assert answer.ids == argmax_loop(model, ids, 6, {tokenizer.eos_token_id}), model_type
