"""KTO: its loss worked out by hand, its unpaired data, its KL samples, and the step against the model's own logits."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from qdpo.batching import make_batch
from qdpo.cli import main
from qdpo.config import build_config
from qdpo.data import Columns, to_examples
from qdpo.errors import UserError
from qdpo.loss import kto_loss
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.step import Metrics, preference_loss, score_batch
from qdpo.tokenize import tokenize_pairs
from qdpo.unpaired import balance_note, kto_pairs, split_by_prompt


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    """beta 0.1; answers' policy/reference log-probs (-10, -12) and (-20, -18): log-ratios r = 2 and -2.
    KL samples' (-30, -33) and (-40, -41): z0 = mean(3, 1) = 2.
    Desirable first answer: 1 - sigmoid(0.1 (2 - 2)) = 0.5, times lambda_D = 2 -> 1.0.
    Undesirable second: 1 - sigmoid(0.1 (2 - (-2))) = 1 - sigmoid(0.4) = 0.401312, times lambda_U = 0.5 -> 0.200656.
    Rewards 0.1 x r = 0.2 and -0.2. On its label's side of z0: the first sits on it (r = z0, not above), the second
    (r = -2 < 2) is."""
    losses, rewards, kl, on_side = kto_loss(
        torch.tensor([-10.0, -20.0]),
        torch.tensor([-12.0, -18.0]),
        torch.tensor([-30.0, -40.0]),
        torch.tensor([-33.0, -41.0]),
        torch.tensor([True, False]),
        beta=0.1,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    assert losses.tolist() == pytest.approx([1.0, 0.5 * (1 - sigmoid(0.4))], rel=1e-6)
    assert 0.5 * (1 - sigmoid(0.4)) == pytest.approx(0.200656, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.2, -0.2], rel=1e-6)
    assert float(kl) == pytest.approx(2.0)
    assert on_side.tolist() == [False, True]


def test_kl_baseline_is_clamped_at_zero_and_carries_no_gradient():
    """A policy closer to the mismatched answers than the reference gives a negative estimate: z0 is 0 then.
    r = 1 for a desirable answer: loss 1 - sigmoid(0.5 x 1) with beta 0.5. The KL inputs get no gradient."""
    policy = torch.tensor([-5.0], requires_grad=True)
    policy_kl = torch.tensor([-9.0, -7.0], requires_grad=True)
    losses, _, kl, _ = kto_loss(
        policy, torch.tensor([-6.0]), policy_kl, torch.tensor([-8.0, -6.0]), torch.tensor([True]), beta=0.5
    )
    assert float(kl) == 0.0  # mean(-1, -1) = -1, clamped
    assert losses.item() == pytest.approx(1 - sigmoid(0.5))
    losses.sum().backward()
    assert policy.grad is not None and policy_kl.grad is None
    # d/dr [1 - sigmoid(beta r)] = -beta sigmoid'(beta r)
    assert policy.grad.item() == pytest.approx(-0.5 * sigmoid(0.5) * (1 - sigmoid(0.5)))


def unpaired_rows():
    rows = []
    for i in range(6):
        rows.append({"prompt": f"What is {i} plus two?", "completion": f"{i} plus two is {i + 2}.", "label": True})
        rows.append({"prompt": f"What is {i} plus two?", "completion": "I am not sure about that.", "label": False})
    return rows


def test_unpaired_rows_take_labels_as_json_csv_and_spreadsheets_write_them():
    rows = unpaired_rows()[:4]
    for row, label in zip(rows, ["true", 1, "FALSE", "0"]):
        row["label"] = label
    examples = to_examples(rows, Columns(), "completion", "label", "d.jsonl")
    assert [e.desirable for e in examples] == [True, True, False, False]
    assert examples[0].completion == "0 plus two is 2." and examples[0].origin == "d.jsonl row 1"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": "maybe"}, "d.jsonl row 2 column 'label' is a string 'maybe', not true or false"),
        ({"label": 2}, "d.jsonl row 2 column 'label' is a number 2, not true or false"),
        ({"label": None}, "d.jsonl row 2 column 'label' is null None, not true or false"),
        ({"completion": None}, "d.jsonl row 2 column 'completion' is empty"),
    ],
)
def test_bad_unpaired_rows_are_named(change, message):
    rows = unpaired_rows()[:3]
    rows[1].update(change)
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")) as error:
        to_examples(rows, Columns(), "completion", "label", "d.jsonl")
    assert "\n" not in str(error.value)


def test_a_row_without_the_label_column_says_how_to_map_it():
    rows = unpaired_rows()[:2]
    del rows[1]["label"]
    rows[1]["good"] = True
    with pytest.raises(UserError, match="row 2 has no column 'label' .*label_column="):
        to_examples(rows, Columns(), "completion", "label", "d.jsonl")


def test_pairs_split_into_a_desirable_and_an_undesirable_example(chat_rows):
    examples = to_examples(chat_rows[:3], Columns(), "completion", "label", "p.jsonl")
    assert [e.desirable for e in examples] == [True, False] * 3
    assert [e.completion for e in examples[:2]] == [chat_rows[0]["chosen"], chat_rows[0]["rejected"]]
    assert all(e.prompt == chat_rows[i // 2]["prompt"] for i, e in enumerate(examples))


def test_each_kl_sample_answers_another_prompt_and_all_answers_are_used(chat_rows):
    """The rejected slot holds an answer to a different prompt; over the set, every answer is some example's KL
    sample (the paper's estimate uses the same answers, matched to other prompts)."""
    for i, row in enumerate(chat_rows):  # every answer distinct, so an answer's text says whose it is
        row["rejected"][0]["content"] = f"Maybe {i}."
    examples = to_examples(chat_rows[:5], Columns(), "completion", "label", "p.jsonl")
    pairs = kto_pairs(examples, "p.jsonl")
    answers_of = {}
    for e in examples:
        answers_of.setdefault(json.dumps(e.prompt), []).append(e.completion)
    for pair, example in zip(pairs, examples):
        assert pair.chosen == example.completion and pair.desirable == example.desirable
        assert pair.rejected not in answers_of[json.dumps(example.prompt)]
    kl_samples = sorted(json.dumps(p.rejected) for p in pairs)
    assert kl_samples == sorted(json.dumps(e.completion) for e in examples)


def test_one_prompt_only_is_refused_in_one_line():
    rows = [{"prompt": "Hi", "completion": f"Hello {i}.", "label": i % 2 == 0} for i in range(4)]
    examples = to_examples(rows, Columns(), "completion", "label", "one.jsonl")
    with pytest.raises(UserError, match="KTO's KL baseline needs answers to other prompts"):
        kto_pairs(examples, "one.jsonl")


def test_held_out_examples_are_whole_prompts():
    examples = to_examples(unpaired_rows(), Columns(), "completion", "label", "d.jsonl")
    train, held = split_by_prompt(examples, 0.25, seed=1)
    assert len(train) + len(held) == 12 and len(held) == 4  # 3 of 12 wanted: whole prompts, at least two of them
    assert not {json.dumps(e.prompt) for e in train} & {json.dumps(e.prompt) for e in held}


@pytest.mark.parametrize("prompts", [2, 3, 4, 5, 30])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
def test_every_split_keeps_two_prompts_for_its_kl_samples(prompts, fraction):
    """Each side of the split needs answers to another prompt of its own; with fewer than four prompts the
    whole set trains. The default eval_fraction on a small set used to hold out one prompt and then fail."""
    rows = [r for i in range(prompts) for r in unpaired_rows()[2 * i : 2 * i + 2]] if prompts <= 6 else None
    rows = rows or [
        {"prompt": f"Q{i}?", "completion": f"A{i}{k}.", "label": k == 0} for i in range(prompts) for k in range(2)
    ]
    examples = to_examples(rows, Columns(), "completion", "label", "d.jsonl")
    train, held = split_by_prompt(examples, fraction, seed=3)
    for side in (train, held):
        if side:
            assert len({json.dumps(e.prompt) for e in side}) >= 2
            kto_pairs(side, "d.jsonl")  # no error: every example finds a KL sample
    assert held or prompts < 4


def test_a_kl_sample_equal_to_the_answer_is_kept(tokenizer):
    """Two prompts with the same answer: the KL sample equals the answer, which a pair would drop as identical."""
    rows = [
        {"prompt": "What is one plus two?", "completion": "I am not sure.", "label": False},
        {"prompt": "What is two plus two?", "completion": "I am not sure.", "label": False},
    ]
    pairs = kto_pairs(to_examples(rows, Columns(), "completion", "label", "d"), "d")
    kept, stats = tokenize_pairs(tokenizer, pairs, 64, 32)
    assert len(kept) == 2 and stats.dropped_identical == 0
    assert kept[0].chosen_ids == kept[0].rejected_ids and kept[0].desirable is False
    assert stats.describe().startswith("2 examples kept")


def test_unbalanced_weights_get_the_papers_advice():
    config = build_config(None, {"loss_type": "kto"})
    pairs = [type("P", (), {"desirable": d})() for d in [True] * 2 + [False] * 6]
    note = balance_note(pairs, config)
    assert note and "2 desirable and 6 undesirable" in note and "desirable_weight=3.00 to 4.00" in note
    config = build_config(None, {"loss_type": "kto", "desirable_weight": 3.5})
    assert balance_note(pairs, config) is None  # 3.5 x 2 / 6 = 1.17, inside [1, 4/3]


def test_metrics_average_each_kind_over_its_own_examples():
    """TRL's KTO names: rewards/chosen is the mean over desirable examples, rewards/rejected over undesirable
    ones, rewards/margins their difference, kl the batch's baseline; across micro-batches of unequal mix."""
    from qdpo.logprobs import SequenceScores

    metrics = Metrics()
    batches = [([0.3, -0.1, 0.5], [True, False, True], 1.5), ([-0.4, 0.2], [False, False], 0.5)]
    for rewards, desirable, kl in batches:
        b = len(rewards)
        scores = SequenceScores(
            logps=torch.arange(2 * b, dtype=torch.float) * -1,
            lengths=torch.ones(2 * b, dtype=torch.long),
            logits_sum=torch.zeros(2 * b),
        )
        scores.extras = {"kl": torch.full((b,), kl), "on_side": torch.tensor([True] * b)}
        metrics.add(torch.zeros(b), torch.tensor(rewards), None, scores, 10, torch.tensor(desirable))
    means = metrics.means()
    assert means["rewards/chosen"] == pytest.approx((0.3 + 0.5) / 2)
    assert means["rewards/rejected"] == pytest.approx((-0.1 - 0.4 + 0.2) / 3)
    assert means["rewards/margins"] == pytest.approx(0.4 - (-0.1))
    assert means["kl"] == pytest.approx((1.5 * 3 + 0.5 * 2) / 5)
    assert means["logps/chosen"] == pytest.approx((0 - 2) / 2)  # answers' rows 0 and 2 of the first batch


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    base = load_base_4bit(ModelSource("m", str(tiny_model_dir)), torch.float32, torch.device("cpu"), False)
    model = add_lora(base, 4, 8, 0.0, ["all-linear"], None, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the reference, so log-ratios and the KL baseline are not 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def own_logps(model, prompt, response) -> float:
    """The oracle: the model's own logits of one sequence, float64 log-softmax, summed over the response."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).sum().item()


@pytest.mark.parametrize("layout, chunk", [("plain", 0), ("shared", 3)])
def test_step_is_kto_on_the_models_own_log_probs(model, tokenizer, chat_rows, layout, chunk):
    """The step's per-example losses equal the KTO formula on the oracle's log-probs, policy and reference."""
    examples = to_examples(chat_rows[:3], Columns(), "completion", "label", "p")
    pairs, _ = tokenize_pairs(tokenizer, kto_pairs(examples, "p"), 128, 64)
    config = build_config(None, {"loss_type": "kto", "beta": 0.5, "desirable_weight": 1.3, "logits_chunk_size": chunk})
    desirable = torch.tensor([p.desirable for p in pairs])
    # A random adapter lowers the log-probs of most text, which clamps z0 to 0: first raise the KL samples' ones.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        (-score_batch(model, make_batch(pairs, tokenizer.pad_token_id, "plain")).logps[len(pairs) :].sum()).backward()
        optimizer.step()
    model.zero_grad()
    with torch.no_grad():
        losses, rewards, _, scores = preference_loss(
            model, make_batch(pairs, tokenizer.pad_token_id, layout), config, desirable=desirable
        )
        policy = [
            (own_logps(model, p.prompt_ids, p.chosen_ids), own_logps(model, p.prompt_ids, p.rejected_ids))
            for p in pairs
        ]
        with model.disable_adapter():
            ref = [
                (own_logps(model, p.prompt_ids, p.chosen_ids), own_logps(model, p.prompt_ids, p.rejected_ids))
                for p in pairs
            ]
    z0 = max(0.0, sum(pk - rk for (_, pk), (_, rk) in zip(policy, ref)) / len(pairs))
    expected = []
    for (pc, _), (rc, _), p in zip(policy, ref, pairs):
        r = pc - rc
        expected.append(1.3 * (1 - sigmoid(0.5 * (r - z0))) if p.desirable else 1 - sigmoid(0.5 * (z0 - r)))
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert rewards.tolist() == pytest.approx([0.5 * (pc - rc) for (pc, _), (rc, _) in zip(policy, ref)], abs=1e-4)
    assert float(scores.extras["kl"][0]) == pytest.approx(z0, abs=1e-4)
    assert z0 > 0  # the baseline is really in the formula


@pytest.mark.parametrize(
    "args, message",
    [
        (["loss_type=[kto, sft]"], "loss_type kto scores answers one at a time and combines with no other loss"),
        (["loss_type=kto", "sft_weight=0.5"], "loss_type kto scores answers one at a time and combines"),
        (["loss_type=kto", "ld_alpha=0.5"], "ld_alpha weighs the two responses of a pair"),
        (["loss_type=kto", "use_weighting=true"], "use_weighting weighs the two responses of a pair"),
        (["loss_type=kto", "label_smoothing=0.1"], "label_smoothing applies to loss_type sigmoid, robust or simpo"),
        (["loss_type=kto", "desirable_weight=0"], "desirable_weight must be"),
    ],
)
def test_kto_configs_that_cannot_work_are_one_line(args, message):
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output, result.output


def test_kto_run_on_unpaired_rows(tmp_path, tiny_model_dir, monkeypatch):
    """A KTO run end to end on prompt/completion/label rows: examples, a cached two-column reference, TRL's names."""
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in unpaired_rows() * 2))
    out = tmp_path / "run"
    args = ["run", "--output", str(out), "--model", str(tiny_model_dir), "--data", str(data), "--no-progress"]
    settings = ["loss_type=kto", "max_steps=2", "micro_batch_size=4", "gradient_accumulation_steps=1"]
    result = CliRunner().invoke(main, [*args, *settings, "eval_fraction=0.34"])
    assert result.exit_code == 0, result.output
    assert "examples kept" in result.output and "training examples" in result.output
    assert "gives the chosen response the higher log-prob" not in result.output  # no rival in KTO's second slot
    assert "eval at step 0: examples on their label's side of the KL baseline 0.000" in result.output
    assert list((tmp_path / "cache").glob("reference/*.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["eval_kl"] == 0.0 and rows[0]["eval_loss"] == pytest.approx(0.5)
    trained = [row for row in rows if "loss" in row]
    assert all("kl" in row and "rewards/accuracies" in row for row in trained)
    # A micro-batch may hold one kind only (length grouping): a side is logged when the step saw it.
    assert {"rewards/chosen", "rewards/rejected"} & set(trained[0])
    assert {"eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"} <= set(rows[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert "label's side of the KL baseline" in summary["verdict"]
