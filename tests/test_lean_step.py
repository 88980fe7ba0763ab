"""Each memory/speed switch leaves the loss and gradients of the plain path unchanged."""

import weakref
from collections import Counter

import pytest
import torch

import qdpo.offload
import qdpo.step
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


class HostCopies:
    """qdpo.offload's Copier with synchronous copies into fresh storage, which logs every move.

    On the CPU the real offload keeps tensors where they are (they are in host memory already), so this stands
    in for StreamCopier: the bookkeeping around it (what leaves, what comes back when) is the code under test.
    """

    def __init__(self):
        self.log, self.index, self.shapes = [], {}, []

    def movable(self, t):
        return True

    def to_host(self, t):
        # what StreamCopier copies in one memcpy: elements spanning exactly numel places of memory
        assert sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1 == t.numel(), (t.shape, t.stride())
        host = torch.empty(t.size(), dtype=t.dtype)
        host.copy_(t)
        assert host.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        self.index[id(host)] = len(self.shapes)
        weakref.finalize(host, self.log.append, ("host freed", len(self.shapes)))
        self.shapes.append(tuple(t.shape))
        return host, None

    def to_device(self, host, device):
        i = self.index[id(host)]
        self.log.append(("in", i))
        back = host.clone().to(device)
        weakref.finalize(back, self.log.append, ("free", i))
        return back, None

    def wait(self, done):
        pass

    def release(self, t, done):
        pass


def test_offloaded_activations_give_the_same_gradients_and_come_back_one_layer_ahead(
    tiny_model_dir, batch, monkeypatch
):
    """offload_activations sends what the policy forward saves to host memory; backward from the copies gives the
    same loss and gradients. Each boundary activation is on its way back before backward asks for it (fetched at
    the use of the layer above), none twice, and at most two wait on the GPU ahead of their use."""
    model = policy(tiny_model_dir, ["all-linear"])
    _, b = batch
    base = model.get_base_model().config
    boundary = (
        *b.input_ids.shape,
        base.hidden_size,
    )  # [2B, T, hidden]: a decoder layer's input, kept by checkpointing

    saved_plain = []

    seen = []

    def record(t):
        # weights stay where they are, and a tensor saved twice travels once
        if not isinstance(t, torch.nn.Parameter) and not any(s is t for s in seen):
            seen.append(t)
            saved_plain.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        kept = loss_and_grads(model, b, Config(model="x", data="y"))

    copier = HostCopies()

    made = []

    def hooks():
        made.append(qdpo.offload.OffloadedActivations(copier, min_bytes=0))
        unpack = made[-1].unpack_hook

        def logged(saved):
            if not isinstance(saved, torch.Tensor):
                copier.log.append(("ask", saved.index))
            return unpack(saved)

        made[-1].unpack_hook = logged
        return made[-1]

    monkeypatch.setattr(qdpo.step, "offload_hooks", hooks)
    offloaded = loss_and_grads(model, b, Config(model="x", data="y", offload_activations=True))

    assert len(made) == 1  # one context per micro-batch
    torch.testing.assert_close(offloaded[0], kept[0], rtol=0, atol=0)
    assert kept[2].keys() == offloaded[2].keys() and len(kept[2]) > 0
    for n in kept[2]:
        torch.testing.assert_close(offloaded[2][n], kept[2][n], rtol=0, atol=0)
        assert kept[2][n].abs().sum() > 0, n
    # Every layer's input went to host memory, and so did everything else the policy forward saves, each tensor
    # once: what the plain run saves beyond that is only the loss's per-pair tensors, computed after the forward.
    layers = [i for i, s in enumerate(copier.shapes) if s == boundary]
    assert len(layers) >= base.num_hidden_layers
    rest = Counter(saved_plain)
    rest.subtract(copier.shapes)
    assert min(rest.values()) >= 0 and {s for s, n in rest.items() if n} <= {(b.num_pairs,)}
    # Nothing was copied back twice, the last IN_FLIGHT saved never left the GPU, and each decoder
    # layer's input was on its way back before backward asked for it; at most two layer inputs were back on the
    # GPU at once (the one in use and the one arriving: what qdpo.plan counts).
    asks = [i for kind, i in copier.log if kind == "ask"]
    ins = [i for kind, i in copier.log if kind == "in"]
    assert len(set(ins)) == len(ins) and set(ins) <= set(asks)  # (a tensor saved twice is asked for twice)
    assert not set(ins) & set(range(len(copier.shapes) - qdpo.offload.IN_FLIGHT, len(copier.shapes)))
    inputs = layers[: base.num_hidden_layers]
    for i in inputs:
        assert copier.log.index(("in", i)) < copier.log.index(("ask", i)), copier.log
    back = 0
    for kind, i in copier.log:
        back += {"in": 1, "free": -1}.get(kind, 0) if i in layers else 0
        assert back <= 2, copier.log
    assert ("free", inputs[0]) in copier.log  # the copies are freed after use (the count above is real)
    # Host copies are freed as backward is done with each, not with the whole graph.
    assert copier.log.index(("host freed", inputs[-1])) < copier.log.index(("ask", inputs[0])), copier.log


def test_offload_moves_each_activation_once_and_leaves_weights_broadcasts_and_small_tensors():
    """Only activations worth a copy leave: not weights or views of them (a linear layer saves weight.t()), not a
    broadcast view (its copy would be larger than the memory it holds), not tensors under min_bytes; a tensor saved
    twice leaves and comes back once; a strided slice leaves as a dense copy. Backward is the same either way."""
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(64, 64, requires_grad=True)
    row = torch.randn(1, 64, requires_grad=True)

    def f():
        corner, odd = x[:2, :2], x[::2] * 1.0
        return (
            torch.nn.functional.linear(x.unsqueeze(0).expand(2, 64, 64), w).sum()  # saves weight.t()
            + (x * row.expand(64, 64)).sum()  # saves x and the broadcast row
            + (corner * corner).sum()  # too small
            + (odd * odd).sum()  # the same tensor twice
            + (x[:, ::2] ** 2).sum()  # a strided slice
        )

    plain = torch.autograd.grad(f(), (w, x, row))
    copier = HostCopies()
    hooks = qdpo.offload.OffloadedActivations(copier, min_bytes=1024)
    with hooks:
        y = f()
    # the linear layer's folded input, x, odd (once), the slice (as a dense copy): never w, w.t() or the row
    assert copier.shapes == [(128, 64), (64, 64), (32, 64), (64, 32)], copier.shapes
    for a, b in zip(torch.autograd.grad(y, (w, x, row)), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(i for kind, i in copier.log if kind == "in") == [0, 1]  # the last IN_FLIGHT never left


def test_offload_refuses_a_saved_tensor_changed_in_place_while_its_copy_may_run():
    """Autograd skips its version check when saved-tensor hooks are set; the offload checks it instead."""
    x = torch.randn(64, 64, requires_grad=True)
    with qdpo.offload.OffloadedActivations(HostCopies(), min_bytes=0):
        h = x * 2
        y = (h * h).sum()
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.backward()


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


@pytest.mark.parametrize("window", [None, 7])
def test_capped_attention_equals_its_definition_in_float64(window, monkeypatch):
    """qdpo.capped_attention (blocks of 16 queries, its own backward) against cap * tanh(scores / cap), the causal
    lower-right mask and softmax written out in float64 with autograd: output and q/k/v gradients, with GQA (4 query
    heads per kv head) and 40 queries at the end of 53 keys."""
    from qdpo import capped_attention as C

    monkeypatch.setattr(C, "SCORES_PER_BLOCK", 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((8, 40), (2, 53), (2, 53)))
    grad = torch.randn(2, 8, 40, 8, generator=g)
    cap, scale = 2.0, 0.7

    def reference(q, k, v):
        k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        scores = cap * torch.tanh(q @ k.transpose(-1, -2) * scale / cap)
        distance = torch.arange(13, 53)[:, None] - torch.arange(53)[None, :]
        visible = (distance >= 0) & (distance < (window or 10**9))
        return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = C.capped_attention(*inputs, window, cap, scale)
    (got * grad).sum().backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference(*exact)
    (want * grad.double()).sum().backward()
    assert len(C.query_blocks(q, k, window)) >= 3
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=2e-6)
    for mine, theirs in zip(inputs, exact):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0, atol=1e-5)


def test_capped_attention_blocks_stay_near_their_bound_and_the_planner_knows_the_largest():
    """Blocks of at least 16 queries: a call too wide for SCORES_PER_BLOCK at 16 queries makes blocks above it, and
    largest_block_scores (what the planner counts) is the largest block the function actually runs."""
    from qdpo import capped_attention as C

    for n, heads, nq, nk, window in ((1, 8, 300, 300, None), (4, 32, 16384, 16384, None), (2, 16, 5000, 9000, 4096)):
        q, k = torch.empty(n, heads, nq, 1, device="meta"), torch.empty(n, 1, nk, 1, device="meta")
        runs = max(n * heads * (b - a) * (hi - lo) for a, b, lo, hi in C.query_blocks(q, k, window))
        assert C.largest_block_scores(n, heads, nq, nk, window) == runs
    assert C.largest_block_scores(4, 32, 16384, 16384, None) > C.SCORES_PER_BLOCK  # 16 queries x 16k keys x 128
    assert C.largest_block_scores(1, 8, 300, 300, None) <= C.SCORES_PER_BLOCK
