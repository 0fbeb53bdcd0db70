"""Chat templates and the responses they produce: the one place that knows where thinking is.

Reasoning-model templates differ in who opens the think block. Qwen3's template leaves it to the
model (the response starts with `<think>`); DeepSeek-R1-distill's and Qwen3.5's thinking templates
end the generation prompt with `<think>\\n`, so the response starts *inside* the block and never
contains `<think>`. Every consumer of a response (thinking-token counts, the format reward, the
verifier's answer region, SFT targets) reads it through the functions here, with the rendered
prompt, so both kinds of template give the same numbers for the same reasoning.

This module also checks that a template does what the role asks of it (`check_thinking`): a
template that ignores `enable_thinking` never silently renders the other mode, and it strips the
BOS text a template writes when the tokenizer adds BOS itself (`strip_bos`): rendered prompts are
tokenized *with* special tokens everywhere (TRL's GRPOTrainer and SFTTrainer, evaluation), so the
prompt ids carry exactly one BOS.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from jinja2 import TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# ------------------------------------------------------------------------------------ responses


def opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open think block (the response starts in it)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def think_prefix(prompt: str) -> str:
    """The part of the think block that the prompt already wrote (`"<think>\\n"`), else ""."""
    if not opens_thinking(prompt):
        return ""
    return prompt[prompt.rindex(THINK_OPEN):]


def explicit_response(prompt: str, response: str) -> str:
    """The response as if the model had opened the think block itself.

    For a think-opened prompt this is the prompt's `<think>\\n` followed by the response, so a
    response reads the same whether the template or the model opened the block.
    """
    return think_prefix(prompt) + response


def answer_region(response: str) -> str:
    """The final-answer part of a response: the text after the last `</think>`.

    A response that never closes a think block (no thinking, or a truncated one) is returned
    whole, so a response without a think block is graded as before.
    """
    if THINK_CLOSE in response:
        return response[response.rindex(THINK_CLOSE) + len(THINK_CLOSE):]
    return response


def thinking_text(response: str, prompt: str = "") -> str | None:
    """The text inside the think block (up to `</think>` or the end), or None without one."""
    text = explicit_response(prompt, response)
    if THINK_OPEN not in text:
        return None
    inside = text[text.index(THINK_OPEN) + len(THINK_OPEN):]
    return inside.split(THINK_CLOSE, 1)[0]


def is_well_formed(response: str, prompt: str = "") -> bool:
    """A think block, if one is open, is closed, and the final-answer region boxes an answer."""
    text = explicit_response(prompt, response)
    if THINK_OPEN in text and THINK_CLOSE not in text[text.index(THINK_OPEN):]:
        return False
    return "\\boxed{" in answer_region(text)


def count_thinking_tokens(token_ids: list[int], tokenizer: PreTrainedTokenizerBase, prompt: str = "") -> int:
    """Tokens strictly between `<think>` and `</think>` (0 without a think block).

    An unclosed block (a truncated response) counts to the end. For a think-opened prompt the
    tokens the prompt wrote after `<think>` (its newline) count too, so the number is the one the
    same text gets when the model opens the block itself.
    """
    open_id = tokenizer.convert_tokens_to_ids(THINK_OPEN)
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    if open_id is None or open_id == tokenizer.unk_token_id:
        return 0
    ids = list(token_ids)
    prefix = think_prefix(prompt)
    if prefix:
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] + ids
    if open_id not in ids:
        return 0
    start = ids.index(open_id) + 1
    end = ids.index(close_id, start) if close_id in ids[start:] else len(ids)
    return end - start


def completion_for_prompt(prompt: str, completion: str) -> str:
    """An SFT target written with its own `<think>`, fitted to a prompt that already opened it."""
    prefix = think_prefix(prompt)
    if not prefix or not completion.startswith(THINK_OPEN):
        return completion
    rest = completion[len(THINK_OPEN):]
    tail = prefix[len(THINK_OPEN):]
    return rest[len(tail):] if rest.startswith(tail) else rest.lstrip()


def unclosed_thinking(response: str, prompt: str = "") -> bool:
    """Whether the response (read with the prompt's own `<think>`, if it wrote one) is still inside a
    think block: one was opened and not closed. `response` must keep the think tags (decode the ids
    without skipping special tokens), since some tokenizers drop them when skipping."""
    text = explicit_response(prompt, response)
    return THINK_OPEN in text and THINK_CLOSE not in text[text.rindex(THINK_OPEN):]


def closed_thinking(response: str, prompt: str = "") -> bool:
    """Whether the response (read with the prompt's own `<think>`) opened a think block and closed it."""
    text = explicit_response(prompt, response)
    return THINK_OPEN in text and THINK_CLOSE in text[text.rindex(THINK_OPEN):]


# ------------------------------------------------------------------------------------ templates


def shipped_template_names() -> list[str]:
    """Names of the chat templates that the installed TRL ships (`trl/chat_templates/*.jinja`)."""
    folder = resources.files("trl") / "chat_templates"
    return sorted(entry.name[: -len(".jinja")] for entry in folder.iterdir() if entry.name.endswith(".jinja"))


def shipped_template(name: str) -> str:
    """The text of a chat template shipped by the installed TRL, e.g. `qwen3`, `deepseek_r1_distill`."""
    path = resources.files("trl") / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        raise ValueError(f"TRL ships no chat template {name!r}; available: {shipped_template_names()}")
    return path.read_text()


@functools.lru_cache(maxsize=64)
def _name_of(template: str) -> str | None:
    for name in shipped_template_names():
        if shipped_template(name) == template:
            return name
    return None


def template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """A readable name for the tokenizer's chat template: the TRL file it matches, else its origin."""
    template = tokenizer.chat_template
    if isinstance(template, str):
        name = _name_of(template)
        if name is not None:
            return f"{name!r} (TRL's {name}.jinja)"
    origin = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
    return f"the chat template of {origin}"


_REASONING, _ANSWER = "REASONING-PROBE", "ANSWER-PROBE"


def think_close_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template writes between the reasoning and the answer of an assistant turn:
    `"\\n</think>\\n\\n"` in Qwen3's templates and the tiny one.

    Found by rendering a finished assistant turn; a template that drops the reasoning of rendered
    turns (DeepSeek-R1-distill's) shows none, and then Qwen3's form is used, which is what those
    models write too. Budget forcing appends it to close a response's open think block.
    """
    messages = [*_PROBE, {"role": "assistant", "content": f"{THINK_OPEN}\n{_REASONING}\n{THINK_CLOSE}\n\n{_ANSWER}"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=True)
    except TemplateError:  # a template that refuses the probe conversation: fall back to Qwen3's form
        text = ""
    if _REASONING in text and _ANSWER in text[text.index(_REASONING):]:
        between = text[text.index(_REASONING) + len(_REASONING):text.index(_ANSWER, text.index(_REASONING))]
        if THINK_CLOSE in between:
            return between
    return f"\n{THINK_CLOSE}\n\n"


# ------------------------------------------------------------------------------------ BOS


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizing text with special tokens puts the BOS token in front of it."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def strip_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """Drop one leading BOS text when the tokenizer adds BOS itself (else the ids would carry two)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos):]
    return text


# ------------------------------------------------------------------------------------ thinking switch


class ThinkingSwitchError(ValueError):
    """The chat template cannot render the thinking mode a role asks for."""


@dataclass(frozen=True)
class ThinkingSwitch:
    """What a chat template does with `enable_thinking`, found by rendering a probe both ways.

    `kind` is "switch" (the two renders differ), "always_on" (identical, the prompt opens a think
    block), "always_off" (identical, the prompt closes an empty think block) or "none" (identical
    and neutral: the template has no thinking switch and leaves thinking to the model).
    """

    kind: str
    template: str
    opens_when_on: bool

    def supports(self, thinking: bool) -> bool:
        return {"switch": True, "none": True, "always_on": thinking, "always_off": not thinking}[self.kind]


_PROBE = [{"role": "user", "content": "What is 1 + 1?"}]


def thinking_switch(tokenizer: PreTrainedTokenizerBase) -> ThinkingSwitch:
    """Probe the tokenizer's chat template with `enable_thinking` on and off."""
    on = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    if on != off:
        kind = "switch"
    elif opens_thinking(on):
        kind = "always_on"
    elif on.rstrip().endswith(THINK_CLOSE):
        kind = "always_off"
    else:
        kind = "none"
    return ThinkingSwitch(kind=kind, template=template_name(tokenizer), opens_when_on=opens_thinking(on))


_checked: dict[tuple, ThinkingSwitch] = {}
_warned: set[tuple] = set()


def _cached_switch(tokenizer: PreTrainedTokenizerBase) -> ThinkingSwitch:
    key = (str(tokenizer.chat_template), tokenizer.bos_token, type(tokenizer).__name__)
    if key not in _checked:
        _checked[key] = thinking_switch(tokenizer)
    return _checked[key]


def check_thinking(tokenizer: PreTrainedTokenizerBase, thinking: bool, role: str = "prompt") -> ThinkingSwitch:
    """Make sure the chat template renders the thinking mode `role` asks for.

    Raises `ThinkingSwitchError` when the template always renders the other mode (DeepSeek-R1-distill
    always opens a think block, so it cannot render a non-thinking prompt). Logs one warning per
    template when it has no switch at all (Llama 3, Gemma 3, Qwen3-Instruct-2507): the prompt is
    then the same either way, and whether responses think is up to the model and its SFT data.
    Cached per template, so `render_prompt` calls it on every render.
    """
    switch = _cached_switch(tokenizer)
    mode = "on" if thinking else "off"
    if not switch.supports(thinking):
        forced = "opens a think block" if switch.kind == "always_on" else "closes an empty think block"
        raise ThinkingSwitchError(
            f"{role}: thinking {mode} was asked for, but {switch.template} ignores enable_thinking and always "
            f"{forced}, so it cannot render a thinking-{mode} prompt. Use thinking "
            f"{'on' if switch.kind == 'always_on' else 'off'} for this role, or give the tokenizer a chat "
            "template with an enable_thinking switch."
        )
    if switch.kind == "none" and (switch.template, thinking) not in _warned:
        _warned.add((switch.template, thinking))
        logger.warning(
            "%s: %s has no thinking switch (enable_thinking changes nothing); the thinking-%s prompt is "
            "the same as the other one, and whether responses think is up to the model and its SFT data.",
            role, switch.template, mode,
        )
    return switch


__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "ThinkingSwitch",
    "ThinkingSwitchError",
    "adds_bos",
    "answer_region",
    "check_thinking",
    "completion_for_prompt",
    "count_thinking_tokens",
    "explicit_response",
    "is_well_formed",
    "opens_thinking",
    "shipped_template",
    "shipped_template_names",
    "template_name",
    "think_prefix",
    "think_close_text",
    "thinking_switch",
    "thinking_text",
    "unclosed_thinking",
]
