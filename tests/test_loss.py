"""dpo_loss against numbers worked out by hand (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from qdpo import dpo_loss

# One pair: policy log-probs (-10, -12), reference (-11, -11).
# chosen log-ratio = +1, rejected log-ratio = -1, delta = 2; with beta = 0.1, beta*delta = 0.2.
PC, PR, RC, RR = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.0))
SOFTPLUS_M02 = math.log(1 + math.exp(-0.2))  # -log sigmoid(0.2) = 0.598138869...
SOFTPLUS_P02 = math.log(1 + math.exp(0.2))  # -log sigmoid(-0.2) = 0.798138869...


def test_sigmoid_matches_hand_value_and_rewards():
    """-log sigmoid(0.2) = log(1 + e^-0.2) = 0.5981388693; rewards 0.1*(+1) and 0.1*(-1)."""
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(0.5981388693, abs=1e-9)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_rewards_sign_follows_the_policy_moving():
    """The policy raising the chosen response gives a positive chosen reward and lowers the loss below log 2."""
    losses, rc, rr = dpo_loss(
        torch.tensor([-5.0]), torch.tensor([-20.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.5
    )
    assert rc.item() == pytest.approx(2.5) and rr.item() == pytest.approx(-5.0)
    assert losses.item() < math.log(2)
    worse, _, _ = dpo_loss(
        torch.tensor([-20.0]), torch.tensor([-5.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.5
    )
    assert worse.item() > math.log(2)


def test_equal_policy_and_reference_is_log2():
    """delta = 0: -log sigmoid(0) = log 2, rewards 0."""
    x = torch.tensor([-3.0, -7.5])
    losses, rc, rr = dpo_loss(x, x.flip(0), x, x.flip(0), beta=0.3)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_conservative_dpo_label_smoothing():
    """eps = 0.1: 0.9*0.5981388693 + 0.1*0.7981388693 = 0.6181388693."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * SOFTPLUS_M02 + 0.1 * SOFTPLUS_P02, abs=1e-12)
    assert losses.item() == pytest.approx(0.6181388693, abs=1e-9)


def test_robust():
    """rDPO eps = 0.1: (0.9*0.5981388693 - 0.1*0.7981388693) / 0.8 = 0.5731388693."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.5731388693, abs=1e-9)
    plain, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust")
    assert plain.item() == pytest.approx(SOFTPLUS_M02)  # eps = 0 is plain DPO


def test_hinge():
    """SLiC: relu(1 - 0.2) = 0.8; and 0 once beta*delta passes 1."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(0.8)
    zero, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    assert zero.item() == 0.0


def test_ipo_uses_per_token_averages():
    """Lengths 4 and 2: log-ratios 1/4 and -1/2, delta 0.75; (0.75 - 1/(2*0.1))^2 = (0.75 - 5)^2 = 18.0625.

    Rewards stay beta x the summed log-ratios (1 and -1), as TRL 1.x logs them for IPO too.
    """
    lengths_c, lengths_r = torch.tensor([4]), torch.tensor([2])
    losses, rc, rr = dpo_loss(
        PC, PR, RC, RR, beta=0.1, loss_type="ipo", chosen_lengths=lengths_c, rejected_lengths=lengths_r
    )
    assert losses.item() == pytest.approx(18.0625)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo")


def test_sft_term_adds_chosen_nll_per_token():
    """sft_weight 0.5, chosen log-prob -10 over 4 tokens: 0.5981388693 + 0.5 * 10/4 = 1.8481388693."""
    losses, _, _ = dpo_loss(
        PC, PR, RC, RR, beta=0.1, sft_weight=0.5, chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([3])
    )
    assert losses.item() == pytest.approx(1.8481388693, abs=1e-9)


def test_rewards_are_detached_and_loss_has_grad():
    """Gradients flow to the policy log-probs through the loss, never through the rewards."""
    pc = torch.tensor([-10.0], requires_grad=True)
    losses, rc, rr = dpo_loss(pc, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    assert not rc.requires_grad and not rr.requires_grad
    losses.sum().backward()
    # d/dx -log sigmoid(beta*(x - c)) = -beta * sigmoid(-beta*delta) = -0.1 * sigmoid(-0.2)
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))


def test_batch_is_elementwise():
    """Each pair's loss depends only on its own log-probs."""
    a = dpo_loss(PC, PR, RC, RR)[0]
    batch = dpo_loss(torch.cat([PC, RC]), torch.cat([PR, RR]), torch.cat([RC, RC]), torch.cat([RR, RR]))[0]
    assert batch[0].item() == pytest.approx(a.item()) and batch[1].item() == pytest.approx(math.log(2))
