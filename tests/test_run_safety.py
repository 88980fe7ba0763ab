"""What a run decides for the user and what it leaves behind: dtype, derived settings, init adapter settings,
hub ids, skipped fp16 steps, and failures after training has started."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import train_step_failing_at

from qdpo.cli import main
from qdpo.config import Config, build_config
from qdpo.errors import UserError
from qdpo.hub import looks_like_hub_id
from qdpo.model import adapter_lora_settings, compute_dtype


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    "capability, want",
    [
        ((7, 5), torch.float16),
        ((7, 0), torch.float16),
        ((8, 0), torch.bfloat16),
        ((8, 9), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
    ids=["T4", "V100", "A100", "L4", "H100"],
)
def test_auto_dtype_is_bf16_only_from_ampere(monkeypatch, capability, want):
    """torch.cuda.is_bf16_supported() says yes on a T4 (emulated bf16); qdpo looks at the compute capability."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert compute_dtype("auto", torch.device("cuda")) == want
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(
    "name, hub",
    [
        ("allenai/tulu-2.5-preference-data", True),
        ("trl-lib/ultrafeedback_binarized", True),
        ("mistralai/Mistral-7B-Instruct-v0.3", True),
        ("data/prefs.jsonl", False),
        ("models/model.gguf", False),
        ("./org/name", False),
        ("~/org/name", False),
        ("/org/name", False),
        ("a/b/c", False),
        ("name", False),
        ("org/na me", False),
        ("org/--bad", False),
    ],
)
def test_one_rule_for_hub_ids(name, hub):
    assert looks_like_hub_id(name) is hub


def test_a_hub_dataset_id_with_a_dot_goes_to_the_hub(monkeypatch):
    """It used to be refused as a missing file; now data, model and planner all treat it as a hub id."""
    import datasets

    from qdpo.data import load_rows
    from qdpo.model import resolve_model

    asked = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, split: (
            asked.append((name, split))
            or datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
        ),
    )
    rows, where = load_rows("allenai/tulu-2.5-preference-data", "train")
    assert asked == [("allenai/tulu-2.5-preference-data", "train")] and rows[0]["chosen"] == "c"
    assert resolve_model("org/model-v0.1").path == "org/model-v0.1"


def test_lowering_max_length_alone_derives_max_prompt_length():
    notes: list[str] = []
    config = build_config({"max_length": 2048, "max_prompt_length": 1024}, {"max_length": 1024}, notes)
    assert (config.max_length, config.max_prompt_length) == (1024, 512) and "max_prompt_length 512" in notes[0]
    with pytest.raises(UserError, match=r"max_prompt_length \(1024\) must be less than max_length \(1024\)"):
        build_config({}, {"max_length": 1024, "max_prompt_length": 1024})


@pytest.mark.parametrize(
    "args", [["run", "max_length=128", "--dry-run"], ["plan", "--preset", "7b-24gb", "max_length=1024"]]
)
def test_lowered_max_length_works_through_the_cli(args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "using max_prompt_length" in result.output


def write_adapter(path, r=4, alpha=8, targets=("q_proj", "v_proj")):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps(
            {"r": r, "lora_alpha": alpha, "target_modules": list(targets), "peft_type": "LORA", "lora_dropout": 0.1}
        )
    )
    return str(path)


def test_init_adapter_decides_the_lora_settings(tmp_path):
    adapter = write_adapter(tmp_path / "sft")
    config, notes = adapter_lora_settings(Config(model="x", data="y", init_adapter=adapter))
    assert (config.lora_r, config.lora_alpha, config.lora_target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert "lora_r=4" in notes[0]
    same, _ = adapter_lora_settings(
        Config(model="x", data="y", init_adapter=adapter, lora_target_modules=["v_proj", "q_proj"])
    )
    assert same.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match=r"lora_r=8 contradicts init_adapter .* trained with lora_r=4"):
        adapter_lora_settings(Config(model="x", data="y", init_adapter=adapter, lora_r=8))
    with pytest.raises(UserError, match=r"lora_target_modules=\['o_proj'\] contradicts"):
        adapter_lora_settings(Config(model="x", data="y", init_adapter=adapter, lora_target_modules=["o_proj"]))


def test_run_records_the_init_adapters_settings(tmp_path, tiny_model_dir, chat_rows):
    """run.json and the saved adapter say r=4, the adapter's rank, not the preset's 16."""
    from qdpo.model import ModelSource, add_lora, load_base_4bit

    base = load_base_4bit(ModelSource("m", str(tiny_model_dir)), torch.float32, torch.device("cpu"), False)
    add_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"], None, seed=0).save_pretrained(tmp_path / "sft")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    out = tmp_path / "run"
    result = invoke(
        "run",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--output",
        str(out),
        "--no-progress",
        "max_steps=1",
        "micro_batch_size=4",
        f"init_adapter={tmp_path / 'sft'}",
        "eval_fraction=0",
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "run.json").read_text())["lora"]
    assert (recorded["r"], recorded["alpha"], sorted(recorded["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert yaml.safe_load((out / "config.yaml").read_text())["lora_r"] == 4
    refused = invoke(
        "run",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--output",
        str(tmp_path / "r2"),
        "--no-progress",
        "max_steps=1",
        f"init_adapter={tmp_path / 'sft'}",
        "lora_r=32",
    )
    assert refused.exit_code == 2 and "lora_r=32 contradicts" in refused.output and not (tmp_path / "r2").exists()


def test_a_skipped_fp16_step_does_not_advance_the_schedule(monkeypatch):
    """GradScaler drops a step whose gradients overflow; the learning-rate schedule must not move on, and the row says so."""
    from types import SimpleNamespace

    import qdpo.train as train
    from qdpo.logprobs import SequenceScores

    weight = torch.nn.Parameter(torch.ones(1))
    factors = iter([math.inf, 1.0])

    def fake_loss(model, batch, config, reference, desirable=None):
        loss = weight * next(factors)
        zero = torch.zeros(1)
        return loss, zero, zero, SequenceScores(torch.zeros(2), torch.ones(2, dtype=torch.long), torch.zeros(2))

    monkeypatch.setattr(train, "make_batch", lambda pairs, pad, layout: SimpleNamespace(num_tokens=1))
    config = Config(
        model="x",
        data="y",
        gradient_accumulation_steps=1,
        micro_batch_size=1,
        warmup_ratio=0.0,
        lr_scheduler_type="linear",
        learning_rate=1.0,
    )
    optimizer = torch.optim.SGD([weight], lr=1.0)
    t = train.Training(
        model=SimpleNamespace(config=SimpleNamespace(vocab_size=4)),
        loss=lambda batch, reference, desirable: fake_loss(None, batch, config, reference, desirable),
        no_sync=contextlib.nullcontext,
        params=[weight],
        optimizer=optimizer,
        scheduler=train.make_scheduler(config, optimizer, 4),
        scaler=torch.amp.GradScaler("cpu", enabled=True),
        steps=4,
        stream=None,
        eval_batches=[],
        train_ref=None,
        eval_ref=None,
    )
    data = SimpleNamespace(train=[None], tokenizer=SimpleNamespace(pad_token_id=0))
    stream = iter([[0], [0]])
    lr_before = t.scheduler.get_last_lr()[0]
    first = train.train_step(t, data, config, stream, torch.device("cpu"))
    assert first["skipped"] is True and weight.item() == 1.0
    assert t.scheduler.get_last_lr()[0] == lr_before  # the schedule did not move
    second = train.train_step(t, data, config, stream, torch.device("cpu"))
    assert second["skipped"] is False and second["learning_rate"] == lr_before and weight.item() != 1.0
    assert t.scheduler.get_last_lr()[0] != lr_before


@pytest.fixture
def run_args(tmp_path, tiny_model_dir, chat_rows):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows))
    return [
        "run",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--output",
        str(tmp_path / "run"),
        "--no-progress",
        "max_steps=3",
        "micro_batch_size=2",
        "eval_fraction=0",
        "loss_type=sigmoid",  # plain DPO (the smoke preset adds an NLL term): step 1's loss is ln 2
    ]


@pytest.mark.parametrize(
    "error, status, exit_code",
    [
        (UserError("out of GPU memory at micro_batch_size=2, max_length=1024; lower one of them."), "failed", 2),
        (KeyboardInterrupt(), "interrupted", 130),
    ],
    ids=["oom", "ctrl-c"],
)
def test_a_failure_after_training_started_keeps_the_run(monkeypatch, tmp_path, run_args, error, status, exit_code):
    """Out of memory at step 2 (or Ctrl-C): metrics.jsonl keeps step 1, run.json says why, exit is non-zero."""
    import qdpo.train as train

    monkeypatch.setattr(train, "train_step", train_step_failing_at(2, error))
    result = invoke(*run_args)
    assert result.exit_code == exit_code, result.output
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if line["step"] > 0]  # step 0 is the held-out baseline (if there is eval data)
    assert [line["step"] for line in lines] == [1] and lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == status and info["error"] == (str(error) or type(error).__name__)
    if isinstance(error, UserError):
        assert result.output.splitlines()[-1] == f"error: {error}"
    assert "keeps the metrics logged so far" in result.output


def test_a_failure_before_the_first_step_leaves_nothing(monkeypatch, tmp_path, run_args):
    import qdpo.train as train

    def no_fit(*args, **kwargs):
        raise UserError("the model does not fit in GPU memory even in 4-bit; use a smaller model.")

    monkeypatch.setattr(train, "setup_training", no_fit)
    result = invoke(*run_args)
    assert result.exit_code == 2 and "does not fit" in result.output
    assert not (tmp_path / "run").exists()


def test_flex_attention_is_refused_by_the_shared_layout(tiny_model_dir, tokenizer, chat_rows):
    """Through the Python API: flex_attention would add the boolean mask as a score (no masking); qdpo refuses in one line."""
    from qdpo.batching import make_batch
    from qdpo.data import Columns, to_pairs
    from qdpo.model import ModelSource, add_lora, load_base_4bit
    from qdpo.step import score_batch
    from qdpo.tokenize import tokenize_pairs

    model = add_lora(
        load_base_4bit(ModelSource("m", str(tiny_model_dir)), torch.float32, torch.device("cpu"), False),
        4,
        8,
        0.0,
        ["all-linear"],
        None,
        seed=0,
    )
    model.get_base_model().config._attn_implementation = "flex_attention"
    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows[:2], Columns(), "t"), 64, 32)
    for layout in ("shared", "packed"):
        with pytest.raises(
            UserError, match="share_prompt cannot be exact here: its attention implementation is flex_attention"
        ):
            score_batch(model, make_batch(pairs, tokenizer.pad_token_id, layout), 4)


def test_an_existing_output_dir_is_refused_before_the_data_is_read(monkeypatch, tmp_path, tiny_model_dir):
    import qdpo.train as train

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: pytest.fail("the data was read"))
    result = invoke("run", "--model", str(tiny_model_dir), "--data", "/no/such/file.jsonl", "--output", str(out))
    # not a run: the only way out is another directory (--overwrite and --resume would both be refused)
    assert result.exit_code == 2 and "is not a qdpo run directory; refusing to overwrite it" in result.output
    assert "--overwrite" not in result.output and (out / "notes.txt").read_text() == "mine"
    (out / "run.json").write_text("{}")  # an earlier run's directory: overwrite or resume it
    result = invoke("run", "--model", str(tiny_model_dir), "--data", "/no/such/file.jsonl", "--output", str(out))
    assert result.exit_code == 2 and "already exists and is not empty; pick another, pass --overwrite" in result.output
    a_file = tmp_path / "README.md"
    a_file.write_text("mine")
    result = invoke("run", "--model", str(tiny_model_dir), "--data", "/no/such/file.jsonl", "--output", str(a_file))
    assert result.exit_code == 2 and f"output_dir {a_file} is a file, not a directory" in result.output
    assert "--overwrite" not in result.output and a_file.read_text() == "mine"
    result = invoke(
        "run", "--model", str(tiny_model_dir), "--data", "/no/such/file.jsonl", "--output", f"{a_file}/run"
    )
    assert result.exit_code == 2 and f"cannot be created: {a_file} is a file; pick another path." in result.output


def test_an_output_dir_the_disk_refuses_is_one_line(monkeypatch, tmp_path):
    """The path checks pass, then mkdir fails (a read-only mount, /proc): one line, not a traceback."""
    from pathlib import Path

    import qdpo.rundir as rundir

    def refuse(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError, match=r"^cannot create output_dir .*/run \(Read-only file system\); pick another"):
        rundir.take_lock(tmp_path / "run")


def test_a_data_error_comes_before_the_model_is_resolved(monkeypatch, tmp_path):
    """An empty data file, for training or held-out, is refused before a GGUF model would be converted."""
    import qdpo.prepare as prepare

    monkeypatch.setattr(prepare, "resolve_model", lambda *a, **k: pytest.fail("the model was resolved first"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    for data in (["--data", str(empty)], ["--data", str(good), "--eval-data", str(empty)]):
        result = invoke("run", "--model", "no/such-model", *data, "--output", str(tmp_path / "run"))
        assert result.exit_code == 2 and f"{empty} has no rows; give a file" in result.output, result.output
        assert not (tmp_path / "run").exists()


def test_a_damaged_reference_cache_entry_is_reported_and_recomputed(
    tmp_path, monkeypatch, tiny_model_dir, tokenizer, chat_rows
):
    """A flipped byte in a cached table still parses as safetensors; its checksum catches it, and it is never used."""
    from qdpo.batching import length_grouped_batches
    from qdpo.data import Columns, to_pairs
    from qdpo.model import ModelSource, add_lora, load_base_4bit
    from qdpo.reference import load_or_compute, reference_dir
    from qdpo.tokenize import tokenize_pairs

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    model = add_lora(
        load_base_4bit(ModelSource("m", str(tiny_model_dir)), torch.float32, torch.device("cpu"), False),
        4,
        8,
        0.0,
        ["all-linear"],
        None,
        seed=0,
    )
    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows, Columns(), "t"), 128, 64)
    batches = length_grouped_batches(pairs, 4, seed=0)
    good, scored = load_or_compute(model, pairs, batches, tokenizer.pad_token_id, "k1")
    assert scored == len(batches)
    path = reference_dir() / "k1.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last float of the table
    path.write_bytes(bytes(raw))
    notes: list[str] = []
    again, scored = load_or_compute(model, pairs, batches, tokenizer.pad_token_id, "k1", notes=notes)
    assert scored == len(batches) and torch.equal(again, good)
    assert notes == ["reference cache entry k1.safetensors is damaged (checksum mismatch): computing it again"]
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    notes.clear()
    again, scored = load_or_compute(model, pairs, batches, tokenizer.pad_token_id, "k1", notes=notes)
    assert scored == len(batches) and torch.equal(again, good) and "damaged (unreadable" in notes[0]


def test_out_of_memory_before_the_first_step_is_one_line_and_leaves_nothing(monkeypatch, tmp_path, run_args):
    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))  # no cached table: the reference pass must run
    monkeypatch.setattr("qdpo.reference.compute_reference", no_room)
    result = invoke(*run_args)
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith(
        "error: out of GPU memory before the first step, scoring the reference"
    )
    assert not (tmp_path / "run").exists()


def test_local_paths_are_written_absolute_so_the_run_resumes_from_anywhere(monkeypatch, tmp_path):
    """config.yaml keeps the paths a resume, merge or export reads: relative ones broke them from another directory.
    Hub ids and built-in names are not paths and stay as typed."""
    from qdpo.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prefs.jsonl").write_text("{}\n")
    config = absolute_paths(Config(model="org/name", data="data/prefs.jsonl", eval_data="builtin:answers:eval"))
    assert config.data == str(tmp_path / "data" / "prefs.jsonl")
    assert (config.model, config.eval_data, config.tokenizer) == ("org/name", "builtin:answers:eval", None)


def test_a_run_started_with_relative_paths_resumes_from_another_directory(monkeypatch, tmp_path, run_args):
    """The run records absolute paths: `qdpo run --resume` from elsewhere finds its data (it did not)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    args = [a.replace(str(tmp_path / "d.jsonl"), "../d.jsonl") for a in run_args] + ["save_steps=1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"] == str(tmp_path / "d.jsonl")
    monkeypatch.chdir(tmp_path.parent)
    again = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "run"), "--no-progress", "max_steps=4"])
    assert again.exit_code == 0, again.output
    assert "resuming from" in again.output


def test_written_outputs_get_the_usual_permissions(tmp_path):
    """mkdtemp's 0700 and safetensors' 0600 would hide an adapter from the other users of a shared server: staged
    outputs get what mkdir and open give (0777/0666 less the umask)."""
    import os

    from safetensors.torch import save_file

    from qdpo.fs import staged

    with staged(tmp_path / "adapter") as tmp:
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "adapter" / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "adapter" / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
