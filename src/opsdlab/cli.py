"""The `opsdlab` command: demo, pipeline, report, and one subcommand per stage.

Every stage subcommand reads an HF model folder and writes one (`OUT/model`), so stages can be run
one by one on a user's own checkpoints; `pipeline` chains them from a config file and `demo` is
that pipeline on the tiny offline default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from opsdlab import __version__

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # = models.DTYPES, kept here so --help stays light


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (the offline task) or a jsonl/json/parquet/csv path or datasets name")
    parser.add_argument("--columns", default=None,
                        help="column mapping, e.g. problem=question,solution=explanation,answer=final")
    parser.add_argument("--problems", type=int, default=None, help="use at most this many problems")
    parser.add_argument("--no-thinking", action="store_true", help="render prompts with thinking disabled")
    parser.add_argument("--extract", default=None, help="answer extraction: last_boxed (default), first_boxed, last_number")
    parser.add_argument("--compare", default=None, help="answer comparison: math_verify or exact (task default)")


def _verifier(args, defaults: dict):
    """The one verifier, with the task's defaults unless --extract / --compare override them."""
    from opsdlab.verifier import VerifierConfig

    return VerifierConfig(extract=args.extract or defaults["extract"], compare=args.compare or defaults["compare"])


def _examples_and_verifier(args, split: str, count: int | None = None):
    """Evaluation problems (`count`, else --problems, else 200 synthetic / all file rows), each paired
    with another one's solution for the `unrelated` context, and the verifier."""
    from opsdlab.data import ColumnMap, load_examples, pair_unrelated, parse_column_map
    from opsdlab.tasks import FileTask, build_task

    count = count or args.problems
    if args.data == "synthetic":
        task = build_task("synthetic")
        return pair_unrelated(task.examples(split, count or 200)), _verifier(args, task.default_verifier)
    columns = parse_column_map(args.columns) if args.columns else ColumnMap(solution=None)
    examples = load_examples(args.data, columns, split=split, limit=count)
    return pair_unrelated(examples), _verifier(args, FileTask.default_verifier)


def _overrides(cls, pairs: list[str], flags: dict[str, str] | None = None):
    """Build a stage config dataclass from `--set` key=value pairs (YAML values) and named flags.

    `flags` maps a field to the value of its own command-line flag (e.g. `--gate`). A value of the
    wrong type is an error naming the option and the type expected.
    """
    import typing

    import yaml

    from opsdlab.config import ConfigError, check_value

    values = {}
    hints = typing.get_type_hints(cls)
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        if key not in hints:
            raise ConfigError(f"--set {key}: unknown option; valid: {sorted(hints)}")
        values[key] = check_value(yaml.safe_load(raw), hints[key], f"--set {key}")
    for key, value in (flags or {}).items():
        values[key] = check_value(value, hints[key], f"--{key}")
    return cls(**values)


def cmd_eval(args) -> int:
    from opsdlab.evaluate import SamplingConfig, check_backend, evaluate, load_for_eval, one_line, write_eval
    from opsdlab.vllm_backend import VLLMSettings

    check_backend(args.backend, "--backend")
    examples, verifier = _examples_and_verifier(args, "test")
    sampling = SamplingConfig(k=args.k, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    settings = VLLMSettings(tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization)
    model, tokenizer = load_for_eval(args.model, args.backend, args.dtype, settings=settings, seed=args.seed)
    samples, summary = evaluate(model, tokenizer, examples, verifier, sampling, thinking=not args.no_thinking,
                                context=args.context, backend=args.backend)
    summary["model"] = str(args.model)
    summary["data"] = args.data
    summary["dtype"] = args.dtype
    write_eval(args.out, samples, summary)
    print(one_line(Path(args.model).name, summary))
    print(f"wrote {Path(args.out) / 'summary.json'} and samples.jsonl")
    return 0


def cmd_sft(args) -> int:
    import torch

    from opsdlab.models import build_tiny_model, build_tiny_tokenizer, load_policy
    from opsdlab.sft import SFTStageConfig, run_sft
    from opsdlab.tasks import build_task

    config = _overrides(SFTStageConfig, args.set)
    if config.probe_every:
        from opsdlab.config import ConfigError

        raise ConfigError("--set probe_every: the SFT teacher probe runs in `opsdlab pipeline` (it grades held-out "
                          "problems from the OPSD teacher's prompt); set sft.probe_every in a pipeline config")
    if args.data == "synthetic":
        task = build_task("synthetic")
        if args.model == "tiny":
            tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
            model = build_tiny_model(tokenizer).to(getattr(torch, args.dtype))
        else:
            model, tokenizer = load_policy(args.model, args.dtype)
    else:
        task = build_task("file", {"train": args.data, "columns": args.columns})
        model, tokenizer = load_policy(args.model, args.dtype)
    rows = task.sft_rows(tokenizer, config.rows, thinking=not args.no_thinking, seed=args.seed)
    out = run_sft(model, tokenizer, rows, config, Path(args.out), seed=args.seed)
    print(f"sft: wrote {out}")
    return 0


def _train_examples(args, count: int):
    from opsdlab.tasks import build_task

    if args.data == "synthetic":
        task = build_task("synthetic")
        return task.examples("train", count), task.default_verifier
    task = build_task("file", {"train": args.data, "columns": args.columns})
    return task.examples("train", args.problems), task.default_verifier


def cmd_rlvr(args) -> int:
    from opsdlab.models import load_policy
    from opsdlab.rlvr import RLVRStageConfig, run_rlvr

    config = _overrides(RLVRStageConfig, args.set)
    examples, defaults = _train_examples(args, config.train_problems)
    verifier = _verifier(args, defaults)
    model, tokenizer = load_policy(args.model, args.dtype)
    out = run_rlvr(model, tokenizer, examples, verifier, config, Path(args.out), thinking=not args.no_thinking,
                   seed=args.seed)
    print(f"rlvr: wrote {out}")
    return 0


def cmd_opsd(args) -> int:
    from opsdlab.evaluate import SamplingConfig, evaluate, one_line
    from opsdlab.models import load_policy
    from opsdlab.opsd import OPSDStageConfig, run_opsd
    from opsdlab.prompts import CONTROL_CONTEXTS

    config = _overrides(OPSDStageConfig, args.set, {"gate": args.gate} if args.gate is not None else {})
    examples, defaults = _train_examples(args, config.train_problems)
    verifier = _verifier(args, defaults)
    model, tokenizer = load_policy(args.model, args.dtype)
    thinking = not args.no_thinking
    if args.teacher_check > 0:
        held_out, _ = _examples_and_verifier(args, "test", args.teacher_check)
        sampling = SamplingConfig(k=2, temperature=0.6, max_new_tokens=config.max_completion_length)
        _, student = evaluate(model, tokenizer, held_out, verifier, sampling, thinking=thinking, desc="student prompt")
        _, teacher = evaluate(model, tokenizer, held_out, verifier, sampling, thinking=thinking,
                              context=config.teacher_context, desc="teacher prompt")
        print(one_line("student prompt", student))
        print(one_line(f"teacher prompt ({config.teacher_context})", teacher))
        if teacher["avg_at_k"] <= student["avg_at_k"] and config.teacher_context not in CONTROL_CONTEXTS:
            print("WARNING: the teacher prompt is not more accurate than the student prompt; OPSD then has "
                  "nothing to teach beyond style.", file=sys.stderr)
    out = run_opsd(model, tokenizer, examples, verifier, config, Path(args.out), thinking=thinking, seed=args.seed)
    print(f"opsd: wrote {out}")
    return 0


def cmd_pipeline(args) -> int:
    from opsdlab.config import load_config

    config = load_config(args.config, args.overrides)
    return _run_and_report(config)


def _run_and_report(config) -> int:
    from opsdlab.pipeline import run_seeds
    from opsdlab.report import seed_dirs, stage_summary, write_report
    from opsdlab.runtime import is_main_process

    run_dir = run_seeds(config)
    if not is_main_process():  # under a multi-process launch the main process writes the report
        return 0
    report = write_report(run_dir)
    seeds = seed_dirs(run_dir)
    for seed, seed_dir in seeds.items():
        print(f"seed {seed}:")
        print("\n".join(stage_summary(seed_dir)))
    if not seeds:
        print("\n".join(stage_summary(run_dir)))
    print(f"report: {report}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_study(args) -> int:
    from opsdlab.study import run_study

    start = time.time()
    done = run_study(args.run_dir, [p for p in args.presets.split(",") if p], args.seeds, args.overrides,
                     jobs=args.jobs)
    for preset, result in done.items():
        print(f"{preset}: {result['report']}")
    print(f"study wall time: {time.time() - start:.0f}s")
    return 0


def cmd_demo(args) -> int:
    from opsdlab.config import load_config

    config = load_config("tiny", [f"run_dir={args.run_dir}"] + args.overrides)
    return _run_and_report(config)


def cmd_report(args) -> int:
    from opsdlab.report import write_report

    print(f"report: {write_report(Path(args.run_dir))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsdlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"opsdlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole pipeline on the tiny offline default, then the report")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. opsd.max_steps=10)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pipeline", help="SFT -> RLVR -> OPSD arms from a config file, then the report")
    p.add_argument("--config", required=True,
                   help="YAML file or a shipped preset: tiny, tiny-nothink, tiny-search, qwen3-8b, qwen3-1.7b")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. seeds=[0,1,2])")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("study", help="every task preset x pipeline seeds x OPSD arms and controls, "
                                     "one report over seeds per task")
    p.add_argument("--presets", default="tiny,tiny-search", help="comma-separated config presets or files, one per task "
                                                     "(default: tiny,tiny-search)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated pipeline seeds (default: 0,1,2)")
    p.add_argument("--run-dir", default="runs/study", help="one sub-directory per preset")
    p.add_argument("--jobs", type=int, default=1,
                   help="(preset, seed) parts run as this many processes at a time, each with OMP_NUM_THREADS "
                        "= cores / jobs unless set (default: 1, in this process)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value applied to every preset")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="rebuild the Markdown report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="k samples per problem: avg@k, pass@k, maj@k, lengths, truncation")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    _task_args(p)
    p.add_argument("--out", default="eval_out")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (then --k 1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context", default="none", help="prompt role: none (student) or a teacher context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="transformers",
                   help="what samples the responses: transformers (model.generate) or vllm (vLLM's engine)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weights' dtype (bfloat16 on GPUs)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model replica")
    p.add_argument("--data-parallel-size", type=int, default=1, help="vllm: model replicas")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="vllm: fraction of GPU memory (on CPU: of host RAM) for weights and KV cache")
    p.set_defaults(func=cmd_eval)

    for name, func, helptext in (("sft", cmd_sft, "supervised fine-tuning through TRL's SFTTrainer"),
                                 ("rlvr", cmd_rlvr, "GRPO/DAPO/Dr.GRPO with the verifier reward"),
                                 ("opsd", cmd_opsd, "outcome-gated on-policy self-distillation")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="HF model folder ('tiny' builds the default, sft only)")
        p.add_argument("--out", required=True, help="stage folder; the final model goes to OUT/model")
        _task_args(p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32",
                       help="weights' dtype (bfloat16 on GPUs; training then runs in bf16 mixed precision)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="stage option, repeatable (e.g. --set max_steps=50)")
        if name == "opsd":
            p.add_argument("--gate", default=None,
                           help="all, correct (default), incorrect, correct_or_truncated, split")
            p.add_argument("--teacher-check", type=int, default=100,
                           help="problems for the teacher-vs-student accuracy check before training (0: skip)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from opsdlab.config import ConfigError
    from opsdlab.data import DataError
    from opsdlab.models import ModelFolderError
    from opsdlab.runtime import LaunchError
    from opsdlab.study import StudyError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelFolderError, LaunchError, StudyError, ValueError) as error:
        if os.environ.get("OPSDLAB_DEBUG"):
            raise
        message = str(error)
        if message.startswith(f"{args.command}: "):  # a stage's own label: already said by the prefix
            message = message[len(args.command) + 2:]
        print(f"opsdlab {args.command}: error: {message}", file=sys.stderr)
        print("(set OPSDLAB_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
