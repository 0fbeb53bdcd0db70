"""Teacher weights for OPSD: the network that reads the privileged prompt.

- `frozen` (default): the weights the stage started from.
- `ema`: teacher <- (1 - rate) * teacher + rate * student after every optimizer step.
- `periodic`: the stage's starting weights, re-copied from the student after every
  `refresh_steps`-th optimizer step that updated the student (CRISP, arXiv 2603.05433); frozen between.
- `live`: the current student itself.

The OPSD loss's anchor (`opsd.anchor_beta`) reads the stage's starting weights too (`start_weights`): the
frozen teacher's own, or a frozen teacher of its own beside any other.

A separate teacher network is built the way TRL builds its reference model, never by deep-copying
the student: TRL patches the student's `forward` on the instance (its fused LM head) with a closure
over the student's own bound method, so a deep copy would run the *student's* backbone. The copy is
a fresh model of the student's class (loaded from the student's folder under DeepSpeed ZeRO-3,
where the student's own parameters are already partitioned), with its own copy of the student's
config (building a model writes its dtype and attention implementation into the config it gets),
given the student's weights, then placed and sharded like TRL's reference model (`prepare_deepspeed`,
`prepare_fsdp`, or `accelerator.prepare_model(evaluation_mode=True)`). Building it leaves the global
RNG untouched (the fresh model's random init runs under `torch.random.fork_rng`), so the same seed
draws the same rollouts whatever the teacher.

The EMA is accumulated in a float32 shadow of the teacher's weights and cast into the teacher's dtype
after each update: in bf16, `t.mul_(1 - a).add_(s, alpha=a)` rounds every step, so the teacher drifts
even where the student equals it. The shadow is a float32 clone of each teacher parameter (placed and
sharded with it; the parameter itself when already float32). Under ZeRO-3, updates gather the
parameters as TRL's `SyncRefModelCallback.sync_target_model` does, on the first process, which holds
the full float32 shadow; the periodic teacher's first process likewise keeps a CPU copy of the
weights of its last refresh for the checkpoint.

With PEFT no second network is built: the teacher is an adapter setting of the same model. A
fresh adapter (the trainer wraps a plain model) is a zero update, so the frozen teacher is the base
with adapters disabled. A model that already carries a trained adapter gets a frozen copy of it
under its own name (as TRL's "ref" adapter); the EMA and periodic teachers are adapter copies updated
like the full-weight ones. All teachers run without gradients.

The EMA and periodic teachers' state (their weights, and the periodic teacher's step count) goes
into every checkpoint, so a resumed run has the teacher of an uninterrupted one. With PEFT a
checkpoint holds the student's adapter alone (`student_adapter_saved_alone`), which is what the
Trainer's loader restores on resume and when held-out checks select a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import functools
from pathlib import Path

import torch
from accelerate.utils import DistributedType, is_peft_model
from transformers import AutoModelForCausalLM
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, use_adapter

from opsdlab.modeling.runtime import untied_missing_keys

FROZEN_ADAPTER = "opsd_frozen"
EMA_ADAPTER = "opsd_ema"
PERIODIC_ADAPTER = "opsd_periodic"


def is_zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: every parameter partitioned outside the forward of the module that owns it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


@contextlib.contextmanager
def _rng_untouched(accelerator):
    """Restore the global CPU RNG, and that of the process's accelerator device, on exit."""
    device = accelerator.device
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[], device_type="cpu"):
            yield
    else:
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            yield


@contextlib.contextmanager
def _full_parameters(accelerator, *params):
    """The full values of `params` inside; yields whether this process writes them.

    Under ZeRO-3 the parameters are gathered and the first process's values are scattered back into
    every process's shards on exit (as TRL's `sync_target_model`); elsewhere they are already whole.
    """
    if is_zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield deepspeed.comm.get_rank() == 0
    else:
        yield True


def separate_copy(student, accelerator) -> torch.nn.Module:
    """A new network holding the student's current weights, placed like TRL's reference model."""
    config = copy_module.deepcopy(student.config)
    if is_zero3(accelerator):
        source = getattr(config, "_name_or_path", "")
        if not source:
            raise ValueError("teacher: under DeepSpeed ZeRO-3 the frozen/EMA/periodic teacher is loaded from the "
                             "student's model folder, but the student has no `_name_or_path`; load it with "
                             "from_pretrained")
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
        missing = untied_missing_keys(teacher, missing)
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


class _CopyOrAdapter:
    """A teacher held as a separate network (`copy`) or as a PEFT adapter setting of the student."""

    copy = None
    adapter = None  # None with no copy: every adapter disabled, i.e. the base
    accelerator = None

    def _build(self, student, accelerator, adapter: str) -> None:
        """A separate copy of the student, or with PEFT a copy of its active adapter named `adapter`."""
        self.accelerator = accelerator
        if is_peft_model(student):
            _copy_adapter(student, adapter)
            self.adapter = adapter
        else:
            self.copy = separate_copy(student, accelerator)

    def _zero3_copy(self) -> bool:
        """A separate copy whose parameters are partitioned (gathered for every update)."""
        return self.copy is not None and is_zero3(self.accelerator)

    @contextlib.contextmanager
    def use(self, student):
        """Yield the module to run the teacher forward with."""
        if self.copy is not None:
            yield self.copy
        else:
            with use_adapter(student, self.adapter):
                yield student

    def _named_pairs(self, student) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
        """(name, teacher parameter, student parameter) for every weight the teacher updates."""
        if self.copy is not None:
            target = self.accelerator.unwrap_model(self.copy)
            names = [name for name, _ in target.named_parameters()]
            return list(zip(names, target.parameters(), student.parameters(), strict=True))
        active = student.active_adapter
        own = dict(student.named_parameters())
        return [(key, own[key], own[key.replace(f".{self.adapter}.", f".{active}.")]) for key in own
                if f".{self.adapter}." in key]


class FrozenTeacher(_CopyOrAdapter):
    """The stage's starting weights."""

    def __init__(self, student, accelerator, *, rate: float = 0.0, refresh_steps: int = 0,
                 pretrained_adapter: bool = False):
        if is_peft_model(student):
            if pretrained_adapter:
                _copy_adapter(student, FROZEN_ADAPTER)
                self.adapter = FROZEN_ADAPTER
        else:
            self.copy = separate_copy(student, accelerator)

    def after_step(self, student) -> None:
        pass


class EmaTeacher(_CopyOrAdapter):
    """An exponential moving average of the student's weights, starting at the stage's start,
    accumulated in float32 (see the module docstring)."""

    def __init__(self, student, accelerator, *, rate: float = 0.05, refresh_steps: int = 0,
                 pretrained_adapter: bool = False):
        if not 0 < rate <= 1:
            raise ValueError(f"teacher: ema rate must be in (0, 1], got {rate}")
        self.rate = rate
        self._build(student, accelerator, EMA_ADAPTER)
        self.names = [name for name, _, _ in self._named_pairs(student)]
        self.shadow = self._make_shadow(student)

    @torch.no_grad()
    def _make_shadow(self, student) -> list[torch.Tensor] | None:
        """Float32 EMA weights, one per teacher parameter; None on the processes that keep none (ZeRO-3)."""
        pairs = self._named_pairs(student)
        if self._zero3_copy():
            with _full_parameters(self.accelerator, *(t for _, t, _ in pairs)) as writer:
                return [t.detach().float().clone() for _, t, _ in pairs] if writer else None
        return [t if t.dtype == torch.float32 else t.detach().float().clone() for _, t, _ in pairs]

    @torch.no_grad()
    def after_step(self, student) -> None:
        pairs = self._named_pairs(student)
        params = [p for _, t, s in pairs for p in (t, s)] if self._zero3_copy() else []
        with _full_parameters(self.accelerator, *params) as writer:
            if writer:
                for (_, mine, theirs), shadow in zip(pairs, self.shadow, strict=True):
                    shadow.lerp_(theirs.detach().to(shadow.device, torch.float32), self.rate)
                    if shadow is not mine:
                        mine.copy_(shadow)

    def state_dict(self, student=None) -> dict[str, torch.Tensor]:
        """The float32 EMA weights (deduplicated parameters), for the checkpoint."""
        if self.shadow is None:
            raise RuntimeError("teacher: under ZeRO-3 only the first process holds the EMA weights to save")
        return {k: v.detach().cpu().contiguous() for k, v in zip(self.names, self.shadow, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict, student=None) -> None:
        if set(self.names) != set(state):
            raise RuntimeError("teacher: the checkpoint's EMA weights do not match this model "
                               f"({len(state)} tensors saved, {len(self.names)} expected)")
        pairs = self._named_pairs(student)
        params = [t for _, t, _ in pairs] if self._zero3_copy() else []
        with _full_parameters(self.accelerator, *params) as writer:
            if writer:
                for (name, mine, _), shadow in zip(pairs, self.shadow, strict=True):
                    shadow.copy_(state[name].to(shadow.device, shadow.dtype))
                    if shadow is not mine:
                        mine.copy_(shadow)


class PeriodicTeacher(_CopyOrAdapter):
    """The student as it was at the last refresh: re-copied after every `refresh_steps`-th optimizer
    step that updated the student (skipped steps, which leave the student as it was, do not count)."""

    def __init__(self, student, accelerator, *, rate: float = 0.0, refresh_steps: int = 50,
                 pretrained_adapter: bool = False):
        if refresh_steps < 1:
            raise ValueError(f"teacher: refresh_steps must be >= 1, got {refresh_steps}")
        self.refresh_steps = refresh_steps
        self.steps = 0  # optimizer steps that updated the student since the stage started
        self._build(student, accelerator, PERIODIC_ADAPTER)
        self.names = [name for name, _, _ in self._named_pairs(student)]
        self._saved = None  # ZeRO-3, first process: CPU copy of the weights of the last refresh
        if self._zero3_copy():
            self._refresh(student, copy=False)

    @torch.no_grad()
    def _refresh(self, student, *, copy: bool = True, state: dict | None = None) -> None:
        """Copy the student's weights (or `state`) into the teacher."""
        pairs = self._named_pairs(student)
        params = [p for _, t, s in pairs for p in (t, s)] if self._zero3_copy() else []
        with _full_parameters(self.accelerator, *params) as writer:
            if not writer:
                return
            for name, mine, theirs in pairs:
                if state is not None:
                    mine.copy_(state[name].to(mine.device, mine.dtype))
                elif copy:
                    mine.copy_(theirs.detach())
            if self._zero3_copy():
                self._saved = {name: mine.detach().cpu().clone() for name, mine, _ in pairs}

    def after_step(self, student) -> None:
        self.steps += 1
        if self.steps % self.refresh_steps == 0:
            self._refresh(student)

    def state_dict(self, student=None) -> dict[str, torch.Tensor]:
        """The teacher's weights (deduplicated parameters), for the checkpoint."""
        if self._zero3_copy():
            if self._saved is None:
                raise RuntimeError("teacher: under ZeRO-3 only the first process holds the teacher weights to save")
            return dict(self._saved)
        return {name: mine.detach().cpu().contiguous() for name, mine, _ in self._named_pairs(student)}

    def load_state_dict(self, state: dict, student=None) -> None:
        if set(self.names) != set(state):
            raise RuntimeError("teacher: the checkpoint's periodic teacher weights do not match this model "
                               f"({len(state)} tensors saved, {len(self.names)} expected)")
        self._refresh(student, state=state)


class LiveTeacher:
    """The current student, without gradients."""

    def __init__(self, student, accelerator, *, rate: float = 0.0, refresh_steps: int = 0,
                 pretrained_adapter: bool = False):
        pass

    @contextlib.contextmanager
    def use(self, student):
        yield student

    def after_step(self, student) -> None:
        pass


TEACHER_WEIGHTS = {"frozen": FrozenTeacher, "ema": EmaTeacher, "periodic": PeriodicTeacher, "live": LiveTeacher}
EMA_STATE_FILE = "opsd_ema_teacher.safetensors"
PERIODIC_STATE_FILE = "opsd_periodic_teacher.safetensors"
_STATE_FILES = {EmaTeacher: EMA_STATE_FILE, PeriodicTeacher: PERIODIC_STATE_FILE}


def build_teacher(kind: str, student, accelerator, *, rate: float = 0.05, refresh_steps: int = 50,
                  pretrained_adapter: bool = False):
    """The teacher named `kind` for the (unwrapped) student at the start of the stage.

    Leaves the global RNG (CPU, and the accelerator device's) as it found it.
    """
    if kind not in TEACHER_WEIGHTS:
        raise ValueError(f"unknown teacher weights {kind!r}; choose one of {sorted(TEACHER_WEIGHTS)}")
    with _rng_untouched(accelerator):
        return TEACHER_WEIGHTS[kind](student, accelerator, rate=rate, refresh_steps=refresh_steps,
                                     pretrained_adapter=pretrained_adapter)


def start_weights(teacher, student, accelerator, *, pretrained_adapter: bool = False):
    """The stage's starting weights, for the anchor of the OPSD loss (`opsd.anchor_beta`): used like a
    teacher (`use(student)` yields the module to run).

    A frozen teacher already holds them and is returned itself: no second copy. Otherwise a frozen teacher
    is built: a separate copy of the student, or with PEFT the base with adapters disabled (a copy of a
    pretrained adapter when the student arrived with one). Rebuilt from the starting weights on resume,
    like any frozen teacher.
    """
    if isinstance(teacher, FrozenTeacher):
        return teacher
    return build_teacher("frozen", student, accelerator, pretrained_adapter=pretrained_adapter)


def save_teacher_state(teacher, student, folder: str | Path) -> None:
    """Write the teacher's own state into a checkpoint folder: the EMA weights (float32), or the
    periodic teacher's weights and step count; no-op for the others."""
    name = _STATE_FILES.get(type(teacher))
    if name is None:
        return
    from safetensors.torch import save_file

    metadata = {"steps": str(teacher.steps)} if isinstance(teacher, PeriodicTeacher) else None
    save_file(teacher.state_dict(student), str(Path(folder) / name), metadata=metadata)


@contextlib.contextmanager
def student_adapter_saved_alone(model):
    """Inside, a PEFT model's `save_pretrained` writes the student's (active) adapter alone.

    PEFT saves every adapter, each other than "default" in a subfolder named after it, and the Trainer's
    checkpoint loader, when a checkpoint has such subfolders, loads those only and never the adapter
    at the folder's root: a resumed run, and the checkpoint that held-out checks select, would keep the
    student's starting adapter beside a restored teacher. The teacher's adapter need not be in the
    checkpoint: the EMA and periodic teachers' state has its own file (`save_teacher_state`), and the
    frozen copy of a pretrained adapter is rebuilt from the stage's starting weights.
    """
    if not is_peft_model(model) or len(model.peft_config) < 2:
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model,
                                              selected_adapters=[model.active_adapter])
    try:
        yield
    finally:
        del model.save_pretrained


def load_teacher_state(teacher, student, folder: str | Path) -> None:
    """Restore the EMA or periodic teacher's state from a checkpoint folder; no-op for the other teachers
    (they are rebuilt from the stage's starting weights, or are the student itself)."""
    name = _STATE_FILES.get(type(teacher))
    if name is None:
        return
    path = Path(folder) / name
    if not path.exists():
        kind = "EMA" if isinstance(teacher, EmaTeacher) else "periodic"
        raise FileNotFoundError(f"teacher: checkpoint {folder} has no {name}; the {kind} teacher cannot "
                                "resume (was it written by a run with another teacher_weights?)")
    from safetensors import safe_open
    from safetensors.torch import load_file

    if isinstance(teacher, PeriodicTeacher):
        with safe_open(str(path), framework="pt") as handle:
            steps = (handle.metadata() or {}).get("steps")
        if steps is None or not steps.isdigit():
            raise RuntimeError(f"teacher: {path} has no step count (metadata 'steps'); it was not written by "
                               "the periodic teacher")
        teacher.steps = int(steps)
    teacher.load_state_dict(load_file(str(path)), student)
