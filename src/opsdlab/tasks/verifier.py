"""The one answer verifier: RL reward, OPSD gate and evaluation all grade through this module.

A verifier is an *extractor* (pull the final answer out of a model response) plus a *comparator*
(decide whether that answer matches the gold answer). Both are picked by name in
`VerifierConfig`, so a run records exactly how it was graded (`describe`) and every stage of the
pipeline grades the same way.

The `math_verify` comparator runs math-verify with its signal-based timeouts switched off, because
`signal.alarm` only works in the main thread and RL reward functions may run elsewhere. Without a
timeout, sympy can hang on hostile predictions (`9^{9^{9^9}}`, `(10^{10})!`, an unevaluated
integral, deeply nested braces), so predictions pass cheap size guards before math-verify sees
them; a prediction that fails a guard is graded wrong unless it matches the gold answer as a string.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, DecimalException
from importlib import metadata

import sympy

from opsdlab.tasks.templates import answer_region

# ---------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------

# `\boxed` / `\fbox` not followed by a letter (so `\boxedtext` is not a box).
_BOX_MARKER = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _match_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index`, or None when it is never closed.

    A backslash escapes the next character, so `\\{` and `\\}` (literal braces, as in
    `\\{1, 2\\}`) do not count toward the nesting.
    """
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_contents(text: str) -> list[str | None]:
    """Contents of the top-level boxes in `text`, in order.

    Accepts `\\boxed{...}`, `\\fbox{...}` and the brace-less `\\boxed 5` (one token, up to
    whitespace or `$`). Boxes nested inside a box are part of the outer content. An unclosed box
    (a truncated response) ends the list with None, since everything after it is swallowed.
    """
    contents: list[str | None] = []
    position = 0
    while True:
        marker = _BOX_MARKER.search(text, position)
        if marker is None:
            return contents
        i = marker.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_brace(text, i)
            if close is None:
                contents.append(None)
                return contents
            contents.append(text[i + 1 : close])
            position = close + 1
        elif i > marker.end():
            token = re.match(r"[^\s$]+", text[i:])
            contents.append(token.group(0) if token else None)
            position = i + (token.end() if token else 0)
        else:
            position = marker.end()


def _unwrap_box(answer: str) -> str:
    """`\\boxed{\\boxed{5}}` -> `5`: strip boxes that wrap the whole answer."""
    answer = answer.strip()
    while (marker := _BOX_MARKER.match(answer)) is not None:
        i = marker.end()
        while i < len(answer) and answer[i].isspace():
            i += 1
        if i >= len(answer) or answer[i] != "{" or _match_brace(answer, i) != len(answer) - 1:
            break
        answer = answer[i + 1 : -1].strip()
    return answer


def extract_last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{}` / `\\fbox{}`; None when there is none or it is unclosed."""
    boxes = _boxed_contents(text)
    if not boxes or boxes[-1] is None:
        return None
    answer = _unwrap_box(boxes[-1])
    return answer or None


def extract_first_boxed(text: str) -> str | None:
    """Content of the first `\\boxed{}` / `\\fbox{}`; None when there is none or it is unclosed."""
    boxes = _boxed_contents(text)
    if not boxes or boxes[0] is None:
        return None
    answer = _unwrap_box(boxes[0])
    return answer or None


# A number not glued to a preceding word/number: `-3`, `2.5`, `.5`, `3/4`, `10,080`, or a
# `\frac{3}{4}` written in LaTeX. The minus sign only counts when it cannot be a binary minus.
_NUMBER = re.compile(
    r"(?P<frac>(?<![\w)\]}])-?\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\})"
    r"|(?P<plain>(?:(?<![\w)\]}.])-)?(?<![\w./])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?:\.\d+)?(?:/\d+)?)"
)


def extract_last_number(text: str) -> str | None:
    """The last integer, decimal or fraction in `text` (`-3`, `2.5`, `3/4`), commas dropped."""
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    if last is None:
        return None
    if last.group("frac"):
        sign = "-" if last.group("frac").startswith("-") else ""
        return f"{sign}{last.group('num')}/{last.group('den')}"
    return last.group("plain").replace(",", "")


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_boxed": extract_last_boxed,
    "first_boxed": extract_first_boxed,
    "last_number": extract_last_number,
}

# ---------------------------------------------------------------------------------------------
# Comparators
# ---------------------------------------------------------------------------------------------


def normalize(answer: str) -> str:
    """Strip whitespace, surrounding `$` and a trailing period: the `exact` comparator's form."""
    text = answer.strip()
    while True:
        before = text
        if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text[1:-1].strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
        if text == before:
            return text


def compare_exact(predicted: str, gold: str) -> bool:
    """String equality after `normalize`."""
    a, b = normalize(predicted), normalize(gold)
    return bool(a) and a == b


# Guards on the prediction before it reaches math-verify (see the module docstring). Gold answers
# in MATH-500 are under 60 characters with bracket depth at most 3; latex2sympy's parse time grows
# quickly with nesting (15 nested `{}` take seconds), and sympy may try to evaluate any number
# it is handed.
MAX_PREDICTION_CHARS = 512
MAX_BRACKET_DEPTH = 8
MAX_DIGITS = 100_000
# Unevaluated calculus in a "final answer" makes sympy integrate/sum/take limits during
# comparison, which is slow or unbounded; a final answer should be in closed form.
_UNEVALUATED = (sympy.Integral, sympy.Sum, sympy.Product, sympy.Limit, sympy.Derivative)
_FACTORIAL_LIKE = (
    sympy.factorial,
    sympy.factorial2,
    sympy.subfactorial,
    sympy.binomial,
    sympy.gamma,
    sympy.RisingFactorial,
    sympy.FallingFactorial,
)


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _log10_bound(expr) -> float:
    """Upper bound on log10 of the magnitude of any number `expr` would evaluate to.

    Computed from the unevaluated tree without evaluating anything; a symbol counts as 10.
    Returns inf as soon as the bound is clearly beyond anything a real answer needs.
    """
    if isinstance(expr, sympy.MatrixBase):
        return max((_log10_bound(entry) for entry in expr), default=0.0)
    if not isinstance(expr, sympy.Basic):
        return 0.0
    if isinstance(expr, sympy.Integer):
        return abs(int(expr)).bit_length() * math.log10(2)
    if isinstance(expr, sympy.Rational):
        return max(_log10_bound(sympy.Integer(expr.p)), _log10_bound(sympy.Integer(expr.q)))
    if isinstance(expr, sympy.Float):
        try:
            return math.log10(abs(float(expr)) + 1.0)
        except (OverflowError, ValueError):
            return math.inf
    if isinstance(expr, sympy.Pow):
        base, exponent = _log10_bound(expr.base), _log10_bound(expr.exp)
        if base == 0.0:
            return 0.0
        if exponent > 7:
            return math.inf
        return base * 10.0**exponent
    if isinstance(expr, _FACTORIAL_LIKE):
        argument = max((_log10_bound(arg) for arg in expr.args), default=0.0)
        if argument > 6:
            return math.inf
        return max(argument, 1.0) * 10.0**argument
    if not expr.args:
        return 1.0
    parts = [_log10_bound(arg) for arg in expr.args]
    if isinstance(expr, sympy.Mul):
        return sum(parts)
    return max(parts) + 1.0


def _too_expensive(parsed: list) -> bool:
    for item in parsed:
        if isinstance(item, sympy.Basic) and item.has(*_UNEVALUATED):
            return True
        if isinstance(item, (sympy.Basic, sympy.MatrixBase)) and _log10_bound(item) > MAX_DIGITS:
            return True
    return False


# Scientific notation: a mantissa times a power of ten, written `4.5e33`, `4.5 \times 10^{33}`,
# `4.5 \cdot 10^{-3}` or `4.5x10^33` (also with `×`, `·` or `*`, and `−` for a minus). math-verify
# reads `4.5e33` as 4.5·e·33 (Euler's e) and `4.5x10^{33}` as a product with a variable x.
_MANTISSA = r"\d+(?:\.\d*)?|\.\d+"
_NUMBER_WRITTEN = re.compile(
    rf"(?P<mantissa>[-+]?(?:{_MANTISSA}))\s*"
    r"(?:[eE](?P<e>[-+]?\d+)|(?:\\times|\\cdot|[x×X·*])\s*10\s*\^\s*(?:\{\s*(?P<braced>[-+]?\d+)\s*\}|(?P<bare>[-+]?\d+)))?")
_E_NOTATION = re.compile(rf"(?<![\w.])(?P<mantissa>{_MANTISSA})[eE](?P<exponent>[-+]?\d+)(?![\w.])")


def scientific_number(answer: str) -> tuple[Decimal, int | None] | None:
    """A whole answer that is a number: its exact value, and the power of ten it is written with
    (`4.5e33`, `-4.5 \\times 10^{33}`, `4.5 \\cdot 10^{-3}`, `4.5x10^33`: 33, 33, -3, 33; None for a
    plain decimal such as `0.0045`). None when the answer is not a number."""
    match = _NUMBER_WRITTEN.fullmatch(normalize(answer).replace("\u2212", "-"))
    if match is None:
        return None
    written = match.group("e") or match.group("braced") or match.group("bare")
    value = Decimal(match.group("mantissa"))
    if written is None:
        return value, None
    try:
        return value.scaleb(int(written)), int(written)
    except DecimalException:  # beyond Decimal's exponent range: no answer is that large or small
        return None


def _on_one_scale(predicted: str, gold: str) -> tuple[str, str] | None:
    """Two numbers, at least one in scientific notation, as plain decimals divided by one power of
    ten (the gold's, else the prediction's): `4.5e33` against `4.5 \\times 10^{33}` is `4.5` against
    `4.5`, and `4.5e32` against it `0.45`. On the gold's scale math-verify's comparison to 6 decimal
    places keeps 6 places of the mantissa; on their own scale `1.5e-30` would equal `1.6e-30`.
    None (compare as written) unless both are numbers, or when a plain form would be too long for
    the size guards."""
    a, b = scientific_number(predicted), scientific_number(gold)
    if a is None or b is None or (a[1] is None and b[1] is None):
        return None
    power = b[1] if b[1] is not None else a[1]
    try:
        scaled = [value.scaleb(-power) for value, _ in (a, b)]
    except DecimalException:
        return None
    if any(value and abs(value.adjusted()) > MAX_PREDICTION_CHARS for value in scaled):
        return None
    return format(scaled[0], "f"), format(scaled[1], "f")


def _as_power_of_ten(answer: str) -> str:
    """Scientific notation in the form math-verify reads as a number: a whole answer such as
    `4.5x10^33` -> `4.5 \\times 10^{33}`, and each `4.5e-3` in an answer -> `4.5 \\times 10^{-3}`."""
    whole = scientific_number(answer)
    if whole is not None and whole[1] is not None:
        value, power = whole
        return f"{format(value.scaleb(-power), 'f')} \\times 10^{{{power}}}"
    return _E_NOTATION.sub(lambda m: f"{m.group('mantissa')} \\times 10^{{{int(m.group('exponent'))}}}", answer)


def _prepare(answer: str) -> str:
    """Spellings math-verify does not read, rewritten to ones it does (`90°` -> `90^\\circ`,
    `4.5e33` -> `4.5 \\times 10^{33}`)."""
    return _as_power_of_ten(answer.replace("°", "^\\circ").replace("\\degree", "^\\circ"))


@functools.lru_cache(maxsize=8192)
def _parse(answer: str) -> tuple:
    """math-verify parse of an extracted answer, boxed so the whole string is the target.

    Cached: in RL the same gold answer is parsed for every rollout of its prompt. math-verify
    returns a list that may mix sympy objects and a fallback string; both are immutable.
    """
    from math_verify import parse

    return tuple(parse(f"$\\boxed{{{_prepare(answer)}}}$", parsing_timeout=None))


def math_verify_equal(predicted: str, gold: str) -> bool:
    """math-verify's judgement alone, with no string shortcut (guards still apply).

    Public so tests can check that every gold answer parses into something math-verify finds
    equal to itself, which the string shortcut in `compare_math_verify` would otherwise hide.
    """
    a, b = normalize(predicted), normalize(gold)
    if not a or not b:
        return False
    a, b = _on_one_scale(a, b) or (a, b)
    if len(a) > MAX_PREDICTION_CHARS or _bracket_depth(a) > MAX_BRACKET_DEPTH:
        return False
    try:
        from math_verify import verify

        gold_parsed, predicted_parsed = _parse(b), _parse(a)
        if not gold_parsed or not predicted_parsed:
            return False
        if _too_expensive(list(predicted_parsed)) and not _too_expensive(list(gold_parsed)):
            return False
        return bool(verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=None))
    except Exception:  # noqa: BLE001 - any failure inside sympy/math-verify means "not verified"
        return False


def compare_math_verify(predicted: str, gold: str) -> bool:
    """Mathematical equivalence via math-verify (`\\frac{1}{2}` == `0.5`, `10,\\!080` == `10080`).

    Exact string equality after `normalize` short-circuits to True. Any exception, an empty
    parse, or a prediction failing the size guards gives False.
    """
    a, b = normalize(predicted), normalize(gold)
    if a and a == b:
        return True
    return math_verify_equal(a, b)


COMPARATORS: dict[str, Callable[[str, str], bool]] = {
    "exact": compare_exact,
    "math_verify": compare_math_verify,
}

# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifierConfig:
    """Which extractor and which comparator grade responses (names from EXTRACTORS/COMPARATORS)."""

    extract: str = "last_boxed"
    compare: str = "math_verify"

    def __post_init__(self):
        if self.extract not in EXTRACTORS:
            raise ValueError(f"unknown verifier extract {self.extract!r}; valid choices: {sorted(EXTRACTORS)}")
        if self.compare not in COMPARATORS:
            raise ValueError(f"unknown verifier compare {self.compare!r}; valid choices: {sorted(COMPARATORS)}")


def extract_answer(text: str, config: VerifierConfig) -> str | None:
    """The final answer in a response according to `config.extract`, or None.

    A response that closes a think block is read after its last `</think>` (an answer written only
    inside the reasoning does not count); one that never closes it is read whole.
    """
    return EXTRACTORS[config.extract](answer_region(text))


def is_correct(response: str, gold: str, config: VerifierConfig) -> bool:
    """Whether the answer extracted from `response` matches `gold`; False when none is found."""
    answer = extract_answer(response, config)
    if answer is None:
        return False
    return COMPARATORS[config.compare](answer, str(gold))


def grade(responses: list[str], golds: list[str], config: VerifierConfig) -> list[bool]:
    """`is_correct` for each (response, gold) pair."""
    if len(responses) != len(golds):
        raise ValueError(f"grade: {len(responses)} responses but {len(golds)} gold answers")
    return [is_correct(response, gold, config) for response, gold in zip(responses, golds)]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(config: VerifierConfig) -> dict:
    """JSON-able record of how answers were graded, written into every result file."""
    record = {"extract": config.extract, "compare": config.compare}
    if config.compare == "math_verify":
        record.update(
            math_verify_version=_version("math-verify"),
            latex2sympy2_extended_version=_version("latex2sympy2_extended"),
            sympy_version=sympy.__version__,
            guards={
                "max_prediction_chars": MAX_PREDICTION_CHARS,
                "max_bracket_depth": MAX_BRACKET_DEPTH,
                "max_digits": MAX_DIGITS,
            },
        )
    return record


__all__ = [
    "COMPARATORS",
    "EXTRACTORS",
    "VerifierConfig",
    "describe",
    "extract_answer",
    "grade",
    "is_correct",
    "math_verify_equal",
    "normalize",
]
