"""Two CPU processes (torchrun, gloo): OPSD with a rank whose gate keeps nothing (plain, and with
supervised tokens, margin_cut weights and an anchor), OPSD with one rollout per prompt, RLVR with dynamic
sampling. Each run must finish (no hang) with identical weights on both ranks."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from opsdlab.modeling.models import load_model
from launch_helpers import free_port, run_with_deadline

SCRIPT = Path(__file__).parent / "scripts" / "two_process_train.py"
WORKER_DEADLINE = 150  # seconds; a normal run takes well under a minute


def _launch(mode: str, folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(SCRIPT), mode, str(folder), str(out)]
    returncode, output = run_with_deadline(command, {**env, "OPSDLAB_WORKER_DEADLINE": str(WORKER_DEADLINE)},
                                           out / "launch.log", WORKER_DEADLINE)
    assert returncode == 0, f"{mode} on 2 processes failed or hung:\n{output[-4000:]}"


def _ranks(out: Path):
    weights = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return weights, infos


@pytest.mark.parametrize("mode", ["opsd", "opsd-weighted", "opsd-single", "rlvr"])
def test_two_processes_finish_with_identical_weights(tmp_path, tiny_folder, mode):
    _launch(mode, tiny_folder, tmp_path)
    (w0, w1), (i0, i1) = _ranks(tmp_path)
    assert i0["processes"] == i1["processes"] == 2
    if mode == "opsd-single":
        # 4 distinct prompts x 1 rollout per optimizer step over both processes: 2 on each.
        assert i0["per_device_batch"] == i1["per_device_batch"] == 2 and i0["generation_batch"] == 4
        assert len(i0["prompts"]) == len(i1["prompts"]) == 2  # one generation batch per step
        for step in range(2):
            ids = i0["prompts"][step] + i1["prompts"][step]
            assert len(ids) == len(set(ids)) == 4, ids
    else:
        # 4 prompts x 2 rollouts per optimizer step over both processes: 2 prompts x 2 rollouts on each.
        assert i0["per_device_batch"] == i1["per_device_batch"] == 4 and i0["generation_batch"] == 8
    # The rollout tokens every rank counts are both ranks' together (a budget ends every rank at one step).
    assert i0["rollout_tokens"] == i1["rollout_tokens"] == sum(i0["completion_lengths"] + i1["completion_lengths"])
    assert w0.keys() == w1.keys()
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    start = dict(load_model(tiny_folder).named_parameters())
    assert max((w0[n] - start[n]).abs().max().item() for n in w0) > 0  # training happened
    if mode in ("opsd", "opsd-weighted"):
        assert i0["skipped_steps"] == i1["skipped_steps"] == 1  # step 2 kept nothing on any rank
        assert i0["global_step"] == 3


def test_two_processes_share_the_held_out_checks_and_the_selection(tmp_path, tiny_folder):
    """Checks split over two ranks (5 problems: 3 and 2): one checks.jsonl line per check, written
    once, and both ranks end with the selected check's weights, the ones model/ holds."""
    from safetensors.torch import load_file

    _launch("opsd-checks", tiny_folder, tmp_path)
    (w0, w1), (i0, i1) = _ranks(tmp_path)
    assert i0["processes"] == i1["processes"] == 2
    lines = [json.loads(line) for line in (tmp_path / "stage" / "checks.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert all(line["problems"] == 5 for line in lines), lines
    assert i0["selected"] == i1["selected"]
    saved = load_file(str(tmp_path / "stage" / "model" / "model.safetensors"))
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        if name in saved:
            assert torch.equal(w0[name], saved[name].to(w0[name].dtype)), name
