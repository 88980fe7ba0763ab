"""Summed log-probabilities of response tokens under a causal LM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceScores:
    """Per-sequence sums over response tokens: log-prob, token count, and the logits' sum (for metrics).

    Rows come in pairs: 0..B-1 the chosen responses, B..2B-1 the rejected ones.
    """

    logps: torch.Tensor  # [N], float32, carries grad when the forward did
    lengths: torch.Tensor  # [N], response tokens scored
    logits_sum: torch.Tensor  # [N], sum of all vocab logits at scored positions (detached)
    # [N], the part of logps past the shorter response of the pair (LD-DPO's verbose tail); carries grad
    tail_logps: torch.Tensor | None = None
    # [N], sum of log p(token) - log sum_v p(v)^2 (WPO's aligned log-probs; detached), when asked for
    aligned_logps: torch.Tensor | None = None
    # per-pair figures a loss reports under TRL's names (nll_loss, log_odds_ratio, ...), filled by the step
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def ld_logps(self, ld_alpha: float | None) -> torch.Tensor:
        """LD-DPO's sequence log-probs: shared part + ld_alpha x the tail (Liu et al. 2024, arXiv:2409.06411)."""
        return self.logps if ld_alpha is None else self.logps - (1 - ld_alpha) * self.tail_logps


def _shared_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """[N]: each row's pair's shorter response length (rows 0..B-1 chosen, B..2B-1 rejected).

    Rows that do not come in pairs (an odd count: not a preference batch) have no shared part.
    """
    if lengths.shape[0] % 2:
        return torch.full_like(lengths, torch.iinfo(lengths.dtype).max)
    b = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:b], lengths[b:])
    return torch.cat([shared, shared])


def _aligned(logits: torch.Tensor, token_logps: torch.Tensor) -> torch.Tensor:
    """log p(token) - log sum_v p(v)^2 per position (WPO eq. 2's alignment), without grad."""
    with torch.no_grad():
        return token_logps - (torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1))


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, aligned: bool = False
) -> SequenceScores:
    """Sum log p(token | prefix) over response tokens; logits[:, t] predicts input_ids[:, t + 1]."""
    logits = logits[:, :-1]
    labels = input_ids[:, 1:]
    mask = response_mask[:, 1:]
    # gather - logsumexp instead of log_softmax: no second [N, T, V] tensor is kept for backward.
    logits32 = logits.float()
    token_logits = logits32.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    token_logps = (token_logits - torch.logsumexp(logits32, dim=-1)).masked_fill(~mask, 0.0)
    lengths = mask.sum(-1)
    tail = mask.cumsum(-1) > _shared_lengths(lengths).unsqueeze(1)
    with torch.no_grad():
        logits_sum = (logits32.sum(-1) * mask).sum(-1)
        aligned_sums = _aligned(logits32, token_logps).masked_fill(~mask, 0.0).sum(-1) if aligned else None
    return SequenceScores(token_logps.sum(-1), lengths, logits_sum, (token_logps * tail).sum(-1), aligned_sums)


def _chunk_logps(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, aligned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    logits = head(hidden).float()
    # gather before logsumexp: the other order measured 21 MB more at the step's peak on SmolLM2 (tests/test_plan.py)
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_logps, logits.detach().sum(-1), _aligned(logits, token_logps) if aligned else None


def gathered_logps(
    states: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    head: torch.nn.Module,
    chunk_size: int,
    aligned: bool = False,
) -> SequenceScores:
    """Per-sequence sums of log p(label | state) for M gathered positions; rows[m] names each one's sequence.

    chunk_size > 0 runs lm_head on that many positions at a time under non-reentrant
    checkpointing: each chunk's [chunk, vocab] logits are freed right after use and recomputed in
    backward, so no [N, T, vocab] tensor ever exists (at a 128k vocabulary that tensor is the
    largest thing in the step). 0 runs all positions at once. Works with a LoRA-wrapped lm_head.
    """
    from torch.utils.checkpoint import checkpoint

    token_logps, logit_sums, aligned_logps = [], [], []
    step = chunk_size if chunk_size > 0 else max(states.shape[0], 1)
    for start in range(0, states.shape[0], step):
        args = (head, states[start : start + step], labels[start : start + step], aligned)
        lp, ls, al = checkpoint(_chunk_logps, *args, use_reentrant=False) if chunk_size > 0 else _chunk_logps(*args)
        token_logps.append(lp)
        logit_sums.append(ls)
        aligned_logps.append(al)
    zeros = torch.zeros(num_rows, dtype=torch.float32, device=states.device)
    flat = torch.cat(token_logps) if token_logps else zeros[:0]
    logps = zeros.index_add(0, rows, flat)
    logits_sum = zeros.index_add(0, rows, torch.cat(logit_sums)) if logit_sums else zeros
    lengths = torch.zeros(num_rows, dtype=torch.long, device=states.device).index_add(0, rows, torch.ones_like(rows))
    # Each label's place in its response (1, 2, ...): positions of one row come in order, so a stable sort by
    # row lines every response up, and its start is the count of labels in the rows before it.
    order = torch.sort(rows, stable=True).indices
    starts = torch.cumsum(lengths, 0) - lengths
    place = torch.empty_like(rows)
    place[order] = torch.arange(1, rows.shape[0] + 1, device=rows.device) - starts[rows[order]]
    tail = zeros.index_add(0, rows, flat * (place > _shared_lengths(lengths)[rows]))
    aligned_sums = zeros.index_add(0, rows, torch.cat(aligned_logps)) if aligned and token_logps else None
    return SequenceScores(logps, lengths, logits_sum, tail, aligned_sums)


def chunked_sequence_logps(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int,
    aligned: bool = False,
) -> SequenceScores:
    """sequence_logps from final hidden states, applying lm_head only at positions that predict a response token."""
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [M, H]
    labels = input_ids[:, 1:][rows, cols]
    return gathered_logps(states, labels, rows, input_ids.shape[0], head, chunk_size, aligned)
