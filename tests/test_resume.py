"""Never lose a run: a run killed at any moment and resumed gives the same metrics and adapter, bit for bit.

The uninterrupted run and every interrupted one run as separate `qdpo run` processes, as a user runs them.
Kills use SIGKILL (no cleanup at all): at random moments from outside, and at moments too short to hit
that way through qdpo's crash points (QDPO_CRASH_AT: mid-checkpoint-write, mid-reference-pass).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import train_step_failing_at
from safetensors.torch import load_file

from qdpo.cli import main

REPO = Path(__file__).resolve().parent.parent
TIMING = ("tokens_per_second", "peak_memory_gb")  # wall-clock measurements: the only fields allowed to differ
SETTINGS = [
    "--no-progress",
    "max_steps=4",
    "micro_batch_size=2",
    "gradient_accumulation_steps=2",
    "save_steps=1",
    "save_total_limit=5",
    "eval_fraction=0.25",
    "eval_steps=2",
    "learning_rate=1e-2",
    "lora_dropout=0.1",
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, chat_rows_module) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows_module))
    return path


@pytest.fixture(scope="module")
def chat_rows_module():
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus two?"}],
            "chosen": [{"role": "assistant", "content": f"{i} plus two is {i + 2}."}],
            "rejected": [{"role": "assistant", "content": "I am not sure about that, let me think."}],
        }
        for i in range(12)
    ]


def start(
    out: Path, model: Path, data: Path, cache: Path, *extra: str, crash_at: str | None = None, signal_at: str = ""
) -> subprocess.Popen:
    """`qdpo run` in a subprocess; crash_at: a crash point where it sends itself SIGKILL (or signal_at, by name)."""
    env = {**os.environ, "QDPO_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("QDPO_CRASH_AT", None)
    env.pop("QDPO_CRASH_SIGNAL", None)
    if crash_at:
        env["QDPO_CRASH_AT"] = crash_at
    if signal_at:
        env["QDPO_CRASH_SIGNAL"] = signal_at
    args = ["run", "--output", str(out), "--model", str(model), "--data", str(data), *SETTINGS, *extra]
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_here(out: Path, model: Path, data: Path, *extra: str):
    """`qdpo run` in this process (so monkeypatches apply), with the suite's settings."""
    return CliRunner().invoke(
        main, ["run", "--output", str(out), "--model", str(model), "--data", str(data), *SETTINGS, *extra]
    )


def resume(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QDPO_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("QDPO_CRASH_AT", None)
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "run", "--resume", str(out), "--no-progress", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(got: Path, want: Path) -> None:
    assert metrics(got) == metrics(want)
    a, b = (
        load_file(got / "adapter" / "adapter_model.safetensors"),
        load_file(want / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((got / "run.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, data_file) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    process = start(root / "run", tiny_model_dir, data_file, root / "cache")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert [row["step"] for row in metrics(root / "run")] == [0, 1, 2, 3, 4]  # step 0: the held-out baseline
    return root / "run"


@pytest.mark.parametrize(
    "crash_at",
    ["checkpoint:2", "reference"],  # a moment between steps is what the random kill below mostly hits
    ids=["writing-a-checkpoint", "computing-the-reference"],
)
def test_sigkill_at_an_exact_moment_then_resume(crash_at, tmp_path, tiny_model_dir, data_file, uninterrupted):
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache", crash_at=crash_at)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, output
    finished = resume(out, tmp_path / "cache")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_same_run(out, uninterrupted)
    assert not list((out / "checkpoints").glob(".*tmp*"))  # the half-written checkpoint was cleared


def test_sigkill_at_a_random_moment_while_a_second_run_is_refused(tmp_path, tiny_model_dir, data_file, uninterrupted):
    """Killed mid-training at a random moment; while it lived, a second run on its directory was refused."""
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache")
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)
    second = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert second.exit_code == 2 and "is in use by another qdpo run" in second.output
    time.sleep(random.Random(7).uniform(0.0, 1.5))  # somewhere in steps 1-4, or writing their checkpoints
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    finished = resume(out, tmp_path / "cache")  # the dead run's lock is stale: taken over
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_same_run(out, uninterrupted)


def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path, tiny_model_dir, data_file, uninterrupted):
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache", "save_steps=0")
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert f"resume with: qdpo run --resume {out}" in output and "stopped: SIGINT at step" in output
    info = json.loads((out / "run.json").read_text())
    stopped_at = int(info["adapter_dir"].split("step-")[1].split("/")[0])
    assert info["status"] == "interrupted" and 1 <= stopped_at < 4
    assert (out / info["adapter_dir"] / "adapter_model.safetensors").is_file()  # a loadable adapter is left
    finished = resume(out, tmp_path / "cache", "save_steps=0")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"done: 4 steps ({4 - stopped_at} after resuming at step {stopped_at}) in " in finished.stdout
    assert json.loads((out / "summary.json").read_text())["resumed_at"] == stopped_at
    assert "learning rate: this run's" not in finished.stdout  # the same schedule: nothing to say
    assert_same_run(out, uninterrupted)


def test_sigterm_before_the_first_step_stops_at_once_and_leaves_nothing(tmp_path, tiny_model_dir, data_file):
    """SIGTERM (Colab's stop button) while the reference table is computed: there is no step to finish, so the run
    stops at once, with SIGTERM's exit code, one line, and no directory left "running" and locked; the same
    command then starts over. (Without a handler SIGTERM ended the process on the spot.)"""
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache", crash_at="reference", signal_at="SIGTERM")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 143, output
    assert (
        f"stopped: SIGTERM before the first step: nothing was trained and {out} is removed; run the command again"
        in output
    )
    assert "Traceback" not in output and not out.exists()
    again = start(out, tiny_model_dir, data_file, tmp_path / "cache", "max_steps=1", "eval_fraction=0")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output


def test_ctrl_c_on_a_pipe_whose_reader_is_gone_still_stops_cleanly(tmp_path, tiny_model_dir, data_file):
    """`qdpo run | tee log` and Ctrl-C: the terminal's SIGINT ends tee too, and qdpo's stop lines then go to a closed
    pipe. The stop must still write its checkpoint and exit 130 (a BrokenPipeError made it a failure, exit 1)."""
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache", "save_steps=0", "max_steps=40")
    while '"step": 1,' not in ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""):
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.stdout.close()  # the reader is gone
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and (out / info["adapter_dir"] / "adapter_model.safetensors").is_file()


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache", "max_steps=40")
    while not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else True:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130 and "stopped: interrupted." in output, output
    from qdpo.checkpoint import checkpoints, load_trainer_state

    kept = checkpoints(out)
    assert kept and load_trainer_state(kept[-1])["step"] == kept[-1].step
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_a_resume_that_changes_the_computation_is_refused(tmp_path, uninterrupted):
    """Only logging, eval, saving, the number of steps, and the micro-batch split at the same pairs per step may change."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for override, field in (
        ("beta=0.2", "beta: 0.1 -> 0.2"),
        ("max_length=512", "max_length: 256 -> 512"),
        ("lora_r=8", "lora_r: 16 -> 8"),
        ("micro_batch_size=4", "micro_batch_size: 2 -> 4"),
    ):
        result = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress", override])
        assert result.exit_code == 2 and field in result.output and "cannot resume" in result.output, result.output
        dry = CliRunner().invoke(main, ["run", "--resume", str(out), "--dry-run", override])  # what a run would say
        assert dry.exit_code == 2 and field in dry.output and "cannot resume" in dry.output, dry.output
    assert CliRunner().invoke(main, ["run", "--resume", str(out), "--dry-run", "logging_steps=2"]).exit_code == 0
    done = CliRunner().invoke(
        main, ["run", "--resume", str(out), "--no-progress", "logging_steps=2", "offload_activations=true"]
    )
    assert done.exit_code == 0 and "already finished its 4 steps" in done.output, done.output
    assert metrics(out) == metrics(uninterrupted)


def test_a_resume_on_edited_training_pairs_is_refused(tmp_path, uninterrupted, data_file):
    """The checkpoint's place in the epoch indexes the training pairs: after rows are removed from the file (what a
    user does after a NaN stop names bad rows), a resume would train on other pairs, or index past the end."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    pairs = tmp_path / "pairs.jsonl"
    shutil.copyfile(data_file, pairs)
    for saved in [out / "config.yaml", *out.glob("checkpoints/*/config.yaml")]:  # the run now reads this copy
        saved.write_text(saved.read_text().replace(str(data_file), str(pairs)))
    same = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert same.exit_code == 0 and "already finished its 4 steps" in same.output, same.output

    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[2:]))  # two rows deleted
    edited = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert edited.exit_code == 2, edited.output
    assert "cannot resume" in edited.output and "the training pairs differ" in edited.output, edited.output
    assert "Traceback" not in edited.output and edited.output.splitlines()[-1].startswith("error: cannot resume")


def test_resume_trains_on_when_max_steps_is_raised(monkeypatch, tmp_path, uninterrupted):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    finished = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress", "max_steps=6"])
    assert finished.exit_code == 0, finished.output
    assert "learning rate: this run's 6-step schedule from step 5 (" in finished.output  # the change is said
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6] and rows[:5] == metrics(uninterrupted)

    # The smoke preset's cosine decay without warmup: step k of n uses 1e-2 x (1 + cos(pi (k - 1) / n)) / 2. Steps 5
    # and 6 follow the 6-step schedule; the 4-step one ended at 0, which step 5 must not inherit (a step doing nothing).
    def cosine(k: int, n: int) -> float:
        return 1e-2 * (1 + math.cos(math.pi * (k - 1) / n)) / 2

    assert [r["learning_rate"] for r in rows[1:5]] == pytest.approx([cosine(k, 4) for k in (1, 2, 3, 4)])
    assert [r["learning_rate"] for r in rows[5:]] == pytest.approx([cosine(5, 6), cosine(6, 6)])
    # Lowered below the checkpoint: its adapter trained past the new end, so the resume is refused, nothing changed.
    before = (out / "metrics.jsonl").read_text()
    lowered = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress", "max_steps=3"])
    assert lowered.exit_code == 2 and "error: cannot resume" in lowered.output
    assert "its last checkpoint is at step 6; raise max_steps (or num_train_epochs) to at least 6" in lowered.output
    assert (out / "metrics.jsonl").read_text() == before


def test_a_resume_between_logged_rows_logs_the_same_means(monkeypatch, tmp_path, tiny_model_dir, data_file):
    """logging_steps=3: the row of step 3 averages steps 1-3. A resume from the checkpoint of step 2 must bring
    the rows of steps 1 and 2 back (they are in no metrics line yet), so it logs what the run logged."""
    import shutil

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    whole = tmp_path / "whole"
    done = run_here(whole, tiny_model_dir, data_file, "logging_steps=3", "eval_steps=0", "save_steps=2")
    assert done.exit_code == 0, done.output
    assert [r["step"] for r in metrics(whole)] == [0, 3, 4]
    out = tmp_path / "resumed"
    shutil.copytree(whole, out)
    for step in (4,):  # as if the run had died just after its checkpoint of step 2
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")
    finished = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert finished.exit_code == 0, finished.output
    assert "resuming from" in finished.output and "(step 2 of 4)" in finished.output
    assert_same_run(out, whole)


def poison_losses(monkeypatch, after: int) -> None:
    """Every training micro-batch's losses NaN after the first `after` (evaluations run without grad: untouched)."""
    import qdpo.step as step  # the training step's loss (through PreferenceLoss, the module DDP would wrap)
    import qdpo.train as train  # the eval pass's

    real, calls = step.preference_loss, []

    def poisoned(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
        losses, *rest = real(*args, **kwargs)
        return (losses * float("nan") if len(calls) > after else losses, *rest)

    monkeypatch.setattr(step, "preference_loss", poisoned)
    monkeypatch.setattr(train, "preference_loss", poisoned)


def test_nan_steps_are_skipped_and_a_run_of_them_stops_with_the_pairs(
    monkeypatch, tmp_path, tiny_model_dir, data_file
):
    poison_losses(monkeypatch, after=2)  # from the second step on (two micro-batches a step), every loss is NaN
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = run_here(out, tiny_model_dir, data_file, "max_nonfinite_steps=2")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert "NaN/Inf for 2 steps in a row (steps 2-3" in last and "learning_rate" in last
    named = [part.split(" row ")[1] for part in last.split("among these: ")[1].split("; the adapter")[0].split("; ")]
    # the pairs of steps 2 and 3 (4 each; step 3 starts the second epoch, so some repeat), named by their file row
    assert len(named) == len(set(named)) >= 4 and all(1 <= int(n) <= 12 for n in named)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and [r.get("skipped") for r in rows] == [None, None, True, True]
    assert rows[2]["learning_rate"] == rows[3]["learning_rate"]  # the schedule waited
    first = load_file(out / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors")
    third = load_file(out / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], third[k]) for k in first)  # no update was applied by the bad steps


def test_a_skipped_last_step_still_logs_the_steps_before_it(monkeypatch, tmp_path, tiny_model_dir, data_file):
    """logging_steps=5 over 4 steps, the last one NaN (skipped): steps 1-3 get their averaged line before the skipped
    step's own, instead of never being logged."""
    poison_losses(monkeypatch, after=6)  # two micro-batches per step: calls 7 and 8 are step 4's
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = run_here(out, tiny_model_dir, data_file, "logging_steps=5", "eval_steps=0", "save_steps=0")
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 3, 4] and [r.get("skipped") for r in rows] == [None, None, True]
    assert math.isfinite(rows[1]["loss"])


def test_a_signal_after_training_is_not_called_before_the_start(monkeypatch, tmp_path, tiny_model_dir, data_file):
    """SIGINT while the report is drawn, after the last step: the run is done, so the line must not say it stopped
    "before the run started; nothing was written" (the early handler must be gone by then)."""
    import qdpo.report as report

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    monkeypatch.setattr(report, "report_after_run", interrupted)
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    result = run_here(tmp_path / "run", tiny_model_dir, data_file, "max_steps=1", "save_steps=0", "eval_fraction=0")
    assert result.exit_code == 130 and "stopped: interrupted." in result.output, result.output
    assert "before the run started" not in result.output


def test_a_resume_stopped_before_its_first_step_can_be_resumed(monkeypatch, tmp_path, tiny_model_dir, data_file):
    """A run with no checkpoint yet, resumed (it starts over in its directory) and stopped by SIGTERM while the
    reference is computed: its settings stay, so the `--resume` the line names works."""
    import qdpo.train as train

    out = tmp_path / "run"
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", train_step_failing_at(2, KeyboardInterrupt()))
        assert run_here(out, tiny_model_dir, data_file, "save_steps=0").exit_code == 130  # no checkpoint
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cold"))  # the reference is computed again: the crash point
    monkeypatch.setenv("QDPO_CRASH_AT", "reference")
    monkeypatch.setenv("QDPO_CRASH_SIGNAL", "SIGTERM")
    stopped = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert stopped.exit_code == 143, stopped.output
    assert f"before the first resumed step: nothing was trained; continue with: qdpo run --resume {out}" in (
        stopped.output
    )
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.delenv("QDPO_CRASH_AT")
    finished = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert finished.exit_code == 0, finished.output


def test_out_of_memory_checkpoints_the_last_good_state(
    monkeypatch, tmp_path, tiny_model_dir, data_file, uninterrupted
):
    """Memory running out in the middle of step 3: the state before step 3 is saved, and resuming from it is exact."""
    import qdpo.step as step  # the training step's loss (through PreferenceLoss, the module DDP would wrap)
    import qdpo.train as train  # the eval pass's

    real, calls = step.preference_loss, []

    def runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # step 3's second micro-batch (after the 2 eval calls of step 0's baseline, 2 x 2
            # training calls and 2 eval calls at step 2)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "preference_loss", runs_out)
    monkeypatch.setattr(train, "preference_loss", runs_out)
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = run_here(out, tiny_model_dir, data_file, "save_steps=0")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert (
        "out of GPU memory at step 3" in last and f"qdpo run --resume {out}" in last and "micro_batch_size=1" in last
    )
    assert [c.name for c in sorted((out / "checkpoints").iterdir())] == ["step-000002"]
    monkeypatch.setattr(step, "preference_loss", real)
    monkeypatch.setattr(train, "preference_loss", real)
    finished = resume(out, tmp_path / "cache", "save_steps=0")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_same_run(out, uninterrupted)
    regrouped = tmp_path / "regrouped"  # the advice itself: one pair per forward, twice the accumulation
    monkeypatch.setattr(step, "preference_loss", runs_out)
    monkeypatch.setattr(train, "preference_loss", runs_out)
    calls.clear()
    run_here(regrouped, tiny_model_dir, data_file, "save_steps=0")
    monkeypatch.setattr(step, "preference_loss", real)
    monkeypatch.setattr(train, "preference_loss", real)
    again = CliRunner().invoke(
        main,
        ["run", "--resume", str(regrouped), "--no-progress", "micro_batch_size=1", "gradient_accumulation_steps=4"],
    )
    assert again.exit_code == 0, again.output
    assert [r["step"] for r in metrics(regrouped)] == [0, 1, 2, 3, 4]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(monkeypatch, tmp_path, tiny_model_dir, data_file):
    import errno

    import qdpo.checkpoint as checkpoint

    real, saves = checkpoint.torch.save, []

    def fills_up(obj, path, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            real(obj, path, *args, **kwargs)  # half of the file made it out
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fills_up)
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = run_here(out, tiny_model_dir, data_file)
    assert result.exit_code == 2
    assert (
        result.output.strip().splitlines()[-1].startswith("error: could not write")
        and "No space left" in result.output
    )
    assert [c.name for c in sorted((out / "checkpoints").iterdir())] == ["step-000001"]  # no half checkpoint
    assert checkpoint.load_trainer_state(checkpoint.latest(out))["step"] == 1
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_finished_run_without_checkpoints_is_never_started_over(monkeypatch, tmp_path, tiny_model_dir, data_file):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run_here(out, tiny_model_dir, data_file, "save_steps=0", "max_steps=2").exit_code == 0
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = CliRunner().invoke(main, ["run", "--resume", str(out), "--no-progress"])
    assert again.exit_code == 2 and "finished without a checkpoint (save_steps was 0)" in again.output
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_sigterm_stops_like_ctrl_c_with_its_own_exit_code(tmp_path, tiny_model_dir, data_file):
    """A job scheduler's or Colab's SIGTERM: checkpoint, run.json interrupted, the resume command, exit 143."""
    out = tmp_path / "run"
    process = start(out, tiny_model_dir, data_file, tmp_path / "cache", "save_steps=0", "max_steps=40")
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "stopped: SIGTERM at step" in output and f"resume with: qdpo run --resume {out}" in output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and (out / info["adapter_dir"] / "adapter_model.safetensors").is_file()


def test_8bit_optimizer_states_resume_exactly(monkeypatch, tmp_path, tiny_model_dir, data_file):
    """bitsandbytes' 8-bit AdamW (paged on a GPU): its quantized states go into the checkpoint and come back exact."""
    import functools

    import bitsandbytes as bnb

    import qdpo.train as train

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    # bitsandbytes keeps tensors under 4096 values in fp32; the tiny model's LoRA matrices are that small
    monkeypatch.setattr(bnb.optim, "AdamW8bit", functools.partial(bnb.optim.AdamW8bit, min_8bit_size=16))
    assert run_here(tmp_path / "whole", tiny_model_dir, data_file, "optim=paged_adamw_8bit").exit_code == 0
    real, calls = train.train_step, []

    def stop_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", stop_at_step_3)
    run_here(tmp_path / "cut", tiny_model_dir, data_file, "optim=paged_adamw_8bit")
    monkeypatch.setattr(train, "train_step", real)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state["optimizer"]["state"].values()]
    assert quantized and all(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quantized)
    assert CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "cut"), "--no-progress"]).exit_code == 0
    assert_same_run(tmp_path / "cut", tmp_path / "whole")


def test_fp16_resume_of_a_run_saved_without_loss_scaling(monkeypatch):
    """compute_dtype auto is bf16 on an A100 and fp16 on a T4 (Colab can hand out either between a stop and its
    resume): an fp16 run resuming a bf16 checkpoint starts its loss scale afresh instead of crashing, an fp16
    checkpoint's scale comes back, and a bf16 run ignores an fp16 checkpoint's."""
    from qdpo.checkpoint import load_scaler_state

    fp16 = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=True)
    bf16 = torch.amp.GradScaler("cpu", enabled=False)
    note = load_scaler_state(fp16, bf16.state_dict())
    assert note and "loss scale starts afresh" in note and fp16.get_scale() == 2.0**16
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True).state_dict()
    assert load_scaler_state(fp16, saved) is None and fp16.get_scale() == 1024.0
    assert load_scaler_state(bf16, saved) is None and not bf16.is_enabled()


def test_cuda_random_states_restore_onto_fewer_gpus(monkeypatch):
    """A checkpoint taken on two GPUs resumed on one: the first device's generator state comes back, the second
    is not asked for (torch.cuda.set_rng_state_all would index a device this machine does not have)."""
    from qdpo.checkpoint import set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": ["gpu0", "gpu1"]}
    set_rng_state(state)
    assert restored == [("gpu0", 0)]
