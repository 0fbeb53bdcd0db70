"""What an RLVR or OPSD stage spent on generation, and the rollout-token budget that may end it.

**Rollout tokens** are the response tokens generated for training (TRL's completion ids, the EOS
included, as `completions/mean_length` counts them), summed over all processes and every generation
round: the OPSD refill rounds and RLVR's dynamic-sampling rounds count, and so do the rollouts a gate
or dynamic sampling then drops. That is what the stage paid for. Prompts are not counted (TRL's own
`num_tokens` adds them), nor is generation outside training: held-out checks, the `length_rl` target's
measurement before the first step, evaluations. The trainers keep the running total
(`rlvr.RolloutTokens`) and write it into every checkpoint (`ROLLOUT_TOKENS_FILE`), so that a resumed
stage counts from where its checkpoint was.

**The budget** (`max_rollout_tokens` of the RLVR and OPSD stage configs; null: none) ends training
after the optimizer step at which the total reaches it (`RolloutBudget`): that step is the stage's last
(saved, and checked when the stage has held-out checks), and `max_steps` stays the upper bound. A
rerun whose checkpoint has spent the budget trains nothing more (`progress.train_stage`). So arms of
different methods, whose steps cost different generation (dynamic sampling's extra rounds, refills,
shorter responses), can be compared at equal generation.

Every stage writes `ROLLOUT_TOKENS_FILE` into its folder when it ends (`write_stage_tokens`): the
tokens spent, the optimizer steps taken, the budget and `max_steps`, and what ended it (`ENDINGS`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from opsdlab.modeling.runtime import is_main_process

# In every checkpoint ({"rollout_tokens": N}) and in the stage folder once it ends (`write_stage_tokens`).
ROLLOUT_TOKENS_FILE = "rollout_tokens.json"

# What ended a stage, as its record names it -> how its done line says it (None: nothing to add).
ENDINGS = {
    "budget": "ended at the rollout-token budget",
    "max_steps": None,
    "stopped": None,  # a held-out check's stopping rule (`checks.STOP_RULES`)
}


def save_checkpoint_tokens(folder: str | Path, tokens: int) -> None:
    """Write the running total into a checkpoint folder (before the Trainer's files: see `rlvr.RolloutTokens`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ROLLOUT_TOKENS_FILE).write_text(json.dumps({"rollout_tokens": int(tokens)}) + "\n")


def checkpoint_tokens(folder: str | Path) -> int | None:
    """The running total a checkpoint holds; None for a checkpoint written before it was kept."""
    path = Path(folder) / ROLLOUT_TOKENS_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["rollout_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable rollout-token count ({err}); remove the checkpoint to train its "
                         "steps again") from err


def reached(tokens: int | None, budget: int | None) -> bool:
    """Whether `tokens` spent reach the rollout-token `budget` (never without a budget)."""
    return budget is not None and tokens is not None and tokens >= budget


class RolloutBudget(TrainerCallback):
    """Ends training after the optimizer step at which the trainer's `rollout_tokens` reach `budget`.

    That step becomes the stage's last: the state's `max_steps` is set to it, so that the callbacks
    after this one (held-out checks check and save their stage's last step) and the Trainer's save
    treat it as the last step, as at `max_steps`. The trainers add it before any other stage callback
    (`rlvr.RolloutTokens`).
    """

    def __init__(self, trainer, budget: int | None):
        self.trainer = trainer
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):
        if reached(self.trainer.rollout_tokens, self.budget):
            state.max_steps = state.global_step
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"


def ending(tokens: int, steps: int, budget: int | None, max_steps: int) -> str:
    """What ended a stage (`ENDINGS`): the budget once reached, else max_steps, else a stopping rule."""
    if reached(tokens, budget):
        return "budget"
    return "max_steps" if steps >= max_steps else "stopped"


def write_stage_tokens(trainer, stage_dir: str | Path) -> dict | None:
    """Write the stage's `ROLLOUT_TOKENS_FILE` from a trainer that has trained or resumed (main process);
    nothing for a trainer that generates no rollouts (SFT) or took no step. Returns the record."""
    tokens = getattr(trainer, "rollout_tokens", None)
    steps = trainer.state.global_step
    if tokens is None or not steps:
        return None
    budget, max_steps = trainer.max_rollout_tokens, trainer.args.max_steps
    record = {"rollout_tokens": int(tokens), "steps": steps, "max_rollout_tokens": budget, "max_steps": max_steps,
              "ended": ending(tokens, steps, budget, max_steps)}
    if is_main_process():
        Path(stage_dir).mkdir(parents=True, exist_ok=True)
        (Path(stage_dir) / ROLLOUT_TOKENS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_stage_tokens(stage_dir: str | Path) -> dict | None:
    """A stage's `write_stage_tokens` record; None when it has none (an SFT stage, a run from before it was kept)."""
    try:
        return json.loads((Path(stage_dir) / ROLLOUT_TOKENS_FILE).read_text())
    except (OSError, ValueError):
        return None


def budget_note(record: dict | None) -> str | None:
    """The clause a stage's done line adds when the budget ended it: `ended at the rollout-token budget:
    27,012 rollout tokens (budget 26,880) at step 19 of at most 60`; None otherwise."""
    if record is None or ENDINGS.get(record.get("ended")) is None:
        return None
    return (f"{ENDINGS[record['ended']]}: {record['rollout_tokens']:,} rollout tokens (budget "
            f"{record['max_rollout_tokens']:,}) at step {record['steps']} of at most {record['max_steps']}")
