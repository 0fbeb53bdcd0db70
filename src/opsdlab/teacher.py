"""Teacher weights for OPSD: the network that reads the privileged prompt.

- `frozen` (default): the weights the stage started from.
- `ema`: teacher <- (1 - rate) * teacher + rate * student after every optimizer step.
- `live`: the current student itself.

A separate teacher network is built the way TRL builds its reference model, never by deep-copying
the student: TRL patches the student's `forward` on the instance (its fused LM head) with a closure
over the student's own bound method, so a deep copy would run the *student's* backbone. The copy is
a fresh model of the student's class (loaded from the student's folder under DeepSpeed ZeRO-3,
where the student's own parameters are already partitioned), given the student's weights, then
placed and sharded like TRL's reference model (`prepare_deepspeed`, `prepare_fsdp`, or
`accelerator.prepare_model(evaluation_mode=True)`). The EMA update gathers ZeRO-3 shards through
TRL's `SyncRefModelCallback.sync_target_model`.

With PEFT no second network is built: the teacher is an adapter setting of the same model. A
fresh adapter (the trainer wraps a plain model) is a zero update, so the frozen teacher is the base
with adapters disabled. A model that already carries a trained adapter gets a frozen copy of it
under its own name (as TRL's "ref" adapter), and the EMA teacher is an adapter copy updated like the
full-weight EMA. All teachers run without gradients.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate.utils import DistributedType, is_peft_model
from transformers import AutoModelForCausalLM
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, use_adapter

FROZEN_ADAPTER = "opsd_frozen"
EMA_ADAPTER = "opsd_ema"


def is_zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: every parameter partitioned outside the forward of the module that owns it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


def separate_copy(student, accelerator) -> torch.nn.Module:
    """A new network holding the student's current weights, placed like TRL's reference model."""
    config = student.config
    if is_zero3(accelerator):
        source = getattr(config, "_name_or_path", "")
        if not source:
            raise ValueError("teacher: under DeepSpeed ZeRO-3 the frozen/EMA teacher is loaded from the student's "
                             "model folder, but the student has no `_name_or_path`; load it with from_pretrained")
        teacher = create_model_from_path(source, dtype=student.dtype,
                                         attn_implementation=config._attn_implementation, device_map=None)
    else:
        # Built where the student lives: the random init that load_state_dict then overwrites is
        # single-threaded on CPU (40 s for Qwen3-1.7B's shape, benchmarks/teacher_copy_time.py), not on a GPU.
        device = next(student.parameters()).device
        with torch.device("cpu" if device.type == "meta" else device):
            teacher = AutoModelForCausalLM.from_config(config, dtype=student.dtype,
                                                       attn_implementation=config._attn_implementation)
        missing, unexpected = teacher.load_state_dict(student.state_dict(), strict=False)
        tied = set(getattr(teacher, "_tied_weights_keys", None) or {})
        missing = [key for key in missing if key not in tied]
        if missing or unexpected:
            raise RuntimeError(f"teacher: the copy does not match the student (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    disable_dropout_in_model(teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        teacher = prepare_deepspeed(teacher, accelerator)
    elif accelerator.distributed_type == DistributedType.FSDP:
        teacher = prepare_fsdp(teacher, accelerator)
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    return teacher


def _copy_adapter(model, name: str) -> None:
    """Add adapter `name` holding a copy of the active ("default") adapter's weights (not trainable)."""
    active = model.active_adapter
    model.add_adapter(name, model.peft_config[active])
    own = dict(model.named_parameters())
    for key, param in own.items():
        if f".{active}." in key:
            own[key.replace(f".{active}.", f".{name}.")].data.copy_(param.data)
    for key, param in own.items():
        if f".{name}." in key:
            param.requires_grad_(False)


def _adapter_pairs(model, name: str):
    """(teacher adapter parameter, student adapter parameter) pairs."""
    active = model.active_adapter
    own = dict(model.named_parameters())
    return [(own[key.replace(f".{active}.", f".{name}.")], param) for key, param in own.items()
            if f".{active}." in key]


class _CopyOrAdapter:
    """A teacher held as a separate network (`copy`) or as a PEFT adapter setting of the student."""

    copy = None
    adapter = None  # None with no copy: every adapter disabled, i.e. the base

    @contextlib.contextmanager
    def use(self, student):
        """Yield the module to run the teacher forward with."""
        if self.copy is not None:
            yield self.copy
        else:
            with use_adapter(student, self.adapter):
                yield student


class FrozenTeacher(_CopyOrAdapter):
    """The stage's starting weights."""

    def __init__(self, student, accelerator, *, rate: float = 0.0, pretrained_adapter: bool = False):
        if is_peft_model(student):
            if pretrained_adapter:
                _copy_adapter(student, FROZEN_ADAPTER)
                self.adapter = FROZEN_ADAPTER
        else:
            self.copy = separate_copy(student, accelerator)

    def after_step(self, student) -> None:
        pass


class EmaTeacher(_CopyOrAdapter):
    """An exponential moving average of the student's weights, starting at the stage's start."""

    def __init__(self, student, accelerator, *, rate: float = 0.05, pretrained_adapter: bool = False):
        if not 0 < rate <= 1:
            raise ValueError(f"teacher: ema rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.accelerator = accelerator
        if is_peft_model(student):
            _copy_adapter(student, EMA_ADAPTER)
            self.adapter = EMA_ADAPTER
        else:
            self.copy = separate_copy(student, accelerator)

    @torch.no_grad()
    def after_step(self, student) -> None:
        if self.copy is not None:
            target = self.accelerator.unwrap_model(self.copy)
            SyncRefModelCallback.sync_target_model(student, target, self.rate)
        else:
            for mine, theirs in _adapter_pairs(student, self.adapter):
                mine.lerp_(theirs.detach().to(mine.dtype), self.rate)

    def _params(self, student=None) -> dict[str, torch.Tensor]:
        if self.copy is not None:
            return dict(self.accelerator.unwrap_model(self.copy).named_parameters())
        return {k: v for k, v in student.named_parameters() if f".{self.adapter}." in k}

    def state_dict(self, student=None) -> dict[str, torch.Tensor]:
        """The EMA weights (deduplicated parameters), for the checkpoint."""
        return {k: v.detach().cpu().contiguous() for k, v in self._params(student).items()}

    def load_state_dict(self, state: dict, student=None) -> None:
        own = self._params(student)
        if set(own) != set(state):
            raise RuntimeError("teacher: the checkpoint's EMA weights do not match this model "
                               f"({len(state)} tensors saved, {len(own)} expected)")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].device, own[key].dtype))


class LiveTeacher:
    """The current student, without gradients."""

    def __init__(self, student, accelerator, *, rate: float = 0.0, pretrained_adapter: bool = False):
        pass

    @contextlib.contextmanager
    def use(self, student):
        yield student

    def after_step(self, student) -> None:
        pass


TEACHER_WEIGHTS = {"frozen": FrozenTeacher, "ema": EmaTeacher, "live": LiveTeacher}
EMA_STATE_FILE = "opsd_ema_teacher.safetensors"


def build_teacher(kind: str, student, accelerator, *, rate: float = 0.05, pretrained_adapter: bool = False):
    """The teacher named `kind` for the (unwrapped) student at the start of the stage."""
    if kind not in TEACHER_WEIGHTS:
        raise ValueError(f"unknown teacher weights {kind!r}; choose one of {sorted(TEACHER_WEIGHTS)}")
    return TEACHER_WEIGHTS[kind](student, accelerator, rate=rate, pretrained_adapter=pretrained_adapter)


def save_teacher_state(teacher, student, folder: str | Path) -> None:
    """Write the teacher's own state (the EMA weights) into a checkpoint folder; no-op for the others."""
    if not isinstance(teacher, EmaTeacher):
        return
    from safetensors.torch import save_file

    save_file(teacher.state_dict(student), str(Path(folder) / EMA_STATE_FILE))


def load_teacher_state(teacher, student, folder: str | Path) -> None:
    """Restore the EMA weights from a checkpoint folder; no-op for the other teachers (they are
    rebuilt from the stage's starting weights, or are the student itself)."""
    if not isinstance(teacher, EmaTeacher):
        return
    path = Path(folder) / EMA_STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"teacher: checkpoint {folder} has no {EMA_STATE_FILE}; the EMA teacher cannot "
                                "resume (was it written by a run with another teacher_weights?)")
    from safetensors.torch import load_file

    teacher.load_state_dict(load_file(str(path)), student)
