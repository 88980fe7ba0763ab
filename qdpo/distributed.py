"""Several processes, one run: the torch.distributed process group that torchrun starts, and what ranks share.

qdpo never starts processes or moves tensors between them by itself: torchrun (or `accelerate launch`, or
`qdpo run --nproc N`, which calls torchrun) starts one process per GPU and sets RANK/WORLD_SIZE/LOCAL_RANK;
this module joins the process group they describe and wraps the handful of collectives a run needs.
With one process every helper is the identity, so the single-GPU path runs the same code.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: its rank, how many ranks there are, and its GPU on this node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes the run directory."""
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's items: every size-th one from its rank on (with one process: all of them)."""
        return items[self.rank :: self.size]

    def share_evenly(self, items: list[T]) -> list[tuple[T, bool]]:
        """This rank's items, each with whether it counts, padded so every rank gets as many.

        Under FSDP every forward is a collective: a rank with one micro-batch fewer than the others would leave
        them waiting. It scores a repeat of the first item instead, and drops the result (counts: False).
        """
        mine = [(item, True) for item in self.share(items)]
        rounds = -(-len(items) // self.size)  # ceil
        return mine + [(items[0], False)] * (rounds - len(mine)) if items else []

    def agree(self, value: Any) -> Any:
        """Rank 0's value, on every rank (a decision only one process may take, such as the run's directory)."""
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank (small Python objects: metric sums, flags)."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, value)
        return out

    def merge_table(self, table: torch.Tensor) -> torch.Tensor:
        """Merge per-rank [N, 2] reference tables (NaN where a rank scored nothing) into the full one."""
        if self.size == 1:
            return table
        # NCCL reduces GPU tensors only; gloo, CPU tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else torch.device("cpu")
        scored = ~torch.isnan(table)
        values = torch.where(scored, table, torch.zeros_like(table)).to(device)
        counts = scored.to(torch.int32).to(device)
        torch.distributed.all_reduce(values)  # each pair is scored by one rank: a sum with zeros, exact
        torch.distributed.all_reduce(counts)
        return torch.where(counts > 0, values, torch.full_like(values, float("nan"))).cpu()

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            torch.distributed.barrier()


SINGLE = World()


def _backend() -> str:
    return "nccl" if "nccl" in str(torch.distributed.get_backend()) else "gloo"


def compute_device(model) -> torch.device:
    """Where the model computes: its parameters' device, or its GPU when FSDP keeps the shards in CPU memory."""
    p = next(model.parameters())
    mesh = getattr(p, "device_mesh", None)
    if p.device.type == "cpu" and mesh is not None and mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return p.device


def launched_size() -> int:
    """How many processes torchrun started for this job (1 when it was started as a plain command)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device_type: str) -> World:
    """Join the process group torchrun described (NCCL on GPUs, gloo on the CPU); SINGLE for a plain process."""
    if launched_size() <= 1:
        return SINGLE
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not torch.distributed.is_initialized():
        # NCCL for GPU tensors; gloo for CPU ones (FSDP's shards and gradients in CPU memory with offload_params).
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        # A long timeout: rank 0 alone may convert a GGUF model or score a cached reference while the others wait.
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return world


_left_gloo = False  # this process ran in a gloo group of several ranks and left it


def leave(finished: bool = True) -> None:
    """Tear the process group down (nothing to do for a plain process).

    finished: every rank gets here, so wait for all of them first; after a failure the others may be gone.
    """
    global _left_gloo
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        _left_gloo = torch.distributed.get_world_size() > 1 and _backend() == "gloo"
        torch.distributed.destroy_process_group()


def end_gloo_process() -> None:
    """After a finished job of several CPU (gloo) processes, exit now, skipping interpreter finalization.

    Under load a rank was seen to abort there after its run had finished and left the group (SIGABRT, "terminate
    called without an active exception"), failing the job: gloo's worker threads can still hold work whose
    tensors are freed while the interpreter is torn down (pytorch/pytorch#179291). Everything qdpo writes is
    already on disk (atomic, fsynced); only the streams need flushing.
    """
    if _left_gloo:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def current_rank() -> int:
    """This process's rank as torchrun set it (0 for a plain process), readable before the group is joined."""
    return int(os.environ.get("RANK", "0")) if launched_size() > 1 else 0


def data_parallel(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module under torch's DistributedDataParallel: its trainable parameters' gradients averaged over ranks.

    With one process, the module itself.
    """
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Every rank loaded the same frozen 4-bit weights: DDP would broadcast them all from rank 0 when it wraps (GBs
    # for nothing) and watch them for gradients they never get. It handles the LoRA parameters alone.
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=has_experts(getattr(getattr(module, "model", None), "config", None)),
    )


def has_experts(config: Any) -> bool:
    """Whether the model is a mixture of experts: the LoRA weights of an expert no token was routed to get no
    gradient in that step, on that rank."""
    return any(getattr(config, name, 0) for name in ("num_experts", "num_local_experts", "n_routed_experts"))


def lost_peer(error: BaseException) -> bool:
    """Whether an error means another rank left the job (its own failure, reported by it or by the launcher)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)


def device_mesh(world: World, device: torch.device):
    """The one-dimensional mesh of all ranks that FSDP shards over (every rank must call this together)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


def shard_model(model, mesh, device: torch.device, offload: bool = False) -> list[torch.nn.Module]:
    """Shard the 4-bit base and its LoRA weights across ranks with torch's FSDP2; returns the sharded roots.

    Units: every decoder layer, the embeddings, and the decoder (the final norm): what qdpo's step calls itself
    (it runs the decoder and the output head separately, never only the model's own forward). FSDP keeps a
    root unit's weights gathered from forward to backward, so the embeddings get a unit of their own inside the
    decoder: gathered for the lookup only. lm_head stays whole on every rank (frozen, no LoRA allowed on it):
    the step applies it once per chunk of response positions, a number that differs between ranks, and every
    call of a sharded unit is a collective all ranks must make. offload keeps the shards in CPU memory (FSDP's
    CPUOffloadPolicy): a GPU then holds the layers being computed, not its shard of the model.
    The 4-bit weights are sharded in their packed uint8 storage: FSDP2 shards parameter by parameter, so they
    need not share the float dtype of the others (FSDP1's constraint, and why bitsandbytes offers a float
    bnb_4bit_quant_storage); a float storage would be cast by value by a mixed-precision policy, destroying
    the packed bits. bitsandbytes reattaches the quantization state to the gathered weight in each forward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    from qdpo.errors import UserError

    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    base = model.get_base_model()
    decoder = base.get_decoder()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if any(p.requires_grad for p in head.parameters()):
        raise UserError("strategy=fsdp keeps lm_head whole and frozen: take lm_head out of lora_target_modules.")
    tied = head.weight is embeddings.weight
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    if not tied:  # tied embeddings stay in the decoder's unit (and whole in lm_head, a module outside it)
        fully_shard(embeddings, mesh=mesh, offload_policy=policy)
    roots = [fully_shard(decoder, mesh=mesh, offload_policy=policy)]
    if has_experts(base.config):  # experts without a gradient on a rank: reduce-scatter them as zeros
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_reduce_scatter_unused_params(True)
    if device.type != "cpu":
        # FSDP moved the shards and buffers to the GPU; bitsandbytes' quantization state is neither, so it follows
        # by hand (the gathered 4-bit weight computes on the GPU with it). Whole on every rank: ~1/64 of the weights.
        for module in model.modules():
            state = getattr(module, "quant_state", None)
            if state is not None and hasattr(state, "to"):
                state.to(device)
        head.to(device)  # whole on every rank (loaded into CPU memory first)
    return roots


@contextlib.contextmanager
def unsynced(roots: list[torch.nn.Module]) -> Iterator[None]:
    """Within this block FSDP keeps gradients local (accumulation); the next backward outside reduces them all."""
    for root in roots:
        root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for root in roots:
            root.set_requires_gradient_sync(True)


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its shard under FSDP, else the whole tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


def sharded(model) -> bool:
    """Whether the model's parameters are FSDP shards (DTensors) rather than whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_adapter_state(model) -> dict[str, torch.Tensor] | None:
    """The trainable adapter's whole tensors (on CPU) gathered from every rank's shards; None when not sharded.

    A collective: every rank must call it. Only the LoRA weights are gathered, never the 4-bit base.
    """
    if not sharded(model):
        return None
    return {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(model, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as one process would hold it (keyed by parameter name when sharded); a collective."""
    if not sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what full_optimizer_state returned, into whole or sharded parameters (every rank calls it).

    A state saved one way loads the other way too (a sharded run resumed on one process, or the reverse): the
    optimizer's parameters are the model's trainable ones, in the same order, so an index and a name are one.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = any(isinstance(k, str) for group in state["param_groups"] for k in group["params"])
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:
            state = _renamed(state, lambda i: order[i])
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    if by_name:
        index = {n: i for i, n in enumerate(order)}
        state = _renamed(state, lambda n: index[n])
    optimizer.load_state_dict(state)


def _renamed(state: dict[str, Any], key) -> dict[str, Any]:
    """An optimizer state dict with every parameter key mapped through key (index <-> name)."""
    return {
        "state": {key(k): v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in state["param_groups"]],
    }


def load_adapter_state(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy whole adapter tensors (keyed by parameter name) into the model's parameters, shards or not."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            if isinstance(p, DTensor):
                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)


def reshard(model) -> None:
    """Free the gathered whole weights FSDP keeps after a pass without backward (its root keeps them by design).

    FSDP2 leaves the root's parameters (the decoder's own: the final norm, and tied embeddings) unsharded after a
    forward, expecting a backward to use and free them; reference, eval and generation passes have none.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
