"""Health checks on the metrics of a running DPO job: the failures users report most, named while they happen.

- The reference equals the policy although the adapter has moved (rewards stay exactly 0): the
  reference switch does nothing, so DPO has no signal. An error: nothing the run learns is real.
- Chosen log-probs fall while the margins rise: the policy pushes both responses down, a known DPO
  failure mode. A warning, with the numbers and the usual remedy (an SFT term on the chosen response).
"""

from __future__ import annotations

from typing import Any, Callable

from qdpo.errors import UserError

WINDOW = 5  # logged steps averaged at the start and at the end, so one noisy micro-batch does not trigger a warning


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


class Watch:
    """Reads each metrics row; raises for a broken reference, returns warnings to print (each at most once)."""

    def __init__(self, sft_weight: float) -> None:
        self.sft_weight = sft_weight
        self.rows: list[dict[str, Any]] = []
        self.updated = False  # an optimizer update has been applied since the start
        self.warned = False

    def see(self, row: dict[str, Any], adapter_moved: Callable[[], bool]) -> list[str]:
        """Check one step's row; adapter_moved() says whether the trainable LoRA weights differ from their start."""
        zero = row.get("rewards/chosen") == 0 and row.get("rewards/rejected") == 0
        if self.updated and zero and adapter_moved():
            raise UserError(f"at step {row['step']} the reference still equals the policy although the adapter has "
                            "moved (every reward is exactly 0): the reference pass is not switching the adapter off, "
                            "so DPO has nothing to learn from; report this with the model and run.json.")
        if not row.get("skipped"):
            self.updated = True
        if "loss" in row and row.get("loss") == row.get("loss"):  # NaN rows say nothing about the trend
            self.rows.append(row)
        return self._falling_chosen()

    def _falling_chosen(self) -> list[str]:
        if self.warned or self.sft_weight > 0 or len(self.rows) < 2 * WINDOW:
            return []
        early, recent = self.rows[:WINDOW], self.rows[-WINDOW:]
        chosen_then, chosen_now = _mean(early, "logps/chosen"), _mean(recent, "logps/chosen")
        margin_then, margin_now = _mean(early, "rewards/margins"), _mean(recent, "rewards/margins")
        if chosen_now < chosen_then - max(2.0, 0.05 * abs(chosen_then)) and margin_now > margin_then + 0.5:
            self.warned = True
            return [f"warning: logps/chosen fell from {chosen_then:.1f} to {chosen_now:.1f} while rewards/margins "
                    f"rose from {margin_then:.2f} to {margin_now:.2f}: the policy is pushing the chosen answers down "
                    "too; sft_weight=0.1 to 1 (an NLL term on the chosen response, RPO) usually stops that."]
        return []
