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


# Segment ids of a shared-prompt row.
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


@dataclass
class SharedPromptBatch:
    """B pairs, one row each: prompt + chosen + rejected, so the prompt is computed once per pair.

    The rejected tokens see the prompt but not the chosen response (attention mask), and their
    positions restart where the prompt ends (position ids), so every response token gets exactly
    the context and positions it has in a plain prompt+response sequence.
    """

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    segments: torch.Tensor  # [B, T]: PROMPT, CHOSEN, REJECTED or PAD
    predictors: torch.Tensor  # [M]: flat index b*T + t of the position whose output predicts each label
    labels: torch.Tensor  # [M]: the response tokens
    rows: torch.Tensor  # [M]: b for chosen tokens, B + b for rejected ones (Batch's row order)
    logical_tokens: int  # tokens of the equivalent plain batch (prompt counted twice), for comparable tokens/s

    @property
    def num_pairs(self) -> int:
        """Pairs in this micro-batch."""
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens of the two plain sequences per pair (what a two-sequence forward would process)."""
        return self.logical_tokens


def collate_shared_prompt(pairs: list[TokenizedPair], pad_id: int) -> SharedPromptBatch:
    """Pack each pair into one row prompt+chosen+rejected, right-padded."""
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    b_total = len(pairs)
    input_ids = torch.full((b_total, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b_total, width), dtype=torch.long)
    segments = torch.full((b_total, width), PAD, dtype=torch.long)
    predictors, labels, rows = [], [], []
    logical = 0
    for b, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        input_ids[b, : n_p + n_c + n_r] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        positions[b, : n_p + n_c] = torch.arange(n_p + n_c)
        positions[b, n_p + n_c: n_p + n_c + n_r] = torch.arange(n_p, n_p + n_r)
        segments[b, :n_p], segments[b, n_p:n_p + n_c], segments[b, n_p + n_c:n_p + n_c + n_r] = PROMPT, CHOSEN, REJECTED
        # chosen token at n_p + i is predicted by the position before it; the first rejected token by
        # the last prompt position (not the last chosen one), later ones by their predecessor.
        predictors += [b * width + n_p - 1 + i for i in range(n_c)]
        predictors += [b * width + (n_p - 1 if i == 0 else n_p + n_c + i - 1) for i in range(n_r)]
        labels += p.chosen_ids + p.rejected_ids
        rows += [b] * n_c + [b_total + b] * n_r
        logical += 2 * n_p + n_c + n_r
    return SharedPromptBatch(input_ids, positions, segments, torch.tensor(predictors), torch.tensor(labels),
                             torch.tensor(rows), logical)


def shared_prompt_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask (True = may attend): causal, and responses see only the prompt and themselves."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k == PROMPT) | (k == q)) & (q != PAD)
    # Padding queries attend to themselves only: a row with nothing to attend to gives NaN in SDPA.
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device) & (q == PAD)
    return allowed[:, None]


def make_batch(pairs: list[TokenizedPair], pad_id: int, share_prompt: bool) -> Batch | SharedPromptBatch:
    """The micro-batch layout the config asks for."""
    return collate_shared_prompt(pairs, pad_id) if share_prompt else collate(pairs, pad_id)


def padding_share(pairs: list[TokenizedPair], batches: list[list[int]], share_prompt: bool = False) -> float:
    """Share of positions in the padded batches that are padding."""
    real = total = 0
    for idx in batches:
        if share_prompt:
            lengths = [len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids) for i in idx]
        else:
            lengths = [len(pairs[i].prompt_ids) + len(getattr(pairs[i], side)) for side in ("chosen_ids", "rejected_ids") for i in idx]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return 1 - real / total if total else 0.0
