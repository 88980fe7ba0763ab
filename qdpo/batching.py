"""Group tokenized pairs into micro-batches of similar length and pad them into tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass

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
        chunk = sorted(order[start:start + window], key=lambda i: len(pairs[i]), reverse=True)
        batches += [chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
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


def padding_share(pairs: list[TokenizedPair], batches: list[list[int]]) -> float:
    """Share of positions in the padded batches that are padding."""
    real = total = 0
    for idx in batches:
        lengths = [len(pairs[i].prompt_ids) + len(getattr(pairs[i], side)) for side in ("chosen_ids", "rejected_ids") for i in idx]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return 1 - real / total if total else 0.0
