"""Tiled MLP: the same loss and gradients as the untiled MLP, and its [tokens, intermediate] tensors one tile at a time."""

import pytest
import torch

from qdpo.batching import make_batch
from qdpo.config import Config
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.step import preference_loss
from qdpo.tiled_mlp import TiledMLP, tile_mlps
from qdpo.tokenize import TokenizedPair


def lora_model(path, checkpointing: bool, dropout: float = 0.0):
    base = load_base_4bit(ModelSource("m", str(path)), torch.float32, torch.device("cpu"), checkpointing)
    model = add_lora(base, 4, 8, dropout, ["all-linear"], None, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B away from 0, so every LoRA parameter has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.train()


def pairs(n: int = 3) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(k: int) -> list[int]:
        return torch.randint(3, 300, (k,), generator=g).tolist()

    return [TokenizedPair(ids(5 + i), ids(9 + 2 * i), ids(12 - i)) for i in range(n)]


def loss_and_grads(model, layout: str):
    model.zero_grad()
    batch = make_batch(pairs(), 0, layout)
    losses, *_ = preference_loss(model, batch, Config(model="x", data="y"), torch.zeros(2 * batch.num_pairs))
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(tiny_model_dir, checkpointing, layout, monkeypatch):
    """Tiles of 4 positions (sequences of ~20-40): every LoRA gradient, the MLP's and the attention's, agrees."""
    model = lora_model(tiny_model_dir, checkpointing)
    want_loss, want = loss_and_grads(model, layout)
    assert tile_mlps(model, 4) == model.config.num_hidden_layers
    calls = []
    apply = TiledMLP.apply
    monkeypatch.setattr(TiledMLP, "apply", lambda *a: calls.append(a[2]) or apply(*a))
    got_loss, got = loss_and_grads(model, layout)
    assert calls and set(calls) == {4}  # the tiled path really ran
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want) and any("mlp" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(want[n].abs().sum() > 0 for n in want if "mlp" in n)  # the MLP's gradients are really compared


def test_tiled_backward_replays_the_forwards_dropout(tiny_model_dir):
    """With LoRA dropout, the recomputed tiles must draw the forward's random numbers: the Function's gradients
    equal autograd's through the same tiles computed plainly from the same seed."""
    model = lora_model(tiny_model_dir, checkpointing=False, dropout=0.3)
    mlp = model.get_base_model().model.layers[0].mlp
    params = [p for p in mlp.parameters() if p.requires_grad]
    x = torch.randn(2, 10, model.config.hidden_size, requires_grad=True)
    w = torch.randn(2, 10, model.config.hidden_size)

    def grads(compute):
        for p in params:
            p.grad = None
        x.grad = None
        torch.manual_seed(7)
        (compute() * w).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in params]

    plain = grads(lambda: torch.cat([mlp(x[:, i : i + 3].contiguous()) for i in range(0, 10, 3)], dim=1))
    tiled = grads(lambda: TiledMLP.apply(x, mlp.forward, 3, *params))
    for a, b in zip(plain, tiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)
    again = torch.cat([mlp(x[:, i : i + 3]) for i in range(0, 10, 3)], dim=1)
    torch.manual_seed(8)
    other = torch.cat([mlp(x[:, i : i + 3]) for i in range(0, 10, 3)], dim=1)
    assert not torch.allclose(again, other)  # dropout is really on, so the replay is what made them agree


def test_tiled_mlp_keeps_one_tiles_intermediate(tiny_model_dir):
    """The tensors the MLP saves for backward: untiled, gate/up/act of every position; tiled, only its input."""
    model = lora_model(tiny_model_dir, checkpointing=False)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 256, model.config.hidden_size, requires_grad=True)

    def saved_bytes() -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x)
        return sum(sizes)

    untiled = saved_bytes()
    tile_mlps(model, 32)
    tiled = saved_bytes()
    # The input alone: 256 x hidden fp32. Untiled keeps at least 3 x 256 x intermediate more.
    assert tiled == 256 * model.config.hidden_size * 4
    assert untiled >= 3 * 256 * model.config.intermediate_size * 4


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_tiled_mlp_on_mixture_of_experts_blocks(tmp_path, model_type):
    """MoE blocks flatten their input with .view: a tile of a multi-row micro-batch (the plain layout's two rows per
    pair) must reach them contiguous, and routing each token alone gives the untiled loss and gradients."""
    from test_families import make_family_model

    make_family_model(tmp_path, model_type)
    model = lora_model(tmp_path, True)
    want_loss, want = loss_and_grads(model, "plain")
    assert tile_mlps(model, 4) == model.config.num_hidden_layers
    got_loss, got = loss_and_grads(model, "plain")
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
