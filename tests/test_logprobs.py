"""Sequence log-probs against a direct full-vocabulary log_softmax in float64."""

import torch

from qdpo.batching import collate
from qdpo.logprobs import sequence_logps
from qdpo.tokenize import TokenizedPair


def direct_logps(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Loop over positions: log_softmax(logits[t-1]) at input_ids[t] for every response token t."""
    out = []
    for row in range(input_ids.shape[0]):
        total = 0.0
        for t in range(1, input_ids.shape[1]):
            if mask[row, t]:
                total += torch.log_softmax(logits[row, t - 1].double(), dim=-1)[input_ids[row, t]].item()
        out.append(total)
    return out


def test_random_logits_match_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 1:5] = True
    mask[2, 6] = True
    scores = sequence_logps(logits, ids, mask)
    assert torch.allclose(
        scores.logps.double(), torch.tensor(direct_logps(logits, ids, mask), dtype=torch.float64), atol=1e-4
    )
    assert scores.lengths.tolist() == [4, 4, 1]


def test_tiny_model_scores_only_response_tokens(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = [TokenizedPair([1, 5, 6, 7], [8, 9, 2], [10, 2]), TokenizedPair([1, 11], [12, 13, 14, 2], [15, 16, 2])]
    batch = collate(pairs, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    scores = sequence_logps(logits, batch.input_ids, batch.response_mask)
    expected = direct_logps(logits, batch.input_ids, batch.response_mask)
    assert torch.allclose(scores.logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    # chosen rows first, then rejected; lengths count response tokens only (EOS included)
    assert scores.lengths.tolist() == [3, 4, 2, 3]
    # padding after a short sequence must not change its score: score row 3 alone
    alone = collate([pairs[1]], pad_id=0)
    with torch.no_grad():
        single = model(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits
    assert torch.allclose(
        sequence_logps(single, alone.input_ids, alone.response_mask).logps[1], scores.logps[3], atol=1e-4
    )


def test_score_batch_with_response_only_logits_matches_full_logits(tiny_model_dir):
    """score_batch computes logits only from the first response position on; the sums must not change."""
    from transformers import AutoModelForCausalLM

    from qdpo.step import score_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = [
        TokenizedPair([1, 5, 6, 7, 8, 9], [8, 9, 2], [10, 2]),
        TokenizedPair([1, 11, 12], [12, 13, 14, 2], [15, 16, 2]),
    ]
    batch = collate(pairs, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        scores = score_batch(model, batch)
    expected = torch.tensor(direct_logps(logits, batch.input_ids, batch.response_mask), dtype=torch.float64)
    assert torch.allclose(scores.logps.double(), expected, atol=1e-4)
