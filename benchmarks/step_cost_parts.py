"""The measuring parts of `opsd_step_cost.py`: rollouts generated once and replayed, FLOP counting,
memory, turn-taking and timing of one LM-head product.

Each part is independent of what the benchmark compares (the project's OPSD and GRPO trainers, its
settings and its report stay in `opsd_step_cost.py`, which reads as the measurement itself); torch
and transformers are imported inside the functions, so `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict


# ---------------------------------------------------------------- generation once, replayed


class Replay:
    """TRL's `_generate` of a trainer, answered from rollouts generated once (the same for both stages).

    Rows are matched by prompt text (the r-th request of a prompt in a call gets its r-th rollout), so
    whatever order a stage's sampler draws the prompts in, it gets the same prompt/rollout pairs.
    """

    def __init__(self, prompts: list[str], generated: tuple):
        prompt_ids, completion_ids, _, completions, logprobs = generated[:5]
        self.rows = defaultdict(list)
        for i, prompt in enumerate(prompts):
            self.rows[prompt].append((prompt_ids[i], completion_ids[i], completions[i],
                                      None if logprobs is None else logprobs[i]))

    def __call__(self, prompts: list[str]):
        seen = defaultdict(int)
        rows = []
        for prompt in prompts:
            rows.append(self.rows[prompt][seen[prompt] % len(self.rows[prompt])])
            seen[prompt] += 1
        logprobs = None if rows[0][3] is None else [r[3] for r in rows]
        return [r[0] for r in rows], [r[1] for r in rows], None, [r[2] for r in rows], logprobs, {}, None, []


def real_generate(trainer, prompts: list[str], seed: int):
    """The trainer's own TRL generation on `prompts` (never vLLM here), under a fixed seed."""
    import torch

    use_vllm = trainer.use_vllm
    trainer.use_vllm = False
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return type(trainer)._generate(trainer, prompts)
    finally:
        trainer.use_vllm = use_vllm


def sampling_logprobs(model, generated: tuple, temperature: float) -> list[list[float]]:
    """Per-token log-probabilities of the sampled tokens, as vLLM reports them with each rollout."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, completion in zip(generated[0], generated[1]):
            ids = torch.tensor([list(prompt) + list(completion)], device=model.device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float() / temperature
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, len(prompt):, None])[:, 0]
            out.append(logp.tolist())
    return out


# ---------------------------------------------------------------- FLOP counting


def flop_counter(names: dict):
    """A FlopCounterMode that also splits every count by phase, with `names` for root modules.

    Phases: "forward" (gradients on), "forward_grad_off" (no-grad forwards: teachers, old
    log-probabilities; also the forward of a custom autograd function, such as TRL's fused LM head)
    and "backward" (recomputation under checkpointing included). Each count is also put under its
    call site: the innermost opsdlab or TRL function on the Python stack. CPU attention
    (`_scaled_dot_product_flash_attention_for_cpu`) and in-place `addmm_`/`baddbmm_` are counted with
    torch's own formulas for their out-of-place and GPU forms, so the counts are the same on any
    machine; any other product-like op that no formula counts is listed under "uncounted_ops".
    """
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    # In-place products (TRL's chunked log-prob kernel accumulates its gradients with `addmm_` on CPU)
    # and CPU attention, which torch's registry leaves out.
    for op, formula in (("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop),
                        ("addmm_", fc.addmm_flop), ("baddbmm_", fc.baddbmm_flop)):
        if hasattr(aten, op) and getattr(aten, op) not in fc.flop_registry:
            # torch's registered formulas already take tensors (shape-wrapped): mark them raw.
            counted = (lambda f: lambda *args, **kwargs: f(*args, **kwargs))(formula)
            counted._get_raw = True
            mapping[getattr(aten, op)] = counted

    class Counter(fc.FlopCounterMode):
        def __init__(self):
            super().__init__(display=False, custom_mapping=mapping)
            self.phased = defaultdict(lambda: defaultdict(int))  # module -> phase -> flops
            self.by_op = defaultdict(lambda: defaultdict(int))  # op -> phase -> flops
            self.by_site = defaultdict(lambda: defaultdict(int))  # call site -> phase -> flops
            self.uncounted = defaultdict(int)  # product-like ops without a formula -> calls
            for module, name in names.items():
                self.mod_tracker._known_modules[module] = name

        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                phase = ("backward" if self.mod_tracker.is_bw else
                         "forward" if torch.is_grad_enabled() else "forward_grad_off")
                for parent in set(self.mod_tracker.parents):
                    self.phased[parent][phase] += flops
                self.by_op[str(func_packet).removeprefix("aten.")][phase] += flops
                self.by_site[call_site()][phase] += flops
            elif any(part in str(func_packet) for part in ("mm", "matmul", "linear", "attention", "conv", "einsum")):
                self.uncounted[str(func_packet)] += 1
            return super()._count_flops(func_packet, out, args, kwargs)

        def summary(self) -> dict:
            """Total, and by module (backbone, LM head of each named root; the rest) and op, by phase."""
            total = sum(self.flop_counts["Global"].values())
            modules = {}
            for root in sorted(set(names.values())):
                for part in ("model", "lm_head"):
                    if f"{root}.{part}" in self.phased:
                        modules[f"{root}.{part}"] = dict(self.phased[f"{root}.{part}"])
            rest = defaultdict(int, self.phased["Global"])
            for counts in modules.values():
                for phase, flops in counts.items():
                    rest[phase] -= flops
            modules["outside these modules"] = {k: v for k, v in rest.items() if v}
            return {"total": total, "by_module": modules, "by_op": {k: dict(v) for k, v in self.by_op.items()},
                    "by_site": {k: dict(v) for k, v in self.by_site.items()}, "uncounted_ops": dict(self.uncounted)}

    return Counter()


def call_site() -> str:
    """`module:function` of the innermost opsdlab or TRL frame on the Python stack (autograd's own
    backward runs without one: then the caller of `backward`)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(("opsdlab.", "trl.")):
            return f"{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "elsewhere"


def root_names(model, name: str) -> dict:
    """Names for the FLOP breakdown: `name` for the model, `name.model` for its backbone and
    `name.lm_head` for its LM head (named up front: both also run outside the model's own forward)."""
    names = {model: name}
    backbone = getattr(model, "base_model", None)
    if backbone is not None and backbone is not model:
        names[backbone] = f"{name}.model"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names[head] = f"{name}.lm_head"
    return names


def teacher_forward_flops(model, batch: dict) -> dict:
    """One no-grad teacher forward over the batch (teacher prompts and responses), the LM head applied
    to the response positions only: the bound's second term, counted like the steps."""
    import torch

    ids = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], dim=1)
    width, completion = batch["teacher_prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    counter = flop_counter(root_names(model, "teacher"))
    with torch.no_grad(), counter:
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        model.get_output_embeddings()(hidden[:, width - 1:width - 1 + completion][batch["completion_mask"].bool()])
    return counter.summary()


# ---------------------------------------------------------------- memory


def teacher_parts(trainer, student) -> tuple[list, list]:
    """The modules and the tensors that a trainer's OPSD teacher (`trainer.teacher`) keeps apart from
    the student: a separate copy, an EMA shadow. Found by looking, so any teacher kind is covered."""
    import torch

    modules, tensors = [], []

    def visit(value):
        if isinstance(value, torch.nn.Module) and value is not student:
            modules.append(value)
            tensors.extend(list(value.parameters()) + list(value.buffers()))
        elif isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(list(getattr(getattr(trainer, "teacher", None), "__dict__", {}).values()))
    student_storage = {t.data_ptr() for t in list(student.parameters()) + list(student.buffers())}
    unique = {t.data_ptr(): t for t in tensors if t.data_ptr() not in student_storage}
    return modules, list(unique.values())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PeakMemory:
    """The largest rise of memory above its level at `start` until `stop`: CUDA's peak allocated on a GPU,
    else the process's resident set size sampled every millisecond."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = self.peak = self._rss()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        self.running = False
        self.thread.join()
        return max(self.peak, self._rss()) - self.base


# ---------------------------------------------------------------- turns and timing


class Turns:
    """Lets two training loops (threads) take steps in a given order, one at a time."""

    def __init__(self, order: list[str]):
        self.order = order
        self.index = -1  # closed until `open`
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def open(self) -> None:
        with self.condition:
            self.index = 0
            self.condition.notify_all()

    def wait(self, stage: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.error is not None or
                                    (0 <= self.index < len(self.order) and self.order[self.index] == stage))
            if self.error is not None:
                raise RuntimeError(f"{stage}: stopped, the other stage failed") from self.error

    def done(self) -> None:
        with self.condition:
            self.index += 1
            self.condition.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.condition:
            self.error = error
            self.condition.notify_all()


def head_gemm_seconds(model, rows: int, repeats: int = 3) -> dict:
    """Seconds of one LM-head product over `rows` positions in the two precisions the stages' heads use.

    Under bf16 weights GRPO's head is TRL's: bf16 operands, bf16 logits. OPSD's head keeps float32
    logits (bf16 operands, float32 accumulation and output): a GPU does that in one bf16 GEMM, but a
    CPU has no bf16 GEMM with float32 output, so it multiplies in float32. The ratio says how much of
    a CPU wall ratio is that precision rather than work.
    """
    import torch

    weight = model.get_output_embeddings().weight.detach()
    hidden = torch.randn(rows, weight.shape[1], device=weight.device)
    products = {"bf16_output": (hidden.bfloat16(), weight.bfloat16()), "float32": (hidden.float(), weight.float())}
    seconds = {}
    for name, (a, b) in products.items():
        torch.mm(a, b.t())  # warm-up
        if weight.is_cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b.t())
        if weight.is_cuda:
            torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - begin) / repeats
    return {**seconds, "rows": rows, "float32_over_bf16_output": seconds["float32"] / seconds["bf16_output"]}
