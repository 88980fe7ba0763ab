"""Several GPUs: the checks the CPU suite cannot make (NCCL, CUDA kernels, real per-GPU memory). Needs >= 2 GPUs.

1. Equivalence on CUDA: tests/ddp_worker.py (one optimizer step pair of qdpo's own training code on a tiny
   random Llama) on 2 GPUs with ddp, fsdp and fsdp + offload_params, against 1 GPU with twice the accumulation:
   loss, LoRA gradients, updated adapter. The suite checks the same on 2 CPU processes (gloo).
2. Per-GPU memory and throughput: `qdpo run --nproc 2` on a random-weight Llama-3-8B-shaped checkpoint
   (benchmarks/compare_trl.py writes it once, 16 GB of disk) at 2048-token pairs, ddp and fsdp, against
   `qdpo plan --nproc 2` for the same settings; and the 1-GPU run for tokens/s scaling.

    python benchmarks/multi_gpu.py --out runs/multi-gpu.json     # on a machine with 2+ GPUs, ~15 min

Not yet run: no session so far has had two GPUs (the lent machine has one H200).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "QDPO_CACHE": tempfile.mkdtemp()}


def equivalence(tmp: Path) -> dict:
    """tests/ddp_worker.py on 2 GPUs (each strategy) and on 1 GPU; the largest differences."""
    import torch
    from conftest import make_model, make_tokenizer

    model, data = tmp / "tiny", tmp / "pairs.jsonl"
    model.mkdir(exist_ok=True)
    make_tokenizer(model)
    make_model(model)
    rows = [
        {
            "prompt": f"What is {i} plus two?",
            "chosen": f" {i + 2}.",
            "rejected": " I am not sure" + " at all" * (i % 3),
        }
        for i in range(16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    worker = str(REPO / "tests" / "ddp_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker]
    runs = {}
    for name, command, accumulation, extra in (
        ("one", [sys.executable, worker], "2", ["ddp"]),
        ("ddp", torchrun, "1", ["ddp"]),
        ("fsdp", torchrun, "1", ["fsdp"]),
        ("fsdp-offload", torchrun, "1", ["fsdp", "offload"]),
    ):
        out = tmp / f"{name}.pt"
        done = subprocess.run([*command, str(model), str(data), str(out), accumulation, *extra], env=env())
        runs[name] = torch.load(out, weights_only=False) if done.returncode == 0 else None
    one, report = runs["one"], {}
    for name, run in runs.items():
        if name == "one" or run is None or one is None:
            report[name] = "failed" if run is None else "no 1-GPU run to compare with"
            continue
        report[name] = {
            "loss": [r["loss"] for r in run["rows"]],
            "loss_1gpu": [r["loss"] for r in one["rows"]],
            "max_grad_diff": max(float((run["grads"][k] - g).abs().max()) for k, g in one["grads"].items()),
            "max_adapter_diff": max(float((run["adapter"][k] - a).abs().max()) for k, a in one["adapter"].items()),
            "held_bytes_rank0": run["held_bytes"],
            "model_bytes": run["model_bytes"],
        }
    return report


def memory(tmp: Path, steps: int) -> dict:
    """qdpo run on 1 and 2 GPUs (ddp, fsdp) on a random Llama-3-8B shape: per-GPU peak, tokens/s, and the plan."""
    from compare_trl import make_rows, prepare_model

    from qdpo.config import build_config, parse_override
    from qdpo.plan import plan_memory, run_view

    described = prepare_model("llama3-8b", "words", 0)
    data = tmp / "random.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows("random", 64, 2048, described["vocab_size"], 0)))
    settings = [f"max_steps={steps}", "max_length=2048", "max_prompt_length=1024", "micro_batch_size=1"]
    settings += ["eval_fraction=0", "save_steps=0", "logging_steps=1", "eval_generate=0"]
    base = ["--no-progress", "--model", described["model_dir"], "--data", str(data)]
    results = {}
    for name, nproc, extra in (
        ("1gpu", 1, ["gradient_accumulation_steps=2"]),
        ("ddp", 2, ["strategy=ddp"]),
        ("fsdp", 2, ["strategy=fsdp"]),
        ("fsdp-offload", 2, ["strategy=fsdp", "offload_params=true"]),
    ):
        out = tmp / f"run-{name}"
        launch = ["--nproc", str(nproc)] if nproc > 1 else []
        command = [sys.executable, "-m", "qdpo", "run", *launch, *base, "--output", str(out), *settings, *extra]
        done = subprocess.run(command, env=env(), cwd=REPO)
        if done.returncode != 0:
            results[name] = "failed"
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in rows if r.get("step", 0) > 1 and "tokens_per_second" in r]
        config = build_config(None, {"model": described["model_dir"], **dict(map(parse_override, settings + extra))})
        model_cfg, view = run_view(config)
        results[name] = {
            "peak_memory_gb_max_over_ranks": max(r["peak_memory_gb"] for r in rows if "peak_memory_gb" in r),
            "planned_gb_per_gpu": plan_memory(model_cfg, view, processes=nproc).total / 1e9,
            "tokens_per_second": sum(r["tokens_per_second"] for r in steady) / max(1, len(steady)),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/multi-gpu.json")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-memory", action="store_true", help="only the equivalence check (minutes)")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"needs 2 GPUs; this machine has {gpus}")
    tmp = Path(tempfile.mkdtemp(prefix="qdpo-multi-gpu-"))
    report = {"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "equivalence": equivalence(tmp)}
    if not args.skip_memory:
        report["memory"] = memory(tmp, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
