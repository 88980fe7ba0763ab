"""Greedy answers (qdpo.generate) and `qdpo generate` on tiny 4-bit models, against a hand-rolled argmax loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_merge import make_run, random_adapter

from qdpo.cli import main
from qdpo.generate import (
    Generation,
    eval_generations,
    greedy,
    log_generations,
    read_generations,
    side_by_side,
    stop_ids,
)
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.tokenize import encode_prompt

QUESTIONS = ["What is two plus two?", "Hello there, how are you today?"]


def bare_4bit(model_dir: Path):
    """The tiny model in 4-bit with no LoRA at all: what the reference must be."""
    return load_base_4bit(ModelSource(str(model_dir), str(model_dir)), torch.float32, torch.device("cpu"), False)


def set_lora(model, seed: int, adapter: str = "default") -> None:
    """Random, clearly non-zero LoRA A and B, so the policy really differs from the base."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                p.normal_(0, 0.2)


@torch.no_grad()
def argmax_loop(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """The oracle: the whole sequence through model(ids).logits at every step (no cache), take the argmax."""
    was_training = model.training
    model.eval()
    ids, new = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
        if token in stop:
            break
    model.train(was_training)
    return new


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """A 4-bit tiny Llama with a LoRA whose A and B are random (not the B = 0 start)."""
    model = add_lora(bare_4bit(tiny_model_dir), 4, 8, 0.0, ["all-linear"], None, seed=0)
    set_lora(model, seed=1)
    return model


def test_greedy_is_the_argmax_loop_and_restores_the_mode(policy, tokenizer, prompts):
    policy.train()
    (got,) = greedy(policy, tokenizer, prompts[:1], max_new_tokens=5)
    assert policy.training  # put back in the mode it was in
    expected = argmax_loop(policy, prompts[0], 5, {tokenizer.eos_token_id})
    assert got.ids == expected and got.tokens == len(expected)
    assert got.stopped == (expected[-1] == tokenizer.eos_token_id)
    assert got.text == tokenizer.decode(expected, skip_special_tokens=True)
    policy.eval()
    greedy(policy, tokenizer, prompts[:1], max_new_tokens=1)
    assert not policy.training


@pytest.mark.parametrize(
    "lengths, new_tokens, budget, expected",
    [
        ([5] * 20, 10, None, [8, 8, 4]),  # at most GENERATE_BATCH prompts per call
        ([5] * 5, 10, 45, [3, 2]),  # 3 rows x (5 + 10) = 45 fit, a 4th would not
        ([5, 5, 30, 5], 10, 90, [2, 2]),  # the long prompt widens the batch: 3 x 40 > 90; it starts the next (2 x 40)
        ([5, 200, 5], 10, 100, [1, 1, 1]),  # too long for the budget even alone: it still goes, alone
        ([], 10, 100, []),
    ],
)
def test_generation_batches_hold_no_more_tokens_than_a_training_micro_batch(lengths, new_tokens, budget, expected):
    from qdpo.generate import generation_batches, training_tokens

    batches = generation_batches(lengths, new_tokens, budget)
    assert [len(b) for b in batches] == expected
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # every prompt once, in order
    for b in batches:
        assert len(b) == 1 or budget is None or len(b) * (max(lengths[i] for i in b) + new_tokens) <= budget
    assert training_tokens({"micro_batch_size": 2, "max_length": 512}) == 2 * 2 * 512


def test_greedy_shows_a_bar_only_when_progress_is_on(policy, tokenizer, prompts, capsys):
    """Decoding is the slowest phase of a CPU smoke run: it has its own bar (on stderr), hidden by --no-progress."""
    from qdpo.quiet import showing_progress

    for show in (True, False):
        with showing_progress(show):
            greedy(policy, tokenizer, prompts[:2], max_new_tokens=1, desc="policy answers")
        err = capsys.readouterr().err
        assert ("policy answers" in err and "/2 " in err) == show, err


def test_greedy_stops_at_eos(policy, tiny_model_dir, prompts):
    """Make the third token the oracle picks the EOS: the answer ends there, EOS counted, and says it stopped."""
    from transformers import AutoTokenizer

    free = argmax_loop(policy, prompts[1], 3, set())
    assert free[2] not in free[:2] and 2 not in free[:2]  # else the answer would end sooner (2: the model's EOS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free[2])
    (got,) = greedy(policy, tokenizer, prompts[1:], max_new_tokens=6)
    assert got.ids == free and got.tokens == 3 and got.stopped
    (cut,) = greedy(policy, tokenizer, prompts[1:], max_new_tokens=2)
    assert cut.ids == free[:2] and cut.tokens == 2 and not cut.stopped
    # In one batch with a prompt that decodes on: the stopped answer ends at its EOS (the padding generate() puts
    # after it is no part of it), and the other is what it gets alone.
    stopped, other = greedy(policy, tokenizer, [prompts[1], prompts[0]], max_new_tokens=6)
    assert stopped.ids == free and stopped.stopped
    assert other.ids == argmax_loop(policy, prompts[0], 6, set(stop_ids(policy, tokenizer)))
    assert len(other.ids) > 3  # it did decode on after the first one stopped


def test_reference_is_the_base_without_lora_and_both_are_logged(policy, tokenizer, tiny_model_dir, prompts, tmp_path):
    path = tmp_path / "generations.jsonl"
    got = eval_generations(policy, tokenizer, prompts, 4, path, step=8, reference=True)
    rows = read_generations(path)
    bare = greedy(bare_4bit(tiny_model_dir), tokenizer, prompts, max_new_tokens=4)
    assert [r["text"] for r in rows if r["which"] == "policy"] == [g.text for g in got]
    # adapters off == a model loaded without LoRA, from the same 4-bit weights
    assert [r["text"] for r in rows if r["which"] == "reference"] == [g.text for g in bare]
    assert [g.ids for g in got] != [g.ids for g in bare]  # the non-zero adapter changes the answers
    assert rows[0]["step"] == 8 and rows[0]["prompt"] == tokenizer.decode(prompts[0]) and rows[0]["tokens"] == 4
    (again,) = greedy(policy, tokenizer, prompts[:1], max_new_tokens=4)  # the adapter is back on afterwards
    assert again.ids == got[0].ids


def test_reference_of_an_init_adapter_run_is_the_init_adapter(tiny_model_dir, tokenizer, prompts, tmp_path):
    from peft import PeftModel

    init = random_adapter(tiny_model_dir, tmp_path / "sft", seed=3)
    model = add_lora(bare_4bit(tiny_model_dir), 4, 8, 0.0, ["all-linear"], str(init), seed=0)
    set_lora(model, seed=4)  # the policy moved away from the init adapter
    ((tuned, reference),) = side_by_side(model, tokenizer, prompts[:1], max_new_tokens=4)
    sft_alone = greedy(PeftModel.from_pretrained(bare_4bit(tiny_model_dir), str(init)), tokenizer, prompts[:1], 4)
    base_alone = greedy(bare_4bit(tiny_model_dir), tokenizer, prompts[:1], 4)
    assert reference.ids == sft_alone[0].ids != base_alone[0].ids
    assert tuned.ids != reference.ids


def test_generations_jsonl_round_trips_and_a_repeated_step_replaces_its_lines(tmp_path):
    path = tmp_path / "generations.jsonl"
    first = [Generation("Four.", 3, True), Generation('Héllo "there"\nline two', 64, False)]
    log_generations(path, 2, ["p1", "p2"], first, "policy")
    log_generations(path, 2, ["p1", "p2"], first[::-1], "reference")
    log_generations(path, 4, ["p1", "p2"], first, "policy")
    rows = read_generations(path)
    assert [(r["step"], r["which"]) for r in rows] == [(2, "policy")] * 2 + [(2, "reference")] * 2 + [
        (4, "policy")
    ] * 2
    assert rows[1] == {
        "step": 2,
        "which": "policy",
        "prompt": "p2",
        "text": 'Héllo "there"\nline two',
        "tokens": 64,
        "stopped": False,
    }
    assert all(json.loads(line) for line in path.read_text().splitlines())  # one JSON object per line
    # A resumed run redoes step 2: its policy lines are replaced, step 4 (a future that was discarded) is dropped.
    log_generations(path, 2, ["p1"], [Generation("Four!", 2, True)], "policy")
    rows = read_generations(path)
    assert [(r["step"], r["which"], r["text"]) for r in rows] == [
        (2, "reference", 'Héllo "there"\nline two'),
        (2, "reference", "Four."),
        (2, "policy", "Four!"),
    ]


def test_generation_settings_may_change_on_resume():
    """Greedy answers draw no random numbers and change no weights: a resume may turn them on or off."""
    from qdpo.checkpoint import resume_conflicts
    from qdpo.config import Config

    before = Config().to_dict()
    del before["eval_generate"], before["max_new_tokens"]  # a checkpoint written before these settings existed
    assert resume_conflicts(before, Config(eval_generate=4, max_new_tokens=8)) == []
    assert resume_conflicts(before, Config(eval_generate=4, beta=0.2)) == ["beta: 0.1 -> 0.2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory, tiny_model_dir)


def test_cli_answers_side_by_side_as_the_trained_model_would(run_dir, tiny_model_dir, tokenizer):
    """The tuned column is the run's adapter on the 4-bit base (loaded here with PEFT), the other the bare base."""
    from peft import PeftModel

    question = "What is 3 plus two?"
    result = CliRunner(env={"COLUMNS": "160"}).invoke(
        main, ["generate", str(run_dir), "--prompt", question, "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    ids = encode_prompt(tokenizer, [{"role": "user", "content": question}])
    tuned = PeftModel.from_pretrained(bare_4bit(tiny_model_dir), str(run_dir / "adapter"))
    tuned_text = tokenizer.decode(argmax_loop(tuned, ids, 4, {2}), skip_special_tokens=True).strip()
    reference_text = tokenizer.decode(argmax_loop(bare_4bit(tiny_model_dir), ids, 4, {2}), skip_special_tokens=True)
    assert tuned_text != reference_text.strip()
    lines = result.stdout.splitlines()
    assert lines[0] == f"=== 1. {question}"
    assert lines[1].startswith("tuned (adapter on)") and lines[1].endswith("| reference (adapters off)")
    left, right = lines[2].split(" | ")
    assert left.strip() == tuned_text and right.strip() == reference_text.strip()


def test_cli_reads_prompts_from_a_file_and_answers_with_a_checkpoint(run_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}?"}) for i in range(3)))
    result = CliRunner(env={"COLUMNS": "60"}).invoke(
        main,
        ["generate", str(run_dir), "--data", str(data), "--limit", "2", "--adapter", "2", "--max-new-tokens", "2"],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"answering the first 2 of the 3 prompts in {data} (--limit)"
    # plain-text prompts go as training encodes them, without the chat template the tokenizer has: said once
    assert lines[1].startswith(f"note: the prompts in {data} are plain text, so they go without the chat template")
    assert "=== 1. Question 0?" in lines and "=== 2. Question 1?" in lines and "=== 3. Question 2?" not in lines
    # narrow: one answer after the other, each with its length
    assert lines.count("tuned (adapter on)") == 2 and lines.count("reference (adapters off)") == 2
    assert sum(line.startswith("[2 tokens,") for line in lines) == 4


def test_cli_says_which_prompts_it_cut_and_wraps_a_long_title(run_dir, tmp_path):
    """A file prompt longer than the run's max_prompt_length (128) is cut from the left as training cuts it, and the
    output says so; its title wraps at the terminal width like the answers; one new token is "1 token"."""
    data = tmp_path / "long.jsonl"
    long_prompt = "Please answer this question, which is long on purpose: " + "what is two plus two? " * 40
    data.write_text("\n".join(json.dumps({"prompt": [{"role": "user", "content": c}]}) for c in ("Hi?", long_prompt)))
    cut = "note: prompt 2 cut to its last 128 tokens (the run's max_prompt_length), as training cuts prompts."
    # The run's adapter directory given instead of the run: the run's settings still apply.
    args = ["--data", str(data), "--max-new-tokens", "1"]
    result = CliRunner().invoke(main, ["generate", str(run_dir / "adapter"), *args])
    assert result.exit_code == 0, result.output
    assert cut in result.stdout.splitlines()
    result = CliRunner(env={"COLUMNS": "60"}).invoke(
        main, ["generate", str(run_dir), "--data", str(data), "--max-new-tokens", "1"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert cut in lines
    assert not any("plain text" in line for line in lines)  # these prompts are messages: the template applies
    start = next(k for k, line in enumerate(lines) if line.startswith("=== 2. Please answer this question"))
    title = lines[start : start + 5]
    assert all(len(line) <= 60 for line in title) and title[2].startswith("two plus two?")
    assert sum(line.startswith("[1 token, ") for line in lines) == 4


def test_cli_silences_the_libraries_before_loading(run_dir, monkeypatch):
    """As run, merge and export do (what silencing does is tested in test_quiet): no "Loading weights" bar."""
    import qdpo.quiet

    calls = []
    monkeypatch.setattr(qdpo.quiet, "quiet_libraries", lambda: calls.append(1))
    result = CliRunner().invoke(main, ["generate", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "1"])
    assert result.exit_code == 0 and calls, result.output


def test_cli_user_errors_are_one_line(run_dir, tmp_path):
    (tmp_path / "no-prompt.jsonl").write_text(json.dumps({"question": "hi"}))
    (tmp_path / "bad.jsonl").write_text("{not json")
    empty = [{"prompt": "Hello?"}, {"prompt": [{"role": "user", "content": "  "}]}]
    (tmp_path / "empty.jsonl").write_text("\n".join(json.dumps(row) for row in empty))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"status": "running", "adapter_dir": "adapter"}))
    cases = {
        "nothing to answer": [str(run_dir)],
        "--prompt is empty": [str(run_dir), "--prompt", " "],
        "neither a qdpo run directory": [str(tmp_path / "missing"), "--prompt", "hi"],
        "has no adapter yet": [str(unfinished), "--prompt", "hi"],
        "has no checkpoint '7' (checkpoints: 2)": [str(run_dir), "--prompt", "hi", "--adapter", "7"],
        "has neither a 'prompt' column": [str(run_dir), "--data", str(tmp_path / "no-prompt.jsonl")],
        "bad.jsonl": [str(run_dir), "--data", str(tmp_path / "bad.jsonl")],
        "does not exist": [str(run_dir), "--data", str(tmp_path / "absent.jsonl")],
        "--max-new-tokens must be at least 1, not 0": [str(run_dir), "--prompt", "hi", "--max-new-tokens", "0"],
        "--limit must be at least 1, not -2": [str(run_dir), "--data", str(tmp_path / "empty.jsonl"), "--limit", "-2"],
        f"prompt 2 in {tmp_path / 'empty.jsonl'} is empty": [str(run_dir), "--data", str(tmp_path / "empty.jsonl")],
    }
    for expected, args in cases.items():
        result = CliRunner().invoke(main, ["generate", *args])
        assert result.exit_code == 2, (expected, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
        assert expected in result.output, result.output


def test_cli_chat_prompts_without_a_chat_template_are_one_line(run_dir, tmp_path):
    """A run whose tokenizer has no chat template cannot encode message prompts: one line, not a traceback."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "adapter" / "chat_template.jinja").unlink()
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hello there"}]}))
    result = CliRunner().invoke(main, ["generate", str(copy), "--data", str(data)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: prompt 1 cannot be encoded by the run's tokenizer ("), result.stderr


def test_cli_help():
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0 and "side by side" in result.output and "--adapter" in result.output


def test_eval_generate_answers_distinct_prompts():
    """KTO's examples (and pairs sharing a prompt) sit side by side: eval_generate takes each prompt once."""
    from qdpo.tokenize import TokenizedPair
    from qdpo.train import generation_prompts

    pairs = [TokenizedPair(p, [9], [8]) for p in ([1, 2], [1, 2], [3], [1, 2], [4, 5], [3], [6])]
    assert generation_prompts(pairs, 3) == [[1, 2], [3], [4, 5]]
    assert generation_prompts(pairs, 10) == [[1, 2], [3], [4, 5], [6]]
