"""The whole tiny pipeline under `accelerate launch` with 2 CPU processes, then the report.

SFT, RLVR with dynamic sampling, one OPSD arm, and every evaluation sharded over the processes: the
run directory must hold the files a single process writes, each written once, with evaluations
holding every problem and sample in a single process's order, and both processes must have held
the same weights at every save. A rerun with one evaluation removed redoes that evaluation alone.
The merge of shares is also checked in one process, with the split simulated (empty shares included).

On CPU, `accelerate launch --cpu` starts several processes only through MPI; `--multi_gpu` starts
them through torchrun, and without a visible GPU they form a gloo group on the CPU.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from opsdlab.config import load_config
from opsdlab.evaluation.evaluate import evaluate, read_samples
from opsdlab.evaluation.metrics.summary import summarize
from opsdlab.modeling.models import load_model, load_policy
from opsdlab.evaluation.evaluate import evaluate_sharded
from opsdlab.run.problems import eval_sets, verifier_of
from opsdlab.tasks import build_task
from launch_helpers import free_port, run_with_deadline

SCRIPT = Path(__file__).parent / "scripts" / "two_process_pipeline.py"
WORKER_DEADLINE = 240  # seconds; a normal run finishes well within it, even on loaded cores

RUN = {
    # SFT steps of 8 rows split by length into 2 micro-batches on each process (as the tiny preset runs).
    "sft": {"rows": 64, "max_steps": 3, "batch_size": 8, "save_steps": 2, "logging_steps": 1, "batching": "rebalanced",
            "gradient_accumulation_steps": 2},
    # All-zero rewards on this barely trained model: dynamic sampling drops every group and refills
    # on both processes (RLVR training on 2 processes is covered by test_multiprocess.py).
    "rlvr": {"max_steps": 2, "prompts_per_step": 4, "group_size": 2, "max_completion_length": 16,
             "train_problems": 16, "save_steps": 100, "logging_steps": 1, "dynamic_sampling": True,
             "dynamic_sampling_max_rounds": 2},
    "opsd": {"max_steps": 2, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_length": 16,
             "train_problems": 16, "save_steps": 100, "logging_steps": 1, "learning_rate": 1.0e-3},
    "arms": [{"name": "all", "gate": "all"}],
    "eval": {"problems": 9, "sampling": {"k": 2, "max_new_tokens": 16}},  # 9: shares of 5 and 4 problems
    "workers": 2,  # under a launch the steps run in order, on every process, and the log says so
}
CHECKPOINTS = {"base": ["", "-greedy"], "sft": ["", "-greedy", "-teacher-solution"],
               "rlvr": ["", "-greedy", "-teacher-solution"], "opsd-all-s0": ["", "-greedy"]}


def _launch(config: Path, out: Path) -> tuple[list[dict], str]:
    """`accelerate launch` the pipeline script on 2 processes; each process's record and the output."""
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OPSDLAB_WORKER_DEADLINE": str(WORKER_DEADLINE)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(SCRIPT), str(config), str(out)]
    returncode, output = run_with_deadline(command, env, out / "launch.log", WORKER_DEADLINE)
    assert returncode == 0, f"the pipeline on 2 processes failed or hung:\n{output[-6000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], output


def _config(root: Path, run_dir: Path) -> Path:
    config = root / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump({**RUN, "run_dir": str(run_dir)}))
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launch the pipeline on 2 processes once; the run directory and each process's record."""
    root = tmp_path_factory.mktemp("two_process_pipeline")
    run_dir = root / "run"
    config = _config(root, run_dir)
    ranks, output = _launch(config, root / "out")
    return run_dir, config, ranks, output


def test_every_file_is_written_once(run):
    run_dir, _, ranks, _ = run
    assert [r["exit_code"] for r in ranks] == [0, 0]
    assert (run_dir / "config.yaml").exists()
    for stage in ("base", "sft", "rlvr", "opsd/all-s0"):
        assert (run_dir / stage / "model" / "COMPLETE").exists(), stage
        assert (run_dir / stage / "model" / "model.safetensors").exists(), stage
    for stage in ("sft", "rlvr", "opsd/all-s0"):
        steps = [json.loads(line)["step"] for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1, (stage, steps)  # + the final summary
    written = sorted(p.relative_to(run_dir / "eval").as_posix() for p in (run_dir / "eval").glob("*/*/summary.json"))
    expected = sorted(f"{name}/synthetic{suffix}/summary.json" for name, suffixes in CHECKPOINTS.items()
                      for suffix in suffixes)
    assert written == expected
    records = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r["kind"] == "stage"] == ["base", "sft", "rlvr", "opsd-all-s0"]
    evals = [(r["checkpoint"], r["set"]) for r in records if r["kind"] == "eval"]
    assert len(evals) == len(set(evals)) == len(expected)
    assert sum(r["kind"] == "teacher_check" for r in records) == 1
    assert [r["message"][:30] for r in records if r["kind"] == "notice"] == ["[pipeline] workers: 2 applies "]
    report = run_dir / "report" / "report.md"
    assert "opsd-all-s0" in report.read_text()
    assert (run_dir / "report" / "accuracy_length_synthetic.png").stat().st_size > 1000


def test_both_processes_held_the_weights_that_were_saved(run):
    run_dir, _, (rank0, rank1), _ = run
    assert rank0["saved"] == rank1["saved"]
    finals = {stage: rank0["saved"][str(run_dir / stage / "model")] for stage in ("sft", "rlvr", "opsd/all-s0")}
    assert len({finals["sft"], finals["opsd/all-s0"]}) == 2  # OPSD trained
    sys.path.insert(0, str(SCRIPT.parent))
    from two_process_pipeline import weights_digest

    for stage, digest in finals.items():  # the folder on disk holds what the processes held
        assert weights_digest(load_model(run_dir / stage / "model")) == digest, stage


def test_sharded_evaluation_matches_a_single_process(run):
    """Same problems and sample indices, in the same order, as one process evaluating the checkpoint;
    the summary is computed over the merged samples."""
    run_dir, config_path, _, output = run
    assert output.count("[eval] rlvr/synthetic-greedy") == 1  # logged by the main process only
    config = load_config(config_path)
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    examples = eval_sets(config, task)["synthetic"]
    model, tokenizer = load_policy(run_dir / "opsd" / "all-s0" / "model")
    single, summary = evaluate_sharded(model, tokenizer, examples, verifier_of(config, task), config.eval.sampling,
                                       thinking=config.task.thinking)
    sharded = read_samples(run_dir / "eval" / "opsd-all-s0" / "synthetic" / "samples.jsonl")
    assert [(s.problem_id, s.sample_index) for s in sharded] == [(s.problem_id, s.sample_index) for s in single]
    assert len(sharded) == 9 * 2
    written = json.loads((run_dir / "eval" / "opsd-all-s0" / "synthetic" / "summary.json").read_text())
    for key, value in summarize(sharded, k=2).items():
        assert written[key] == value, key
    assert written["num_problems"] == summary["num_problems"] == 9
    assert written["sampling"] == summary["sampling"] and written["checkpoint"] == "opsd-all-s0"
    greedy = read_samples(run_dir / "eval" / "opsd-all-s0" / "synthetic-greedy" / "samples.jsonl")
    assert [s.problem_id for s in greedy] == [ex.id for ex in examples]


def test_a_rerun_redoes_only_what_is_missing_on_both_processes(run, tmp_path):
    """Resume: with one evaluation's summary removed, a rerun trains nothing and redoes that evaluation
    alone (every process must take the same branches, or the run hangs at a collective)."""
    source, _, _, _ = run
    run_dir = tmp_path / "rerun"
    shutil.copytree(source, run_dir)
    missing = run_dir / "eval" / "opsd-all-s0" / "synthetic-greedy"
    (missing / "summary.json").unlink()
    rewritten = {run_dir / "summary.jsonl", run_dir / "config.yaml", missing / "samples.jsonl"}  # + the report
    kept = {p: p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and p not in rewritten and p.parent != run_dir / "report"}
    before = (run_dir / "summary.jsonl").read_text().splitlines()

    ranks, _ = _launch(_config(tmp_path, run_dir), tmp_path / "out")

    assert [r["saved"] for r in ranks] == [{}, {}]  # no stage trained on either process
    assert {p: p.read_bytes() for p in kept} == kept  # nothing finished was rewritten
    assert len(read_samples(missing / "samples.jsonl")) == 9 and (missing / "summary.json").exists()
    after = (run_dir / "summary.jsonl").read_text().splitlines()
    assert after[:len(before)] == before
    added = [json.loads(line) for line in after[len(before):]]
    assert [(r["kind"], r.get("checkpoint"), r.get("set")) for r in added
            if r["kind"] not in ("teacher_check", "notice")] == [("eval", "opsd-all-s0", "synthetic-greedy")]


@pytest.mark.parametrize("problems, processes", [(7, 3), (2, 3)])
def test_shares_merge_into_a_single_process_evaluation(tiny_folder, task, monkeypatch, problems, processes):
    """`evaluate_sharded` with the problems split as accelerate splits them over several processes
    (simulated in one; with fewer problems than processes a share is empty): the merged samples are a
    single process's problems and sample indices in its order, and the summary is over all of them."""
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.evaluation import evaluate as evaluation
    from opsdlab.tasks.verifier import VerifierConfig

    seeds = []

    def split_like_accelerate(items, work):
        size, extra = divmod(len(items), processes)
        results, start = [], 0
        for index in range(processes):
            end = start + size + (1 if index < extra else 0)
            results.append(work(items[start:end], index) if end > start else None)
            start = end
        return results

    monkeypatch.setattr(evaluation, "shard_and_gather", split_like_accelerate)
    def recording(*args, **kwargs):
        seeds.append(args[4].seed)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", recording)
    model, tokenizer = load_policy(tiny_folder)
    examples = task.examples("test", problems)
    sampling, verifier = SamplingConfig(k=3, max_new_tokens=6, seed=5), VerifierConfig(**task.default_verifier)
    merged, summary = evaluate_sharded(model, tokenizer, examples, verifier, sampling, desc="sharded")
    single, _ = evaluate(model, tokenizer, examples, verifier, sampling)
    assert [(s.problem_id, s.sample_index) for s in merged] == [(s.problem_id, s.sample_index) for s in single]
    assert seeds == [5, 6, 7][:min(problems, processes)]  # one sampler seed per share
    assert summary == {**summary, **summarize(merged, k=3)}
    assert summary["num_problems"] == problems and summary["sampling"]["seed"] == 5
