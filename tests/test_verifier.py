"""Tests for the one answer verifier: extractors, comparators, and every benchmark gold answer."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opsdlab.tasks.verifier import (
    COMPARATORS,
    EXTRACTORS,
    VerifierConfig,
    describe,
    extract_answer,
    grade,
    is_correct,
    math_verify_equal,
)

MATH = VerifierConfig(extract="last_boxed", compare="math_verify")
EXACT = VerifierConfig(extract="last_boxed", compare="exact")
FIRST = VerifierConfig(extract="first_boxed", compare="math_verify")
NUMBER = VerifierConfig(extract="last_number", compare="math_verify")

BENCHMARKS = ("math500", "aime24", "aime25")

# Adjacent gold answers (row i, row i+1) that really are equivalent, so the "a different gold
# answer must be rejected" check does not apply to them. Listed by hand, not derived from
# math-verify, so the negative check cannot pass by construction. math-verify treats `x=5` as
# the value 5 (an equation with a lone variable on the left compares its right-hand side).
EQUIVALENT_NEIGHBOURS = {("5", "x=5"), ("x=5", "5")}


def benchmark_dir() -> Path:
    override = os.environ.get("OPSDLAB_BENCHMARKS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


def load_golds(name: str) -> list[tuple[str, str]]:
    path = benchmark_dir() / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"benchmark file {path} not found (set OPSDLAB_BENCHMARKS to its folder)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["id"], str(row["answer"])) for row in rows]


def boxed(answer: str) -> str:
    return "Some reasoning first ... so the answer is \\boxed{" + answer + "}."


# --- configuration ----------------------------------------------------------------------------


def test_config_rejects_unknown_names_and_lists_choices():
    with pytest.raises(ValueError, match="last_boxed"):
        VerifierConfig(extract="final")
    with pytest.raises(ValueError, match="math_verify"):
        VerifierConfig(compare="sympy")
    assert set(EXTRACTORS) == {"last_boxed", "first_boxed", "last_number"}
    assert set(COMPARATORS) == {"exact", "math_verify"}


def test_describe_is_json_and_names_the_versions():
    record = describe(MATH)
    assert json.loads(json.dumps(record)) == record
    assert record["extract"] == "last_boxed" and record["compare"] == "math_verify"
    assert record["math_verify_version"]
    assert describe(EXACT) == {"extract": "last_boxed", "compare": "exact"}


# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}", "\\{1\\pm\\sqrt{5},-2\\}"),
        ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        ("first \\boxed{1}, finally \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("no box here, the answer is 5", None),
        ("\\boxed{3} but then \\boxed{4", None),  # truncated: the final box never closed
        ("\\boxed{}", None),
    ],
)
def test_last_boxed(text, expected):
    assert extract_answer(text, MATH) == expected


def test_first_and_last_boxed_differ():
    text = "Try \\boxed{12}. Wait, that is wrong; the answer is \\boxed{13}."
    assert extract_answer(text, FIRST) == "12"
    assert extract_answer(text, MATH) == "13"
    assert is_correct(text, "13", MATH)
    assert not is_correct(text, "13", FIRST)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is -3.", "-3"),
        ("about 2.5 hours", "2.5"),
        ("ratio 3/4", "3/4"),
        ("x = \\frac{3}{4}", "3/4"),
        ("5-3 leaves 2", "2"),
        ("a total of 10,080 ways", "10080"),
        ("items 1,2,3", "3"),
        ("nothing numeric", None),
    ],
)
def test_last_number(text, expected):
    assert extract_answer(text, NUMBER) == expected


# --- comparison -------------------------------------------------------------------------------


def test_no_box_is_not_correct():
    assert not is_correct("The answer is 42.", "42", MATH)
    assert not is_correct("", "42", EXACT)


def test_fraction_equals_decimal_under_math_verify_only():
    assert is_correct(boxed("\\frac{1}{2}"), "0.5", MATH)
    assert is_correct(boxed("0.5"), "\\frac{1}{2}", MATH)
    assert not is_correct(boxed("0.5"), "1/2", EXACT)
    assert not is_correct(boxed("0.5"), "\\frac{1}{2}", EXACT)


def test_exact_normalizes_whitespace_dollars_and_period():
    assert is_correct("\\boxed{ $42$. }", "42", EXACT)
    assert COMPARATORS["exact"]("$x+1$", " x+1. ")


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("10080", "10,\\!080"),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\text{Evelyn}", "\\text{Evelyn}"),
        ("Evelyn", "\\text{Evelyn}"),
        ("[-2,7]", "x \\in [-2,7]"),
        ("90", "90^\\circ"),
        ("90°", "90^\\circ"),
        ("10\\%", "10\\%"),
        ("p-q", "p - q"),
        ("\\dfrac{14}{3}", "\\frac{14}{3}"),
        ("-2, 1", "1,-2"),
        ("32348", "\\$32,\\!348"),
        ("C", "\\text{(C)}"),
        ("2(k+1)", "2k+2"),
    ],
)
def test_equivalent_spellings_accepted(prediction, gold):
    assert is_correct(boxed(prediction), gold, MATH)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("\\frac{14}{5}", "\\frac{14}{3}"),
        ("q - p", "p - q"),
        ("\\text{Bob}", "\\text{Evelyn}"),
        ("\\text{(D)}", "\\text{(C)}"),
        ("(3,4)", "(3,4]"),
        ("3.14159", "\\pi"),
        ("1", "1,-2"),
        ("204.5", "204"),
        ("x^3+3x-7", "x^3+3x-6"),
    ],
)
def test_wrong_answers_rejected(prediction, gold):
    assert not is_correct(boxed(prediction), gold, MATH)


# --- scientific notation (Minerva's golds are written `4.5e33`) --------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("4.5 \\times 10^{33}", "4.5e33"),
        ("4.5e33", "4.5 \\times 10^{33}"),
        ("4.5 \\times 10^33", "4.5e33"),           # exponent without braces
        ("4.5\\times10^{33}", "4.5E+33"),
        ("4.5 \\cdot 10^{33}", "4.5e33"),
        ("4.5x10^{33}", "4.5e33"),
        ("4.5 x 10^33", "4.5e33"),
        ("4.5 × 10^{33}", "4.5e33"),
        ("4.5*10^33", "4.5e33"),
        ("-4.5 \\times 10^{33}", "-4.5e33"),       # negative mantissa
        ("−4.5 \\times 10^{33}", "-4.5e33"),       # written with a minus sign
        ("4.5 \\times 10^{-3}", "4.5e-3"),         # negative exponent
        ("4.5 \\times 10^-3", "4.5e-3"),
        ("4.5x10^{-3}", "0.0045"),
        ("0.0045", "4.5e-3"),
        ("4500000000000000000000000000000000", "4.5e33"),
        ("45 \\times 10^{32}", "4.5e33"),          # another mantissa, the same number
        ("4.50e33", "4.5e33"),
        ("1.5 \\times 10^{-30}", "1.5e-30"),
        ("$4.5 \\times 10^{33}$", "4.5e33"),
        ("(1 \\times 10^{-3}, 2 \\times 10^{-3})", "(1e-3, 2e-3)"),  # inside an expression: e-notation read as a number
    ],
)
def test_scientific_notation_matches_the_same_number(prediction, gold):
    assert is_correct(boxed(prediction), gold, MATH)
    assert math_verify_equal(prediction, gold)  # without the string shortcut


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("4.5e32", "4.5e33"),
        ("4.5 \\times 10^{32}", "4.5e33"),
        ("4.5 \\times 10^{33}", "-4.5e33"),
        ("-4.5 \\times 10^{33}", "4.5e33"),
        ("4.5 \\times 10^{3}", "4.5e-3"),
        ("4.5 \\times 10^{-33}", "4.5e-34"),
        ("1.6 \\times 10^{-30}", "1.5e-30"),   # on its own scale math-verify's 6 decimal places would take it
        ("0.0046", "4.5e-3"),
        ("4.51e33", "4.5e33"),
        ("4.5", "4.5e33"),
        ("1e600", "1e601"),
        ("1e999999", "1e-999999"),
    ],
)
def test_scientific_notation_rejects_another_number(prediction, gold):
    assert not is_correct(boxed(prediction), gold, MATH)


def test_scientific_number_reads_each_spelling():
    from decimal import Decimal

    from opsdlab.tasks.verifier import scientific_number

    assert scientific_number("4.5e33") == (Decimal("4.5e33"), 33)
    assert scientific_number("-4.5 \\times 10^{-3}") == (Decimal("-0.0045"), -3)
    assert scientific_number("4.5 \\cdot 10^{+2}") == (Decimal("450"), 2)
    assert scientific_number("4.5x10^7") == (Decimal("4.5e7"), 7)
    assert scientific_number("0.25") == (Decimal("0.25"), None)
    assert scientific_number("x10^3") is None and scientific_number("e33") is None
    assert scientific_number("4.5 \\times 10^{33} \\text{ erg}") is None


@pytest.mark.parametrize(
    "hostile",
    ["9^{9^{9^{9}}}", "(10^{10})!", "2^{2^{40}}", "\\prod_{k=1}^{10^{9}} k", "{" * 15 + "1" + "}" * 15],
)
def test_hostile_predictions_do_not_hang(hostile):
    # Without math-verify's signal timeouts these would make sympy run for minutes or forever.
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(is_correct(boxed(hostile), "5", MATH)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert result == [False], f"verifier did not return promptly for {hostile!r}"


def test_math_verify_works_off_the_main_thread():
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda pair: is_correct(boxed(pair[0]), pair[1], MATH), [("0.5", "\\frac{1}{2}"), ("3", "4")]))
    assert results == [True, False]


def test_grade_pairs_responses_with_golds():
    assert grade([boxed("1"), boxed("2"), "none"], ["1", "3", "1"], MATH) == [True, False, False]
    with pytest.raises(ValueError):
        grade([boxed("1")], ["1", "2"], MATH)


# --- every benchmark gold answer --------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_gold_answer_verifies_against_itself(name):
    golds = load_golds(name)
    through_api = [row_id for row_id, gold in golds if not is_correct(boxed(gold), gold, MATH)]
    assert not through_api, f"{name}: gold answers not accepted for themselves: {through_api}"
    # Without the string shortcut: math-verify itself must parse each gold into something equal
    # to itself, otherwise any differently spelled correct prediction would be rejected.
    parsed = [(row_id, gold) for row_id, gold in golds if not math_verify_equal(gold, gold)]
    assert not parsed, f"{name}: math-verify cannot match these gold answers to themselves: {parsed}"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_different_gold_answer_is_rejected(name):
    golds = load_golds(name)
    failures = []
    for index, (row_id, gold) in enumerate(golds):
        other_id, other = golds[(index + 1) % len(golds)]
        for (gold_id, g), (pred_id, p) in (((row_id, gold), (other_id, other)), ((other_id, other), (row_id, gold))):
            if g.strip() == p.strip() or (g, p) in EQUIVALENT_NEIGHBOURS:
                continue
            if is_correct(boxed(p), g, MATH):
                failures.append(f"{pred_id} answer {p!r} accepted for {gold_id} gold {g!r}")
    assert not failures, f"{name}: wrong answers accepted:\n" + "\n".join(failures)


def test_eval_cli_grades_scientific_notation_against_a_minerva_style_gold(tiny_folder, tmp_path, monkeypatch):
    """`opsdlab eval --data FILE` on golds written `4.5e33`: the right number in any spelling is
    correct, a wrong power of ten is not (the responses are scripted; everything else is the CLI's)."""
    from opsdlab.evaluation import evaluate
    from opsdlab.cli import main

    data = tmp_path / "minerva.jsonl"
    rows = [("4.5e33", "\\boxed{4.5 \\times 10^{33}}"), ("4.5e33", "\\boxed{4.5 \\times 10^{32}}"),
            ("-1.2e-5", "\\boxed{-1.2x10^{-5}}"), ("6e23", "\\boxed{6 \\cdot 10^{23}}")]
    data.write_text("".join(json.dumps({"problem": f"problem {i}", "answer": gold}) + "\n"
                            for i, (gold, _) in enumerate(rows)))

    def scripted(model, tokenizer, prompts, sampling, desc):
        texts = [response for (_, response) in rows for _ in range(sampling.k)]
        return [evaluate.Generation(tokenizer(text, add_special_tokens=False)["input_ids"], text, False)
                for text in texts]

    monkeypatch.setitem(evaluate.BACKENDS, "transformers",
                        evaluate.Backend(evaluate.BACKENDS["transformers"].load, scripted,
                                         evaluate.BACKENDS["transformers"].extend))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_folder), "--data", str(data), "--temperature", "0",
                 "--out", str(out)]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [sample["correct"] for sample in samples] == [True, False, True, True]
    assert json.loads((out / "summary.json").read_text())["verifier"]["compare"] == "math_verify"
