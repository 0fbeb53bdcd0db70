"""What every training stage shares: precision and device settings, batch split, metrics JSONL, checkpoints.

Stages hand TRL trainers the same `common_training_args`, so a stage runs on a laptop CPU
(float32, `use_cpu`) and on GPUs (bf16 where supported) without code changes, writes its
metrics to `metrics.jsonl` in its stage folder, and resumes from its last checkpoint. A stage's
batch size counts rows per optimizer step over all processes and accumulation steps;
`per_device_rows` turns it into the per-device micro-batch that the Trainer takes, for the number
of processes of the launch (`launch_processes`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def precision_kwargs() -> dict:
    """bf16 on GPUs that support it, float32 on CPU (TRL's bf16 default fails on CPU)."""
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "fp16": False, "use_cpu": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


def launch_processes() -> int:
    """How many training processes this launch runs (1 without a distributed launcher).

    Read without initialising anything: the size of an existing process group, else the variable
    that torchrun, `accelerate launch` and deepspeed set (WORLD_SIZE) or that MPI launchers set.
    `check_world_size` compares it with the Trainer's own count once the arguments exist.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "").strip()
        if value:
            return int(value)
    return 1


def per_device_rows(stage: str, rows: int, what: str, num_processes: int, accumulation_steps: int) -> int:
    """Rows per device per micro-batch, for `rows` rows per optimizer step over all processes and micro-batches.

    `what` says how `rows` is made (e.g. "batch_size (32)"); an uneven split is an error naming the values.
    """
    share = num_processes * accumulation_steps
    if rows % share:
        raise ValueError(
            f"{stage}: {what} = {rows} rows per optimizer step do not split evenly over {num_processes} "
            f"process(es) x gradient_accumulation_steps {accumulation_steps} (= {share} micro-batches); "
            f"make it a multiple of {share}"
        )
    return rows // share


def check_world_size(args, num_processes: int, stage: str) -> None:
    """Raise if the Trainer's arguments see another number of processes than the batch was split for."""
    if args.world_size != num_processes:
        raise RuntimeError(
            f"{stage}: the batch was split for {num_processes} process(es) (launch environment), but the "
            f"trainer runs on {args.world_size}; launch with torchrun or `accelerate launch`, which set WORLD_SIZE"
        )


def common_training_args(stage_dir: Path, *, seed: int, save_steps: int, logging_steps: int,
                         report_to: str | list[str] = "none", save_total_limit: int = 2) -> dict:
    """TrainingArguments fields every stage sets the same way."""
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        seed=seed,
        data_seed=seed,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        logging_steps=logging_steps,
        report_to=report_to,
        disable_tqdm=False,
        dataloader_num_workers=0,
        **precision_kwargs(),
    )


def resume_point(stage_dir: Path) -> str | None:
    """The last complete checkpoint a killed run of this stage left behind, if any.

    A run killed while saving leaves a checkpoint folder without its trainer_state.json (the
    Trainer writes it last); such a folder cannot be resumed from and is removed.
    """
    checkpoints = Path(stage_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return None
    for folder in sorted(checkpoints.glob("checkpoint-*"), key=_step_of, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            print(f"removing incomplete checkpoint {folder} (the run was stopped while saving it)")
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _step_of(folder: Path) -> int:
    suffix = folder.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


class JsonlMetrics(TrainerCallback):
    """Append every logged dict (with step and wall time) to a JSONL file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "time_s": round(time.time() - self.start, 2)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool))})
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
