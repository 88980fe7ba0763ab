"""Each memory/speed switch leaves the loss and gradients of the plain path unchanged."""

from collections import Counter

import pytest
import torch

from qdpo.batching import collate, length_grouped_batches, make_batch
from qdpo.config import Config
from qdpo.data import Columns, to_pairs
from qdpo.model import ModelSource, add_lora, load_base_4bit
from qdpo.reference import compute_reference
from qdpo.step import preference_loss
from qdpo.tokenize import tokenize_pairs
from qdpo.train import table_rows

VOCAB = 320


def policy(model_dir, targets, seed=5):
    base = load_base_4bit(ModelSource("m", str(model_dir)), torch.float32, torch.device("cpu"), True)
    model = add_lora(base, 4, 8, 0.0, targets, None, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a policy away from the reference, so the gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.train()
    return model


def loss_and_grads(model, batch, config, reference=None):
    model.zero_grad()
    losses, cr, rr, scores = preference_loss(model, batch, config, reference)
    losses.sum().backward()
    return (
        losses.detach(),
        scores.logits_sum,
        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
    )


@pytest.fixture
def batch(tokenizer, chat_rows):
    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows[:4], Columns(), "t"), 128, 64)
    return pairs, collate(pairs, tokenizer.pad_token_id)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj", "lm_head"]], ids=["blocks", "with-lm_head"])
def test_chunked_logps_equal_full_logits(tiny_model_dir, batch, targets):
    model = policy(tiny_model_dir, targets)
    _, b = batch
    plain = loss_and_grads(model, b, Config(model="x", data="y", logits_chunk_size=0))
    for chunk in (3, 1024):
        chunked = loss_and_grads(model, b, Config(model="x", data="y", logits_chunk_size=chunk))
        torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked[1], plain[1], rtol=1e-4, atol=1e-3)
        assert chunked[2].keys() == plain[2].keys()
        if "lm_head" in targets[-1]:
            assert any("lm_head" in n for n in plain[2])
        for n in plain[2]:
            torch.testing.assert_close(chunked[2][n], plain[2][n], rtol=1e-4, atol=1e-5)


def test_chunked_path_never_saves_a_full_logits_tensor(tiny_model_dir, batch):
    model = policy(tiny_model_dir, ["all-linear"])
    _, b = batch
    sizes = {}
    for chunk in (0, 4):
        biggest = []

        def pack(t):
            if t.dim() >= 1 and t.shape[-1] == VOCAB and t.dtype.is_floating_point:
                biggest.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses, *_ = preference_loss(model, b, Config(model="x", data="y", logits_chunk_size=chunk))
        sizes[chunk] = max(biggest, default=0)
        losses.sum().backward()
    response_positions = int(b.response_mask[:, 1:].sum())
    assert sizes[0] >= response_positions * VOCAB  # the plain path keeps [2B, T', V] for backward
    assert sizes[4] == 0  # chunks are recomputed in backward: nothing vocab-wide is saved


@pytest.mark.parametrize("pack", [False, True], ids=["shared-prompt", "packed"])
def test_all_switches_together_equal_the_plain_path(tiny_model_dir, tokenizer, chat_rows, pack):
    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows, Columns(), "t"), 128, 64)
    batches = length_grouped_batches(pairs, 3, seed=0)
    model = policy(tiny_model_dir, ["all-linear"])
    lean = Config(
        model="x", data="y", logits_chunk_size=5, offload_activations=True, share_prompt=True, pack_pairs=pack
    )
    plain = Config(model="x", data="y", logits_chunk_size=0, share_prompt=False)
    with torch.no_grad():  # the reference table is built with the adapters off, as in training
        table = compute_reference(
            model, pairs, batches, tokenizer.pad_token_id, lean.logits_chunk_size, lean.batch_layout
        )
    for idx in batches:
        a = loss_and_grads(model, collate([pairs[i] for i in idx], tokenizer.pad_token_id), plain)
        c = loss_and_grads(
            model,
            make_batch([pairs[i] for i in idx], tokenizer.pad_token_id, lean.batch_layout),
            lean,
            table_rows(table, idx),
        )
        torch.testing.assert_close(c[0], a[0], rtol=1e-5, atol=1e-6)
        for n in a[2]:
            torch.testing.assert_close(c[2][n], a[2][n], rtol=1e-4, atol=1e-5)


def test_offloaded_activations_give_the_same_gradients(tiny_model_dir, batch, monkeypatch):
    """offload_activations sends what the policy forward saves through save_on_cpu's hooks, and backward
    from the copies gives the same loss and gradients.

    On the CPU the real save_on_cpu keeps a CPU tensor as it is, so it stands in for the GPU path here: a
    recorder with save_on_cpu's interface that copies every saved tensor into fresh storage (as the pinned
    path does) and hands the copy to backward. The tensors the plain run saves are recorded with plain
    hooks to know what has to go through it.
    """
    model = policy(tiny_model_dir, ["all-linear"])
    _, b = batch
    hidden = model.get_base_model().config.hidden_size
    boundary = (*b.input_ids.shape, hidden)  # [2B, T, hidden]: a decoder layer's input, kept by checkpointing

    saved_plain = []

    def record(t):
        saved_plain.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        kept = loss_and_grads(model, b, Config(model="x", data="y"))

    made, packed, unpacked = [], [], []

    class CopyingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            made.append(pin_memory)

            def pack(t):
                copy = torch.empty(t.size(), dtype=t.dtype, layout=t.layout)
                copy.copy_(t)
                assert copy.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                packed.append(tuple(t.shape))
                return t.device, copy

            def unpack(saved):
                unpacked.append(tuple(saved[1].shape))
                return saved[1].to(saved[0])

            super().__init__(pack, unpack)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CopyingSaveOnCpu)
    offloaded = loss_and_grads(model, b, Config(model="x", data="y", offload_activations=True))

    assert made == [torch.cuda.is_available()]  # entered once per step; pinned only where there is a GPU
    # Every layer's input went through the offload hooks and came back for backward ...
    assert packed.count(boundary) >= model.get_base_model().config.num_hidden_layers
    assert unpacked.count(boundary) == packed.count(boundary)
    # ... and so did everything else the policy forward saves: what the plain run saves beyond that is
    # only the loss's per-pair tensors, computed after the forward (the no-grad reference pass saves nothing).
    rest = Counter(saved_plain)
    rest.subtract(packed)
    assert min(rest.values()) >= 0 and {s for s, n in rest.items() if n} <= {(b.num_pairs,)}
    torch.testing.assert_close(offloaded[0], kept[0], rtol=0, atol=0)
    assert kept[2].keys() == offloaded[2].keys() and len(kept[2]) > 0
    for n in kept[2]:
        torch.testing.assert_close(offloaded[2][n], kept[2][n], rtol=0, atol=0)
        assert kept[2][n].abs().sum() > 0, n


@pytest.mark.parametrize("pack", [False, True], ids=["row-per-pair", "packed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_two_sequence_forward(tiny_model_dir, batch, attn, pack):
    """prompt+chosen+rejected in one row (rejected masked off the chosen part), one row per pair or all pairs
    in one unpadded row (masked off each other) = the plain two-sequence forward."""
    from qdpo.batching import collate_shared_prompt

    model = policy(tiny_model_dir, ["all-linear"])
    model.get_base_model().config._attn_implementation = attn
    pairs, plain_batch = batch
    packed = collate_shared_prompt(pairs, 0, packed=pack)
    assert packed.input_ids.shape[0] == (1 if pack else len(pairs)) and packed.num_tokens == plain_batch.num_tokens
    if pack:  # no padding: the row is exactly every pair's prompt + chosen + rejected
        assert packed.input_ids.shape[1] == sum(
            len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
        )
    for chunk in (0, 7):
        config = Config(model="x", data="y", logits_chunk_size=chunk)
        plain = loss_and_grads(model, plain_batch, config)
        shared = loss_and_grads(model, packed, config)
        torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared[1], plain[1], rtol=1e-4, atol=1e-3)
        for n in plain[2]:
            torch.testing.assert_close(shared[2][n], plain[2][n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pack", [False, True], ids=["row-per-pair", "packed"])
def test_shared_prompt_scores_match_direct_log_softmax(tiny_model_dir, tokenizer, batch, pack):
    """Independent check: each response's log-prob from a separate unbatched forward of prompt+response."""
    from qdpo.batching import collate_shared_prompt
    from qdpo.step import score_batch

    model = policy(tiny_model_dir, ["all-linear"])
    pairs, _ = batch
    with torch.no_grad():
        scores = score_batch(model, collate_shared_prompt(pairs, 0, packed=pack), 4).logps
        for side, offset in (("chosen_ids", 0), ("rejected_ids", len(pairs))):
            for i, p in enumerate(pairs):
                ids = torch.tensor([p.prompt_ids + getattr(p, side)])
                logits = model(input_ids=ids).logits[0].double()
                n = len(p.prompt_ids)
                expected = sum(torch.log_softmax(logits[t - 1], -1)[ids[0, t]].item() for t in range(n, ids.shape[1]))
                assert abs(scores[offset + i].item() - expected) < 1e-3


def test_packed_pairs_do_not_see_each_other(tiny_model_dir, batch):
    """The last pair of a packed row (which causal attention alone would let see every earlier pair) scores
    the same when the earlier pairs' tokens change: the mask isolates pairs."""
    from dataclasses import replace

    from qdpo.batching import collate_shared_prompt
    from qdpo.step import score_batch

    model = policy(tiny_model_dir, ["all-linear"])
    pairs, _ = batch
    n = len(pairs)
    earlier = [replace(p, prompt_ids=[(t * 7 + 3) % VOCAB for t in p.prompt_ids]) for p in pairs[:-1]]
    with torch.no_grad():
        first = score_batch(model, collate_shared_prompt(pairs, 0, packed=True), 4).logps
        changed = score_batch(model, collate_shared_prompt(earlier + pairs[-1:], 0, packed=True), 4).logps
    last = [n - 1, 2 * n - 1]  # its chosen and rejected rows
    torch.testing.assert_close(changed[last], first[last], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        changed[: n - 1], first[: n - 1]
    )  # the edit was real: the changed pairs score differently


def test_padding_share_counts_the_positions_of_each_layout(tokenizer, chat_rows):
    """padding_share against the padding counted in the tensors each layout actually builds."""
    from qdpo.batching import LAYOUTS, padding_share

    pairs, _ = tokenize_pairs(tokenizer, to_pairs(chat_rows, Columns(), "t"), 128, 64)
    batches = length_grouped_batches(pairs, 3, seed=0)
    for layout in LAYOUTS:
        built = [make_batch([pairs[i] for i in idx], tokenizer.pad_token_id, layout) for idx in batches]
        real = sum(int(b.attention_mask.sum()) if layout == "plain" else int((b.pair_ids >= 0).sum()) for b in built)
        total = sum(b.input_ids.numel() for b in built)
        assert padding_share(pairs, batches, layout) == pytest.approx(1 - real / total)
    assert padding_share(pairs, batches, "shared") > 0  # the fixture's pairs differ in length
