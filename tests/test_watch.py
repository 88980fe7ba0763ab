"""The DPO failures users report most are named while a run happens, not discovered after it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qdpo.batching import make_batch
from qdpo.cli import main
from qdpo.data import Columns, to_pairs
from qdpo.errors import UserError
from qdpo.tokenize import tokenize_pairs
from qdpo.watch import WINDOW, Watch


def row(step, chosen, margin, rewards=0.5):
    return {
        "step": step,
        "loss": 0.6,
        "logps/chosen": chosen,
        "rewards/margins": margin,
        "rewards/chosen": rewards,
        "rewards/rejected": rewards - margin,
    }


def test_falling_chosen_logps_with_rising_margins_warns_once_with_the_numbers():
    watch = Watch(sft_weight=0.0)
    warnings = []
    for step in range(1, 4 * WINDOW):  # chosen -102, -104, ...; margins 0.15, 0.30, ...
        warnings += watch.see(row(step, -100 - 2 * step, 0.15 * step), lambda: True)
    # First possible at step 10: steps 1-5 average -106 and 0.45, steps 6-10 -116 and 1.20 (a 10-nat fall,
    # past max(2, 5% of 106); margins up 0.75 > 0.5). Then never again.
    assert len(warnings) == 1
    assert "logps/chosen fell from -106.0 to -116.0 while rewards/margins rose from 0.45 to 1.20" in warnings[0]
    assert "loss_type=[sigmoid,sft] loss_weights=[1,0.5]" in warnings[0]


def test_a_resumed_run_warns_when_and_as_the_uninterrupted_one_would():
    """The checks' state goes into each checkpoint: resumed at any step, the warning comes at the same step with
    the same numbers, and one already given is not given again. The chosen log-probs hold for 12 steps, then
    fall (the first WINDOW rows stay the reference for the whole run)."""

    def steps(watch, first, last):
        return {s: watch.see(row(s, -100 - 3 * max(0, s - 12), 0.15 * s), lambda: True) for s in range(first, last)}

    uninterrupted = steps(Watch(sft_weight=0.0), 1, 30)
    assert [s for s, w in uninterrupted.items() if w] == [16]
    for resumed_at in (3, 9, 15, 16, 20):
        before = Watch(sft_weight=0.0)
        earlier = steps(before, 1, resumed_at + 1)
        after = Watch(sft_weight=0.0)
        after.load_state_dict(before.state_dict())
        assert {**earlier, **steps(after, resumed_at + 1, 30)} == uninterrupted, resumed_at


@pytest.mark.parametrize(
    "sft_weight, chosen_slope",
    [(0.5, -2.0), (0.0, 0.0), (0.0, 0.1)],
    ids=["sft-term-on", "chosen-flat", "chosen-rising"],
)
def test_no_warning_when_the_chosen_answers_hold_up_or_an_sft_term_is_on(sft_weight, chosen_slope):
    watch = Watch(sft_weight=sft_weight)
    assert not [
        w
        for step in range(1, 4 * WINDOW)
        for w in watch.see(row(step, -100 + chosen_slope * step, 0.15 * step), lambda: True)
    ]


def test_a_reference_equal_to_the_moved_policy_stops_the_run():
    watch = Watch(sft_weight=0.0)
    assert watch.see(row(1, -100, 0.0, rewards=0), lambda: False) == []  # step 1: policy == reference, as it must be
    with pytest.raises(UserError, match="at step 2 the reference still equals the policy"):
        watch.see(row(2, -100, 0.0, rewards=0), lambda: True)


def test_a_broken_reference_switch_is_caught_in_a_real_run(monkeypatch, tmp_path, tiny_model_dir, chat_rows):
    """If disabling the adapter did nothing, the in-step reference would track the policy: caught at step 2."""
    import contextlib

    import qdpo.step as step

    monkeypatch.setattr(step, "reference_model", lambda model: contextlib.nullcontext())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--no-progress",
            "max_steps=3",
            "micro_batch_size=4",
            "precompute_ref_log_probs=false",
            "eval_fraction=0",
            "learning_rate=1e-2",
        ],
    )
    assert result.exit_code == 2 and "at step 2 the reference still equals the policy" in result.output


def test_a_first_step_at_learning_rate_zero_is_not_a_broken_reference(tmp_path, tiny_model_dir, chat_rows):
    """Warmup starts at rate 0: step 2's forward still sees the untouched adapter, so its rewards are 0 by right."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    args = ["run", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run")]
    args += ["--no-progress", "max_steps=3", "micro_batch_size=4", "eval_fraction=0", "warmup_ratio=0.5"]
    result = CliRunner().invoke(main, args + ["learning_rate=1e-2", "eval_generate=0"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["learning_rate"] == 0 and rows[1]["rewards/margins"] == 0  # the case the check got wrong
    assert rows[2]["rewards/margins"] != 0


@pytest.mark.parametrize("layout", ["plain", "shared", "packed"])
def test_a_pad_token_equal_to_eos_never_masks_the_real_eos(tokenizer, chat_rows, layout):
    """Masks come from lengths, not from comparing ids with pad: every response's EOS is scored."""
    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows[:3], Columns(), "t"), 128, 64)
    eos = tokenizer.eos_token_id
    assert all(p.chosen_ids[-1] == eos and p.rejected_ids[-1] == eos for p in pairs)
    batch = make_batch(pairs, eos, layout)  # pad with the EOS id itself
    scored = int(batch.response_mask[:, 1:].sum()) if layout == "plain" else len(batch.labels)
    assert scored == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    if layout != "plain":
        assert int((batch.labels == eos).sum()) == 2 * len(pairs)


def test_no_trainable_parameter_is_refused(monkeypatch, tmp_path, tiny_model_dir, chat_rows):
    import qdpo.train as train

    monkeypatch.setattr(train, "trainable_parameters", lambda model: [])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 2 and "no parameter of the model requires a gradient" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "settings, advice",
    [
        # 8 pairs per step: the largest micro-batch below 4 that divides 8 is 2 (3 would make 6 a step)
        (dict(micro_batch_size=4, gradient_accumulation_steps=2), "micro_batch_size=2 gradient_accumulation_steps=4"),
        (dict(micro_batch_size=3, gradient_accumulation_steps=3), "micro_batch_size=1 gradient_accumulation_steps=9"),
        (
            dict(micro_batch_size=1, gradient_checkpointing=False),
            "one pair per forward already: qdpo run --resume R gradient_checkpointing=true",
        ),
        (dict(micro_batch_size=1), "one pair per forward already: qdpo run --resume R offload_activations=true"),
        (
            dict(micro_batch_size=1, offload_activations=True),
            "checkpointed and offloaded: start a new run with a lower max_length",
        ),
    ],
)
def test_out_of_memory_advice_is_a_resume_the_run_accepts(settings, advice):
    """Without the planner (no GPU here): the advice keeps the pairs per step, or switches memory savers on."""
    from pathlib import Path

    from qdpo.checkpoint import resume_conflicts
    from qdpo.config import Config
    from qdpo.watch import out_of_memory

    config = Config(model="/no/such/model", data="y", **settings)
    message = str(out_of_memory(config, Path("R"), 3, Path("R/checkpoints/step-000002")))
    assert advice in message and message.startswith("out of GPU memory at step 3")
    if "qdpo run --resume R " in message:  # the suggested command must not be refused as a changed computation
        overrides = dict(kv.split("=") for kv in message.split("qdpo run --resume R ")[1].rstrip(".").split())
        resumed = Config(
            **{**config.to_dict(), **{k: int(v) if v.isdigit() else v == "true" for k, v in overrides.items()}}
        )
        assert resume_conflicts(config.to_dict(), resumed) == []
