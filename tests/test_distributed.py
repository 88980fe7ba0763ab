"""Several processes, one run: 2 ranks on gloo compute what 1 process with twice the accumulation computes.

Everything runs as real processes started by torchrun (torch.distributed.run), as users start them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
TIMING = ("tokens_per_second", "peak_memory_gb")
# One pytest-xdist worker runs the whole module: its fixtures start several processes each, once.
pytestmark = pytest.mark.xdist_group("distributed")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus two?"}],
            "chosen": [{"role": "assistant", "content": f"{i} plus two is {i + 2}."}],
            "rejected": [{"role": "assistant", "content": "I am not sure about that" + ", let me think" * (i % 3)}],
        }
        for i in range(14)
    ]
    path = tmp_path_factory.mktemp("ddp-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env_with(cache: Path, **extra: str) -> dict[str, str]:
    # PYTHONPATH: the ranks import this checkout's qdpo whatever their working directory.
    env = {**os.environ, "QDPO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.pop("QDPO_CRASH_AT", None)
    env.update(extra)
    return env


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


@pytest.fixture(scope="module")
def one_step_each(tiny_model_dir, data_file, tmp_path_factory):
    """The worker's saved results: 2 ranks with accumulation 1 (ddp, fsdp), and 1 process with accumulation 2."""
    tmp = tmp_path_factory.mktemp("ddp-step")
    runs = {}
    for name, command, accumulation in (
        ("ddp", [*torchrun(2), str(WORKER)], "1"),
        ("fsdp", [*torchrun(2), str(WORKER)], "1"),
        ("one", [sys.executable, str(WORKER)], "2"),
    ):
        out = tmp / f"{name}.pt"
        done = subprocess.run(
            [
                *command,
                str(tiny_model_dir),
                str(data_file),
                str(out),
                accumulation,
                "fsdp" if name == "fsdp" else "ddp",
            ],
            env=env_with(tmp / f"cache-{name}"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = torch.load(out, weights_only=False)
    return runs, tmp


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_loss_gradients_and_update_of_one_process(one_step_each, strategy):
    runs, _ = one_step_each
    two, one = runs[strategy], runs["one"]
    assert two["steps"] == one["steps"] == 2
    for got, want in zip(two["rows"], one["rows"]):
        for name, value in want.items():
            if name not in TIMING:
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert two["rows"][1]["loss"] < two["rows"][0]["loss"]  # the first update really changed the second step
    assert two["grads"].keys() == one["grads"].keys() and one["grads"]
    for name, grad in one["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7)
    lr = 1e-2  # ddp_worker's learning_rate
    for name, weight in one["adapter"].items():
        # Where a step's gradient is near Adam's eps (1e-8), its update lr * g / (|g| + eps) turns float noise in g
        # (another summation order: 2e-10 on 4e-8, seen with FSDP on AVX512) into differences of 1e-5: those
        # elements only have to move alike to within 1% of lr. (A gradient of exactly 0, lora_A's at the first
        # step while lora_B is 0, moves nothing on either side.)
        steps = torch.stack([g[name].abs() for g in one["step_grads"]])
        tiny = ((steps > 0) & (steps < 1e-6)).any(0)
        assert tiny.float().mean() < 0.05, name  # a few elements, not a weaker check of the whole adapter
        got = two["adapter"][name]
        torch.testing.assert_close(got[~tiny], weight[~tiny], rtol=1e-5, atol=1e-7)
        assert torch.all((got[tiny] - weight[tiny]).abs() <= 1e-2 * lr), name
    assert two["eval"] == pytest.approx(one["eval"], rel=1e-5, abs=1e-6)


def test_fsdp_holds_half_the_model_but_lm_head_on_each_of_two_ranks(one_step_each, tiny_model_dir):
    runs, _ = one_step_each
    assert runs["ddp"]["held_bytes"] == runs["ddp"]["model_bytes"]  # data parallel: a whole copy on every rank
    config = json.loads((tiny_model_dir / "config.json").read_text())
    head = config["vocab_size"] * config["hidden_size"] * 4  # fp32 on the CPU, whole on every rank
    model = runs["fsdp"]["model_bytes"]
    assert runs["fsdp"]["held_bytes"] == (model - head) // 2 + head  # 4-bit weights, embeddings, norms, LoRA: split


def test_fsdp_ranks_load_the_whole_model_one_at_a_time(one_step_each):
    """Each rank loads the whole model into CPU memory before sharding it: in turn, so one whole copy exists at a
    time, not one per rank."""
    runs, _ = one_step_each
    loads = sorted(runs["fsdp"]["loads"])
    assert len(loads) == 2 and all(len(span) == 2 and span[0] < span[1] for span in loads), loads
    assert loads[0][1] <= loads[1][0], loads  # rank after rank: the first had sharded before the second began


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_rank_takes_its_own_share_of_every_step(one_step_each, strategy):
    runs, _ = one_step_each
    rank0, rank1 = runs[strategy]["shares"]
    assert rank0 and rank1 and not set(rank0) & set(rank1)  # no pair on two ranks
    assert len(rank0) == len(rank1)  # a micro-batch each per step
    assert sorted(rank0 + rank1) == sorted(runs["one"]["shares"][0])  # together: the one process's pairs


def test_reference_tables_are_gathered_and_cached_as_in_one_process(one_step_each):
    runs, tmp = one_step_each
    for table in ("train_ref", "eval_ref"):
        torch.testing.assert_close(runs["ddp"][table], runs["one"][table], equal_nan=True, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(runs["fsdp"][table], runs["one"][table], equal_nan=True, rtol=1e-6, atol=1e-6)
    assert not torch.isnan(runs["ddp"]["eval_ref"]).any()  # every held-out pair scored, by one rank or the other
    names = ("one", "ddp", "fsdp")
    entries = {name: sorted((tmp / f"cache-{name}" / "reference").glob("*.safetensors")) for name in names}
    assert len(entries["one"]) == 2  # the training pairs' table and the held-out pairs'
    for name in ("ddp", "fsdp"):
        assert [p.name for p in entries[name]] == [p.name for p in entries["one"]]
        for got, want in zip(entries[name], entries["one"]):
            torch.testing.assert_close(load_file(got)["logps"], load_file(want)["logps"], equal_nan=True)


SETTINGS = [
    "--no-progress",
    "max_steps=3",
    "micro_batch_size=2",
    "save_steps=1",
    "eval_fraction=0.25",
    "eval_steps=3",
    "learning_rate=1e-2",
    "warmup_ratio=0",
    "eval_generate=0",
    "strategy=fsdp",  # the sharded path: checkpoints gather the adapter and the optimizer from the shards
]


def qdpo_run(cache: Path, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    extra = {"QDPO_CRASH_AT": crash_at} if crash_at else {}
    return subprocess.run(
        [sys.executable, "-m", "qdpo", "run", *args],
        env=env_with(cache, **extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def rows_without_timing(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_file, tmp_path_factory):
    """One process with accumulation 2 (uninterrupted), and `qdpo run --nproc 2` with accumulation 1 whose rank 1
    is killed with SIGKILL after its second step, then resumed on 2 processes; a copy of the killed run."""
    tmp = tmp_path_factory.mktemp("nproc")

    def start(out: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
        base = ["--output", str(out), "--model", str(tiny_model_dir), "--data", str(data_file), *SETTINGS]
        return qdpo_run(tmp / "cache", *base, *extra, crash_at=crash_at)

    done = {"one": start(tmp / "one", "gradient_accumulation_steps=2")}
    done["killed"] = start(tmp / "two", "--nproc", "2", "gradient_accumulation_steps=1", crash_at="step:2@1")
    shutil.copytree(tmp / "two", tmp / "killed")
    done["resumed"] = qdpo_run(tmp / "cache", "--nproc", "2", "--no-progress", "--resume", str(tmp / "two"))
    for name in ("one", "resumed"):
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    return tmp, done


def test_a_dead_rank_stops_the_job_in_one_line(runs):
    tmp, done = runs
    killed = done["killed"]
    assert killed.returncode != 0
    errors = [line for line in killed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 was killed by SIGKILL" in errors[0], killed.stderr[-3000:]
    assert f"qdpo run --nproc 2 --resume {tmp / 'two'}" in errors[0]
    assert "Traceback" not in killed.stderr and "ChildFailedError" not in killed.stderr
    assert json.loads((tmp / "killed" / "run.json").read_text())["status"] == "failed"
    assert "global batch: 2 processes x 1 micro-batch of 2" in killed.stdout
    assert killed.stdout.count("reference log-probs:") == 1  # one rank speaks


def test_the_resumed_two_process_run_is_the_one_process_run(runs):
    tmp, _ = runs
    out = tmp / "two"
    got_rows, want_rows = rows_without_timing(out), rows_without_timing(tmp / "one")
    assert len(got_rows) == len(want_rows)
    for got, want in zip(got_rows, want_rows):
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert [row["step"] for row in rows_without_timing(out)] == [0, 1, 2, 3]  # rank 0 logs each line once
    got, want = adapter(out), adapter(tmp / "one")  # a plain PEFT file, gathered from the shards
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert json.loads((out / "checkpoints" / "step-000003" / "checkpoint.json").read_text())["world_size"] == 2
    assert (out / "report.html").is_file()


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    tmp, _ = runs
    one = qdpo_run(tmp / "cache", "--no-progress", "--resume", str(tmp / "killed"), "gradient_accumulation_steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming on 1 process a run saved on 2 processes: the global batch stays 4 pairs per step" in one.stdout
    # The sharded optimizer state, saved by name, loads into the whole one: the run is the one-process run.
    got, want = adapter(tmp / "killed"), adapter(tmp / "one")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_launcher_refusals_are_one_line(monkeypatch):
    from click.testing import CliRunner

    from qdpo.cli import main

    for count, dry in (("0", []), ("-1", []), ("0", ["--dry-run"])):  # refused before any preset check, dry or not
        result = CliRunner().invoke(main, ["run", "--nproc", count, *dry])
        assert result.exit_code == 2 and result.output.strip().splitlines() == [
            f"error: --nproc must be 1 or more (1, or left out, for one process), not {count}."
        ]
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each rank
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(main, ["run", "--nproc", "2"])
    assert result.exit_code == 2 and result.output == ""  # every rank fails alike: rank 0 says it for all
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(main, ["run", "--nproc", "2"])
    assert result.exit_code == 2 and result.output.startswith("error: rank 0: --nproc starts torchrun itself")
    for setting, words in (("optim=paged_adamw_8bit", "set optim=adamw"), ("init_adapter=x", "init_adapter yet")):
        monkeypatch.setenv("RANK", "0")
        result = CliRunner().invoke(main, ["run", "strategy=fsdp", setting, "--dry-run"])
        assert result.exit_code == 2 and words in result.output and result.output.startswith("error: rank 0: ")


def test_each_rank_gets_the_command_without_nproc():
    from qdpo.launch import worker_args

    assert worker_args(["--nproc", "2", "--preset", "x", "--nproc=4", "beta=0.2"]) == ["--preset", "x", "beta=0.2"]


def test_planned_shard_is_what_each_rank_holds(one_step_each, tiny_model_dir):
    from qdpo.config import build_config
    from qdpo.plan import FROZEN, FSDP_HEAD, LORA, WEIGHTS_4BIT, plan_memory

    runs, _ = one_step_each
    model_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    settings = {"model": str(tiny_model_dir), "micro_batch_size": 2, "strategy": "fsdp"}
    planned = plan_memory(model_cfg, build_config(None, settings), device="cpu", processes=2)
    held = planned.bytes_of(WEIGHTS_4BIT, FROZEN, LORA, FSDP_HEAD)  # parameters; the quantization state is not one
    assert held == pytest.approx(runs["fsdp"]["held_bytes"], rel=0.02)
    whole = plan_memory(model_cfg, build_config(None, {**settings, "strategy": "ddp"}), device="cpu")
    assert whole.bytes_of(WEIGHTS_4BIT, FROZEN, LORA) == pytest.approx(runs["ddp"]["held_bytes"], rel=0.02)


def test_data_parallel_plan_adds_the_gradient_buckets_and_offload_moves_shards_off_the_gpu():
    from qdpo.config import build_config
    from qdpo.plan import DDP_BUCKETS, LORA_GRADS, plan_memory
    from qdpo.shapes import model_config

    shape, _ = model_config("meta-llama/Meta-Llama-3-8B-Instruct")
    cfg = build_config(None, {"model": "x", "max_length": 1024})
    one, two = plan_memory(shape, cfg), plan_memory(shape, cfg, processes=2)
    assert two.bytes_of(DDP_BUCKETS) == one.bytes_of(LORA_GRADS) > 0
    # The overhead line adds 18% slack on the tensors, so the total grows by the buckets and their slack.
    assert two.total - one.total == pytest.approx(1.18 * one.bytes_of(LORA_GRADS), rel=0.01)
    sharded = plan_memory(
        shape, build_config(None, {"model": "x", "max_length": 1024, "strategy": "fsdp"}), processes=2
    )
    offloaded = plan_memory(
        shape,
        build_config(None, {"model": "x", "max_length": 1024, "strategy": "fsdp", "offload_params": True}),
        processes=2,
    )
    assert offloaded.total < sharded.total < one.total


def test_the_70b_preset_plans_two_24gb_gpus_and_refuses_one_process():
    from click.testing import CliRunner

    from qdpo.cli import main

    shown = CliRunner().invoke(main, ["plan", "--preset", "70b-2x24gb"])
    assert shown.exit_code == 0, shown.output
    assert "one rank of 2 processes, sharded (fsdp)" in shown.output
    total = next(line for line in shown.output.splitlines() if line.startswith("total per GPU"))
    assert "fits" in total and "NOT" not in total
    alone = CliRunner().invoke(main, ["plan", "--preset", "70b-2x24gb", "--nproc", "1", "offload_params=false"])
    assert "does NOT fit" in alone.output  # 34 GB of 4-bit weights alone: more than one 24 GB card
    refused = CliRunner().invoke(main, ["run", "--preset", "70b-2x24gb"])
    assert refused.exit_code == 2 and "run it with qdpo run --nproc 2" in refused.output
