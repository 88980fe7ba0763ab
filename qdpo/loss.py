"""The preference losses: a pure function of sequence log-probabilities.

Formulas match TRL's DPOTrainer so numbers compare; each cites its paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdpo.config import LOSS_TYPES


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

    Inputs are summed response log-probs, shape [B]. `ipo` and `sft_weight > 0` also need the
    response lengths in tokens (`chosen_lengths`, `rejected_lengths`): IPO works on per-token
    averages and the SFT term is the chosen response's mean per-token NLL.
    Rewards are beta x (policy - reference) log-ratios of the summed log-probs, for every loss type
    (as TRL 1.x logs them, IPO included).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    needs_lengths = loss_type == "ipo" or sft_weight > 0
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type='ipo' and sft_weight > 0 need chosen_lengths and rejected_lengths")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "ipo":
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
