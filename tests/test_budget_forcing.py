"""Budget forcing at evaluation: responses cut at B tokens, the thinking closed and the answer forced.

Scripted responses through both backends' code paths give hand-computed layouts and summaries; the
tiny model shows that the forced ids sit between round 1 and round 2, that a response ending within
the budget is untouched, that a generous budget changes nothing, and that budget=None is the
evaluation it always was (pinned values recorded before budget forcing existed).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from opsdlab.evaluation import vllm_backend
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import (ANSWER_CUE, budget_forced_generate, evaluate, generate, response_length,
                                         write_eval)
from opsdlab.modeling.models import end_token_ids
from opsdlab.tasks.prompts import render_prompt
from opsdlab.tasks.templates import shipped_template, think_close_text
from opsdlab.tasks.verifier import VerifierConfig

EXACT = VerifierConfig(compare="exact")
EOS = "<|im_end|>"
CLOSE = ["\n", "</think>", "\n", "\n"]  # the tiny template's think-close text, "\n</think>\n\n"
CUE = ["The", "▁answer", "▁is", "▁\\boxed{"]

# What the model would write in round 1 (budget 6) in prompt-major order, k=2 per problem; both gold
# answers are 12. The scripted backends stop each row at the cap they are given, as a model does.
ROUND_ONE = [
    ["▁\\boxed{", "12", "}", EOS],                            # ends within the budget: untouched
    ["<think>", "\n", "20", "▁+", "▁22", "▁=", "▁42", EOS],      # cut inside its think block: closed, then the cue
    ["1", "12", "▁=", "▁12", "\n", "The", "▁answer", "▁is"],   # cut, no think block: a line break, then the cue
    ["▁\\boxed{", "7", "}", EOS],                              # ends, wrong
]
# Round 2 (answer_tokens 4), one row per cut response in order.
ROUND_TWO = [
    ["12", "}", EOS],                          # the forced answer, correct
    ["7", "}", "▁ok", "▁ok", "▁ok", "▁ok"],    # goes past the answer cap: truncated, wrong
]


def ids_of(tokenizer, tokens):
    return tokenizer.convert_tokens_to_ids(tokens)


def script_backends(model, tokenizer, monkeypatch, rounds):
    """Both backends' sampling replaced by `rounds` (one list of rows per generation call, in call
    order), each row stopped at the call's cap of new tokens; returns the list of (input ids, seeds)
    each call received."""
    rounds = [[ids_of(tokenizer, row) for row in rows] for rows in rounds]
    calls = []

    def capped(cap):
        return [row[:cap] for row in rounds[len(calls) - 1]]

    def generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        calls.append(([row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)], None))
        rows = capped(max_new_tokens)
        padded = torch.tensor([row + [pad_token_id] * (max_new_tokens - len(row)) for row in rows])
        return torch.cat([input_ids, padded], dim=1)

    def sample(llm, token_ids, sampling, seeds, stop):
        calls.append((token_ids, seeds))
        return [(row, "stop" if row[-1] == tokenizer.eos_token_id else "length")
                for row in capped(sampling.max_new_tokens)]

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(vllm_backend, "_sample", sample)
    return calls


@pytest.fixture
def scripted(tiny_folder, task, monkeypatch):
    """The tiny model and 2 problems; both backends' sampling replaced by the script, their inputs recorded."""
    from opsdlab.modeling.models import load_policy

    model, tokenizer = load_policy(tiny_folder)
    calls = script_backends(model, tokenizer, monkeypatch, [ROUND_ONE, ROUND_TWO, ROUND_ONE, ROUND_TWO])
    examples = [replace(example, answer="12") for example in task.examples("test", 2)]
    return model, tokenizer, examples, calls


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_forced_layout_and_summary_by_hand(scripted, backend, tmp_path):
    model, tokenizer, examples, calls = scripted
    engine = None if backend == "vllm" else model
    sampling = SamplingConfig(k=2, max_new_tokens=50, seed=3)
    prompts = [render_prompt(tokenizer, example) for example in examples]
    generations = budget_forced_generate(backend, engine, tokenizer, prompts, sampling, budget=6, answer_tokens=4)
    one = [ids_of(tokenizer, row[:6]) for row in ROUND_ONE]  # what round 1 keeps: at most 6 tokens and the EOS
    two = [ids_of(tokenizer, row[:4]) for row in ROUND_TWO]
    closed = ids_of(tokenizer, CLOSE + CUE)
    cue = ids_of(tokenizer, ["\n"] + CUE)
    assert [g.token_ids for g in generations] == [one[0], one[1] + closed + two[0], one[2] + cue + two[1], one[3]]
    assert [g.forced for g in generations] == [None, (6, 14), (6, 11), None]
    assert [g.truncated for g in generations] == [False, False, True, False]
    # Round 2 continued from the prompt ids, round 1's ids and the forced ids, nothing re-tokenized.
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    assert calls[1][0] == [prompt_ids[0] + one[1] + closed, prompt_ids[1] + one[2] + cue]
    if backend == "vllm":  # each continuation seeded by its sample's place: samples 1 and 2 of 4
        assert calls[1][1] == vllm_backend.prompt_seeds(4, 3)[1:]

    samples, summary = evaluate(engine, tokenizer, examples, EXACT, sampling, backend=backend, budget=6,
                                answer_tokens=4)
    # lengths without the closing EOS: 3; 6 + 8 + 3 - 1 = 16; 6 + 5 + 4 = 15 (no EOS); 3
    assert [(s.correct, s.truncated, s.response_tokens) for s in samples] == [
        (True, False, 3), (True, False, 16), (False, True, 15), (False, False, 3)]
    assert samples[1].thinking_tokens == 6  # "\n 20 + 22 =" and the forced "\n" before </think>
    assert samples[1].first_correct_token == 14  # the "12" round 2 wrote after the forced cue
    assert samples[1].text.endswith("The answer is \\boxed{12}")
    assert summary["budget"] == 6 and summary["answer_tokens"] == 4 and summary["forced_samples"] == 2
    assert summary["avg_at_k"] == 0.5 and summary["truncation_rate"] == 0.25
    assert summary["mean_tokens_correct"] == 9.5 and summary["mean_tokens_incorrect"] == 9.0
    # ladder of 3, 3, 15, 16: p25 3, p50 9, p75 15.25, p90 15.7, max 16; within 3 to 15 only sample 0
    # counts (p1 1/2), within 16 samples 0 and 1 (p1 2/2); the truncated one never counts
    assert summary["accuracy_at_budget"] == {"3": 0.25, "9": 0.25, "15": 0.25, "16": 0.5}
    write_eval(tmp_path, samples, summary)


# Budget 6, answer_tokens 4, k=1 on 3 problems: responses of B-1, B and B+1 tokens before their EOS.
AT_THE_BUDGET = [
    ["▁\\boxed{", "12", "}", "▁ok", "▁ok", EOS],                         # 5 tokens: ends within the budget
    ["▁\\boxed{", "12", "}", "▁ok", "▁ok", "▁ok", EOS],                  # 6 tokens: exactly the budget, kept
    ["▁\\boxed{", "12", "}", "▁ok", "▁ok", "▁ok", "▁ok", EOS],           # 7 tokens: cut after the 6th, forced
]
# The forced answer: exactly answer_tokens tokens before its EOS, so not truncated.
ANSWER_AT_ITS_CAP = [["12", "}", "▁ok", "▁ok", EOS]]


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_a_response_of_exactly_the_budget_is_kept_and_one_token_more_is_forced(tiny_folder, task, monkeypatch,
                                                                                 backend):
    from opsdlab.modeling.models import load_policy

    model, tokenizer = load_policy(tiny_folder)
    calls = script_backends(model, tokenizer, monkeypatch, [AT_THE_BUDGET, ANSWER_AT_ITS_CAP])
    examples = [replace(example, answer="12") for example in task.examples("test", 3)]
    samples, summary = evaluate(None if backend == "vllm" else model, tokenizer, examples, EXACT,
                                SamplingConfig(k=1, temperature=0.0), backend=backend, budget=6, answer_tokens=4)
    # lengths without the EOS: 5; 6; 6 + ("\n" and the 4-token cue) 5 + 4 = 15
    assert [(s.response_tokens, s.truncated) for s in samples] == [(5, False), (6, False), (15, False)]
    assert summary["forced_samples"] == 1
    # one continuation, of the 7-token response: its prompt, its first 6 tokens, the line break and the cue
    prompt = tokenizer(render_prompt(tokenizer, examples[2]), add_special_tokens=True)["input_ids"]
    assert calls[1][0] == [prompt + ids_of(tokenizer, AT_THE_BUDGET[2][:6] + ["\n"] + CUE)]
    assert samples[1].text == tokenizer.decode(ids_of(tokenizer, AT_THE_BUDGET[1]), skip_special_tokens=True)
    assert samples[2].text.endswith("ok ok ok\nThe answer is \\boxed{12} ok ok")


def test_budgets_choose_the_accuracy_at_budget_points(scripted):
    model, tokenizer, examples, _ = scripted
    _, summary = evaluate(model, tokenizer, examples, EXACT, SamplingConfig(k=2), budget=6, answer_tokens=4,
                          budgets=[2, 3, 20])
    assert summary["accuracy_at_budget"] == {"2": 0.0, "3": 0.25, "20": 0.5}


@pytest.mark.parametrize("budget,answer_tokens,message", [
    (0, 32, "budget must be a token count >= 1, got 0"),
    (2.5, 32, "budget must be a token count >= 1, got 2.5"),
    (True, 32, "budget must be a token count >= 1, got True"),
    (8, 0, "answer_tokens must be a token count >= 1, got 0"),
])
def test_bad_budget_is_one_clear_error(tiny_folder, task, budget, answer_tokens, message):
    with pytest.raises(ValueError, match=message):
        evaluate(None, None, task.examples("test", 1), EXACT, SamplingConfig(k=1, temperature=0.0), budget=budget,
                 answer_tokens=answer_tokens)


# ------------------------------------------------------------------ the template's think-close text


@pytest.mark.parametrize("template", ["qwen3", "qwen3_5_think", "deepseek_r1_distill"])
def test_think_close_text_of_real_templates(tokenizer, template):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = shipped_template(template)
    # Qwen3's write it; DeepSeek-R1-distill's drops the reasoning of rendered turns: Qwen3's form is used.
    assert think_close_text(tokenizer) == "\n</think>\n\n"


def test_think_close_text_is_read_from_the_template(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
        "{{- m['content'].split('</think>')[0].rstrip() + '</think>\n' + m['content'].split('</think>')[-1].lstrip() }}"
        "{%- else %}{{- m['content'] }}{%- endif %}{%- endfor %}")
    assert think_close_text(tokenizer) == "</think>\n"


@pytest.mark.parametrize("prompt,response,unclosed", [
    ("user: hi\n", "<think>\nsome steps", True),
    ("user: hi\n", "<think>\nsteps</think>\n\nThe answer", False),
    ("user: hi\n", "no think block at all", False),
    ("user: hi\n<think>\n", "steps opened by the template", True),
    ("user: hi\n<think>\n", "steps</think>\nThe answer", False),
    ("user: hi\n<think>\n\n</think>\n\n", "thinking off", False),
])
def test_unclosed_thinking(prompt, response, unclosed):
    from opsdlab.tasks.templates import unclosed_thinking

    assert unclosed_thinking(response, prompt) is unclosed


# ------------------------------------------------------------------ the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from opsdlab.modeling.models import load_policy

    return load_policy(tiny_folder)


def test_think_opened_prompt_layout_on_the_tiny_model(tiny, task):
    """A template that opens <think> itself: round 1, the think-close and cue ids, then the model's greedy answer."""
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = shipped_template("qwen3_5_think")
    assert think_close_text(tokenizer) == "\n</think>\n\n"
    prompt = render_prompt(tokenizer, task.examples("test", 1)[0])
    assert prompt.endswith("<think>\n")
    sampling = SamplingConfig(k=1, temperature=0.0, max_new_tokens=64)
    budget, answer_tokens = 8, 6
    [forced] = budget_forced_generate("transformers", model, tokenizer, [prompt], sampling, budget, answer_tokens)
    [unforced] = generate(model, tokenizer, [prompt], replace(sampling, max_new_tokens=budget))
    assert unforced.truncated and tokenizer.convert_tokens_to_ids("</think>") not in unforced.token_ids
    forced_ids = tokenizer("\n</think>\n\n" + ANSWER_CUE, add_special_tokens=False)["input_ids"]
    assert forced.forced == (budget, budget + len(forced_ids))
    assert forced.token_ids[:budget] == unforced.token_ids
    assert forced.token_ids[budget:budget + len(forced_ids)] == forced_ids
    # Round 2 is the model's own greedy continuation of exactly those ids.
    context = tokenizer(prompt, add_special_tokens=True)["input_ids"] + forced.token_ids[:budget + len(forced_ids)]
    expected = model.generate(torch.tensor([context]), attention_mask=torch.ones(1, len(context), dtype=torch.long),
                              max_new_tokens=answer_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)[0, len(context):].tolist()
    assert forced.token_ids[budget + len(forced_ids):] == expected[:len(forced.token_ids) - budget - len(forced_ids)]
    assert len(forced.token_ids) <= budget + len(forced_ids) + answer_tokens


def test_responses_ending_within_the_budget_are_untouched(tiny, task):
    model, tokenizer = tiny
    prompts = [render_prompt(tokenizer, example) for example in task.examples("test", 3)]
    sampling = SamplingConfig(k=4, temperature=1.0, max_new_tokens=100, seed=2)
    budget = 12
    # room for the budget's tokens and an EOS: a response of at most 12 tokens ends within it
    unforced = generate(model, tokenizer, [p for p in prompts for _ in range(4)],
                        replace(sampling, max_new_tokens=budget + 1))
    forced = budget_forced_generate("transformers", model, tokenizer, prompts, sampling, budget, answer_tokens=5)
    eos = end_token_ids(tokenizer, model)
    ended = [i for i, g in enumerate(unforced) if response_length(g, eos) <= budget]
    assert ended and len(ended) < len(unforced)  # both kinds are present
    for index, (before, after) in enumerate(zip(unforced, forced)):
        if index in ended:
            assert after == before  # same ids, text and flags; nothing forced
        else:
            assert after.forced is not None and after.token_ids[:budget] == before.token_ids[:budget]


def test_a_generous_budget_changes_nothing(tiny, task):
    """At a budget no response reaches, the forced evaluation is the unforced one: same samples, same accuracy."""
    model, tokenizer = tiny
    examples = task.examples("test", 3)
    sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=160, seed=4)
    unforced, plain = evaluate(model, tokenizer, examples, EXACT, sampling)
    assert not any(s.truncated for s in unforced)  # every response ended on its own (the seed is chosen so)
    forced, summary = evaluate(model, tokenizer, examples, EXACT, sampling, budget=160)
    assert forced == unforced
    assert summary["forced_samples"] == 0 and summary["avg_at_k"] == plain["avg_at_k"]
    assert summary["accuracy_at_budget"] == plain["accuracy_at_budget"]
    assert {key: value for key, value in summary.items() if key not in ("budget", "answer_tokens", "forced_samples")
            } == plain


# Recorded with the evaluation code as it was before budget forcing existed (tiny model, seed 0 weights,
# 3 test problems, k=2, temperature 1.0, 24 new tokens, sampling seed 1).
PINNED = [
    (24, "69 4 43 check check19 2428 21.70 reference 36 reason7776 again 6459 30 63 641 64"),
    (24, " within 37 9 396 48 and 33 10 7918 78The 27 step32 65 44 058 a</think>671"),
    (24, " 23 36 26 14</think>35 6380Solveassistant solution 54 put} solution put 34}76 concisely 64 21 68 +"),
    (24, " 66 43 \\boxed{41 79 41 problem36 3426Here 5575694363 3270 61 674 solve 8Solve"),
    (24, "346355Solve them 66 72679729 7829assistantsystem is3553 problemuser33 me 14 64"),
    (24, " 208,6938755065342639 again>Solve 35 25 72 76 13 solve9 5660"),
]


def test_no_budget_is_the_evaluation_as_before(tiny, task):
    model, tokenizer = tiny
    samples, summary = evaluate(model, tokenizer, task.examples("test", 3), EXACT,
                                SamplingConfig(k=2, temperature=1.0, max_new_tokens=24, seed=1))
    assert [(s.response_tokens, s.text) for s in samples] == PINNED
    assert all(s.truncated for s in samples)
    assert not {"budget", "answer_tokens", "forced_samples"} & set(summary)


# ------------------------------------------------------------------ opsdlab eval --budget


def test_eval_cli_budget_forces_and_records_it(tiny_folder, tmp_path, capsys):
    import json

    from opsdlab.cli import main

    out = tmp_path / "forced"
    assert main(["eval", "--model", str(tiny_folder), "--problems", "2", "--temperature", "0", "--budget", "4",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["budget"], summary["answer_tokens"], summary["forced_samples"]) == (4, 32, 2)
    forced = len(CUE) + 1  # the tiny template leaves <think> to the model, which did not open it: "\n" and the cue
    lengths = [json.loads(line)["response_tokens"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(4 + forced < length <= 4 + forced + 32 for length in lengths), lengths
    assert "budget 4 (2 of 2 forced)" in capsys.readouterr().out


def test_eval_cli_bad_budget_names_the_flag(tiny_folder, tmp_path, capsys):
    from opsdlab.cli import main

    assert main(["eval", "--model", str(tiny_folder), "--budget", "0", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "opsdlab eval: error: --budget must be >= 1 (tokens), got 0"


@pytest.mark.parametrize("response, expected", [
    ("<think>\n1 + 12 = 13\n13 +", "\n</think>\n\nThe answer is \\boxed{"),   # reasoning cut: closed, then the cue
    ("<think>\n1 + 12 = 13\n</think>\n\nThe answer is \\boxed{13}.", ""),    # reasoning done: its own answer goes on
    ("1 + 12 = 13\n13 +", "\nThe answer is \\boxed{"),                      # thinking off: the cue
])
def test_what_is_forced_depends_on_whether_the_reasoning_ended(tiny_folder, response, expected):
    from opsdlab.evaluation.evaluate import forced_text
    from opsdlab.modeling.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_folder)
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert forced_text(ids, tokenizer, prompt="") == expected


def test_eval_cli_budget_equal_to_the_longest_response_forces_nothing(tiny_folder, tmp_path):
    """`opsdlab eval --budget B` where B is the longest response's length (EOS not counted): at B and
    B+1 every response is the unforced one; at B-1 exactly the responses of B tokens are forced."""
    import json

    from opsdlab.cli import main

    def run(name, *flags):
        out = tmp_path / name
        assert main(["eval", "--model", str(tiny_folder), "--problems", "3", "--k", "2", "--temperature", "1.0",
                     "--seed", "4", "--max-new-tokens", "160", "--out", str(out), *flags]) == 0
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        return samples, json.loads((out / "summary.json").read_text())

    plain, _ = run("plain")
    assert not any(sample["truncated"] for sample in plain)  # every response ended (the seed is chosen so)
    longest = max(sample["response_tokens"] for sample in plain)
    for budget in (longest, longest + 1):
        samples, summary = run(f"b{budget}", "--budget", str(budget))
        assert summary["forced_samples"] == 0, budget
        assert [(s["text"], s["response_tokens"]) for s in samples] == [(s["text"], s["response_tokens"]) for s in plain]
    samples, summary = run("below", "--budget", str(longest - 1))
    at_longest = [i for i, sample in enumerate(plain) if sample["response_tokens"] == longest]
    assert summary["forced_samples"] == len(at_longest)
    assert all(samples[i]["response_tokens"] > longest for i in at_longest)
