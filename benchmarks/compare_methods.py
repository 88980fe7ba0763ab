#!/usr/bin/env python
"""qdpo's preference losses against TRL's own code, on identical inputs: prints each loss and the difference.

    python benchmarks/compare_methods.py              # CPU, a few seconds; needs `pip install trl` (not a qdpo dependency)

One tiny random Llama is the policy and another the reference, both plain fp32 transformers models (no
4-bit, no LoRA: the comparison is of the losses, so both tools must see the same function). The same random
pairs (prompt, chosen, rejected token ids of different lengths) go through:

* qdpo: `qdpo.step.preference_loss` (its log-prob gathering, LD-DPO tails, WPO weights and loss terms), with
  the reference log-probs from `qdpo.step.score_batch` on the reference model;
* TRL: `DPOTrainer._compute_loss` (every DPOTrainer loss type qdpo has, loss lists, `ld_alpha`,
  `use_weighting`) with TRL's fused LM head on both models; `CPOTrainer.get_batch_loss_metrics` for SimPO;
  `ORPOTrainer.get_batch_loss_metrics` for ORPO; `KTOTrainer._compute_loss` for KTO, given the same
  mismatched (KL) completions qdpo pairs each example with. The trainers' methods run on a stand-in for the
  trainer object that holds only the attributes those methods read, so no Trainer (optimizer, dataloader) is
  built.

TRL averages a batch's per-pair losses; qdpo's per-pair losses are averaged the same way here. Differences
that are not float rounding are explained in the README ("differences from TRL"): ORPO's NLL (TRL counts
the prompt tokens too) is printed separately, next to the odds-ratio part that must agree.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections import defaultdict
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qdpo.batching import make_batch  # noqa: E402
from qdpo.config import build_config  # noqa: E402
from qdpo.step import preference_loss, score_batch  # noqa: E402
from qdpo.tokenize import TokenizedPair  # noqa: E402

VOCAB, PAD = 128, 0
TOLERANCE = 1e-5  # relative: float32 sums over ~20 tokens in a different order


def tiny_llama(seed: int):
    """A 2-layer random Llama in fp32, eval mode (no dropout: both tools see one deterministic function)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so log-probs spread out
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def random_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """Pairs whose chosen and rejected responses differ in length (LD-DPO then has a tail to weigh)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(1, VOCAB, (k,), generator=g).tolist()

    return [TokenizedPair(ids(3 + i % 4), ids(4 + 3 * (i % 3)), ids(9 - 2 * (i % 3))) for i in range(n)]


def trl_dpo_inputs(pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """TRL DPOTrainer's batch: prompt+completion rows, chosen rows then rejected rows, right-padded."""
    return trl_rows([(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs])


def trl_rows(rows: list[tuple[list[int], list[int]]], prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows: input ids, attention mask and completion mask (names with a prefix)."""
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[r, :n] = torch.tensor(prompt + response)
        attention[r, :n] = 1
        completion[r, len(prompt) : n] = 1
    return {
        f"{prefix}input_ids": input_ids,
        f"{prefix}attention_mask": attention,
        f"{prefix}completion_mask": completion,
    }


def trl_paired_batch(pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """CPOTrainer/ORPOTrainer's batch: chosen_/rejected_ input ids, attention masks and labels (-100 on the prompt)."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [(p.prompt_ids, getattr(p, f"{side}_ids")) for p in pairs]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), PAD)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for r, (prompt, response) in enumerate(rows):
            n = len(prompt) + len(response)
            ids[r, :n] = torch.tensor(prompt + response)
            mask[r, :n] = 1
            labels[r, len(prompt) : n] = torch.tensor(response)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def accelerator():
    """The few Accelerator methods the loss code calls, for one process on the CPU."""
    same = lambda x: x  # noqa: E731
    return types.SimpleNamespace(
        device=torch.device("cpu"), gather=same, gather_for_metrics=same, unwrap_model=same, autocast=nullcontext
    )


def trl_dpo(policy, reference, pairs, loss_types, loss_weights=None, beta=0.1, ld_alpha=None, use_weighting=False):
    """TRL DPOTrainer._compute_loss on the batch: the mean loss and its logged metrics."""
    from trl import DPOTrainer

    trainer = types.SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        ld_alpha=ld_alpha,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        beta=beta,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        use_weighting=use_weighting,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, trl_dpo_inputs(pairs), return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def trl_paired(kind: str, policy, pairs, **settings):
    """TRL's CPOTrainer (SimPO) or ORPOTrainer get_batch_loss_metrics on the batch: mean loss and metrics."""
    if kind == "cpo":
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOTrainer as Trainer
    trainer = types.SimpleNamespace(
        accelerator=accelerator(),
        is_encoder_decoder=False,
        pad_token_id=PAD,
        padding_value=PAD,
        label_pad_token_id=-100,
        aux_loss_enabled=False,
        concatenated_inputs=Trainer.concatenated_inputs,
        get_batch_logps=Trainer.get_batch_logps,
        **settings,
    )
    trainer.concatenated_forward = types.MethodType(Trainer.concatenated_forward, trainer)
    for name in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(Trainer, name):
            setattr(trainer, name, types.MethodType(getattr(Trainer, name), trainer))
    with torch.no_grad():
        loss, metrics = Trainer.get_batch_loss_metrics(trainer, policy, trl_paired_batch(pairs), train_eval="train")
    return float(loss), metrics


def trl_kto(policy, reference, examples: list[TokenizedPair], **settings):
    """TRL KTOTrainer._compute_loss on examples (completion in chosen_ids, KL completion in rejected_ids)."""
    from trl import KTOTrainer

    batch = trl_rows([(e.prompt_ids, e.chosen_ids) for e in examples])
    batch.update(trl_rows([(e.prompt_ids, e.rejected_ids) for e in examples], prefix="KL_"))
    batch["label"] = torch.tensor([e.desirable for e in examples])
    trainer = types.SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        calculate_KL=True,
        loss_type="kto",
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **settings,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(trainer, policy, batch, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def qdpo_kto(policy, reference, examples: list[TokenizedPair], overrides):
    """qdpo's KTO step on the same examples: mean loss and TRL-named metrics (Metrics, as a run logs them)."""
    from qdpo.step import Metrics

    config = build_config(None, {"logits_chunk_size": 0, "share_prompt": False, "loss_type": "kto", **overrides})
    batch = make_batch(examples, PAD, "plain")
    desirable = torch.tensor([e.desirable for e in examples])
    metrics = Metrics()
    with torch.no_grad():
        ref = score_batch(reference, batch, 0).logps
        losses, rewards, _, scores = preference_loss(policy, batch, config, ref, desirable)
        metrics.add(losses, rewards, None, scores, VOCAB, desirable)
    return float(losses.mean()), metrics.means()


def qdpo_loss(policy, reference, pairs, overrides):
    """qdpo's step on the same batch (plain layout, full logits): mean loss and per-pair-mean metrics."""
    config = build_config(None, {"logits_chunk_size": 0, "share_prompt": False, **overrides})
    batch = make_batch(pairs, PAD, "plain")
    with torch.no_grad():
        ref = score_batch(reference, batch, 0).ld_logps(config.ld_alpha) if config.needs_reference else None
        losses, chosen, rejected, scores = preference_loss(policy, batch, config, ref)
    metrics = {k: float(v.mean()) for k, v in scores.extras.items()}
    metrics["rewards/chosen"] = float(chosen.mean())
    metrics["rewards/margins"] = float((chosen - rejected).mean())
    return float(losses.mean()), metrics


def main() -> None:
    """Print one row per method: qdpo's loss, TRL's, the difference, and whether it is within tolerance."""
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = tiny_llama(0), tiny_llama(1)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    add_fused_lm_head(policy, outputs=outputs)
    add_fused_lm_head(reference, outputs=outputs)  # KTO swaps the two models' roles
    pairs = random_pairs(6, seed=2)
    rows = []
    dpo_cases = [
        ("sigmoid", {"loss_type": "sigmoid"}, dict(loss_types=["sigmoid"])),
        ("ipo", {"loss_type": "ipo"}, dict(loss_types=["ipo"])),
        ("hinge", {"loss_type": "hinge"}, dict(loss_types=["hinge"])),
        ("robust (eps 0)", {"loss_type": "robust"}, dict(loss_types=["robust"])),
        ("sigmoid_norm", {"loss_type": "sigmoid_norm"}, dict(loss_types=["sigmoid_norm"])),
        ("apo_zero", {"loss_type": "apo_zero"}, dict(loss_types=["apo_zero"])),
        ("apo_down", {"loss_type": "apo_down"}, dict(loss_types=["apo_down"])),
        ("sigmoid ld_alpha=0.5", {"ld_alpha": 0.5}, dict(loss_types=["sigmoid"], ld_alpha=0.5)),
        ("sigmoid use_weighting", {"use_weighting": True}, dict(loss_types=["sigmoid"], use_weighting=True)),
        (
            "[apo_zero, sigmoid_norm] [0.7, 0.3]",
            {"loss_type": ["apo_zero", "sigmoid_norm"], "loss_weights": [0.7, 0.3]},
            dict(loss_types=["apo_zero", "sigmoid_norm"], loss_weights=[0.7, 0.3]),
        ),
        (
            "[sigmoid, sft] [1, 0.5]",
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
            dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        ),
    ]
    for name, ours, theirs in dpo_cases:
        q, _ = qdpo_loss(policy, reference, pairs, ours)
        t, _ = trl_dpo(policy, reference, pairs, **theirs)
        # TRL's sft term is a token mean over the whole batch, qdpo's the mean of each pair's token mean.
        rows.append((name, q, t, "sft: mean of per-pair token means (qdpo) vs batch token mean (TRL)"))

    q, qm = qdpo_loss(policy, reference, pairs, {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0})
    t, tm = trl_paired("cpo", policy, pairs, loss_type="simpo", beta=2.0, simpo_gamma=1.0, label_smoothing=0.0,
                       cpo_alpha=0.0, alpha=0.0)  # fmt: skip
    rows.append(("simpo (CPOTrainer)", q, t, ""))
    rows.append(("simpo rewards/chosen", qm["rewards/chosen"], tm["rewards/chosen"], ""))

    q, qm = qdpo_loss(policy, reference, pairs, {"loss_type": "orpo", "orpo_alpha": 0.1})
    t, tm = trl_paired("orpo", policy, pairs, beta=0.1)
    rows.append(("orpo (ORPOTrainer) whole loss", q, t, "NLL: qdpo response only, TRL prompt + response"))
    rows.append(("orpo nll_loss", qm["nll_loss"], tm["nll_loss"], "same NLL difference"))
    rows.append(("orpo odds-ratio part", q - qm["nll_loss"], t - tm["nll_loss"], ""))
    rows.append(("orpo log_odds_ratio", qm["log_odds_ratio"], tm["log_odds_ratio"], ""))
    rows.append(("orpo log_odds_chosen", qm["log_odds_chosen"], tm["log_odds_chosen"], ""))
    rows.append(("orpo rewards/chosen", qm["rewards/chosen"], tm["rewards/chosen"], ""))

    # KTO: the pairs' chosen answers are the completions, their rejected answers the KL completions (answers to
    # other prompts in qdpo's runs; any completion serves to compare the arithmetic), labels alternating.
    examples = [dataclasses.replace(p, desirable=i % 3 != 1) for i, p in enumerate(pairs)]
    # The two random models swap roles here: this way round the KL samples' mean log-ratio is positive, so z0 is
    # not clamped to 0 and really enters both losses.
    settings = {"beta": 0.5, "desirable_weight": 1.2, "undesirable_weight": 0.8}
    q, qm = qdpo_kto(reference, policy, examples, settings)
    t, tm = trl_kto(reference, policy, examples, **settings)
    rows.append(("kto (KTOTrainer)", q, t, ""))
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        rows.append((f"kto {name}", qm[name], tm[name], ""))

    print(f"{'method':<38} {'qdpo':>12} {'TRL':>12} {'rel. diff':>10}  verdict")
    for name, q, t, why in rows:
        diff = abs(q - t) / max(abs(t), 1e-30)
        verdict = "same (float rounding)" if diff <= TOLERANCE else f"differs: {why or 'UNEXPLAINED'}"
        print(f"{name:<38} {q:>12.6g} {t:>12.6g} {diff:>10.2e}  {verdict}")


if __name__ == "__main__":
    main()
