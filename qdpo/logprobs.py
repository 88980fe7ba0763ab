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
