"""One preference micro-step: reference (when the method has one) and policy log-probs of a batch, the loss, and
its metrics."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

from qdpo import attention
from qdpo.batching import Batch, SharedPromptBatch, shared_prompt_mask
from qdpo.config import Config
from qdpo.distributed import compute_device
from qdpo.errors import UserError
from qdpo.families import OutputHead, decoder_masks, family_of, shared_layout_problem
from qdpo.logprobs import SequenceScores, chunked_sequence_logps, gathered_logps, sequence_logps
from qdpo.loss import kto_loss, preference_losses, wpo_weights
from qdpo.model import reference_model
from qdpo.offload import offload_hooks

# Models whose decoder layers do not pass the attention kwargs through, found at their first shared-prompt forward.
DENSE_ONLY: weakref.WeakSet = weakref.WeakSet()


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def span_forward(base, input_ids: torch.Tensor, positions: torch.Tensor | None, spans) -> torch.Tensor | None:
    """The decoder's hidden states with qdpo.attention's causal calls per span and no mask, or None when some layer
    never saw the spans (then this model takes transformers' mask from now on)."""
    if base in DENSE_ONLY:
        return None
    before = attention.calls
    with attention.no_mask():
        # The all-ones 2-D mask keeps transformers from reading restarted position ids as packed sequences.
        hidden = base.get_decoder()(
            input_ids=input_ids,
            attention_mask=torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device),
            position_ids=positions,
            use_cache=False,
            qdpo_spans=spans,
        ).last_hidden_state
    if attention.calls - before != len(base.get_decoder().layers):
        # Some layer never saw the spans (a decoder layer that drops the attention kwargs, which
        # attention.hand_spans_on does not know of): its attention was plain causal over the whole row. Throw that
        # away.
        DENSE_ONLY.add(base)
        return None
    return hidden


def score_shared_prompt(
    model, batch: SharedPromptBatch, logits_chunk_size: int, aligned: bool = False
) -> SequenceScores:
    """Scores of a shared-prompt (or packed) batch: prompt once per pair, lm_head only where it predicts a response."""
    device = compute_device(model)
    base = _base(model)
    problem = shared_layout_problem(base.config)
    if problem:
        raise UserError(
            f"share_prompt cannot be exact here: {problem}; set share_prompt=false (and pack_pairs=false)."
        )
    positions = batch.position_ids.to(device)
    hidden = None
    if batch.spans and attention.span_problem(base.config) is None:
        hidden = span_forward(base, batch.input_ids.to(device), positions, batch.spans)
    if hidden is None:
        # Built after the checks: a packed row's [1, 1, W, W] mask can be hundreds of MB.
        allowed = shared_prompt_mask(batch.segments.to(device), batch.pair_ids.to(device))
        mask = decoder_masks(base.config, allowed, positions, base.get_input_embeddings().weight.dtype)
        hidden = base.get_decoder()(
            input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
    states = hidden.reshape(-1, hidden.shape[-1])[batch.predictors.to(device)]
    return gathered_logps(
        states,
        batch.labels.to(device),
        batch.rows.to(device),
        2 * batch.num_pairs,
        OutputHead(base.get_output_embeddings(), base.config),
        logits_chunk_size,
        aligned,
    )


def score_batch(
    model, batch: Batch | SharedPromptBatch, logits_chunk_size: int = 0, aligned: bool = False
) -> SequenceScores:
    """Summed response log-probs of all 2B sequences, from one forward of chosen and rejected together.

    logits_chunk_size > 0 takes the decoder's hidden states and applies lm_head (and the family's
    logit transform) only at response positions, that many at a time (see chunked_sequence_logps);
    0 builds the logits tensor. A family qdpo has not verified always takes the model's own forward.
    aligned also sums WPO's aligned log-probs (SequenceScores.aligned_logps).
    """
    if isinstance(batch, SharedPromptBatch):
        return score_shared_prompt(model, batch, logits_chunk_size, aligned)
    device = compute_device(model)
    base = _base(model)
    if logits_chunk_size > 0 and family_of(base.config) is not None:
        # No padding mask: rows are right-padded, so causal attention alone never lets a real token see padding.
        # With a mask transformers would build a [2B, 1, T, T] one per forward and SDPA would repeat GQA's K/V to
        # every head on its masked path; without, it runs causal kernels with K/V at their own head count.
        ids = batch.input_ids.to(device)
        hidden = None
        blocked = attention.window_cuts(base.config, ids.shape[1]) or attention.softcapped(base.config)
        if blocked and attention.span_problem(base.config) is None:
            # A sliding window that cuts the rows, or soft-capped scores: transformers would build a [2B, 1, T, T]
            # mask (and eagerly, [2B, heads, T, T] scores); qdpo.attention's blocks need neither (a row is one span).
            hidden = span_forward(base, ids, None, tuple((row, 0, ids.shape[1], 0, 0) for row in range(ids.shape[0])))
        if hidden is None:
            hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        return chunked_sequence_logps(
            hidden,
            OutputHead(base.get_output_embeddings(), base.config),
            batch.input_ids.to(device),
            batch.response_mask.to(device),
            logits_chunk_size,
            aligned,
        )
    # Only positions from the earliest response token on need logits: skipping the prompt's share of
    # lm_head (and of the [2B, T, vocab] tensor) saves memory and time (~15% of a step on SmolLM2).
    start = int(batch.response_mask.int().argmax(dim=1).min()) - 1
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
        logits_to_keep=batch.input_ids.shape[1] - start,
    )
    scores = sequence_logps(
        out.logits, batch.input_ids[:, start:].to(device), batch.response_mask[:, start:].to(device), aligned
    )
    del out  # free the logits before backward needs the memory
    return scores


@torch.no_grad()
def reference_scores(model, batch: Batch | SharedPromptBatch, logits_chunk_size: int = 0) -> SequenceScores:
    """The same forward with the reference model: adapters off (or the frozen init adapter), no grad."""
    with reference_model(model):
        return score_batch(model, batch, logits_chunk_size)


class Metrics:
    """Sums of per-pair (KTO: per-example) metrics over micro-batches, averaged when read (TRL's names)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # how many pairs or examples each sum holds
        self.pairs = 0
        self.logit_sums = [0.0, 0.0]  # chosen, rejected: sum of all vocab logits at scored positions
        self.logit_counts = [0, 0]

    def _add(self, name: str, values: torch.Tensor) -> None:
        if values.numel():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.float().sum())
            self.counts[name] = self.counts.get(name, 0) + values.numel()

    def add(
        self,
        losses: torch.Tensor,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor | None,
        policy: SequenceScores,
        vocab_size: int,
        desirable: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one micro-batch (with desirable: a KTO batch, whose chosen_rewards are all its examples')."""
        b = losses.shape[0]
        logps = policy.logps[:b].detach()
        if desirable is None:
            rows = (torch.arange(b), torch.arange(b, 2 * b))
            correct = chosen_rewards > rejected_rewards
            sides = (chosen_rewards, rejected_rewards, logps, policy.logps[b:].detach())
        else:  # KTO: "chosen" means desirable, "rejected" undesirable, as TRL's KTOTrainer logs them
            desirable = desirable.to(losses.device)
            rows = (desirable.nonzero().flatten().cpu(), (~desirable).nonzero().flatten().cpu())
            correct = policy.extras.pop("on_side")
            sides = (chosen_rewards[desirable], chosen_rewards[~desirable], logps[desirable], logps[~desirable])
        self._add("loss", losses.detach())
        self._add("rewards/accuracies", correct.float())
        for name, values in zip(("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"), sides):
            self._add(name, values)
        for name, values in policy.extras.items():
            self._add(name, values.detach())
        self.pairs += b
        for side, picked in enumerate(rows):
            self.logit_sums[side] += float(policy.logits_sum[picked].sum())
            self.logit_counts[side] += int(policy.lengths[picked].sum()) * vocab_size

    @classmethod
    def total(cls, parts: list["Metrics"]) -> "Metrics":
        """The sums of several Metrics (each rank's share of a step or an eval), as if one had seen it all."""
        out = cls()
        for part in parts:
            for name, value in part.sums.items():
                out.sums[name] = out.sums.get(name, 0.0) + value
                out.counts[name] = out.counts.get(name, 0) + part.counts[name]
            out.pairs += part.pairs
            for side in range(2):
                out.logit_sums[side] += part.logit_sums[side]
                out.logit_counts[side] += part.logit_counts[side]
        return out

    def means(self, prefix: str = "") -> dict[str, float]:
        """Per-pair means (and per-logit means for logits/*), with an optional name prefix.

        rewards/margins is mean chosen reward minus mean rejected reward: for pairs the mean margin, for KTO
        the gap between desirable and undesirable examples. A KTO side with no example in the batch is left out.
        """
        out = {prefix + k: v / self.counts[k] for k, v in self.sums.items()}
        if "rewards/chosen" in self.sums and "rewards/rejected" in self.sums:
            out[prefix + "rewards/margins"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
        for side, name in enumerate(("logits/chosen", "logits/rejected")):
            if self.logit_counts[side]:
                out[prefix + name] = self.logit_sums[side] / self.logit_counts[side]
        return out


# What a logged row keeps from its own step; every other figure describes all the steps since the last row.
AT_ITS_STEP = ("step", "learning_rate", "skipped", "pairs")


def interval_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics row for the steps since the last logged one (logging_steps > 1), under the last step's number.

    Each metric is its mean over the steps that have it, as TRL logs an interval; tokens are summed,
    tokens_per_second is over the whole interval, peak_memory_gb its highest; learning_rate is the last step's.
    """
    row = dict(rows[-1])
    keys = dict.fromkeys(k for r in rows for k in r)  # first seen first: a KTO side may be missing from the last step
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if key in AT_ITS_STEP or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        if key == "tokens":
            row[key] = sum(values)
        elif key == "tokens_per_second":
            row[key] = sum(r["tokens"] for r in rows) / sum(r["tokens"] / r[key] for r in rows)
        elif key == "peak_memory_gb":
            row[key] = max(values)
        else:
            row[key] = sum(values) / len(values)
    return row


def preference_loss(
    model,
    batch: Batch | SharedPromptBatch,
    config: Config,
    reference_logps: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, SequenceScores]:
    """Per-pair losses, rewards and the policy scores for one micro-batch.

    With loss_type kto each "pair" is one example: its completion in the chosen slot and another prompt's
    completion (the KL baseline's mismatched sample) in the rejected slot; desirable ([B] bool) gives the labels.
    The rewards are then the examples' own (one per example) and the rejected rewards None; the KL baseline
    (`kl`) and which rewards lie on their label's side of it (`on_side`) come back in the extras.

    reference_logps ([2B], chosen then rejected; LD-DPO-weighted when ld_alpha is set) comes from the
    precomputed table when there is one; otherwise the reference forward runs here. A reference-free
    method (simpo, orpo) runs no reference forward at all. The method's own per-pair metrics (ORPO's
    nll_loss, ...) come back in the policy scores' extras.
    """
    if config.needs_reference and reference_logps is None:
        reference_logps = reference_scores(model, batch, config.logits_chunk_size).ld_logps(config.ld_alpha)
    with offload_hooks() if config.offload_activations else contextlib.nullcontext():
        policy = score_batch(model, batch, config.logits_chunk_size, aligned=config.use_weighting)
    b = batch.num_pairs
    logps, lengths = policy.ld_logps(config.ld_alpha), policy.lengths
    ref = reference_logps.to(logps.device) if reference_logps is not None else None
    if config.unpaired:
        if desirable is None:
            raise ValueError("loss_type kto needs the examples' desirable labels")
        losses, rewards, kl, on_side = kto_loss(
            logps[:b],
            ref[:b],
            logps[b:].detach(),  # the baseline is a constant of the loss: no gradient through the mismatched answers
            ref[b:],
            desirable.to(logps.device),
            config.beta,
            config.desirable_weight,
            config.undesirable_weight,
        )
        policy.extras = {"kl": kl.expand(b), "on_side": on_side}
        return losses, rewards, None, policy
    weights = None
    if config.use_weighting:
        average = policy.aligned_logps / lengths.clamp(min=1)
        weights = wpo_weights(average[:b], average[b:])
    out = preference_losses(
        config.weighted_losses,
        logps[:b],
        logps[b:],
        lengths[:b],
        lengths[b:],
        ref[:b] if ref is not None else None,
        ref[b:] if ref is not None else None,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        simpo_gamma=config.simpo_gamma,
        orpo_alpha=config.orpo_alpha,
        pair_weights=weights,
        sft_chosen_logps=policy.logps[:b],
    )
    policy.extras = out.extras
    return out.losses, out.chosen_rewards, out.rejected_rewards, policy


class PreferenceLoss(torch.nn.Module):
    """preference_loss as a module, so torch's DistributedDataParallel can wrap it.

    qdpo's step calls the decoder and the output head separately (response-only logits), so the model's own
    forward is never the one that runs; DDP syncs gradients for what its wrapped module's forward computed,
    and this module's forward is the whole step's computation.
    """

    def __init__(self, model, config: Config) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def forward(
        self,
        batch: Batch | SharedPromptBatch,
        reference_logps: torch.Tensor | None = None,
        desirable: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, SequenceScores]:
        return preference_loss(self.model, batch, self.config, reference_logps, desirable)
