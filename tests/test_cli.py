"""The command line end to end on a tiny model, every preset through the CLI, and one-line user errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qdpo.cli import main
from qdpo.config import Config, field_names
from qdpo.presets import available

REPO = Path(__file__).resolve().parent.parent
TRL_METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["presets", "--help"], ["settings", "--help"]])
def test_help(args):
    result = invoke(*args)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_presets_lists_each_with_memory():
    result = invoke("presets")
    assert result.exit_code == 0
    for name in ("smoke", "7b-24gb", "7b-16gb", "8b-24gb"):
        assert name in available()
        line = next(line for line in result.output.splitlines() if line.startswith(name + " "))
        assert ("GB GPU" in line) != (name == "smoke")


@pytest.mark.parametrize("preset", available())
def test_every_preset_loads_through_the_cli(preset):
    result = invoke("run", "--preset", preset, "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert list(resolved) == field_names()
    Config(**resolved)  # the printed config is itself valid
    raw = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    for key, value in raw.items():
        if key in resolved:
            assert resolved[key] == value or resolved[key] == float(value), key


def test_precedence_defaults_preset_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("beta: 0.3\nlora_r: 4\nmodel: from-preset\n")
    result = invoke(
        "run", "--preset", str(preset), "--model", "from-flag", "lora_r=8", "learning_rate=1e-4", "--dry-run"
    )
    resolved = yaml.safe_load(result.output)
    assert resolved["beta"] == 0.3 and resolved["lora_r"] == 8 and resolved["model"] == "from-flag"
    assert resolved["learning_rate"] == 1e-4 and resolved["loss_type"] == Config().loss_type


@pytest.mark.parametrize(
    "args, message",
    [
        (["bogus=1"], "unknown setting 'bogus'"),
        (["beta=abc"], "beta must be a number"),
        (["lora_r=2.5"], "lora_r must be an integer"),
        (["loss_type=nca_pair"], "loss_type must be one of sigmoid, ipo, hinge, robust"),
        (["max_prompt_length=2000"], "max_prompt_length (2000) must be less than max_length"),
        (
            ["share_prompt=false", "pack_pairs=true"],
            "pack_pairs packs prompt+chosen+rejected runs, so it needs share_prompt=true",
        ),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["loss_type=[sigmoid,", "sft]"], "loss_type got '[sigmoid,', a list cut short (the shell splits unquoted"),
        (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
        (["--model", "README.md"], "model path README.md is a file, not a model"),
        (
            ["strategy=fsdp", "lora_target_modules=[q_proj,lm_head]"],
            "strategy=fsdp keeps lm_head whole and frozen: take lm_head out of lora_target_modules",
        ),
    ],
)
def test_config_errors_are_one_line(args, message):
    result = invoke("run", *args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and message in result.output, result.output


@pytest.mark.parametrize(
    "meta, message",
    [
        ("processes: two", "processes must be a whole number of at least 1; got 'two'"),
        ("processes: 0", "processes must be a whole number of at least 1; got 0"),
        ("gpu_memory_gb: 24GB", "gpu_memory_gb must be a positive number of GB (like 24); got '24GB'"),
        ("gpu_memory_gb: -8", "gpu_memory_gb must be a positive number of GB (like 24); got -8"),
    ],
)
def test_bad_preset_metadata_is_one_line(tmp_path, meta, message):
    """A preset file's own keys (not settings) are checked where the file is read, by every command."""
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"model: some/model\n{meta}\n")
    for command in (["run", "--dry-run"], ["plan"]):
        result = invoke(*command, "--preset", str(preset))
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output


def run_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "chosen": "b"}\n', "row 1 has no column 'rejected'"),
        (
            '{"prompt": "a", "chosen": ["x"], "rejected": "c"}\n',
            "column 'chosen' must be a string or a list of {role, content} messages",
        ),
        ("", "has no rows"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ],
)
def test_bad_data_through_the_cli(monkeypatch, tmp_path, tiny_model_dir, content, message):
    """Exit code 2, one line on stderr, no traceback, no output directory left."""
    (tmp_path / "bad.jsonl").write_text(content)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        main, ["run", "--model", str(tiny_model_dir), "--data", "bad.jsonl", "--output", "out"]
    )
    assert result.exit_code == 2 and not isinstance(result.exception, (KeyError, TypeError, ValueError))
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_user_error_in_a_real_process_is_one_line_without_traceback(tmp_path, tiny_model_dir):
    """The same through a real `qdpo` process (what a shell sees): stderr holds the one line, exit code 2."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    proc = run_subprocess(
        "run", "--model", str(tiny_model_dir), "--data", "bad.jsonl", "--output", "out", cwd=tmp_path
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == [
        "error: bad.jsonl row 1 has no column 'rejected' (it has 'prompt', 'chosen'); map yours with "
        "--chosen-column/--rejected-column."
    ]
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_is_refused(tmp_path, tiny_model_dir, chat_rows):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    result = invoke(
        "run", "--model", str(tiny_model_dir), "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "out")
    )
    assert result.exit_code == 2 and "not a qdpo run directory" in result.output
    result = invoke(
        "run",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--output",
        str(tmp_path / "out"),
        "--overwrite",
    )
    assert result.exit_code == 2 and "not a qdpo run directory" in result.output
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_logging_steps_averages_the_steps_between_rows(tmp_path, tiny_model_dir, chat_rows):
    """logging_steps=3 over 4 steps: the row of step 3 holds the means of steps 1-3 as a logging_steps=1 run of the
    same pairs logs them (tokens summed, the highest peak, step 3's learning rate), and step 4, the last, its own."""
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    rows = {}
    for every in (1, 3):
        out = tmp_path / f"every-{every}"
        args = ["--model", str(tiny_model_dir), "--data", str(tmp_path / "d.jsonl"), "--output", str(out)]
        settings = ["max_steps=4", "micro_batch_size=2", "eval_fraction=0", "save_steps=0", "learning_rate=1e-2"]
        result = invoke("run", "--preset", "smoke", *args, "--no-progress", *settings, f"logging_steps={every}")
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows[every] = {line["step"]: line for line in lines if line["step"] > 0}
    each, averaged = rows[1], rows[3]
    assert sorted(each) == [1, 2, 3, 4] and sorted(averaged) == [3, 4]
    for name in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected", "grad_norm"):
        assert averaged[3][name] == pytest.approx(sum(each[s][name] for s in (1, 2, 3)) / 3, rel=1e-5, abs=1e-7)
        assert averaged[4][name] == pytest.approx(each[4][name], rel=1e-5, abs=1e-7)
    assert averaged[3]["tokens"] == sum(each[s]["tokens"] for s in (1, 2, 3))
    assert averaged[3]["learning_rate"] == each[3]["learning_rate"] != each[1]["learning_rate"]
    assert each[1]["loss"] != pytest.approx(each[3]["loss"])  # the steps differ: a mean is not any one of them


def test_run_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, chat_rows):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    out = tmp_path / "run"
    result = invoke(
        "run",
        "--preset",
        "smoke",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--output",
        str(out),
        "--no-progress",
        "max_steps=4",
        "micro_batch_size=2",
        "gradient_accumulation_steps=2",
        "eval_fraction=0.25",
        "eval_steps=2",
        "learning_rate=1e-2",
        "loss_type=sigmoid",  # plain DPO (the smoke preset adds an NLL term): step 1's loss is ln 2
    )
    assert result.exit_code == 0, result.output
    assert "9 pairs kept" in result.output and "3 pairs kept" in result.output
    baseline, *lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 0 is the held-out baseline before any update: policy = reference, so every margin is 0 and loss is ln 2.
    assert baseline["step"] == 0 and "loss" not in baseline
    assert baseline["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and baseline["eval_rewards/margins"] == 0
    assert baseline["eval_rewards/accuracies"] == 0
    assert "eval at step 0: reward accuracy 0.000 (0/3, 95% CI 0.00-0.56)" in result.output
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        for name in TRL_METRICS + ["grad_norm", "learning_rate", "tokens_per_second", "peak_memory_gb"]:
            assert name in line, name
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and lines[0]["rewards/margins"] == 0
    assert [("eval_rewards/accuracies" in line) for line in lines] == [False, True, False, True]
    assert all("eval_" + name in lines[3] for name in TRL_METRICS)

    run_info = json.loads((out / "run.json").read_text())
    assert run_info["status"] == "finished"
    assert run_info["base_model"]["path"] == str(tiny_model_dir)
    assert run_info["quantization"]["quant_type"] == "nf4" and run_info["quantization"]["double_quant"]
    assert (
        run_info["lora"]["r"] == 16
        and run_info["data"]["train_pairs"] == 9
        and len(run_info["data"]["fingerprint"]) == 16
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["max_steps"] == 4 and Config(**config).learning_rate == 1e-2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_rewards/accuracies"] == lines[3]["eval_rewards/accuracies"]

    # The adapter is a plain PEFT directory: it loads on the full-precision base without qdpo.
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    assert AutoTokenizer.from_pretrained(out / "adapter").chat_template


def test_micro_batch_auto_uses_the_planner():
    """auto picks the largest micro-batch whose plan fits; one more pair must not fit."""
    from qdpo.config import build_config
    from qdpo.plan import plan_memory
    from qdpo.presets import load_preset
    from qdpo.shapes import model_config

    result = invoke("run", "--preset", "7b-24gb", "--micro-batch", "auto", "--dry-run")
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load(result.output.split("\n", 1)[1])
    chosen, accumulation = settings["micro_batch_size"], settings["gradient_accumulation_steps"]
    config = build_config(load_preset("7b-24gb").settings)
    shape, _ = model_config(config.model)
    gb = 1e9  # the planner's GB are decimal, like GPU spec sheets
    fits = next(b for b in range(64, 0, -1) if plan_memory(shape, config, b, config.max_length).total <= 24 * gb)
    # the preset's pairs per step kept: the largest micro-batch that divides them and fits
    per_step = config.micro_batch_size * config.gradient_accumulation_steps
    assert chosen * accumulation == per_step
    assert chosen == max(b for b in range(1, fits + 1) if per_step % b == 0)
    assert f"(the plan fits {fits}; qdpo plan)" in result.output
    no_budget = invoke("run", "--preset", "smoke", "--micro-batch", "auto", "--dry-run")
    assert no_budget.exit_code == 2 and "needs a GPU budget" in no_budget.output


def test_tokenizer_from_another_directory(tmp_path, tiny_model_dir, chat_rows):
    """tokenizer=DIR tokenizes exactly as the same tokenizer inside the model directory does."""
    import shutil

    from qdpo.config import build_config
    from qdpo.prepare import prepare_data

    weights_only, tokenizer_only = tmp_path / "weights", tmp_path / "tok"
    weights_only.mkdir(), tokenizer_only.mkdir()
    for f in tiny_model_dir.iterdir():
        shutil.copy(
            f,
            (tokenizer_only if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) else weights_only)
            / f.name,
        )
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    settings = {"data": str(tmp_path / "d.jsonl"), "eval_fraction": 0.0}
    expected = prepare_data(build_config(None, {**settings, "model": str(tiny_model_dir)}), echo=lambda _: None).train
    got = prepare_data(
        build_config(None, {**settings, "model": str(weights_only), "tokenizer": str(tokenizer_only)}),
        echo=lambda _: None,
    ).train
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in got] == [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in expected
    ]
    result = invoke(
        "run", "--model", str(weights_only), "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "out")
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "could not load a tokenizer" in result.output
    result = invoke(
        "run",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "tokenizer=" + str(tmp_path / "nope"),
        "--output",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "could not load tokenizer" in result.output
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tiny_model_dir, chat_rows):
    """Token ids past the model's embeddings stop the run with one sentence and leave no run directory."""
    from conftest import make_model

    small = tmp_path / "small-vocab"
    make_model(small, vocab_size=64)  # the test tokenizer has 320 ids
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    result = invoke(
        "run",
        "--model",
        str(small),
        "--data",
        str(tmp_path / "d.jsonl"),
        "tokenizer=" + str(tiny_model_dir),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
        "max_steps=1",
    )
    assert result.exit_code == 2, result.output
    assert "has only 64 embeddings" in result.output.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_bracket_in_a_text_setting_is_not_a_cut_list():
    from qdpo.config import parse_override

    assert parse_override("assistant_marker=[Assistant]:") == ("assistant_marker", "[Assistant]:")
    assert parse_override("prompt_column=[q]x") == ("prompt_column", "[q]x")


def test_a_preset_with_resume_is_refused(tmp_path):
    """A resumed run keeps its own settings, so a --preset beside --resume would be silently ignored: refused."""
    result = invoke("run", "--preset", "7b-24gb", "--resume", str(tmp_path))
    assert result.exit_code == 2 and result.output.startswith("error: --preset does not apply to --resume"), (
        result.output
    )
