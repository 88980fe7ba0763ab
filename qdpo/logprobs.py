"""Summed log-probabilities of response tokens under a causal LM."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceScores:
    """Per-sequence sums over response tokens: log-prob, token count, and the logits' sum (for metrics)."""

    logps: torch.Tensor  # [N], float32, carries grad when the forward did
    lengths: torch.Tensor  # [N], response tokens scored
    logits_sum: torch.Tensor  # [N], sum of all vocab logits at scored positions (detached)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> SequenceScores:
    """Sum log p(token | prefix) over response tokens; logits[:, t] predicts input_ids[:, t + 1]."""
    logits = logits[:, :-1]
    labels = input_ids[:, 1:]
    mask = response_mask[:, 1:]
    # gather - logsumexp instead of log_softmax: no second [N, T, V] tensor is kept for backward.
    logits32 = logits.float()
    token_logits = logits32.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logits - torch.logsumexp(logits32, dim=-1)
    token_logps = token_logps.masked_fill(~mask, 0.0)
    with torch.no_grad():
        logits_sum = (logits32.sum(-1) * mask).sum(-1)
    return SequenceScores(token_logps.sum(-1), mask.sum(-1), logits_sum)


def _chunk_logps(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_logps, logits.detach().sum(-1)


def gathered_logps(
    states: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    head: torch.nn.Module,
    chunk_size: int,
) -> SequenceScores:
    """Per-sequence sums of log p(label | state) for M gathered positions; rows[m] names each one's sequence.

    chunk_size > 0 runs lm_head on that many positions at a time under non-reentrant
    checkpointing: each chunk's [chunk, vocab] logits are freed right after use and recomputed in
    backward, so no [N, T, vocab] tensor ever exists (at a 128k vocabulary that tensor is the
    largest thing in the step). 0 runs all positions at once. Works with a LoRA-wrapped lm_head.
    """
    from torch.utils.checkpoint import checkpoint

    token_logps, logit_sums = [], []
    step = chunk_size if chunk_size > 0 else max(states.shape[0], 1)
    for start in range(0, states.shape[0], step):
        args = (head, states[start : start + step], labels[start : start + step])
        lp, ls = checkpoint(_chunk_logps, *args, use_reentrant=False) if chunk_size > 0 else _chunk_logps(*args)
        token_logps.append(lp)
        logit_sums.append(ls)
    zeros = torch.zeros(num_rows, dtype=torch.float32, device=states.device)
    logps = zeros.index_add(0, rows, torch.cat(token_logps)) if token_logps else zeros
    logits_sum = zeros.index_add(0, rows, torch.cat(logit_sums)) if logit_sums else zeros
    lengths = torch.zeros(num_rows, dtype=torch.long, device=states.device).index_add(0, rows, torch.ones_like(rows))
    return SequenceScores(logps, lengths, logits_sum)


def chunked_sequence_logps(
    hidden: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor, chunk_size: int
) -> SequenceScores:
    """sequence_logps from final hidden states, applying lm_head only at positions that predict a response token."""
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [M, H]
    labels = input_ids[:, 1:][rows, cols]
    return gathered_logps(states, labels, rows, input_ids.shape[0], head, chunk_size)
