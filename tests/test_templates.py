"""Real chat templates end to end: the reasoning-model families users run, on tiny local models.

Each family is a tiny word-level tokenizer whose vocabulary carries the family's special tokens,
with the chat template that the installed TRL ships for it (read from the package, not copied),
and a tiny model of the family's architecture.
"""

import functools
import json
import logging

import pytest
import torch

from opsdlab.tasks import templates
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import Generation, evaluate, generate
from opsdlab.modeling.models import (build_tiny_model, build_tiny_tokenizer, check_output_head, load_policy, output_head,
                            save_policy, thinking_token_count)
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt, user_message
from opsdlab.loss.rewards import format_reward
from opsdlab.tasks.templates import ThinkingSwitchError, opens_thinking, shipped_template
from opsdlab.tasks.verifier import VerifierConfig, extract_answer, is_correct

EXACT = VerifierConfig(extract="last_boxed", compare="exact")

QWEN = dict(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos_token="<|im_end|>",
            pad_token="<|endoftext|>")
DEEPSEEK = dict(special_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                "<｜▁pad▁｜>"),
                bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜▁pad▁｜>",
                add_bos=True)
LLAMA3 = dict(special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|finetune_right_pad_id|>"),
              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
              add_bos=True)
GEMMA = dict(special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), bos_token="<bos>",
             eos_token="<end_of_turn>", pad_token="<pad>", add_bos=True)

# family (TRL template name) -> (tokenizer options, tiny architecture, what enable_thinking does)
FAMILIES = {
    "qwen3": (QWEN, "qwen3", "switch"),
    "qwen3_5_think": (QWEN, "qwen3", "switch"),
    "qwen3_instruct_2507": (QWEN, "qwen3", "none"),
    "deepseek_r1_distill": (DEEPSEEK, "llama", "always_on"),
    "llama3_1": (LLAMA3, "llama", "none"),
    "gemma3": (GEMMA, "gemma3", "none"),
    "gemma": (GEMMA, "gemma2", "none"),
}
THINK_OPENED = {"qwen3_5_think", "deepseek_r1_distill"}
ADDS_BOS = {"deepseek_r1_distill", "llama3_1", "gemma3", "gemma"}
REASONING = "1 + 2 = 3\nwait, let me check: 1 + 2 = 3. ok.\n"
ANSWER = "The answer is \\boxed{3}."


@functools.lru_cache(maxsize=None)
def family_tokenizer(family: str):
    from opsdlab.tasks import build_task

    corpus = build_task("synthetic", {}).tokenizer_corpus()
    corpus += ["Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "model", "What is 1 + 1?"]
    options, _, _ = FAMILIES[family]
    # Real reasoning tokenizers keep <think> and </think> when decoding with skip_special_tokens.
    return build_tiny_tokenizer(corpus, chat_template=shipped_template(family), decode_keeps_think=True, **options)


def thinking_modes(family: str) -> list[bool]:
    return [True] if FAMILIES[family][2] == "always_on" else [True, False]


def response_for(prompt: str, reasoning: str = REASONING, answer: str = ANSWER) -> str:
    """The same reasoning, written the way the template expects: opened by the prompt or by the model."""
    body = f"{reasoning}</think>\n\n{answer}"
    return body if opens_thinking(prompt) else "<think>\n" + body


@pytest.fixture
def example(task):
    from opsdlab.tasks.data import pair_unrelated

    return pair_unrelated(task.examples("test", 2))[0]


# ------------------------------------------------------------------------------------ rendering


def test_families_read_the_templates_that_trl_ships():
    assert set(FAMILIES) <= set(templates.shipped_template_names())
    assert "enable_thinking" not in shipped_template("deepseek_r1_distill")
    assert family_tokenizer("llama3_1").chat_template == shipped_template("llama3_1")


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_render_without_unknown_tokens(family, example):
    tokenizer = family_tokenizer(family)
    for thinking in thinking_modes(family):
        ids = tokenizer(render_prompt(tokenizer, example, thinking=thinking))["input_ids"]
        assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("context", sorted(set(TEACHER_CONTEXTS) - {"none"}))
def test_student_and_teacher_prompts_differ_only_by_the_privileged_block(family, context, example):
    tokenizer = family_tokenizer(family)
    block = TEACHER_CONTEXTS[context](example, "2 + 3 = 5")
    for thinking in thinking_modes(family):
        student = render_prompt(tokenizer, example, thinking=thinking)
        teacher = render_prompt(tokenizer, example, thinking=thinking, context=context, sibling="2 + 3 = 5")
        plain, privileged = user_message(example), user_message(example, context=block)
        assert privileged == plain + "\n\n" + block
        assert student.count(plain) == 1
        assert teacher == student.replace(plain, privileged)


@pytest.mark.parametrize("family", FAMILIES)
def test_thinking_switch_is_probed_per_template(family):
    switch = templates.thinking_switch(family_tokenizer(family))
    assert switch.kind == FAMILIES[family][2]
    assert switch.opens_when_on == (family in THINK_OPENED)
    assert family in switch.template


def test_a_template_that_ignores_enable_thinking_cannot_render_a_non_thinking_prompt(example):
    """DeepSeek-R1-distill always opens <think>: asking for thinking off is an error naming the template."""
    tokenizer = family_tokenizer("deepseek_r1_distill")
    with pytest.raises(ThinkingSwitchError, match="deepseek_r1_distill.*always opens a think block"):
        render_prompt(tokenizer, example, thinking=False)
    with pytest.raises(ThinkingSwitchError, match=r"teacher prompt \(solution\)"):
        render_prompt(tokenizer, example, thinking=False, context="solution")
    assert render_prompt(tokenizer, example, thinking=True).endswith("<｜Assistant｜><think>\n")


def test_a_template_that_always_closes_thinking_cannot_render_a_thinking_prompt(example):
    forced_off = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                  "{%- endfor %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}")
    tokenizer = build_tiny_tokenizer(["What is 1 + 1?"], chat_template=forced_off)
    with pytest.raises(ThinkingSwitchError, match="always closes an empty think block"):
        render_prompt(tokenizer, example, thinking=True)
    assert render_prompt(tokenizer, example, thinking=False).endswith("</think>\n\n")


def test_a_template_without_a_switch_warns_once_naming_it(example, caplog, monkeypatch):
    monkeypatch.setattr(templates, "_warned", set())
    tokenizer = family_tokenizer("llama3_1")
    with caplog.at_level(logging.WARNING, logger="opsdlab.tasks.templates"):
        for _ in range(3):
            render_prompt(tokenizer, example, thinking=False)
    warnings = [r.getMessage() for r in caplog.records if "no thinking switch" in r.getMessage()]
    assert len(warnings) == 1 and "llama3_1" in warnings[0] and "thinking-off" in warnings[0]


def test_the_project_template_and_qwen3_render_identically(tokenizer, example):
    """The project's tiny template is Qwen3's generation prompt: same text in both modes."""
    qwen = family_tokenizer("qwen3")
    for thinking in (True, False):
        assert render_prompt(tokenizer, example, thinking=thinking) == render_prompt(qwen, example, thinking=thinking)


# ------------------------------------------------------------------------------------ BOS


@pytest.mark.parametrize("family", sorted(ADDS_BOS))
def test_prompt_ids_carry_exactly_one_bos(family, example):
    """TRL tokenizes the rendered prompt with special tokens (GRPOTrainer, SFTTrainer): one BOS, not two."""
    tokenizer = family_tokenizer(family)
    assert templates.adds_bos(tokenizer)
    for context in ("none", "solution"):
        prompt = render_prompt(tokenizer, example, context=context)
        assert not prompt.startswith(tokenizer.bos_token)
        ids = tokenizer(text=[prompt])["input_ids"][0]  # GRPOTrainer._tokenize_prompts
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", sorted(ADDS_BOS))
def test_sft_rows_tokenize_with_exactly_one_bos(family, task):
    """SFTTrainer tokenizes prompt and prompt + completion text with special tokens too."""
    tokenizer = family_tokenizer(family)
    for row in task.sft_rows(tokenizer, 4):
        for text in (row["prompt"], row["prompt"] + row["completion"]):
            ids = tokenizer(text=text)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5_think"])
def test_tokenizers_without_bos_keep_the_template_text(family, example):
    tokenizer = family_tokenizer(family)
    assert not templates.adds_bos(tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": user_message(example)}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
    assert render_prompt(tokenizer, example) == rendered


def test_evaluation_tokenizes_prompts_like_training(tmp_path, example):
    """evaluate.generate feeds the model the same prompt ids as TRL's trainer: one BOS."""
    tokenizer = family_tokenizer("llama3_1")
    model = build_tiny_model(tokenizer, architecture="llama")
    prompt = render_prompt(tokenizer, example)
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return original(**kwargs)

    model.generate = spy
    generate(model, tokenizer, [prompt], SamplingConfig(k=1, temperature=0, max_new_tokens=2))
    assert seen[0][0].tolist() == tokenizer(text=[prompt])["input_ids"][0]
    assert seen[0][0].tolist().count(tokenizer.bos_token_id) == 1


# ------------------------------------------------------------------------------------ responses


@pytest.mark.parametrize("family", FAMILIES)
def test_thinking_tokens_answer_and_format_on_a_known_response(family, example):
    tokenizer = family_tokenizer(family)
    prompt = render_prompt(tokenizer, example, thinking=True)
    assert opens_thinking(prompt) == (family in THINK_OPENED)
    response = response_for(prompt)
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == response
    expected = len(tokenizer("\n" + REASONING, add_special_tokens=False)["input_ids"])
    assert thinking_token_count(ids, tokenizer, prompt) == expected
    assert templates.thinking_text(text, prompt) == "\n" + REASONING
    assert extract_answer(text, EXACT) == "3" and is_correct(text, "3", EXACT)
    assert format_reward(prompts=[prompt], completions=[text]) == [1.0]


def test_a_think_opened_response_is_read_like_an_explicit_one():
    """Same reasoning, template-opened or model-opened: same thinking tokens, answer and format score."""
    tokenizer = family_tokenizer("qwen3_5_think")
    opened, explicit = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n"
    for reasoning, answer in ((REASONING, ANSWER), (REASONING + "\\boxed{4}\n", "so 3."), (REASONING, "")):
        a, b = response_for(opened, reasoning, answer), response_for(explicit, reasoning, answer)
        ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
        ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
        assert thinking_token_count(ids_a, tokenizer, opened) == thinking_token_count(ids_b, tokenizer, explicit) > 0
        assert extract_answer(a, EXACT) == extract_answer(b, EXACT)
        assert format_reward(prompts=[opened], completions=[a]) == format_reward(prompts=[explicit], completions=[b])


def test_format_reward_reads_a_think_opened_response_through_its_prompt():
    """A response that starts inside the think block and never closes it is malformed."""
    opened = "<｜User｜>What is 1 + 2?<｜Assistant｜><think>\n"
    unclosed = "1 + 2 = 3, so \\boxed{3}"
    assert format_reward(prompts=[opened], completions=[unclosed]) == [0.0]
    assert format_reward(prompts=[opened], completions=["1 + 2 = 3\n</think>\n\n\\boxed{3}"]) == [1.0]
    assert format_reward(prompts=["<|im_start|>assistant\n"], completions=[unclosed]) == [1.0]
    assert format_reward(completions=[unclosed]) == [1.0]  # no prompt: read as written


def test_the_answer_is_read_after_the_think_block():
    assert extract_answer("<think>\n\\boxed{4}\n</think>\n\nThe answer is \\boxed{3}.", EXACT) == "3"
    assert extract_answer("<think>\nmaybe \\boxed{4}\n</think>\n\nno box here", EXACT) is None
    assert extract_answer("maybe \\boxed{4}\n</think>\n\nThe answer is \\boxed{3}.", EXACT) == "3"
    assert extract_answer("<think>\n1 + 2 = \\boxed{3}", EXACT) == "3"  # never closed: read whole, as before
    assert extract_answer("The answer is \\boxed{3}.", EXACT) == "3"
    last_number = VerifierConfig(extract="last_number", compare="exact")
    assert extract_answer("7 + 8 = 15\n</think>\n\nThe answer is 15.", last_number) == "15"


def test_sft_targets_fit_a_template_that_opens_the_think_block(task):
    tokenizer = family_tokenizer("deepseek_r1_distill")
    rows = task.sft_rows(tokenizer, 6)
    for row in rows:
        assert row["prompt"].endswith("<｜Assistant｜><think>\n")
        assert not row["completion"].startswith("<think>") and "</think>\n\n" in row["completion"]
        full = row["prompt"] + row["completion"]
        assert full.count("<think>") == 1 and full.count("</think>") == 1
    explicit = task.sft_rows(family_tokenizer("qwen3"), 2)
    assert all(row["completion"].startswith("<think>\n") for row in explicit)
    assert templates.completion_for_prompt("x<think>\n", "<think>\nabc</think>") == "abc</think>"


# ------------------------------------------------------------------------------------ evaluation


def _fixed_generate(tokenizer):
    """A stand-in for sampling that writes the same reasoning for every prompt, as the template expects."""

    def fake(model, tok, prompts, sampling, desc="generate"):
        out = []
        for prompt in prompts:
            text = response_for(prompt)
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append(Generation(ids, tok.decode(ids, skip_special_tokens=True), False))
        return out

    return fake


def test_eval_counts_thinking_in_a_think_opened_template_like_an_explicit_one(tmp_path, monkeypatch):
    """`opsdlab eval` on the same text: Qwen3 (model opens <think>) and Qwen3.5-think (template opens it)."""
    from opsdlab.cli import main

    summaries = {}
    for family in ("qwen3", "qwen3_5_think"):
        tokenizer = family_tokenizer(family)
        folder = tmp_path / family
        save_policy(build_tiny_model(tokenizer), tokenizer, folder)
        monkeypatch.setattr("opsdlab.evaluation.evaluate.generate", _fixed_generate(tokenizer))
        out = tmp_path / f"eval-{family}"
        assert main(["eval", "--model", str(folder), "--data", "synthetic", "--problems", "3", "--k", "2",
                     "--out", str(out)]) == 0
        summaries[family] = json.loads((out / "summary.json").read_text())
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert all(s["thinking_tokens"] > 0 for s in samples)
    explicit, opened = summaries["qwen3"], summaries["qwen3_5_think"]
    assert opened["mean_thinking_tokens"] == explicit["mean_thinking_tokens"] > 0
    assert opened["avg_at_k"] == explicit["avg_at_k"]
    # The responses differ only by what the template wrote for the model: "<think>\n".
    opening = len(family_tokenizer("qwen3")("<think>\n", add_special_tokens=False)["input_ids"])
    assert opened["mean_response_tokens"] == explicit["mean_response_tokens"] - opening


def test_eval_of_a_real_model_on_a_think_opened_template_counts_thinking(tmp_path):
    from opsdlab.cli import main

    tokenizer = family_tokenizer("deepseek_r1_distill")
    save_policy(build_tiny_model(tokenizer, architecture="llama"), tokenizer, tmp_path / "m")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "synthetic", "--problems", "2", "--k", "1",
                 "--temperature", "0", "--max-new-tokens", "6", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_thinking_tokens"] > 0  # a random model never closes the block the template opened


def test_eval_with_thinking_off_on_a_template_that_cannot_is_a_clear_error(tmp_path, capsys):
    from opsdlab.cli import main

    tokenizer = family_tokenizer("deepseek_r1_distill")
    save_policy(build_tiny_model(tokenizer, architecture="llama"), tokenizer, tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "synthetic", "--problems", "1", "--k", "1",
                 "--temperature", "0", "--no-thinking", "--out", str(tmp_path / "e")]) == 2
    assert "deepseek_r1_distill" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("family", FAMILIES)
def test_opsd_steps_on_each_family_from_folder_to_folder(family, tmp_path, task):
    """HF folder in, OPSD (the alignment check runs on every batch), HF folder out, per family."""
    from opsdlab.config.stages import OPSDStageConfig
    from opsdlab.stages.opsd import run_opsd

    tokenizer = family_tokenizer(family)
    architecture = FAMILIES[family][1]
    save_policy(build_tiny_model(tokenizer, architecture=architecture), tokenizer, tmp_path / "in")
    model, loaded = load_policy(tmp_path / "in")
    assert loaded.chat_template == shipped_template(family)
    assert loaded.bos_token_id == tokenizer.bos_token_id and loaded.eos_token == tokenizer.eos_token
    config = OPSDStageConfig(gate="all", max_steps=2, prompts_per_step=2, rollouts_per_prompt=2,
                             max_completion_length=8, learning_rate=1e-3, save_steps=100, logging_steps=1)
    out = run_opsd(model, loaded, task.examples("train", 4), EXACT, config, tmp_path / "opsd", thinking=True)
    after, tokenizer_after = load_policy(out)
    assert after.config.model_type == model.config.model_type
    assert tokenizer_after.chat_template == shipped_template(family)
    records = [json.loads(line) for line in (tmp_path / "opsd" / "metrics.jsonl").read_text().splitlines()]
    assert any("opsd/loss" in r for r in records)


# ------------------------------------------------------------------------------------ LM head


def _forward(model, tokens=10):
    ids = torch.arange(3, 3 + tokens).unsqueeze(0)
    with torch.no_grad():
        output = model(input_ids=ids, output_hidden_states=True)
    return output.hidden_states[-1], output.logits


def _loud(model, factor=40.0):
    """Scale the LM head so that logits are large enough for soft-capping to bite."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3"])
def test_output_head_applies_final_logit_softcapping(architecture):
    tokenizer = family_tokenizer("gemma")
    model = build_tiny_model(tokenizer, architecture=architecture)
    if architecture == "gemma3":
        model.config.final_logit_softcapping = 10.0
    model = _loud(model.eval())
    hidden, logits = _forward(model)
    assert model.config.final_logit_softcapping
    assert torch.allclose(output_head(model)(hidden), logits, atol=1e-4)
    assert (model.get_output_embeddings()(hidden) - logits).abs().max() > 1.0  # the bare head is wrong
    check_output_head(model)
    with pytest.raises(RuntimeError, match="output_head"):
        check_output_head(model, head=model.get_output_embeddings())


def test_output_head_is_the_bare_head_without_postprocessing(tiny_folder):
    model, _ = load_policy(tiny_folder)
    hidden, logits = _forward(model.eval())
    assert torch.allclose(output_head(model)(hidden), model.get_output_embeddings()(hidden))
    assert torch.allclose(output_head(model)(hidden), logits, atol=1e-5)


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_output_head_applies_logit_scaling(family):
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
    torch.manual_seed(0)
    if family == "granite":
        model = GraniteForCausalLM(GraniteConfig(**dims, logits_scaling=4.0))
    else:
        model = CohereForCausalLM(CohereConfig(**dims, logit_scale=0.25))
    hidden, logits = _forward(model.eval())
    assert torch.allclose(output_head(model)(hidden), logits, atol=1e-5)
    assert not torch.allclose(model.get_output_embeddings()(hidden), logits, atol=1e-3)
