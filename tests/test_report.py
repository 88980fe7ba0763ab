"""The run report and the verdict: intervals and smoothing against hand numbers, the report against the run's files."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

import qdpo
from qdpo.assess import EvalAccuracy, small_eval_warning, verdict, wilson_interval
from qdpo.cli import main
from qdpo.report import smooth


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # Published Wilson 95% intervals (e.g. Newcombe 1998, Table I; any binomial CI calculator).
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # Newcombe 1998's worked example
    ],
)
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_accuracy_line_and_small_eval_warning():
    assert EvalAccuracy(43, 48).describe() == "0.896 (43/48, 95% CI 0.78-0.95)"
    # One pair: the interval spans almost everything, and the run says so.
    assert "only 1 held-out pair," in small_eval_warning(1) and "+-0.4" in small_eval_warning(1)
    assert small_eval_warning(30) is None and "+-0.17" in small_eval_warning(29)
    assert small_eval_warning(4, "example").startswith("warning: only 4 held-out examples, so")
    assert "for at least 30 examples to judge" in small_eval_warning(4, "example")


@pytest.mark.parametrize(
    "correct, expected",
    [
        (43, "learned the preference"),
        (26, "not distinguishable from chance"),
        (5, "columns are not swapped"),
    ],
)
def test_verdict_reads_the_interval_against_chance(correct, expected):
    last = {"eval_rewards/accuracies": correct / 48}
    assert expected in verdict({"eval_rewards/accuracies": 0.0}, last, 48)
    assert "give eval_data" in verdict(None, None, 0)


def test_a_reference_free_baseline_is_judged_by_the_margin():
    """SimPO/ORPO rank pairs by the policy's own log-probs: 46/48 at step 0 is the base model, not learning."""
    first = {"eval_rewards/accuracies": 46 / 48, "eval_rewards/margins": 3.14}
    last = {"eval_rewards/accuracies": 47 / 48, "eval_rewards/margins": 4.71}
    said = verdict(first, last, 48)
    assert "learned" not in said and "base model's own ranking is the baseline" in said
    assert "margin moved from 3.140 to 4.710" in said


def test_smoothing_is_a_debiased_moving_average():
    # weight 0.6: avg1 = 0.4*1 = 0.4, /(1-0.6) = 1; avg2 = 0.6*0.4 + 0.4*3 = 1.44, /(1-0.36) = 2.25
    assert smooth([1.0, 3.0]) == pytest.approx([1.0, 2.25])
    assert smooth([5.0] * 7) == pytest.approx([5.0] * 7)  # no pull towards 0 at the start


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir):
    """Two short runs on the tiny model through the Python API, differing in beta; the rows the callback saw."""
    rows = [
        dict(prompt=f"Question {i}: what is {i} plus {i}?", chosen=f"{2 * i}.", rejected="Not sure.")
        for i in range(12)
    ]
    root = tmp_path_factory.mktemp("report")
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seen: dict[str, list[dict]] = {}
    for name, beta in (("a", 0.1), ("b", 0.5)):
        seen[name], printed = [], []
        qdpo.tune(
            "smoke",
            model=str(tiny_model_dir),
            data=str(root / "d.jsonl"),
            output_dir=str(root / name),
            overrides=[f"beta={beta}", "max_steps=6", "micro_batch_size=2", "eval_fraction=0.25", "eval_steps=3"],
            callback=seen[name].append,
            progress=False,
            echo=printed.append,
        )
        seen[name + ":printed"] = printed
    return root, seen


def test_the_callback_sees_exactly_the_logged_rows(tiny_runs):
    root, seen = tiny_runs
    logged = [json.loads(line) for line in (root / "a" / "metrics.jsonl").read_text().splitlines()]
    assert seen["a"] == logged and [r["step"] for r in logged] == [0, 1, 2, 3, 4, 5, 6]
    result_rows = [r["step"] for r in logged if "eval_loss" in r]
    assert result_rows == [0, 3, 6]


def test_the_run_prints_honest_counts_and_judges_its_small_eval_set(tiny_runs):
    """12 rows: 9 train and 3 held-out pairs, 2 per micro-batch: the run says so, and that 3 pairs say little."""
    printed = "\n".join(tiny_runs[1]["a:printed"])
    assert "6 steps of 2 pairs (one micro-batch per epoch has 1); 9 training pairs, 1.20 epochs" in printed
    assert "warning: only 3 held-out pairs, so eval accuracy is uncertain by about +-0.3" in printed
    assert re.search(r"^eval at step 0: reward accuracy 0\.000 \(0/3, 95% CI 0\.00-0\.56\)", printed, re.M)
    assert "before tuning, the reference gives the chosen response the higher log-prob on" in printed
    summary = json.loads((tiny_runs[0] / "a" / "summary.json").read_text())
    assert summary["verdict"] in printed


@pytest.mark.parametrize(
    "pairs, micro_batch, accumulation, expected",
    [
        (7, 8, 1, "7 pairs (all of them)"),  # the case that printed "steps of 8 pairs"
        (7, 8, 2, "2 x 7 pairs (all of them)"),
        (16, 8, 1, "8 pairs"),
        (17, 8, 2, "2 micro-batches of 8 pairs (one micro-batch per epoch has 1)"),
    ],
)
def test_step_size_says_what_a_step_really_takes(pairs, micro_batch, accumulation, expected):
    from qdpo.config import Config
    from qdpo.train import step_size

    config = Config(micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation)
    assert step_size(config, pairs) == expected


def test_a_steps_gradient_is_the_mean_over_the_pairs_it_really_has(tmp_path, tiny_model_dir):
    """5 pairs in micro-batches of 2, 2 and 1, or in one micro-batch of 8 that holds all 5: the first step's gradient is
    the mean over those 5 pairs, the gradient of one micro-batch of exactly 5 (not scaled by 5/6 or 5/8)."""
    rows = [dict(prompt=f"What is {i} plus {i}?", chosen=f"{2 * i}.", rejected="Not sure at all.") for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    norms = {}
    for name, mb, ga in (("whole", 5, 1), ("short-micro-batch", 2, 3), ("small-data", 8, 1)):
        run = qdpo.tune(
            "smoke",
            model=str(tiny_model_dir),
            data=str(tmp_path / "d.jsonl"),
            output_dir=str(tmp_path / name),
            overrides=[f"micro_batch_size={mb}", f"gradient_accumulation_steps={ga}", "max_steps=1", "lora_dropout=0"],
            eval_fraction=0,
            eval_generate=0,
            progress=False,
            echo=lambda line: None,
        )
        (row,) = [r for r in run.metrics if r["step"] == 1]
        norms[name] = row["grad_norm"]
    assert norms["whole"] > 0
    assert norms["short-micro-batch"] == pytest.approx(norms["whole"], rel=1e-4), norms
    assert norms["small-data"] == pytest.approx(norms["whole"], rel=1e-4), norms


def test_a_run_writes_a_self_contained_report(tiny_runs):
    root, _ = tiny_runs
    run = root / "a"
    page = (run / "report.html").read_text()
    # Opens offline: nothing is fetched; every image is inline PNG.
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5
    # The data table repeats run.json's counts: 9 training pairs read and kept, 3 held out.
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["train_stats"]["rows"] == 9 and info["data"]["eval_stats"]["kept"] == 3
    assert "<td>train</td><td>9</td><td>9</td>" in page
    # Every eval, step 0's baseline included, with its count out of 3 pairs.
    evals = page.split("<h2>Held-out evaluations</h2>")[1].split("<h2>")[0]
    assert re.findall(r"<tr><td>(\d+)</td><td>[0-9.]+ \(\d/3, 95% CI", evals) == ["0", "3", "6"]
    # Every timed phase, and the phases add up to no more than the run's wall time.
    summary = json.loads((run / "summary.json").read_text())
    assert {"data", "load", "reference", "eval", "steps", "save"} <= set(summary["timings"])
    assert sum(summary["timings"].values()) <= summary["seconds"] + 1
    md = (run / "report.md").read_text()
    for png in re.findall(r"\]\((report_files/[a-z_]+\.png)\)", md):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.count("](report_files/") == 5 and "| beta | 0.1 |" in md


def test_two_runs_compared_show_only_the_settings_that_differ(tiny_runs):
    root, _ = tiny_runs
    result = CliRunner().invoke(main, ["report", str(root / "a"), str(root / "b"), "--out", str(root / "ab")])
    assert result.exit_code == 0, result.output
    md = (root / "ab" / "report.md").read_text()
    differing = md.split("## Settings that differ")[1].split("##")[0]
    names = re.findall(r"^\| (\w+) \|", differing, flags=re.M)
    assert names == ["setting", "beta"]
    assert "| beta | 0.1 | 0.5 |" in differing
    interval = re.search(r"^\| 95% interval \| (.*) \|$", md, flags=re.M).group(1)
    assert re.fullmatch(r"\[[0-9.e-]{1,10}, [0-9.e-]{1,10}\] \| \[[0-9.e-]{1,10}, [0-9.e-]{1,10}\]", interval), (
        interval
    )
    same = CliRunner().invoke(main, ["report", str(root / "a"), str(root / "a"), "--out", str(root / "aa")])
    assert same.exit_code == 0, same.output
    alike = (root / "aa" / "report.md").read_text().split("## Settings that differ")[1].split("##")[0]
    assert "the runs' settings are identical" in alike and "| setting |" not in alike  # no empty table under it


def test_generations_show_each_question_once_and_mark_cut_answers(tmp_path):
    """The lines every prompt starts with (system line, template header) are left out; an answer that ran into
    max_new_tokens says so."""
    from qdpo.report import Run, generations_section

    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    prompts = [head + "What is 2 + 2?<|im_end|>\n", head + "What is 3 + 5?<|im_end|>\n"]
    generations = [
        dict(step=step, which=which, prompt=prompt, text=f"{which} {step} {k}", stopped=step == 0 or k == 0)
        for step in (0, 8)
        for which in ("policy", "reference")
        for k, prompt in enumerate(prompts)
    ]
    section = generations_section(Run(tmp_path, {}, {}, {}, [], generations))
    assert section.header == ["prompt", "step 0", "step 8"]
    assert section.rows == [
        ["...What is 2 + 2?<|im_end|>\n", "policy 0 0", "policy 8 0"],
        ["...What is 3 + 5?<|im_end|>\n", "policy 0 1", "policy 8 1 [cut at max_new_tokens]"],
    ]
    alone = generations_section(Run(tmp_path, {}, {}, {}, [], [g for g in generations if g["prompt"] == prompts[0]]))
    assert alone.rows[0][0] == prompts[0]  # one prompt: nothing to compare it with, shown whole


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "no run.json" in result.output


def test_the_report_figures_are_drawn(tiny_runs):
    """The PNGs decode to real plots: not blank, and the size they were drawn at."""
    import matplotlib.image as mpimg

    image = mpimg.imread(tiny_runs[0] / "a" / "report_files" / "loss.png")
    assert image.shape[:2] == (360, 640)
    assert math.isclose(float(image[..., :3].std()), 0.0) is False  # lines and text, not a blank canvas
