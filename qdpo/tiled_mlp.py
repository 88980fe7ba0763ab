"""Each decoder layer's MLP run over sequence tiles: its [tokens, intermediate] activations exist one tile at a time.

An MLP acts on every token alone, so cutting the tokens into tiles changes no number. Under autograd, plain tiling
would still keep every tile's activations for backward; TiledMLP keeps only the MLP's input and recomputes each
tile in backward (the tiled MLP of Arctic Long Sequence Training, Snowflake 2025). So the forward, the checkpointed
recomputation and the backward each hold one tile's gate/up/activation tensors, not the whole sequence's: at 32k
tokens on an 8B shape that is 2.6 GB of bf16 per recomputed layer down to a tile's share.
torch.utils.checkpoint and transformers have no such thing for the MLP alone, hence this module.
"""

from __future__ import annotations

import torch


def in_tiles(fn, x: torch.Tensor, tile: int) -> torch.Tensor:
    """fn applied to `tile` sequence positions of x at a time, the outputs put back in order."""
    # contiguous: a tile of a multi-row batch is strided, and MoE blocks (Mixtral, Qwen2-MoE) flatten it with .view
    return torch.cat([fn(x[..., i : i + tile, :].contiguous()) for i in range(0, x.shape[-2], tile)], dim=-2)


class TiledMLP(torch.autograd.Function):
    """y = mlp(x) computed `tile` sequence positions at a time, saving only x; backward recomputes tile by tile."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp, tile: int, *params: torch.nn.Parameter) -> torch.Tensor:
        ctx.mlp, ctx.tile, ctx.params = mlp, tile, params
        # The same random numbers in the recomputation (LoRA dropout), as torch.utils.checkpoint does.
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return in_tiles(mlp, x, tile)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.zeros_like(x) if want_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(ctx.params)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), torch.enable_grad():
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for i in range(0, x.shape[-2], ctx.tile):
                piece = x[..., i : i + ctx.tile, :].detach().contiguous().requires_grad_(want_x)
                wrt = ([piece] if want_x else []) + list(ctx.params)
                found = torch.autograd.grad(ctx.mlp(piece), wrt, grad_out[..., i : i + ctx.tile, :], allow_unused=True)
                if want_x:
                    grad_x[..., i : i + ctx.tile, :] = found[0]
                    found = found[1:]
                for k, g in enumerate(found):
                    if g is not None:
                        grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
        return (grad_x, None, None, *grad_params)


def tile_mlps(model, tile: int) -> int:
    """Make every decoder layer's `mlp` run in tiles of `tile` sequence positions; returns how many now do."""
    from qdpo.families import family_of

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if family_of(base.config) is None:  # an MLP qdpo has not seen may not return one tensor per position
        return 0
    tiled = 0
    for layer in base.get_decoder().layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or hasattr(mlp, "qdpo_plain_forward"):
            continue
        mlp.qdpo_plain_forward = mlp.forward

        def forward(x: torch.Tensor, _mlp=mlp) -> torch.Tensor:
            if x.shape[-2] <= tile:
                return _mlp.qdpo_plain_forward(x)
            if not torch.is_grad_enabled():  # the reference and eval passes: tiles, and nothing to save
                return in_tiles(_mlp.qdpo_plain_forward, x, tile)
            params = [p for p in _mlp.parameters() if p.requires_grad]
            return TiledMLP.apply(x, _mlp.qdpo_plain_forward, tile, *params)

        mlp.forward = forward
        tiled += 1
    return tiled
