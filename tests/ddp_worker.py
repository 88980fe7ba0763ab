"""One optimizer step of qdpo's own training code on however many ranks torchrun started (or one process).

tests/test_distributed.py runs it on 2 ranks (gloo) and as 1 process with twice the gradient accumulation,
and compares what it saves: usage `ddp_worker.py MODEL DATA OUT ACCUMULATION [STRATEGY]`.
"""

from __future__ import annotations

import sys
import time

import torch

import qdpo.train as train
from qdpo.config import build_config
from qdpo.distributed import end_gloo_process, join, leave, local
from qdpo.model import pick_device
from qdpo.prepare import prepare_data


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from the ranks' shards under FSDP (a collective)."""
    tensor = tensor.detach()
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).cpu().clone()


def main(model: str, data_path: str, out: str, accumulation: int) -> None:
    device = pick_device()  # the CPU in the suite; benchmarks/multi_gpu.py runs it on GPUs
    world = join(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    settings = {
        "model": model,
        "data": data_path,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": accumulation,
        "eval_fraction": 0.25,
        "learning_rate": 1e-2,
        "max_steps": 2,
        "strategy": sys.argv[5] if len(sys.argv) > 5 else "ddp",
        "offload_params": len(sys.argv) > 6 and sys.argv[6] == "offload",
        "warmup_ratio": 0.0,
        "logits_chunk_size": 4,  # lm_head applied a different number of times on each rank (responses differ)  # the first step already moves the adapter
    }
    config = build_config(None, settings)
    data = prepare_data(config, echo=lambda _: None)
    torch.manual_seed(config.seed)
    span: list[float] = []  # wall-clock start of loading the model and end of sharding it (fsdp)
    policy, shard = train._policy, train.shard_model

    def timed_policy(*args, **kwargs):
        span.append(time.time())
        return policy(*args, **kwargs)

    def timed_shard(*args, **kwargs):
        roots = shard(*args, **kwargs)
        span.append(time.time())
        return roots

    train._policy, train.shard_model = timed_policy, timed_shard
    t = train.setup_training(config, data, device, torch.float32, lambda _: None, world=world)
    loads = world.gather(span)
    names = {id(p): n for n, p in t.model.named_parameters()}

    seen: list[str] = []  # the pairs this rank put into its micro-batches
    make_batch = train.make_batch

    def recording(pairs, *args):
        seen.extend(p.origin for p in pairs)
        return make_batch(pairs, *args)

    train.make_batch = recording
    step_grads: list[dict[str, torch.Tensor]] = []
    step = t.optimizer.step

    def spying(*args, **kwargs):  # the gradients each update uses: after DDP's reduction and clipping
        step_grads.append({names[id(p)]: whole(p.grad) for p in t.params})
        return step(*args, **kwargs)

    t.optimizer.step = spying
    rows = [train.train_step(t, data, config, t.stream, device) for _ in range(2)]
    train.make_batch = make_batch
    pad = data.tokenizer.pad_token_id
    evaluated = train.evaluate(t.model, data.eval, t.eval_batches, t.eval_ref, config, pad, world)
    held = sum(local(p).numel() * p.element_size() for p in t.model.parameters())  # this rank's bytes
    shares = world.gather(seen)
    adapter = {names[id(p)]: whole(p) for p in t.params}
    if world.main:
        torch.save(
            {
                "rows": rows,
                "eval": evaluated,
                "grads": step_grads[-1],
                "step_grads": step_grads,
                "adapter": adapter,
                "train_ref": t.train_ref,
                "eval_ref": t.eval_ref,
                "shares": shares,
                "loads": loads,
                "steps": t.steps,
                "held_bytes": held,
                "model_bytes": sum(p.numel() * p.element_size() for p in t.model.parameters()),
            },
            out,
        )
    leave()
    end_gloo_process()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
