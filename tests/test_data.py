"""Tests for dataset loading: the benchmark files, error messages, column mapping, formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from opsdlab.tasks.data import ColumnMap, DataError, Example, load_examples, parse_column_map

EVAL_ONLY = ColumnMap(solution=None)


def benchmark_dir() -> Path:
    override = os.environ.get("OPSDLAB_BENCHMARKS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Point the `datasets` cache at tmp_path so tests leave nothing in the user's cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


GOOD = {"id": "a", "problem": "1+1?", "solution": "It is 2.", "answer": "2"}


@pytest.mark.parametrize(("name", "count"), [("math500", 500), ("aime24", 30), ("aime25", 30)])
def test_benchmarks_load(name, count):
    path = benchmark_dir() / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"benchmark file {path} not found (set OPSDLAB_BENCHMARKS to its folder)")
    examples = load_examples(str(path), EVAL_ONLY)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    assert all(isinstance(e, Example) and e.problem and e.answer and e.solution == "" for e in examples)
    assert load_examples(str(path), EVAL_ONLY, limit=5) == examples[:5]


def test_good_rows_and_type_conversion(tmp_path):
    path = write_jsonl(tmp_path / "good.jsonl", [GOOD, {"id": 7, "problem": "3*4?", "solution": "12", "answer": 12}])
    examples = load_examples(str(path), require_solution=True)
    assert examples == [
        Example(id="a", problem="1+1?", solution="It is 2.", answer="2"),
        Example(id="7", problem="3*4?", solution="12", answer="12"),
    ]


def test_missing_id_column_numbers_rows(tmp_path):
    path = write_jsonl(tmp_path / "noid.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "2"}])
    assert [e.id for e in load_examples(str(path), ColumnMap(solution=None))] == ["0", "1"]
    assert [e.id for e in load_examples(str(path), ColumnMap(id=None, solution=None))] == ["0", "1"]


def assert_error(excinfo, *parts: str):
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} not in error message: {message}"


def test_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [GOOD, {"id": "b", "question": "2+2?", "solution": "4", "answer": "4"}])
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "missing.jsonl", "line 2", "'problem'", "question", "problem=question")


def test_empty_problem(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [GOOD, GOOD | {"id": "b"}, GOOD | {"id": "c", "problem": "  "}])
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "empty.jsonl", "line 3", "'problem'", "empty")


def test_non_string_problem(tmp_path):
    path = write_jsonl(tmp_path / "numeric.jsonl", [GOOD | {"problem": 5}])
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "numeric.jsonl", "line 1", "'problem'", "string")


def test_empty_answer(tmp_path):
    path = write_jsonl(tmp_path / "noanswer.jsonl", [GOOD | {"answer": None}])
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "noanswer.jsonl", "line 1", "'answer'", "empty")


def test_empty_solution_only_fails_when_required(tmp_path):
    path = write_jsonl(tmp_path / "nosolution.jsonl", [GOOD, GOOD | {"id": "b", "solution": ""}])
    assert load_examples(str(path))[1].solution == ""
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path), require_solution=True)
    assert_error(excinfo, "nosolution.jsonl", "line 2", "'solution'", "empty")


def test_broken_json_line_reports_the_physical_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"id": "b", "problem": "x"\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "broken.jsonl", "line 3", "not valid JSON")


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [GOOD, [1, 2]])
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "list.jsonl", "line 2", "JSON object")


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [GOOD, GOOD])
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path))
    assert_error(excinfo, "dup.jsonl", "line 2", "duplicate id 'a'")


def test_nonexistent_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_examples(str(tmp_path / "nowhere.jsonl"))
    assert_error(excinfo, "nowhere.jsonl", "not found")


def test_directory_is_rejected(tmp_path):
    with pytest.raises(DataError, match="directory"):
        load_examples(str(tmp_path))


def test_column_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "mapped.jsonl",
        [{"uid": "q1", "question": "2+3?", "final": 5, "explanation": "Add them."}],
    )
    columns = parse_column_map("problem=question, answer=final ,solution=explanation,id=uid")
    assert columns == ColumnMap(id="uid", problem="question", solution="explanation", answer="final")
    assert load_examples(str(path), columns) == [Example(id="q1", problem="2+3?", solution="Add them.", answer="5")]
    assert parse_column_map({"problem": "question", "solution": None}) == ColumnMap(problem="question", solution=None)
    assert parse_column_map("solution=none") == ColumnMap(solution=None)
    assert parse_column_map(None) == ColumnMap()


@pytest.mark.parametrize("spec", ["question=problem", {"prompt": "x"}, "problem", "problem=none", "problem=a,problem=b"])
def test_bad_column_mapping(spec):
    with pytest.raises(DataError) as excinfo:
        parse_column_map(spec)
    if "question=" in str(spec) or "prompt" in str(spec):
        assert_error(excinfo, "valid keys", "problem", "answer", "solution", "id")


def test_parquet_round_trip(tmp_path, private_cache):
    datasets = private_cache
    rows = [
        {"id": 1, "problem": "1+1?", "solution": "2", "answer": 2.0},
        {"id": 2, "problem": "Half of 1?", "solution": "1/2", "answer": 0.5},
    ]
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert load_examples(str(path), require_solution=True) == [
        Example(id="1", problem="1+1?", solution="2", answer="2"),
        Example(id="2", problem="Half of 1?", solution="1/2", answer="0.5"),
    ]
    with pytest.raises(DataError) as excinfo:
        load_examples(str(path), ColumnMap(problem="question"))
    assert_error(excinfo, "train.parquet", "row 1", "'question'", "columns present")


def test_csv_keeps_answers_as_written(tmp_path, private_cache):
    path = tmp_path / "train.csv"
    path.write_text('id,problem,answer\n1,"Pad it, please",007\n2,Trailing zero,3.10\n', encoding="utf-8")
    examples = load_examples(str(path), ColumnMap(solution=None))
    assert [(e.id, e.problem, e.answer) for e in examples] == [("1", "Pad it, please", "007"), ("2", "Trailing zero", "3.10")]


def test_hub_failure_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def refuse(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DataError) as excinfo:
        load_examples("someone/not-a-dataset")
    assert_error(excinfo, "someone/not-a-dataset", "could not load", "local paths must exist")
