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


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_logps, logits.detach().sum(-1)


def chunked_sequence_logps(hidden: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor,
                           response_mask: torch.Tensor, chunk_size: int) -> SequenceScores:
    """sequence_logps from the final hidden states, applying lm_head only at response positions, in chunks.

    Each chunk runs under non-reentrant checkpointing: its [chunk, vocab] logits are freed right
    after use and recomputed in backward, so no [N, T, vocab] tensor ever exists (at a 128k
    vocabulary that tensor is the largest thing in the step). Works with any head module,
    including a LoRA-wrapped lm_head.
    """
    from torch.utils.checkpoint import checkpoint

    mask = response_mask[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [M, H]: only positions that predict a response token
    labels = input_ids[:, 1:][rows, cols]
    token_logps, logit_sums = [], []
    for start in range(0, states.shape[0], chunk_size):
        lp, ls = checkpoint(_chunk_logps, head, states[start:start + chunk_size], labels[start:start + chunk_size],
                            use_reentrant=False)
        token_logps.append(lp)
        logit_sums.append(ls)
    n = input_ids.shape[0]
    zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    logps = zeros.index_add(0, rows, torch.cat(token_logps)) if token_logps else zeros
    logits_sum = zeros.index_add(0, rows, torch.cat(logit_sums)) if logit_sums else zeros
    return SequenceScores(logps, mask.sum(-1), logits_sum)
