"""Precomputed reference log-probs equal the per-step reference pass, and the disk cache is reused."""

import math

import pytest
import torch

from qdpo.batching import length_grouped_batches, make_batch
from qdpo.config import Config
from qdpo.data import Columns, to_pairs
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.reference import cache_key, compute_reference, load_or_compute
from qdpo.step import preference_loss
from qdpo.tokenize import tokenize_pairs
from qdpo.train import table_rows


@pytest.fixture
def setup(tiny_model_dir, tokenizer, chat_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    source = ModelSource(str(tiny_model_dir), str(tiny_model_dir))
    base = load_base_4bit(source, torch.float32, torch.device("cpu"), True)
    model = add_lora(base, 8, 16, 0.0, ["all-linear"], None, seed=0)
    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows, Columns(), "t"), 128, 64)
    batches = length_grouped_batches(pairs, 3, seed=0)
    return source, model, pairs, batches, tokenizer.pad_token_id


def base_oracle(model_dir, pairs) -> torch.Tensor:
    """[N, 2] summed response log-probs (chosen, rejected) from a separately loaded 4-bit base model with no
    adapter at all: its own logits, one sequence at a time, float64 log-softmax."""
    base = load_base_4bit(ModelSource(str(model_dir), str(model_dir)), torch.float32, torch.device("cpu"), False)
    base.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(pairs):
            for side, response in enumerate((p.chosen_ids, p.rejected_ids)):
                ids = torch.tensor([p.prompt_ids + response])
                logps = torch.log_softmax(base(input_ids=ids).logits[0].double(), -1)[:-1].gather(
                    -1, ids[0, 1:, None]
                )[:, 0]
                out[i, side] = logps[len(p.prompt_ids) - 1 :].sum()
    return out


@pytest.mark.parametrize(
    "config",
    [Config(model="x", data="y"), Config(model="x", data="y", logits_chunk_size=0, share_prompt=False)],
    ids=["lean", "plain"],
)
def test_table_gives_the_same_loss_and_gradients_as_the_reference_pass(setup, tiny_model_dir, config):
    source, model, pairs, batches, pad = setup
    with (
        torch.no_grad()
    ):  # move the policy away from the reference first: a table that kept the adapters on would show
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    model.train()
    table = compute_reference(model, pairs, batches, pad, config.logits_chunk_size, config.batch_layout)
    assert model.training and all(
        p.requires_grad for n, p in model.named_parameters() if "lora_" in n
    )  # left as found
    # Independent expectation: the reference is the bare 4-bit base model, scored by its own forward.
    expected = base_oracle(tiny_model_dir, pairs)
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=1e-3)
    for idx in batches:
        batch = make_batch([pairs[i] for i in idx], pad, config.batch_layout)
        results = []
        for reference in (None, table_rows(table, idx)):
            model.zero_grad()
            losses, cr, rr, policy = preference_loss(model, batch, config, reference)
            losses.sum().backward()
            results.append(
                (losses.detach(), cr, rr, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            )
        # the policy really is elsewhere: with the adapters on, the sequences score far from the reference
        b = len(idx)
        policy_rows = torch.stack([policy.logps[:b], policy.logps[b:]], 1).detach().double()
        assert (policy_rows - expected[idx]).abs().max() > 0.1
        # and the in-step reference pass gives exactly the table's loss, rewards and gradients
        (l0, c0, r0, g0), (l1, c1, r1, g1) = results
        assert torch.equal(l0, l1) and torch.equal(c0, c1) and torch.equal(r0, r1)
        for n in g0:
            assert torch.equal(g0[n], g1[n]), n


def test_step_zero_is_exactly_log2_with_the_table(setup):
    source, model, pairs, batches, pad = setup
    config = Config(model="x", data="y")
    table = compute_reference(model, pairs, batches, pad, config.logits_chunk_size, config.batch_layout)
    idx = batches[0]
    batch = make_batch([pairs[i] for i in idx], pad, config.batch_layout)
    losses, *_ = preference_loss(model, batch, config, table_rows(table, idx))
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))


def test_cache_is_reused_and_keyed_by_content(setup):
    source, model, pairs, batches, pad = setup
    key = cache_key(source, None, pairs, torch.float32, 3, batches)
    first, scored = load_or_compute(model, pairs, batches, pad, key)
    assert scored == len(batches)
    second, scored = load_or_compute(model, pairs, batches, pad, key)
    assert scored == 0 and torch.equal(first, second)
    assert cache_key(source, None, pairs[:-1], torch.float32, 3, batches) != key  # other data
    assert cache_key(source, None, pairs, torch.bfloat16, 3, batches) != key  # other compute dtype
    assert cache_key(source, None, pairs, torch.float32, 3, batches, layout="packed") != key  # other batch layout


def test_a_rerun_scores_neither_reference_table_again(tiny_model_dir, chat_rows, tmp_path, monkeypatch):
    """The held-out table is cached like the training one: a second run with the same model, data and settings
    makes no reference pass at all, and its held-out evals are the first run's, to the last digit."""
    import json

    import qdpo
    import qdpo.reference

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    real = qdpo.reference.compute_reference
    evals = {}
    for name in ("first", "again"):
        if name == "again":
            monkeypatch.setattr(qdpo.reference, "compute_reference", lambda *a, **k: pytest.fail("scored again"))
        run = qdpo.tune(
            "smoke",
            model=str(tiny_model_dir),
            data=str(tmp_path / "d.jsonl"),
            output_dir=str(tmp_path / name),
            overrides=["max_steps=2", "micro_batch_size=2", "eval_fraction=0.25", "eval_generate=0"],
            progress=False,
            echo=lambda line: None,
        )
        evals[name] = [{k: v for k, v in r.items() if k.startswith("eval_")} for r in run.metrics if "eval_loss" in r]
    assert len(evals["first"]) == 2 and evals["again"] == evals["first"]
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2  # train pairs and held-out pairs
    # A longer run: the held-out table and the first run's two micro-batches come from the cache; the two more
    # that max_steps=4 uses are scored, and they grow the same entry.
    calls, lines = [], []
    monkeypatch.setattr(
        qdpo.reference, "compute_reference", lambda m, p, b, *a, **k: calls.append(len(b)) or real(m, p, b, *a, **k)
    )
    qdpo.tune(
        "smoke",
        model=str(tiny_model_dir),
        data=str(tmp_path / "d.jsonl"),
        output_dir=str(tmp_path / "longer"),
        overrides=["max_steps=4", "micro_batch_size=2", "eval_fraction=0.25", "eval_generate=0", "eval_steps=0"],
        progress=False,
        echo=lines.append,
    )
    assert calls == [2] and "reference log-probs: 2 of 4 micro-batches reused from cache, the other 2 computed" in (
        "\n".join(lines)
    )
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2


def test_a_longer_run_scores_only_the_micro_batches_the_cache_lacks(setup):
    """A table keyed on an epoch's micro-batches grows: a run that needs more of them (a larger max_steps) scores
    only those, and the grown table is the one a single pass over all of them gives, bit for bit."""
    source, model, pairs, batches, pad = setup
    assert len(batches) >= 3
    key = cache_key(source, None, pairs, torch.float32, 3, batches)
    part, scored = load_or_compute(model, pairs, batches[-1:], pad, key)  # a short run: the last micro-batch
    assert scored == 1 and torch.isnan(part).any()
    grown, scored = load_or_compute(model, pairs, batches[-2:], pad, key)
    assert scored == 1  # batches[-1] came from the cache
    full, scored = load_or_compute(model, pairs, batches, pad, key)
    assert scored == len(batches) - 2 and not torch.isnan(full).any()
    assert torch.equal(full, compute_reference(model, pairs, batches, pad))
    assert load_or_compute(model, pairs, batches[:1], pad, key)[1] == 0
