"""What goes wrong in a running DPO job, named while it happens, with what to do about it.

- Out of GPU memory at a step, or NaN/Inf steps in a row: the message says what the planner fits or what
  the likely causes are, and how to go on.
- The reference equals the policy although the adapter has moved (rewards stay exactly 0): the
  reference switch does nothing, so DPO has no signal. An error: nothing the run learns is real.
- Chosen log-probs fall while the margins rise: the policy pushes both responses down, a known DPO
  failure mode. A warning, with the numbers and the usual remedy (an SFT term on the chosen response).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from qdpo.config import Config
from qdpo.errors import UserError
from qdpo.rundir import resume_command

WINDOW = 5  # logged steps averaged at the start and at the end, so one noisy micro-batch does not trigger a warning


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


class Watch:
    """Reads each metrics row; raises for a broken reference, returns warnings to print (each at most once)."""

    def __init__(self, sft_weight: float, paired: bool = True) -> None:
        self.sft_weight = sft_weight
        self.paired = paired  # KTO's chosen/rejected are two groups of examples, and it takes no sft term
        self.rows: list[dict[str, Any]] = []
        self.updated = False  # an optimizer update has been applied since the start
        self.warned = False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run warns when and as the uninterrupted one would: the trend's
        first and last WINDOW rows (all it reads), and whether it has updated and warned."""
        rows = self.rows if len(self.rows) <= 2 * WINDOW else self.rows[:WINDOW] + self.rows[-WINDOW:]
        return {"rows": list(rows), "updated": self.updated, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what state_dict() kept."""
        self.rows, self.updated, self.warned = list(state["rows"]), state["updated"], state["warned"]

    def see(self, row: dict[str, Any], adapter_moved: Callable[[], bool]) -> list[str]:
        """Check one step's row; adapter_moved() says whether the trainable LoRA weights differ from their start."""
        zero = row.get("rewards/chosen") == 0 and row.get("rewards/rejected") == 0
        if self.updated and zero and adapter_moved():
            raise UserError(
                f"at step {row['step']} the reference still equals the policy although the adapter has "
                "moved (every reward is exactly 0): the reference pass is not switching the adapter off, "
                "so DPO has nothing to learn from; report this with the model and run.json."
            )
        if not row.get("skipped"):
            self.updated = True
        if "loss" in row and row.get("loss") == row.get("loss"):  # NaN rows say nothing about the trend
            self.rows.append(row)
        return self._falling_chosen()

    def _falling_chosen(self) -> list[str]:
        if self.warned or self.sft_weight > 0 or not self.paired or len(self.rows) < 2 * WINDOW:
            return []
        early, recent = self.rows[:WINDOW], self.rows[-WINDOW:]
        chosen_then, chosen_now = _mean(early, "logps/chosen"), _mean(recent, "logps/chosen")
        margin_then, margin_now = _mean(early, "rewards/margins"), _mean(recent, "rewards/margins")
        if chosen_now < chosen_then - max(2.0, 0.05 * abs(chosen_then)) and margin_now > margin_then + 0.5:
            self.warned = True
            return [
                f"warning: logps/chosen fell from {chosen_then:.1f} to {chosen_now:.1f} while rewards/margins "
                f"rose from {margin_then:.2f} to {margin_now:.2f}: the policy is pushing the chosen answers down "
                "too; an NLL term on the chosen response (RPO: loss_type=[sigmoid,sft] loss_weights=[1,0.5]) "
                "usually stops that (in a new run: it changes what every step computes)."
            ]
        return []


def caused_by_out_of_memory(error: BaseException) -> bool:
    """Whether an error is qdpo's message for CUDA running out of memory (raised while handling one)."""
    return isinstance(error.__context__, torch.cuda.OutOfMemoryError)


def out_of_memory(
    config: Config, out: Path, step: int, saved: Path | None, during: str = "", processes: int = 1
) -> UserError:
    """The message for CUDA running out of memory at a step: what fits by the planner, and how to resume with it.

    With several processes no checkpoint is written (it needs every rank, and the others wait inside the step).
    """
    if processes > 1:
        where = "the run keeps its last checkpoint (a new one needs every process, and the others were mid-step)"
    elif during:
        where = f"step {step} itself finished and is checkpointed in {saved}"
    else:
        where = f"the state before it is checkpointed in {saved}" if saved else "nothing was checkpointed yet"
    pairs = config.micro_batch_size * config.gradient_accumulation_steps
    try:
        from qdpo.plan import largest_fit, model_config

        budget = torch.cuda.get_device_properties(0).total_memory / 1e9
        fit_batch, fit_length = largest_fit(model_config(config.model)[0], config, budget, processes=processes)
    except Exception:  # no config.json offline, an unknown shape: advise without the planner
        fit_batch, fit_length = 0, 0
    resume = resume_command(out, processes)
    if config.micro_batch_size > 1:  # fewer pairs per forward, as many per step: the resume allows that
        most = fit_batch if 0 < fit_batch < config.micro_batch_size else config.micro_batch_size - 1
        batch = max(b for b in range(1, most + 1) if pairs % b == 0)
        why = f"the planner fits micro_batch_size={fit_batch}" if 0 < fit_batch < config.micro_batch_size else "try"
        advice = f"{why}: {resume} micro_batch_size={batch} gradient_accumulation_steps={pairs // batch}"
    elif not config.gradient_checkpointing or not config.offload_activations:
        switch = "gradient_checkpointing=true" if not config.gradient_checkpointing else "offload_activations=true"
        advice = f"one pair per forward already: {resume} {switch}"
    else:
        advice = "one pair per forward already, checkpointed and offloaded: start a new run with a lower max_length"
    if fit_length and fit_length < config.max_length:
        advice += f" (the planner fits max_length={fit_length} at one pair per forward)"
    return UserError(
        f"out of GPU memory at step {step}{' during ' + during if during else ''} "
        f"(micro_batch_size={config.micro_batch_size}, max_length={config.max_length}); {where}; {advice}."
    )


def not_finite(rows: list[dict[str, Any]], config: Config, saved: Path, origins: list[str]) -> UserError:
    """The message that stops a run whose loss or gradients stay NaN/Inf: the likely causes and the pairs involved.

    origins[i] says where training pair i came from ("prefs.jsonl row 12"), so the user can find it.
    """
    steps = f"steps {rows[0]['step']}-{rows[-1]['step']}"
    pairs = sorted({i for row in rows for i in row["pairs"]})
    shown = "; ".join(origins[i] or f"training pair {i}" for i in pairs[:8]) + ("; ..." if len(pairs) > 8 else "")
    return UserError(
        f"the loss or gradients were NaN/Inf for {len(rows)} steps in a row ({steps}; no update was "
        f"applied); likely causes: learning_rate {config.learning_rate:g} too high, fp16 overflow "
        f"(compute_dtype=float16), or a broken pair among these: {shown}; the adapter before "
        f"them is in {saved / 'adapter'}."
    )
