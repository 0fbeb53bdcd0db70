"""What one OPSD optimizer step costs next to one GRPO (RLVR) step on the same batch and model.

    python benchmarks/opsd_step_cost.py --json benchmarks/results/opsd_step_cost.json
    python benchmarks/opsd_step_cost.py --gradient-checkpointing --layers 2 --completion 128
    python benchmarks/opsd_step_cost.py --vllm-style          # trainers set up as under vLLM (no vLLM needed)

The model is Qwen3-1.7B's shape (Qwen3Config, random init, no download) with its real vocabulary
(151,936) and hidden size (2,048) and fewer layers (`--layers`). Both trainers are the project's
own (`opsd.OPSDTrainer` with `opsd_args`, `rlvr.RLVRTrainer` with `grpo_args`) on one shared model,
each running its real Trainer loop (`train()`, in its own thread); the two loops take turns step by
step in the order OPSD, GRPO, GRPO, OPSD, OPSD, GRPO, ... so that drift of a shared machine falls on
both alike. The first step of each stage is a warm-up, counted with `FlopCounterMode` and not timed.

Generation runs once: the rollouts of the step's prompts (`--prompts` x `--rollouts`, exactly
`--completion` tokens each: EOS is held off with `min_new_tokens`) are generated before training
and every step of both stages replays them through TRL's generation hook, so both stages compute
on the identical batch. Generation is timed apart, per stage, before each measured step: each
trainer's own TRL generation call on the same prompts, same token count, same seed.

Reported per stage: matmul FLOPs of one optimizer step without generation (what
`torch.utils.flop_counter.FlopCounterMode` counts: matmuls and attention, the same on any machine),
by module and phase; wall seconds of each measured step without generation (device-synchronized);
generation seconds; and peak memory, counted as the stage alone would need it: the model's weights,
what the stage keeps (its optimizer state, the OPSD teacher's weights) and the largest rise of
memory within a step (resident set size sampled every millisecond on CPU; CUDA's peak allocated on
a GPU). The ratios are OPSD over GRPO; `bound_ratio` is (GRPO step + one no-grad teacher forward
over the same batch, teacher prompts included, with the LM head on the response positions only) /
GRPO step, all three counted the same way. The targets: flops_ratio <= 1.05 x bound_ratio and
wall_ratio_non_generation <= 1.15 x bound_ratio.

Precision. With bfloat16 weights GRPO's LM head is TRL's (bf16 operands, bf16 logits) and OPSD's keeps
float32 logits (bf16 operands, float32 accumulation and output), as it must not round logits before
its softmax. A GPU does both in one bf16 GEMM; a CPU has no bf16 GEMM with float32 output, so there
OPSD's head multiplies in float32, several times slower per product than GRPO's bf16 one (the run
times one product both ways: `head_gemm_seconds`). On a CPU a bfloat16 run therefore compares two
precisions, not two steps' work; `--dtype auto` (the default) takes float32 weights there, the same
precision in both trainers, and bfloat16 on a GPU.

This file is the measurement: its settings, the model and trainers, the steps in turn and the report.
The measuring parts it uses (generation replayed, FLOP counting, memory, turn-taking, the head
product's timing) are in `step_cost_parts.py` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_cost_parts import (  # noqa: E402
    PeakMemory, Replay, Turns, flop_counter, head_gemm_seconds, real_generate, root_names, sampling_logprobs,
    teacher_forward_flops, teacher_parts, tensor_bytes,
)

# Qwen3-1.7B's config.json (architecture only); the layer count is the benchmark's --layers.
QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
# The tests' shape: the project's tokenizer's vocabulary, tiny dimensions.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=1024, tie_word_embeddings=True)
SHAPES = {"qwen3-1.7b": QWEN3_1_7B, "tiny": TINY}
STAGES = ("opsd", "grpo")
TARGET_FLOPS = 1.05  # flops_ratio <= 1.05 x bound_ratio
TARGET_WALL = 1.15   # wall_ratio_non_generation <= 1.15 x bound_ratio


@dataclass
class Settings:
    """One measurement's settings (all of them go into the JSON)."""

    shape: str = "qwen3-1.7b"
    layers: int = 1
    prompts: int = 2
    rollouts: int = 2
    completion: int = 48
    generation: str = "transformers"  # the TRL generation backend that makes the rollouts (transformers, paged)
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    vllm_style: bool = False  # trainers compute as under vLLM (use_vllm), generation still by `generation`
    vllm_importance_sampling_correction: bool = True  # GRPO's, under vllm_style (OPSD's is always off)
    teacher_weights: str = "frozen"
    divergence: str = "reverse_kl"
    chunk_size: int = 1024
    steps: int = 3  # measured steps per stage, after one warm-up step
    time_generation: bool = True
    seed: int = 0

    def check(self, *, minimum_steps: int = 1) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        if self.layers < 1 or self.prompts < 2 or self.rollouts < 2 or self.completion < 1:
            raise ValueError("--layers and --completion must be >= 1, --prompts and --rollouts >= 2 "
                             "(GRPO needs groups of at least 2; OPSD's unrelated-solution pairing 2 prompts)")
        if self.steps < minimum_steps:
            raise ValueError(f"--steps must be >= {minimum_steps} measured steps per stage, got {self.steps}")
        if self.generation not in ("transformers", "paged"):
            raise ValueError(f"--generation must be transformers or paged, got {self.generation!r} "
                             "(for what vLLM changes in the trainers use --vllm-style)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


# ---------------------------------------------------------------- model and data


def build(settings: Settings):
    """The random-init Qwen3 of the chosen shape, the project's tokenizer, and the prompts' examples."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsdlab.modeling.models import build_tiny_tokenizer
    from opsdlab.tasks import build_task

    task = build_task("synthetic", {})
    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    shape = dict(SHAPES[settings.shape])
    shape.setdefault("vocab_size", len(tokenizer))
    # Ids past the tokenizer's own vocabulary decode to nothing: a random model's text is never graded
    # correct anyway, and the cost of a step does not depend on what the text says.
    config = Qwen3Config(**shape, num_hidden_layers=settings.layers, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = Qwen3ForCausalLM(config)
    model = model.to(getattr(torch, settings.dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, task.examples("train", settings.prompts)


def build_trainers(model, tokenizer, examples, settings: Settings, work: Path, total_steps: int) -> dict:
    """The project's OPSD and GRPO trainers on `model`, each with one optimizer step per generation batch."""
    from transformers.trainer_utils import SaveStrategy

    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig
    from opsdlab.stages.opsd import OPSDTrainer, opsd_args, opsd_dataset
    from opsdlab.loss.rewards import VerifierReward
    from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, rl_dataset
    from opsdlab.tasks.verifier import VerifierConfig

    common = dict(max_steps=total_steps, prompts_per_step=settings.prompts,
                  max_completion_length=settings.completion, gradient_checkpointing=settings.gradient_checkpointing,
                  generation_backend=settings.generation, save_steps=10**6, logging_steps=10**6)
    opsd_config = OPSDStageConfig(**common, rollouts_per_prompt=settings.rollouts, gate="all", min_kept_rollouts=0,
                                  teacher_weights=settings.teacher_weights, divergence=settings.divergence,
                                  chunk_size=settings.chunk_size)
    rlvr_config = RLVRStageConfig(**common, group_size=settings.rollouts)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    args = {"opsd": opsd_args(opsd_config, work / "opsd", settings.seed, num_processes=1),
            "grpo": grpo_args(rlvr_config, work / "grpo", settings.seed, num_processes=1)}
    for stage_args in args.values():
        # Every rollout runs to the token limit, so generation does the same work in both stages.
        stage_args.generation_kwargs = {"min_new_tokens": settings.completion}
        stage_args.disable_tqdm = True
        stage_args.save_strategy = SaveStrategy.NO  # no model written at the end of the run
    verifier = VerifierConfig(compare="exact")
    trainers = {
        "opsd": OPSDTrainer(model=model, reward_funcs=[VerifierReward(verifier, eos)], args=args["opsd"],
                            train_dataset=opsd_dataset(examples, tokenizer, True), processing_class=tokenizer,
                            opsd=opsd_config, student_thinking=True),
        "grpo": RLVRTrainer(model=model, reward_funcs=[VerifierReward(verifier, eos)], args=args["grpo"],
                            train_dataset=rl_dataset(examples, tokenizer, True), processing_class=tokenizer),
    }
    if settings.vllm_style:
        # What use_vllm changes in the trainers' computation without a vLLM engine: GRPO's
        # importance-sampling correction (a no-grad forward over the batch for the old log-probabilities,
        # and the ratio in its loss); `opsd_args` turns OPSD's off. Generation is replayed (`Replay`).
        trainers["grpo"].vllm_importance_sampling_correction = settings.vllm_importance_sampling_correction
        for trainer in trainers.values():
            trainer.use_vllm = True
    return trainers


# ---------------------------------------------------------------- the measurement


def turn_order(steps_per_stage: int) -> list[str]:
    """OPSD, GRPO, GRPO, OPSD, OPSD, GRPO, ...: each stage goes first in every other pair."""
    order = []
    for i in range(steps_per_stage):
        order.extend(STAGES if i % 2 == 0 else STAGES[::-1])
    return order


def measure(settings: Settings, work: Path | None = None, log=print) -> dict:
    """Run both stages' steps in turn on one generated batch; the ratios and every raw number."""
    import torch
    from transformers import TrainerCallback

    settings.check()
    cuda = torch.cuda.is_available()
    work = Path(work or tempfile.mkdtemp(prefix="opsd-step-cost-"))
    started = time.perf_counter()
    model, tokenizer, examples = build(settings)
    if cuda:
        model = model.cuda()
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    total_steps = settings.steps + 1
    trainers = build_trainers(model, tokenizer, examples, settings, work, total_steps)
    log(f"model and trainers: {time.perf_counter() - started:.1f} s")

    # The step's prompts, each repeated for its rollouts, as TRL's sampler hands them out.
    prompts = [row["prompt"] for row in trainers["grpo"].train_dataset for _ in range(settings.rollouts)]
    model.train()
    start = time.perf_counter()
    generated = real_generate(trainers["grpo"], prompts, settings.seed)
    once_seconds = time.perf_counter() - start
    lengths = sorted({len(ids) for ids in generated[1]})
    if settings.vllm_style:
        generated = (*generated[:4], sampling_logprobs(model, generated, trainers["grpo"].temperature), *generated[5:])
    replay = Replay(prompts, generated)
    log(f"generated {len(prompts)} rollouts of {lengths} tokens once: {once_seconds:.1f} s")

    order = turn_order(total_steps)
    turns = Turns(order)
    raw = {stage: {"non_generation_seconds": [], "generation_seconds": [], "generated_tokens": [],
                   "step_memory_rise_bytes": []} for stage in STAGES}
    counted: dict = {}
    captured: dict = {}
    ready = {stage: threading.Event() for stage in STAGES}
    memory = PeakMemory(cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        """Times (or, on the warm-up step, counts) each step of one stage, in its turn."""

        def __init__(self, stage: str, trainer):
            self.stage, self.trainer, self.step = stage, trainer, 0

        def on_step_begin(self, args, state, control, **kwargs):
            ready[self.stage].set()
            turns.wait(self.stage)
            if self.step > 0 and settings.time_generation:
                sync()
                begin = time.perf_counter()
                out = real_generate(self.trainer, prompts, settings.seed + 1000 + self.step)
                sync()
                raw[self.stage]["generation_seconds"].append(time.perf_counter() - begin)
                raw[self.stage]["generated_tokens"].append(sum(len(ids) for ids in out[1]))
                del out
            self.counter = None
            if self.step == 0:
                names = {**root_names(model, "student"),
                         **{k: v for m in teacher_parts(self.trainer, model)[0] for k, v in root_names(m, "teacher").items()}}
                self.counter = flop_counter(names)
                self.counter.__enter__()
            else:
                memory.start()
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            seconds = time.perf_counter() - self.begin
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                counted[self.stage] = self.counter.summary()
            else:
                raw[self.stage]["step_memory_rise_bytes"].append(memory.stop())
                raw[self.stage]["non_generation_seconds"].append(seconds)
            log(f"{self.stage} step {self.step}{' (warm-up, counted)' if self.step == 0 else ''}: {seconds:.2f} s")
            self.step += 1
            turns.done()

    for stage, trainer in trainers.items():
        trainer._generate = replay
        trainer.add_callback(Clock(stage, trainer))  # after the trainer's own callbacks (OPSD's teacher update)
    inner = trainers["opsd"]._generate_and_score_completions

    def capture(inputs):
        batch = inner(inputs)
        captured["batch"] = batch
        return batch

    trainers["opsd"]._generate_and_score_completions = capture

    errors = {}

    def run(stage):
        try:
            trainers[stage].train()
        except BaseException as error:  # reported by the main thread
            errors[stage] = error
            turns.fail(error)
            ready[stage].set()

    threads = {}
    for stage in STAGES:  # one at a time up to its first step: the Trainer's set-up is not thread-safe
        threads[stage] = threading.Thread(target=run, args=(stage,), name=f"{stage}-train")
        threads[stage].start()
        ready[stage].wait()
    turns.open()
    for thread in threads.values():
        thread.join()
    if errors:
        stage, error = next(iter(errors.items()))
        raise RuntimeError(f"{stage} training failed: {error!r}") from error

    teacher = teacher_forward_flops(model, captured["batch"])
    stages = {}
    for stage, trainer in trainers.items():
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        state_bytes = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        kept_bytes = tensor_bytes(teacher_parts(trainer, model)[1])
        rise = max(raw[stage]["step_memory_rise_bytes"])
        stages[stage] = {
            "flops": counted[stage]["total"], "flops_by_module": counted[stage]["by_module"],
            "flops_by_op": counted[stage]["by_op"], "flops_by_site": counted[stage]["by_site"],
            "uncounted_ops": counted[stage]["uncounted_ops"],
            "non_generation_seconds_median": statistics.median(raw[stage]["non_generation_seconds"]),
            "generation_seconds_median": (statistics.median(raw[stage]["generation_seconds"])
                                          if raw[stage]["generation_seconds"] else None),
            "peak_memory_bytes": weights + state_bytes + kept_bytes + rise,
            "memory_parts_bytes": {"weights": weights, "optimizer_state": state_bytes,
                                   "teacher_kept_apart": kept_bytes, "largest_rise_within_a_step": rise},
            **{k: [round(v, 4) if isinstance(v, float) else v for v in values] for k, values in raw[stage].items()},
        }
    opsd, grpo = stages["opsd"], stages["grpo"]
    bound = (grpo["flops"] + teacher["total"]) / grpo["flops"]
    flops_ratio = opsd["flops"] / grpo["flops"]
    wall_ratio = opsd["non_generation_seconds_median"] / grpo["non_generation_seconds_median"]
    generation_ratio = (opsd["generation_seconds_median"] / grpo["generation_seconds_median"]
                        if settings.time_generation else None)
    return {
        "flops_ratio": flops_ratio,
        "bound_ratio": bound,
        "wall_ratio_non_generation": wall_ratio,
        "generation_ratio": generation_ratio,
        "peak_memory_ratio": opsd["peak_memory_bytes"] / grpo["peak_memory_bytes"],
        "targets": {"flops_ratio_max": TARGET_FLOPS * bound, "wall_ratio_non_generation_max": TARGET_WALL * bound,
                    "flops_met": flops_ratio <= TARGET_FLOPS * bound, "wall_met": wall_ratio <= TARGET_WALL * bound,
                    "flops_ratio_over_bound": flops_ratio / bound, "wall_ratio_over_bound": wall_ratio / bound},
        "extra_flops_over_bound_by_module": extra_over_bound(opsd, grpo, teacher),
        "settings": asdict(settings),
        "batch": {"rollouts": len(prompts), "completion_tokens": lengths,
                  "prompt_tokens": sorted({len(ids) for ids in generated[0]}),
                  "teacher_prompt_tokens": int(captured["batch"]["teacher_prompt_ids"].shape[1]),
                  "generated_once_seconds": round(once_seconds, 3)},
        "teacher_forward": teacher,
        "head_gemm_seconds": head_gemm_seconds(model, sum(len(ids) for ids in generated[1])),
        "order": order,
        "stages": stages,
        "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def extra_over_bound(opsd: dict, grpo: dict, teacher: dict) -> dict:
    """OPSD's FLOPs minus the bound's (GRPO step + teacher forward), by module and phase (non-zero only)."""
    out = {}
    for name in sorted(set(opsd["flops_by_module"]) | set(grpo["flops_by_module"]) | set(teacher["by_module"])):
        phases = defaultdict(int)
        for sign, source in ((1, opsd["flops_by_module"]), (-1, grpo["flops_by_module"]), (-1, teacher["by_module"])):
            for phase, flops in source.get(name, {}).items():
                phases[phase] += sign * flops
        phases = {k: v for k, v in phases.items() if v}
        if phases:
            out[name] = phases
    return out


# ---------------------------------------------------------------- the command


def provenance() -> dict:
    """The commit measured (and whether the trainers' source differs from it), the machine and its load."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"commit": git("rev-parse", "HEAD"), "commit_subject": git("log", "-1", "--format=%s"),
            "src_changes_not_committed": git("status", "--porcelain", "--", "src").splitlines(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


def table(result: dict) -> str:
    """The headline numbers as Markdown rows."""
    s = result["stages"]
    gib = 2**30
    rows = [("matmul FLOPs per step, without generation", f"{s['opsd']['flops'] / 1e9:.1f} G",
             f"{s['grpo']['flops'] / 1e9:.1f} G", f"{result['flops_ratio']:.3f}"),
            ("wall s per step, without generation (median)", f"{s['opsd']['non_generation_seconds_median']:.2f}",
             f"{s['grpo']['non_generation_seconds_median']:.2f}", f"{result['wall_ratio_non_generation']:.3f}")]
    if result["generation_ratio"] is not None:
        rows.append(("generation s (median)", f"{s['opsd']['generation_seconds_median']:.2f}",
                     f"{s['grpo']['generation_seconds_median']:.2f}", f"{result['generation_ratio']:.3f}"))
    rows.append(("peak memory", f"{s['opsd']['peak_memory_bytes'] / gib:.2f} GiB",
                 f"{s['grpo']['peak_memory_bytes'] / gib:.2f} GiB", f"{result['peak_memory_ratio']:.3f}"))
    lines = ["| | OPSD | GRPO | OPSD / GRPO |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    head = result["head_gemm_seconds"]
    lines.append(f"\none LM-head product over {head['rows']} rows: bf16 logits {head['bf16_output']:.3f} s, "
                 f"float32 logits {head['float32']:.3f} s ({head['float32_over_bf16_output']:.2f}x)")
    t = result["targets"]
    lines.append(f"\nbound_ratio {result['bound_ratio']:.3f}: targets flops_ratio <= {t['flops_ratio_max']:.3f} "
                 f"({'met' if t['flops_met'] else 'not met'}), wall_ratio_non_generation <= "
                 f"{t['wall_ratio_non_generation_max']:.3f} ({'met' if t['wall_met'] else 'not met'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=defaults.shape,
                        help="qwen3-1.7b: the real vocabulary and widths; tiny: the tests' shape")
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers (Qwen3-1.7B has 28)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="prompts per step")
    parser.add_argument("--rollouts", type=int, default=defaults.rollouts,
                        help="rollouts per prompt (OPSD) = group size (GRPO)")
    parser.add_argument("--completion", type=int, default=defaults.completion, help="tokens per rollout")
    parser.add_argument("--generation", choices=("transformers", "paged"), default=defaults.generation,
                        help="TRL generation backend of both stages")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights' dtype; auto: bfloat16 on a GPU, float32 on a CPU (see the module's docstring)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=defaults.gradient_checkpointing)
    parser.add_argument("--vllm-style", action="store_true",
                        help="set both trainers up as under vLLM (use_vllm): GRPO's importance-sampling correction")
    parser.add_argument("--vllm-importance-sampling-correction", action=argparse.BooleanOptionalAction,
                        default=defaults.vllm_importance_sampling_correction, help="GRPO's, with --vllm-style")
    parser.add_argument("--teacher-weights", default=defaults.teacher_weights, help="OPSD teacher_weights")
    parser.add_argument("--divergence", default=defaults.divergence, help="OPSD divergence")
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size, help="OPSD chunk_size")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="measured steps per stage (>= 3)")
    parser.add_argument("--no-generation-timing", action="store_true", help="skip timing each stage's generation")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--work", type=Path, help="trainers' output folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    dtype = args.dtype
    if dtype == "auto":
        import torch

        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    settings = Settings(shape=args.shape, layers=args.layers, prompts=args.prompts, rollouts=args.rollouts,
                        completion=args.completion, generation=args.generation, dtype=dtype,
                        gradient_checkpointing=args.gradient_checkpointing, vllm_style=args.vllm_style,
                        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
                        teacher_weights=args.teacher_weights, divergence=args.divergence,
                        chunk_size=args.chunk_size, steps=args.steps, time_generation=not args.no_generation_timing)
    try:
        settings.check(minimum_steps=3)
    except ValueError as error:
        parser.error(str(error))
    load_before = os.getloadavg()
    result = measure(settings, args.work, log=lambda line: print(line, flush=True))
    result = {**result, **provenance(), "command": " ".join(["python", "benchmarks/opsd_step_cost.py", *(argv or sys.argv[1:])]),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
