"""Group tokenized pairs into micro-batches of similar length and pad them into tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from qdpo.tokenize import TokenizedPair

# Sort within windows of this many micro-batches: padding stays small while order stays random.
LENGTH_GROUP_WINDOW = 50


@dataclass
class Batch:
    """A micro-batch: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones."""

    input_ids: torch.Tensor  # [2B, T]
    attention_mask: torch.Tensor  # [2B, T], 1 on real tokens
    response_mask: torch.Tensor  # [2B, T], 1 where the token is part of the scored response

    @property
    def num_pairs(self) -> int:
        """Pairs in this micro-batch."""
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in this micro-batch."""
        return int(self.attention_mask.sum())


def length_grouped_batches(pairs: list[TokenizedPair], micro_batch_size: int, seed: int) -> list[list[int]]:
    """Indices of pairs per micro-batch: shuffled, then sorted by length inside windows, batches shuffled."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    window = micro_batch_size * LENGTH_GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(pairs[i]), reverse=True)
        batches += [chunk[i : i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    rng.shuffle(batches)
    return batches


def collate(pairs: list[TokenizedPair], pad_id: int) -> Batch:
    """Right-pad prompt+chosen and prompt+rejected sequences into one [2B, T] batch."""
    sequences, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            response = getattr(p, side)
            sequences.append(p.prompt_ids + response)
            masks.append([0] * len(p.prompt_ids) + [1] * len(response))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    response = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        response[row, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
    return Batch(input_ids, attention, response)


# Segment ids of a shared-prompt row.
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3

# Micro-batch layouts (Config.batch_layout): two right-padded sequences per pair; one row per pair
# prompt+chosen+rejected; or every pair of the micro-batch back to back in one row, no padding.
LAYOUTS = ("plain", "shared", "packed")


@dataclass
class SharedPromptBatch:
    """B pairs as prompt + chosen + rejected runs, so the prompt is computed once per pair.

    Either one right-padded row per pair, or (packed) all B runs back to back in a single row with
    no padding at all. The rejected tokens see their own prompt but not the chosen response, no
    token sees another pair (attention mask), and positions restart where each prompt ends
    (position ids), so every response token gets exactly the context and positions it has in a
    plain prompt+response sequence.
    """

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    segments: torch.Tensor  # [R, T]: PROMPT, CHOSEN, REJECTED or PAD
    pair_ids: torch.Tensor  # [R, T]: which pair of the micro-batch each position belongs to (-1 on padding)
    predictors: torch.Tensor  # [M]: flat index r*T + t of the position whose output predicts each label
    labels: torch.Tensor  # [M]: the response tokens
    rows: torch.Tensor  # [M]: b for chosen tokens, B + b for rejected ones (Batch's row order)
    num_pairs: int
    logical_tokens: int  # tokens of the equivalent plain batch (prompt counted twice), for comparable tokens/s
    spans: tuple[tuple[int, int, int, int, int], ...] = ()  # per pair: row, start, prompt/chosen/rejected tokens

    @property
    def num_tokens(self) -> int:
        """Tokens of the two plain sequences per pair (what a two-sequence forward would process)."""
        return self.logical_tokens


def pair_length(p: TokenizedPair) -> int:
    """Tokens of a pair as one prompt+chosen+rejected run."""
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def collate_shared_prompt(pairs: list[TokenizedPair], pad_id: int, packed: bool = False) -> SharedPromptBatch:
    """Lay each pair out as prompt+chosen+rejected: one right-padded row per pair, or all in one row (packed)."""
    row_of = [0] * len(pairs) if packed else list(range(len(pairs)))
    lengths = [pair_length(p) for p in pairs]
    width = sum(lengths) if packed else max(lengths)
    n_rows = 1 if packed else len(pairs)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.full((n_rows, width), PAD, dtype=torch.long)
    pair_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    predictors, labels, rows, spans = [], [], [], []
    logical, cursor = 0, [0] * n_rows
    b_total = len(pairs)
    for b, p in enumerate(pairs):
        r, s = row_of[b], cursor[row_of[b]]
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        end = s + n_p + n_c + n_r
        input_ids[r, s:end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        positions[r, s : s + n_p + n_c] = torch.arange(n_p + n_c)
        positions[r, s + n_p + n_c : end] = torch.arange(n_p, n_p + n_r)
        segments[r, s : s + n_p], segments[r, s + n_p : s + n_p + n_c], segments[r, s + n_p + n_c : end] = (
            PROMPT,
            CHOSEN,
            REJECTED,
        )
        pair_ids[r, s:end] = b
        # chosen token at n_p + i is predicted by the position before it; the first rejected token by
        # the last prompt position (not the last chosen one), later ones by their predecessor.
        base = r * width + s
        predictors += [base + n_p - 1 + i for i in range(n_c)]
        predictors += [base + (n_p - 1 if i == 0 else n_p + n_c + i - 1) for i in range(n_r)]
        labels += p.chosen_ids + p.rejected_ids
        rows += [b] * n_c + [b_total + b] * n_r
        logical += 2 * n_p + n_c + n_r
        cursor[r] = end
        spans.append((r, s, n_p, n_c, n_r))
    return SharedPromptBatch(
        input_ids,
        positions,
        segments,
        pair_ids,
        torch.tensor(predictors),
        torch.tensor(labels),
        torch.tensor(rows),
        b_total,
        logical,
        tuple(spans),
    )


def shared_prompt_mask(segments: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] boolean mask (True = may attend): causal, within one pair, a response sees its prompt, itself."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    same_pair = pair_ids[:, :, None] == pair_ids[:, None, :]
    allowed = causal & same_pair & ((k == PROMPT) | (k == q)) & (q != PAD)
    # Padding queries attend to themselves only: a row with nothing to attend to gives NaN in SDPA.
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device) & (q == PAD)
    return allowed[:, None]


def make_batch(pairs: list[TokenizedPair], pad_id: int, layout: str) -> Batch | SharedPromptBatch:
    """The micro-batch in the given layout (one of LAYOUTS)."""
    if layout == "plain":
        return collate(pairs, pad_id)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}")
    return collate_shared_prompt(pairs, pad_id, packed=layout == "packed")


def padding_share(pairs: list[TokenizedPair], batches: list[list[int]], layout: str = "plain") -> float:
    """Share of positions in the micro-batches' tensors that are padding (0 when packed)."""
    if layout == "packed":
        return 0.0
    real = total = 0
    for idx in batches:
        if layout == "shared":
            lengths = [pair_length(pairs[i]) for i in idx]
        else:
            lengths = [
                len(pairs[i].prompt_ids) + len(getattr(pairs[i], side))
                for side in ("chosen_ids", "rejected_ids")
                for i in idx
            ]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return 1 - real / total if total else 0.0


class BatchStream:
    """Pair indices of each micro-batch, epoch after epoch (regrouped with its seed); its position can be saved."""

    def __init__(
        self, pairs: list[TokenizedPair], micro_batch_size: int, seed: int, first_epoch: list[list[int]]
    ) -> None:
        self.pairs, self.micro_batch_size, self.seed = pairs, micro_batch_size, seed
        self.epoch, self.queue = 0, [list(b) for b in first_epoch]

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> list[int]:
        while not self.queue:
            self.epoch += 1
            self.queue = length_grouped_batches(self.pairs, self.micro_batch_size, self.seed + self.epoch)
        return self.queue.pop()

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the epoch and the micro-batches it has not handed out yet."""
        return {"epoch": self.epoch, "queue": [list(b) for b in self.queue], "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; with another micro_batch_size the pairs left are regrouped, in order."""
        self.epoch, self.queue = state["epoch"], [list(b) for b in state["queue"]]
        if state["micro_batch_size"] != self.micro_batch_size:
            left = [i for batch in reversed(self.queue) for i in batch]  # in the order they would be handed out
            n = self.micro_batch_size
            self.queue = [left[k : k + n] for k in range(0, len(left), n)][::-1]
