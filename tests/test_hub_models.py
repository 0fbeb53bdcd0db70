"""A Hugging Face Hub model id works wherever a model folder does (`model.init`, `eval --model`, the
stage commands' `--model`): resolved through the Hugging Face cache, here offline with a cache laid
out as `hf download` leaves it, and one line naming the id when it is not there."""

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest

from opsdlab.cli import main
from opsdlab.run.provenance import path_fingerprint

FIRST, SECOND = "a" * 40, "b" * 40  # two revisions (commit hashes) of the model


def add_revision(cache: Path, repo_id: str, revision: str, folder: Path) -> Path:
    """Put `folder`'s files into `cache` as revision `revision` of the Hub model `repo_id`, the main
    branch: content-addressed blobs, a snapshot folder of relative links to them, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for file in sorted(path for path in folder.rglob("*") if path.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_folder):
    """An offline Hugging Face cache (HF_HUB_CACHE) holding the tiny model as the Hub model `org/tiny`;
    the test's working directory holds no folder of that name."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache, add_revision(cache, "org/tiny", FIRST, tiny_folder)


def test_eval_takes_a_hub_model_id_from_the_cache(hub_cache, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--model", "org/tiny", "--out", str(out), "--problems", "2", "--k", "1",
                 "--max-new-tokens", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 2 and summary["model"] == "org/tiny"
    assert summary["model_snapshot"].endswith(f"models--org--tiny/snapshots/{FIRST}")


def test_a_hub_id_absent_from_the_cache_offline_is_one_line(hub_cache, tmp_path, capsys, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setattr("opsdlab.evaluation.evaluate.load_for_eval", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["eval", "--model", "org/absent", "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab eval: error: --model: org/absent is neither a model folder nor in the Hugging Face cache ({cache}): "
        "HF_HUB_OFFLINE=1 forbids downloading it; download it with `hf download org/absent` (online), or give a "
        "model folder")
    assert main(["pipeline", "--config", "tiny", "model.init=org/absent", "--run-dir", str(tmp_path / "run")]) == 2
    assert "model.init: org/absent is neither a model folder nor in the Hugging Face cache" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stage_command_starts_from_a_hub_model_id(hub_cache, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--model", "org/tiny", "--out", str(out), "max_steps=1", "rows=4", "batch_size=4"]) == 0
    assert (out / "model" / "model.safetensors").exists()


SMALL_RUN = ["stages=[sft]", "workers=1", "sft.rows=4", "sft.max_steps=1", "sft.batch_size=4", "sft.save_steps=100",
             "eval.base=false", "eval.problems=2", "eval.sampling={k: 1, max_new_tokens: 2}", "eval.greedy=false",
             "eval.teacher_check=false"]


def test_a_run_from_a_hub_model_id_records_its_snapshot_and_sees_a_new_revision(hub_cache, tiny_folder, tmp_path,
                                                                                  capsys):
    """The run's records fingerprint the snapshot's files (read through its links), so a rerun skips
    what is done, and a new revision of the model is a changed input."""
    cache, snapshot = hub_cache
    command = ["pipeline", "--config", "tiny", "model.init=org/tiny", "--run-dir", str(tmp_path / "run"), *SMALL_RUN]
    assert main(command) == 0
    record = json.loads((tmp_path / "run" / "sft" / "settings.json").read_text())
    assert record["inputs"]["model"] == path_fingerprint(snapshot) == path_fingerprint(tiny_folder)
    assert main(command) == 0
    assert "[sft] skipped" in capsys.readouterr().out

    changed = tmp_path / "changed"
    changed.mkdir()
    for file in tiny_folder.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    (changed / "generation_config.json").write_text(json.dumps({"max_length": 7}))
    add_revision(cache, "org/tiny", SECOND, changed)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "train sft" in err and "model" in err and "--redo changed" in err
