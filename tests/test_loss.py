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


# The methods beyond DPO, on the same pair: summed log-probs (-10, -12), reference (-11, -11), and response
# lengths 4 (chosen) and 2 or 3 (rejected) where a method averages per token.
from qdpo.loss import orpo_loss, preference_losses, simpo_loss, wpo_weights  # noqa: E402

L4, L2, L3 = torch.tensor([4]), torch.tensor([2]), torch.tensor([3])


def test_sigmoid_norm_is_dpo_on_per_token_log_ratios():
    """Log-ratios +1/4 and -1/2, delta 0.75; -log sigmoid(0.1 * 0.75) = log(1 + e^-0.075) = log(1.9277434863)
    = 0.6563501408."""
    losses, rc, rr = dpo_loss(
        PC, PR, RC, RR, beta=0.1, loss_type="sigmoid_norm", chosen_lengths=L4, rejected_lengths=L2
    )
    assert losses.item() == pytest.approx(0.6563501408, abs=1e-9)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)  # TRL: rewards on summed ratios


def test_apo_zero():
    """APO-zero eq. 7: (1 - sigmoid(0.1 * 1)) + sigmoid(0.1 * -1) = 2 * 0.4750208125 = 0.9500416250."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="apo_zero")
    assert losses.item() == pytest.approx(0.9500416250, abs=1e-9)


def test_apo_down():
    """APO-down eq. 8: sigmoid(0.1 * 1) + 1 - sigmoid(0.1 * 2) = 0.5249791875 + 1 - 0.5498339973 = 0.9751451902."""
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="apo_down")
    assert losses.item() == pytest.approx(0.9751451902, abs=1e-9)


def test_simpo_uses_length_averages_and_no_reference():
    """avg_c = -10/4 = -2.5, avg_r = -12/3 = -4; beta 2, gamma 1: z = 2 * 1.5 - 1 = 2;
    -log sigmoid(2) = log(1 + e^-2) = 0.1269280110. Rewards beta * avg: -5 and -8.
    label_smoothing 0.1: 0.9 * 0.1269280110 + 0.1 * log(1 + e^2) (= 2.1269280110) = 0.3269280110."""
    losses, rc, rr = simpo_loss(PC / L4, PR / L3, beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(0.1269280110, abs=1e-9)
    assert rc.item() == pytest.approx(-5.0) and rr.item() == pytest.approx(-8.0)
    smoothed, _, _ = simpo_loss(PC / L4, PR / L3, beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.3269280110, abs=1e-9)
    via_terms = preference_losses([("simpo", 1.0)], PC, PR, L4, L3, beta=2.0, simpo_gamma=1.0)
    assert via_terms.losses.item() == pytest.approx(0.1269280110, abs=1e-9)


def test_orpo_odds_ratio_on_averaged_probabilities():
    """avg_c = -0.5: P = e^-0.5 = 0.6065306597, log odds = -0.5 - log(1 - 0.6065306597) = -0.5 + 0.9327521296
    = 0.4327521296. avg_r = -1: P = 0.3678794412, log odds = -1 + 0.4586751454 = -0.5413248546.
    Log odds ratio 0.9740769842; log sigmoid of it = -log(1 + e^-0.9740769842) = -0.3202997852.
    NLL of the chosen response = 0.5 per token; lambda 0.1: loss = 0.5 + 0.1 * 0.3202997852 = 0.5320299785.
    Rewards lambda * avg: -0.05 and -0.1."""
    avg_c, avg_r = torch.tensor([-0.5], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    losses, rc, rr, extras = orpo_loss(avg_c, avg_r, -avg_c, alpha=0.1)
    assert losses.item() == pytest.approx(0.5320299785, abs=1e-9)
    assert rc.item() == pytest.approx(-0.05) and rr.item() == pytest.approx(-0.1)
    assert extras["log_odds_chosen"].item() == pytest.approx(0.9740769842, abs=1e-9)
    assert extras["log_odds_ratio"].item() == pytest.approx(-0.3202997852, abs=1e-9)
    assert extras["nll_loss"].item() == pytest.approx(0.5)
    # The same through the term list: summed log-probs -2 over 4 tokens and -3 over 3 tokens.
    out = preference_losses([("orpo", 1.0)], avg_c * 4, avg_r * 3, L4, L3, orpo_alpha=0.1)
    assert out.losses.item() == pytest.approx(0.5320299785, abs=1e-9) and set(out.extras) == set(extras)


def test_orpo_log1mexp_is_accurate_near_zero():
    """A response the model is almost sure of: avg = -1e-10, log(1 - e^-1e-10) = log(1e-10) = -23.0258509299."""
    from qdpo.loss import log1mexp

    assert log1mexp(torch.tensor([-1e-10], dtype=torch.float64)).item() == pytest.approx(-23.0258509299, abs=1e-6)


def test_orpo_stays_finite_when_a_response_is_certain():
    """A confident model on a short response: every token's log-prob rounds to 0 in fp32, so avg = 0 exactly and
    log(1 - e^0) = -inf. The loss and its gradients stay finite: with both responses certain the odds ratio term
    is log sigmoid(0) = -log 2 (loss = NLL 0 + 0.1 log 2), and the rejected response keeps its gradient when only the
    chosen one is certain."""
    both = torch.zeros(2, requires_grad=True)
    losses, *_ = orpo_loss(both[:1], both[1:], torch.zeros(1), alpha=0.1)
    losses.sum().backward()
    assert losses.item() == pytest.approx(0.1 * math.log(2), rel=1e-6)
    assert torch.isfinite(both.grad).all()
    avg_r = torch.tensor([-1.0], requires_grad=True)
    losses, *_ = orpo_loss(torch.zeros(1), avg_r, torch.zeros(1), alpha=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(avg_r.grad).all() and avg_r.grad.item() > 0


def test_wpo_weight_multiplies_each_pair_loss():
    """Aligned averages -0.2 and -0.3: weight e^-0.2 * e^-0.3 = e^-0.5 = 0.6065306597;
    weighted DPO = 0.5981388693 * 0.6065306597 = 0.3627895630."""
    w = wpo_weights(torch.tensor([-0.2], dtype=torch.float64), torch.tensor([-0.3], dtype=torch.float64))
    assert w.item() == pytest.approx(0.6065306597, abs=1e-9)
    out = preference_losses([("sigmoid", 1.0)], PC, PR, L4, L3, RC, RR, beta=0.1, pair_weights=w)
    assert out.losses.item() == pytest.approx(0.3627895630, abs=1e-9)


def test_loss_list_sums_weighted_terms():
    """[sigmoid, sft] weights [1, 0.5]: 0.5981388693 + 0.5 * 10/4 = 1.8481388693 (the RPO term of sft_weight 0.5);
    [apo_zero, sigmoid] weights [2, 1]: 2 * 0.9500416250 + 0.5981388693 = 2.4982221193; rewards from DPO's ratios."""
    out = preference_losses([("sigmoid", 1.0), ("sft", 0.5)], PC, PR, L4, L3, RC, RR, beta=0.1)
    assert out.losses.item() == pytest.approx(1.8481388693, abs=1e-9)
    out = preference_losses([("apo_zero", 2.0), ("sigmoid", 1.0)], PC, PR, L4, L3, RC, RR, beta=0.1)
    assert out.losses.item() == pytest.approx(2.4982221193, abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)


def test_ld_dpo_weights_the_tail_past_the_shorter_response():
    """LD-DPO: chosen token log-probs -1, -2, -3, -4 and rejected -1, -1 share 2 tokens; ld_alpha 0.5 gives
    chosen -1 - 2 + 0.5 * (-3 - 4) = -6.5 and rejected -2 (no tail)."""
    from qdpo.logprobs import gathered_logps

    token_logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -1.0, -1.0], dtype=torch.float64)
    rows = torch.tensor([0, 0, 0, 0, 1, 1])
    # A head whose logits make log p(label) exactly the given numbers: label 0's logit is the log-prob,
    # label 1's fills the rest of the probability.
    logits = torch.stack([token_logps, torch.log1p(-torch.exp(token_logps))], dim=1)
    scores = gathered_logps(logits, torch.zeros(6, dtype=torch.long), rows, 2, torch.nn.Identity(), 0)
    assert scores.logps.tolist() == pytest.approx([-10.0, -2.0])
    assert scores.ld_logps(0.5).tolist() == pytest.approx([-6.5, -2.0])
    assert scores.ld_logps(None).tolist() == pytest.approx([-10.0, -2.0])
