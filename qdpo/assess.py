"""Whether a run did well: held-out accuracy with its count and confidence interval, and the closing verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Below this many held-out pairs a 95% interval around 0.5 is wider than +-0.17: a run that learned little cannot be
# told from luck. (The built-in set's 48 pairs give +-0.14.)
SMALL_EVAL = 30
CHANCE = 0.5  # a change to the policy that ignores the preference raises chosen over rejected half the time


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% at z=1.96); (0, 1) when n is 0.

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest at 0/n and n/n,
    which small eval sets hit often.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EvalAccuracy:
    """Held-out reward accuracy as a count, with its 95% interval."""

    correct: int
    pairs: int

    @property
    def value(self) -> float:
        """The accuracy itself."""
        return self.correct / self.pairs if self.pairs else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """Its 95% Wilson interval."""
        return wilson_interval(self.correct, self.pairs)

    def describe(self) -> str:
        """'0.896 (43/48, 95% CI 0.78-0.95)'."""
        low, high = self.interval
        return f"{self.value:.3f} ({self.correct}/{self.pairs}, 95% CI {low:.2f}-{high:.2f})"


def eval_accuracy(row: dict[str, Any], pairs: int) -> EvalAccuracy:
    """The accuracy count behind an eval row's mean (the mean of 0/1 values over `pairs` pairs)."""
    return EvalAccuracy(round(row["eval_rewards/accuracies"] * pairs), pairs)


# KTO has no pairs to rank: an example counts as right when its reward lies on its label's side of the KL baseline
# (above it when desirable, below when not), the line KTO's loss itself draws.
KTO_MEASURE = "examples on their label's side of the KL baseline"


def eval_line(step: int, row: dict[str, Any], pairs: int) -> str:
    """The line printed at each evaluation."""
    acc = eval_accuracy(row, pairs)
    if "eval_kl" in row:  # KTO
        return (
            f"eval at step {step}: {KTO_MEASURE} {acc.describe()}, desirable minus undesirable reward "
            f"{row.get('eval_rewards/margins', float('nan')):.3f}, kl {row['eval_kl']:.3f}, "
            f"loss {row['eval_loss']:.4f}"
        )
    return (
        f"eval at step {step}: reward accuracy {acc.describe()}, margin {row['eval_rewards/margins']:.3f}, "
        f"loss {row['eval_loss']:.4f}"
    )


def small_eval_warning(pairs: int, unit: str = "pair") -> str | None:
    """A warning when the held-out set is too small for its accuracy to mean much (unit: KTO counts examples)."""
    if pairs >= SMALL_EVAL:
        return None
    low, high = wilson_interval(pairs // 2, pairs)
    return (
        f"warning: only {pairs} held-out {unit}{'' if pairs == 1 else 's'}, so eval accuracy is uncertain by about "
        f"+-{(high - low) / 2:.2f}; "
        f"give eval_data (or raise eval_fraction) for at least {SMALL_EVAL} {unit}s to judge the run."
    )


def verdict(
    first: dict[str, Any] | None, last: dict[str, Any] | None, pairs: int, desirable_share: float | None = None
) -> str:
    """What the held-out numbers say about the run, and what a good result looks like for this data.

    desirable_share (KTO) is the share of held-out examples labelled desirable: raising (or lowering) every
    reward past the baseline scores the larger share, so that share, not 0.5, is the bar to clear.
    """
    if last is None or not pairs:
        return "no held-out pairs, so nothing says whether the run generalises; give eval_data to judge it."
    acc = eval_accuracy(last, pairs)
    low, high = acc.interval
    start = f", from {eval_accuracy(first, pairs).value:.3f} at step 0" if first is not None else ""
    if desirable_share is not None:
        bar = max(desirable_share, 1 - desirable_share)
        seen = f"held-out {KTO_MEASURE}: {acc.describe()}{start}"
        if low > bar:
            return (
                f"{seen}: the policy learned to tell desirable from undesirable answers: even the interval's low end "
                f"is above {bar:.2f}, what one-sided rewards would score."
            )
        if high < 1 - bar:
            return (
                f"{seen}: more examples sit on the wrong side of the baseline than one-sided rewards would put there; "
                "check that the labels are not inverted (true must mean desirable)."
            )
        return (
            f"{seen}: not distinguishable from one-sided rewards ({bar:.2f}) yet; a good run's interval lies wholly "
            f"above it (more steps, a higher learning_rate, or more held-out examples)."
        )
    seen = f"held-out reward accuracy {acc.describe()}{start}"
    if first is not None and first["eval_rewards/accuracies"] > 0:
        # A reference-free method's reward is the policy's own average log-prob: the base model already ranks
        # pairs with it, so the count at step 0 is the baseline, not 0, and the margin shows what tuning added.
        return (
            f"{seen}: without a reference the base model's own ranking is the baseline; the held-out margin moved "
            f"from {first['eval_rewards/margins']:.3f} to {last['eval_rewards/margins']:.3f}."
        )
    if low > CHANCE:
        return f"{seen}: the policy learned the preference: even the interval's low end is above chance (0.5)."
    if high < CHANCE:
        return (
            f"{seen}: the policy now prefers the rejected responses more often than chance; check that the chosen "
            "and rejected columns are not swapped."
        )
    return (
        f"{seen}: not distinguishable from chance (0.5) yet; a good run's interval lies wholly above 0.5 "
        "(more steps, a higher learning_rate, or more held-out pairs)."
    )
