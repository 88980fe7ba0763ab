"""The preference losses: pure functions of sequence log-probabilities.

Formulas match TRL's (DPOTrainer; CPOTrainer for SimPO, ORPOTrainer for ORPO, KTOTrainer for KTO) so numbers compare
(benchmarks/compare_methods.py); each cites its paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qdpo.config import LOSS_TYPES, REFERENCE_FREE

REFERENCE_LOSSES = tuple(t for t in LOSS_TYPES if t not in REFERENCE_FREE + ("sft", "kto"))  # what dpo_loss computes


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses, chosen rewards and rejected rewards (rewards detached).

    Inputs are summed response log-probs, shape [B]. `ipo`, `sigmoid_norm` and `sft_weight > 0` also need
    the response lengths in tokens (`chosen_lengths`, `rejected_lengths`): IPO and sigmoid_norm work on
    per-token averages and the SFT term is the chosen response's mean per-token NLL.
    Rewards are beta x (policy - reference) log-ratios of the summed log-probs, for every loss type
    (as TRL 1.x logs them, IPO included).
    """
    if loss_type not in REFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {REFERENCE_LOSSES}, got {loss_type!r}")
    needs_lengths = loss_type in ("ipo", "sigmoid_norm") or sft_weight > 0
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type ipo or sigmoid_norm and sft_weight > 0 need chosen_lengths and rejected_lengths")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type in ("ipo", "sigmoid_norm"):
        # IPO regresses the per-token-averaged log-ratio gap (TRL normalises by length; the IPO
        # authors confirmed their reported numbers use this form).
        delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)

    if loss_type == "sigmoid":
        # DPO, Rafailov et al. 2023 (arXiv:2305.18290) eq. 7; with label_smoothing = epsilon it is
        # conservative DPO (cDPO, Mitchell 2023): the target is 1 - epsilon instead of 1.
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "robust":
        # Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409) eq. 8: unbiased under a label-flip rate epsilon.
        losses = (
            -F.logsigmoid(beta * delta) * (1 - label_smoothing) + F.logsigmoid(-beta * delta) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "sigmoid_norm":
        # Length-normalised DPO (TRL's sigmoid_norm): DPO eq. 7 on per-token-averaged log-ratios, so a long
        # response's many small log-prob moves do not outweigh a short one's.
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "apo_zero":
        # APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266) eq. 7: chosen log-ratio up, rejected down.
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        # APO-down, same paper, eq. 8: chosen down, and the rejected further down than the chosen.
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * delta))
    elif loss_type == "hinge":
        # SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425) eq. 2, as TRL writes it: relu(1 - beta * delta).
        losses = torch.relu(1 - beta * delta)
    else:
        # IPO, Azar et al. 2023 (arXiv:2310.12036) eq. 17, with tau = beta: (delta - 1/(2 tau))^2.
        losses = (delta - 1 / (2 * beta)) ** 2

    if sft_weight > 0:
        # RPO, Pang et al. 2024 (arXiv:2404.19733): add the chosen response's NLL (per token).
        losses = losses + sft_weight * (-policy_chosen_logps / chosen_lengths.clamp(min=1))

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO per-pair losses and rewards from length-averaged log-probs; no reference model.

    Meng et al. 2024 (arXiv:2405.14734) eq. 6: -log sigmoid(beta (avg_c - avg_r) - gamma); label_smoothing
    gives its conservative form, as TRL's CPOTrainer does. Rewards are beta x avg log-probs (TRL's names).
    """
    z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    # x = 0 (a response the model is certain of: every token's log-prob rounds to 0) would be -inf, and both
    # branches' gradients NaN; just below 0 it is finite (about -87 in fp32) and its gradient through the clamp 0.
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, chosen_nll: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO per-pair losses, rewards and TRL's ORPO metrics; no reference model.

    Hong et al. 2024 (arXiv:2403.07691) eq. 6: L = L_SFT + lambda L_OR, with L_OR = -log sigmoid(log odds(c) -
    log odds(r)) (eq. 7) and odds(y) = P(y) / (1 - P(y)) on the length-averaged probability (eq. 4), so
    log odds = avg - log(1 - exp(avg)). chosen_nll is L_SFT per pair (the chosen response's mean per-token NLL).
    Rewards are alpha x avg log-probs, as TRL's ORPOTrainer logs them (its beta is this lambda).
    """
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    ratio = F.logsigmoid(log_odds)
    losses = chosen_nll - alpha * ratio
    extras = {"nll_loss": chosen_nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return losses, alpha * chosen_avg_logps.detach(), alpha * rejected_avg_logps.detach(), extras


def wpo_weights(chosen_aligned_avg: torch.Tensor, rejected_aligned_avg: torch.Tensor) -> torch.Tensor:
    """WPO's per-pair weight (Zhou et al. 2024, arXiv:2406.11827, eq. 2): the product of both responses' exp of
    their per-token-averaged aligned log-probs (log p - log sum_v p_v^2), detached."""
    return torch.exp(chosen_aligned_avg.detach()) * torch.exp(rejected_aligned_avg.detach())


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO per-example losses, rewards (detached), the KL baseline z0, and which rewards lie on their label's side.

    Ethayarajh et al. 2024 (arXiv:2402.01306), the KTO loss of section 4 (eq. 7 as TRL cites it): with the log-ratio
    r = log pi(y|x) - log ref(y|x) and z0 = KL(pi || ref) estimated as the mean log-ratio of mismatched (x, y')
    pairs (clamped at 0 and detached, as the paper and TRL's KTOTrainer do), a desirable y costs
    lambda_D (1 - sigmoid(beta (r - z0))) and an undesirable one lambda_U (1 - sigmoid(beta (z0 - r))).
    That is the paper's lambda_y - v(x, y). Inputs are summed response log-probs of shape [B] (the KL ones may
    have another length); desirable is a bool [B]. Rewards are beta x r, as TRL logs them.
    """
    logratios = policy_logps - ref_logps
    kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    on_side = torch.where(desirable, logratios.detach() > kl, logratios.detach() < kl)
    return losses, beta * logratios.detach(), kl, on_side


@dataclass
class PairLosses:
    """Per-pair loss (with grad), rewards (detached) and the per-pair metrics a method reports."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def preference_losses(
    terms: list[tuple[str, float]],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_alpha: float = 0.1,
    pair_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
) -> PairLosses:
    """The weighted sum of loss terms [(loss_type, weight), ...] per pair, as TRL 1.x's loss_type list sums them.

    Reference log-probs are needed only by the DPO-style terms. The sft term is the chosen response's mean
    per-token NLL (RPO, Pang et al. 2024, arXiv:2404.19733), from sft_chosen_logps when the policy's log-probs are
    LD-DPO-weighted (every token counts fully in an NLL, as in TRL). pair_weights (WPO) multiply every term.
    Rewards come from the method: beta x avg log-probs for simpo, orpo_alpha x avg log-probs for orpo,
    beta x the log-ratios otherwise.
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1)
    total = torch.zeros_like(policy_chosen_logps)
    rewards, extras = None, {}
    for loss_type, weight in terms:
        if loss_type == "sft":
            losses = -chosen_avg if sft_chosen_logps is None else -sft_chosen_logps / chosen_lengths.clamp(min=1)
        elif loss_type == "simpo":
            losses, cr, rr = simpo_loss(chosen_avg, rejected_avg, beta, simpo_gamma, label_smoothing)
            rewards = (cr, rr)
        elif loss_type == "orpo":
            losses, cr, rr, extras = orpo_loss(chosen_avg, rejected_avg, -chosen_avg, orpo_alpha)
            rewards = (cr, rr)
        else:
            losses, cr, rr = dpo_loss(
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=beta,
                loss_type=loss_type,
                label_smoothing=label_smoothing if loss_type in ("sigmoid", "robust") else 0.0,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )
            rewards = rewards or (cr, rr)
        total = total + weight * (losses if pair_weights is None else losses * pair_weights)
    if rewards is None:
        raise ValueError(f"the loss terms {terms} have no preference loss, only sft")
    return PairLosses(total, rewards[0], rewards[1], extras)
