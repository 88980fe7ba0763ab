"""The preference methods beyond DPO on the real step: what each reads from the model, checked another way.

The oracle is the tiny model's own logits (`model(ids).logits`, float64 log-softmax), one sequence at a
time, as in tests/test_families.py; the loss formulas themselves are checked by hand in tests/test_loss.py.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from qdpo.batching import length_grouped_batches, make_batch
from qdpo.checkpoint import resume_conflicts
from qdpo.cli import main
from qdpo.config import Config, build_config, parse_override
from qdpo.data import Columns, to_pairs
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.reference import compute_reference
from qdpo.step import preference_loss, score_batch
from qdpo.tokenize import tokenize_pairs
from qdpo.train import table_rows


def policy(model_dir):
    base = load_base_4bit(ModelSource("m", str(model_dir)), torch.float32, torch.device("cpu"), False)
    model = add_lora(base, 4, 8, 0.0, ["all-linear"], None, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the reference, so rewards and gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return policy(tiny_model_dir)


@pytest.fixture
def pairs(tokenizer, chat_rows):
    # Responses of different lengths within a pair, so LD-DPO's tail is not empty.
    for i, row in enumerate(chat_rows):
        row["rejected"][0]["content"] = "I am not sure" + " about that" * (i % 3) + "."
    return tokenize_pairs(tokenizer, to_pairs(chat_rows[:6], Columns(), "t"), 128, 64)[0]


def oracle(model, pairs, ld_alpha=None):
    """Per response, from the model's own logits of each sequence alone (float64): summed log-prob, length,
    LD-DPO's weighted sum, and WPO's summed aligned log-prob; chosen rows first, then rejected."""
    rows = []
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            for p in pairs:
                response = getattr(p, f"{side}_ids")
                ids = torch.tensor([p.prompt_ids + response])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                at = logp[len(p.prompt_ids) - 1 : -1]
                tokens = at.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
                aligned = tokens - torch.logsumexp(2 * at, -1)
                shared = min(len(p.chosen_ids), len(p.rejected_ids))
                weighted = tokens[:shared].sum() + (ld_alpha or 0.0) * tokens[shared:].sum()
                rows.append((tokens.sum().item(), len(response), weighted.item(), aligned.sum().item()))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "layout, chunk", [("plain", 0), ("plain", 3), ("shared", 3), ("packed", 0)], ids=lambda v: str(v)
)
def test_tail_and_aligned_sums_match_the_models_own_logits(model, pairs, tokenizer, layout, chunk):
    """LD-DPO's tail and WPO's aligned log-probs, in every layout and head path, against the oracle."""
    model.eval()
    with torch.no_grad():
        scores = score_batch(model, make_batch(pairs, tokenizer.pad_token_id, layout), chunk, aligned=True)
    want = oracle(model, pairs, ld_alpha=0.3)
    torch.testing.assert_close(scores.logps.double(), want[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.lengths.double(), want[:, 1])
    torch.testing.assert_close(scores.ld_logps(0.3).double(), want[:, 2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.aligned_logps.double(), want[:, 3], rtol=1e-4, atol=1e-4)
    assert (want[:, 2] != want[:, 0]).any()  # some pair has a tail, so the check can fail


def test_reference_free_methods_run_no_reference_forward(model, pairs, tokenizer, monkeypatch):
    """simpo and orpo never call the reference: the step equals their formulas on the oracle's log-probs."""

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free method ran a reference forward")

    monkeypatch.setattr("qdpo.step.reference_scores", no_reference)
    model.eval()
    batch = make_batch(pairs, tokenizer.pad_token_id, "shared")
    want = oracle(model, pairs)
    b = len(pairs)
    avg = (want[:, 0] / want[:, 1]).tolist()
    with torch.no_grad():
        losses, cr, rr, scores = preference_loss(model, batch, build_config(None, {"loss_type": "simpo", "beta": 2.0}))
    expected = [-math.log(1 / (1 + math.exp(-(2.0 * (avg[i] - avg[b + i]) - 0.5)))) for i in range(b)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert cr.tolist() == pytest.approx([2.0 * a for a in avg[:b]], rel=1e-4)
    with torch.no_grad():
        losses, cr, rr, scores = preference_loss(model, batch, build_config(None, {"loss_type": "orpo"}))
    odds = [math.log(math.exp(a) / (1 - math.exp(a))) for a in avg]
    expected = [-avg[i] + 0.1 * math.log1p(math.exp(-(odds[i] - odds[b + i]))) for i in range(b)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert set(scores.extras) == {"nll_loss", "log_odds_ratio", "log_odds_chosen"}


def test_sft_weight_computes_the_same_as_an_sft_term(model, pairs, tokenizer):
    """The deprecated sft_weight=0.5 and loss_type=[sigmoid, sft] loss_weights=[1, 0.5]: same losses, same grads."""
    model.train()
    batch = make_batch(pairs, tokenizer.pad_token_id, "shared")
    results = []
    for overrides in ({"sft_weight": 0.5}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}):
        model.zero_grad()
        losses, *_ = preference_loss(model, batch, build_config(None, overrides))
        losses.sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain, *_ = preference_loss(model, batch, Config())  # and the term is really there: + 0.5 x per-token NLL
    want = oracle(model, pairs)
    nll = -(want[: len(pairs), 0] / want[: len(pairs), 1])
    torch.testing.assert_close(results[0][0].double(), plain.detach().double() + 0.5 * nll, rtol=1e-4, atol=1e-4)
    model.zero_grad()


def test_the_sft_term_is_the_plain_nll_under_ld_dpo(model, pairs, tokenizer):
    """ld_alpha weights the log-probs of the DPO term only: [sigmoid, sft] weights [1, 0.5] with ld_alpha 0.3 is
    sigmoid with ld_alpha 0.3 plus 0.5 x the chosen response's mean per-token NLL over all its tokens (the oracle's),
    as TRL computes it; the chosen responses here differ in length from the rejected ones, so LD-DPO cuts a tail."""
    from dataclasses import replace

    pairs = [replace(p, chosen_ids=p.rejected_ids, rejected_ids=p.chosen_ids) for p in pairs]
    assert any(len(p.chosen_ids) > len(p.rejected_ids) for p in pairs)  # a chosen tail the weighting would shrink
    model.train()
    batch = make_batch(pairs, tokenizer.pad_token_id, "shared")
    with torch.no_grad():
        both, *_ = preference_loss(
            model,
            batch,
            build_config(None, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.3}),
        )
        alone, *_ = preference_loss(model, batch, build_config(None, {"ld_alpha": 0.3}))
    want = oracle(model, pairs)
    nll = -(want[: len(pairs), 0] / want[: len(pairs), 1])
    torch.testing.assert_close(both.double(), alone.double() + 0.5 * nll, rtol=1e-4, atol=1e-4)


def test_ld_dpo_reference_table_equals_the_reference_forward(model, pairs, tokenizer):
    """With ld_alpha the precomputed table holds LD-weighted reference log-probs, as the per-step reference does."""
    config = build_config(None, {"ld_alpha": 0.4, "loss_type": "sigmoid_norm", "use_weighting": True})
    batches = length_grouped_batches(pairs, 3, seed=0)
    model.eval()
    with torch.no_grad():
        table = compute_reference(model, pairs, batches, tokenizer.pad_token_id, 0, "shared", ld_alpha=0.4)
        plain = compute_reference(model, pairs, batches, tokenizer.pad_token_id, 0, "shared")
        for idx in batches:
            batch = make_batch([pairs[i] for i in idx], tokenizer.pad_token_id, "shared")
            from_table = preference_loss(model, batch, config, table_rows(table, idx))[0]
            on_the_fly = preference_loss(model, batch, config)[0]
            torch.testing.assert_close(from_table, on_the_fly, rtol=1e-5, atol=1e-6)
    assert not torch.equal(table, plain)


def test_loss_settings_from_the_command_line():
    """A list from YAML or commas, weights as numbers, one name kept as a plain string."""
    assert parse_override("loss_type=[sigmoid, sft]") == ("loss_type", ["sigmoid", "sft"])
    assert parse_override("loss_type=apo_zero,sft") == ("loss_type", ["apo_zero", "sft"])
    assert parse_override("loss_type=[simpo]") == ("loss_type", "simpo")
    assert parse_override("loss_weights=1,0.5") == ("loss_weights", [1.0, 0.5])
    assert parse_override("loss_weights=[2, 1e-1]") == ("loss_weights", [2.0, 0.1])
    notes = []
    config = build_config(None, {"sft_weight": 0.2}, notes)
    assert config.weighted_losses == [("sigmoid", 1.0), ("sft", 0.2)]
    assert notes and "sft_weight is deprecated" in notes[0] and "loss_type=[sigmoid, sft]" in notes[0]
    assert build_config(None, {"loss_type": "orpo"}).precompute_ref_log_probs is False
    assert not build_config(None, {"loss_type": ["simpo", "sft"]}).needs_reference
    assert build_config(None, {"loss_type": ["apo_down", "sft"]}).needs_reference


@pytest.mark.parametrize(
    "args, message",
    [
        (["loss_type=[sigmoid, orpo]"], "loss_type orpo combines only with sft"),
        (["loss_type=simpo", "precompute_ref_log_probs=true"], "loss_type simpo needs no reference model"),
        (["loss_type=[sigmoid, sft]", "loss_weights=[1]"], "loss_weights has 1 weights for 2 losses"),
        (["loss_weights=[-1, 1]"], "loss_weights must be finite and not negative"),
        (["loss_type=sft"], "loss_type sft is an extra term on another loss"),
        (["loss_type=dpo"], "loss_type dpo is called sigmoid (DPO's loss, as TRL names it); set loss_type=sigmoid."),
        (["loss_type=[sigmoid, sigmoid]"], "loss_type lists a loss twice"),
        (["loss_type=[sigmoid, sft]", "sft_weight=0.5"], "sft_weight and sft in loss_type both add"),
        (["loss_type=orpo", "use_weighting=true"], "use_weighting weighs DPO-style losses"),
        (["loss_type=simpo", "ld_alpha=0.5"], "ld_alpha weighs DPO-style losses"),
        (["ld_alpha=1.5"], "ld_alpha must be in [0, 1]"),
        (["loss_type=ipo", "label_smoothing=0.1"], "label_smoothing applies to loss_type sigmoid, robust or simpo"),
        (["loss_type={a: 1}"], "loss_type must be a loss name or a list of them"),
    ],
)
def test_configs_that_cannot_work_are_one_line(args, message):
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output, result.output


def test_new_loss_settings_change_what_a_resume_computes():
    """Each method setting is refused on a resume, as loss_type and beta are."""
    saved = Config().to_dict()
    for name, value in [
        ("loss_type", ["sigmoid", "sft"]),
        ("loss_weights", [1.0]),
        ("simpo_gamma", 1.0),
        ("orpo_alpha", 0.2),
        ("ld_alpha", 0.5),
        ("use_weighting", True),
        ("loss_type", "kto"),
        ("desirable_weight", 1.5),
        ("undesirable_weight", 0.5),
        ("label_column", "good"),
    ]:
        conflicts = resume_conflicts(saved, Config(**{name: value}))
        assert conflicts and conflicts[0].startswith(f"{name}:"), name


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default():
    """A qdpo that had no desirable_weight computed what desirable_weight=1 computes: no conflict then."""
    saved = Config().to_dict()
    del saved["desirable_weight"], saved["completion_column"]
    assert resume_conflicts(saved, Config()) == []
    assert resume_conflicts(saved, Config(desirable_weight=2.0)) == ["desirable_weight: 1.0 -> 2.0"]


def test_readme_and_settings_list_every_method():
    """Each loss_type has a README table row and a line in `qdpo settings` with its data and reference."""
    from pathlib import Path

    from qdpo.config import METHODS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listing = CliRunner().invoke(main, ["settings"]).output
    for name, (_, data, reference) in METHODS.items():
        assert f"| `{name}` |" in readme, name
        line = next(line for line in listing.splitlines() if line.strip().startswith(name + " "))
        assert data in line and ("needs a reference" if reference else "no reference") in line, line


def test_orpo_run_has_no_reference_and_logs_trls_names(tmp_path, tiny_model_dir, chat_rows, monkeypatch):
    """A reference-free run says so, writes no reference table, and logs ORPO's metrics (eval too)."""
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    out = tmp_path / "run"
    args = ["run", "--output", str(out), "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    settings = ["loss_type=orpo", "max_steps=2", "micro_batch_size=2", "gradient_accumulation_steps=1"]
    result = CliRunner().invoke(main, [*args, *settings, "eval_fraction=0.25"])
    assert result.exit_code == 0, result.output
    assert "reference: none (loss_type orpo needs no reference model" in result.output
    assert not list((tmp_path / "cache").glob("reference/*.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if "loss" in row]
    for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert name in trained[0] and "eval_" + name in rows[-1]


def test_planner_knows_reference_free_methods_carry_no_reference():
    """simpo/orpo with an init_adapter drop the frozen reference copy; the step's peak is otherwise the same
    (the reference pass runs without grad and never set the peak)."""
    from qdpo.plan import REF_ADAPTER, plan_memory
    from qdpo.shapes import BUILTIN_SHAPES

    shape = BUILTIN_SHAPES["meta-llama/Llama-2-7b-hf"][1]
    plans = {
        loss: plan_memory(shape, build_config(None, {"loss_type": loss, "init_adapter": "sft-adapter"}), 1, 1024)
        for loss in ("sigmoid", "simpo", "orpo")
    }
    reference_copy = [line.bytes for line in plans["sigmoid"].lines if line.part == REF_ADAPTER]
    assert reference_copy and reference_copy[0] > 0
    for loss in ("simpo", "orpo"):
        assert REF_ADAPTER not in [line.part for line in plans[loss].lines]
        assert any(a.startswith(f"no reference model (loss_type {loss})") for a in plans[loss].assumptions)
        assert plans[loss].total < plans["sigmoid"].total
