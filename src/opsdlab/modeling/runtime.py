"""What every training stage shares: precision and device settings, batch split, metrics JSONL, checkpoints.

Stages hand TRL trainers the same `common_training_args`, so a stage runs on a laptop CPU
(float32, `use_cpu`) and on GPUs (bf16 where supported) without code changes, writes its
metrics to `metrics.jsonl` in its stage folder, and resumes from its last checkpoint. A stage's
batch size counts rows per optimizer step over all processes and accumulation steps;
`config.ranges.per_device_rows` turns it into the per-device micro-batch that the Trainer takes, for the number
of processes of the launch (`launch_processes`).

Under a multi-process launch (`accelerate launch`, torchrun) every process runs the same code; the
helpers at the end coordinate them through accelerate's `PartialState`: the main process alone
writes shared files (`is_main_process`), decisions that read files are taken on the main process and
broadcast (`main_decides`), and work that splits by item, such as evaluation, runs on one share per
process and is gathered (`shard_and_gather`). Without a launcher they reduce to plain calls.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers import TrainerCallback

T = TypeVar("T")
R = TypeVar("R")


def precision_kwargs() -> dict:
    """bf16 on GPUs that support it, float32 on CPU (TRL's bf16 default fails on CPU)."""
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "fp16": False, "use_cpu": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


def vanishing_update_fraction(parameters, step: float, per_tensor: int = 1 << 20) -> float:
    """Fraction of the elements of `parameters` that a change of `step` leaves exactly as they are.

    Computed in each tensor's own dtype, as the optimizer writes it: in bfloat16 (8 significant
    bits) a weight of magnitude 0.02 has a spacing of about 1.2e-4, so an AdamW step of size 1e-6
    rounds back to the same number. Zeros always move. A tensor of more than `per_tensor` elements
    is read at an even stride (a billion-parameter model is checked in seconds) and weighs by its size.
    """
    unchanged = total = 0.0
    for parameter in parameters:
        flat = parameter.detach().reshape(-1)
        if flat.numel() == 0 or flat.is_meta:  # meta: not loaded on this rank (FSDP's RAM-efficient loading)
            continue
        values = flat[::max(1, flat.numel() // per_tensor)]
        unchanged += float(((values + step) == values).sum()) / values.numel() * flat.numel()
        total += flat.numel()
    return unchanged / total if total else 0.0


def warn_if_updates_vanish(trainer, stage: str, threshold: float = 0.25) -> float | None:
    """Warn when most trainable weights are too coarse (bf16/fp16) for a step of the learning rate.

    An AdamW step moves a weight by about the learning rate at most; with low-precision weights and
    no float32 master copy (one process, DDP, FSDP) that step is lost wherever it is below half the
    spacing of the weight's dtype. DeepSpeed keeps float32 master weights, so it is not checked.
    Returns the fraction checked (None when nothing was), and warns on the main process above
    `threshold`.
    """
    if getattr(trainer, "is_deepspeed_enabled", False):
        return None
    coarse = [p for p in trainer.model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not coarse:
        return None
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    learning_rate = trainer.args.learning_rate
    fraction = vanishing_update_fraction(coarse, learning_rate) * sum(p.numel() for p in coarse) / trainable
    if fraction >= threshold and is_main_process():
        print(f"WARNING: {stage}: a step of the learning rate ({learning_rate:g}) leaves {fraction:.0%} of the "
              f"trainable weights unchanged: they are {coarse[0].dtype} numbers too coarse for it, so the "
              "optimizer barely moves them. Load the weights in float32 (--dtype float32, model.dtype: float32; "
              "on a GPU training still runs in bf16 mixed precision) or train under DeepSpeed (float32 master "
              "weights).", file=sys.stderr, flush=True)
    return fraction


def peak_memory_mb() -> dict:
    """This process's peak memory so far, in MiB: resident host memory (`peak_rss_mb`, where the OS
    reports it) and, once CUDA is in use, the most the caching allocator held on this process's GPU
    (`peak_cuda_mb`). A worker process of `workers: N` starts fresh, so its figure is its step's."""
    peaks = {}
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peaks["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
    except ImportError:  # Windows
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return peaks


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


class LaunchError(RuntimeError):
    """The processes that run do not match the launch the batches were split for."""


def check_world_size(args, num_processes: int, stage: str) -> None:
    """Raise a LaunchError if the Trainer's arguments see another number of processes than the batch was split for."""
    if args.world_size != num_processes:
        raise LaunchError(
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
    Trainer writes it last); such a folder cannot be resumed from and is removed. Under several
    processes the main process looks (and removes) and every process gets its answer, so that all
    resume from the same step.
    """
    return main_decides(lambda: _last_complete_checkpoint(stage_dir))


def _last_complete_checkpoint(stage_dir: Path) -> str | None:
    checkpoints = Path(stage_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return None
    for folder in sorted(checkpoints.glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            print(f"removing incomplete checkpoint {folder} (the run was stopped while saving it)")
            shutil.rmtree(folder, ignore_errors=True)
    return None


def untied_missing_keys(model, missing: list[str]) -> list[str]:
    """The keys of `missing` that no tied weight of `model` accounts for.

    A model with tied embeddings holds its LM head and its input embedding as one tensor, which a
    checkpoint stores once, under the embedding's name: loading it reports the head's key
    (`lm_head.weight`) missing, although the head was loaded with the embedding.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return [key for key in missing if key not in tied]


def warn_only_untied_missing_keys(trainer) -> None:
    """Make the Trainer's checkpoint loads (a resume, a held-out check's selection) warn only about
    missing keys that no tied weight accounts for (`untied_missing_keys`).

    transformers' `Trainer._issue_warnings_after_load` excuses only the model's `_keys_to_ignore_on_save`,
    which models with tied embeddings leave unset, so every resume warned `missing keys ['lm_head.weight']`.
    Any other missing key is still warned about, by the Trainer's own warning.
    """
    issue = trainer._issue_warnings_after_load

    def issue_untied(load_result):
        issue(load_result._replace(missing_keys=untied_missing_keys(trainer.model, load_result.missing_keys)))

    trainer._issue_warnings_after_load = issue_untied


def checkpoint_step(folder: Path) -> int:
    """The step of a `checkpoint-N` folder (-1 for a name without one)."""
    suffix = folder.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


class JsonlMetrics(TrainerCallback):
    """Append every logged dict (with step and wall time) to a JSONL file, the final train summary
    (train_runtime, train_loss, ...) included. This file, not stdout, is where a stage's logged
    numbers go (`progress.StageProgress` shows a few of them on a bar)."""

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


# In a stage folder: how many optimizer steps the stage took and how many it skipped (an OPSD step
# whose gate kept no rollout updates nothing), written when it finishes.
UPDATES = "updates.json"


class NothingTrained(ValueError):
    """A stage whose every optimizer step was skipped: its settings train nothing on this model."""


def write_updates(stage_dir: Path, steps: int, skipped: int, why: str) -> None:
    """Record a stage's optimizer steps and skipped steps (`why`: what made a step skip), main process only."""
    if is_main_process():
        record = {"steps": steps, "skipped_steps": skipped, "skipped_why": why}
        (Path(stage_dir) / UPDATES).write_text(json.dumps(record, indent=1) + "\n")


def read_updates(stage_dir: Path) -> dict | None:
    """A stage's `write_updates` record; None when it wrote none (a stage that skips no step)."""
    try:
        return json.loads((Path(stage_dir) / UPDATES).read_text())
    except (OSError, ValueError):
        return None


def trained_nothing(record: dict | None) -> bool:
    return record is not None and record["steps"] > 0 and record["skipped_steps"] >= record["steps"]


def skipped_note(record: dict | None) -> str | None:
    """One line on a stage's skipped steps; None when every step updated the weights."""
    if record is None or not record["skipped_steps"]:
        return None
    steps, skipped, why = record["steps"], record["skipped_steps"], record["skipped_why"]
    if trained_nothing(record):
        return f"trained nothing: {'all ' * (steps > 1)}{steps} optimizer step{'s' * (steps > 1)} skipped ({why})"
    return f"{skipped} of {steps} optimizer steps skipped ({why})"


def save_trained(trainer, folder: str | Path) -> Path:
    """Save a stage's trained model (weights, config, generation config, tokenizer) once, to `folder`.

    `Trainer.save_model` gathers sharded weights (DeepSpeed ZeRO-3, FSDP) on every process and
    writes on the main process only; every process then waits until the folder is complete, since
    the next stage loads it on all of them.
    """
    folder = Path(folder)
    trainer.save_model(str(folder))
    trainer.accelerator.wait_for_everyone()
    return folder


def process_state() -> PartialState:
    """accelerate's state of this process (under a multi-process launch, this joins the process group).

    On the CPU choice the Trainer's arguments make (`precision_kwargs`): without a GPU the processes
    form a gloo group, which accelerate sets up only when told to use the CPU.
    """
    return PartialState(cpu=precision_kwargs()["use_cpu"])


def _single() -> bool:
    """True without a multi-process launch: the helpers below then run plainly, creating no state."""
    return launch_processes() == 1


def is_main_process() -> bool:
    return _single() or process_state().is_main_process


def wait_for_everyone() -> None:
    """A barrier over every process of the launch (nothing without one)."""
    if not _single():
        process_state().wait_for_everyone()


def process_device() -> torch.device:
    """Where this process runs a model outside a Trainer: its own GPU under a launch (cuda:LOCAL_RANK),
    else the first GPU, else the CPU."""
    if not _single():
        return process_state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main_decides(decide: Callable[[], T]) -> T:
    """`decide()` computed on the main process only, returned on every process.

    For choices that read the file system (is a stage finished, which checkpoint to resume): every
    process takes the same branch even while another process is writing, or when a network file
    system shows a file to one host later than to another. The value must be picklable.
    """
    if _single():
        return decide()
    state = process_state()
    box = [decide() if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def shard_and_gather(items: list, work: Callable[[list, int], R]) -> list[R | None]:
    """Run `work(share, share_index)` on this process's share of `items`; every process's result, in process order.

    The shares are accelerate's `split_between_processes`: contiguous, in process order, sizes
    differing by at most one, so concatenating the results in the order returned keeps the order of
    `items`. A process whose share is empty (fewer items than processes) does not call `work` and
    contributes None. Results travel through `gather_object` (pickled) and reach every process.
    """
    if _single():
        return [work(list(items), 0) if items else None]
    state = process_state()
    with state.split_between_processes(list(items)) as share:
        result = work(share, state.process_index) if share else None
    return gather_object([result])
