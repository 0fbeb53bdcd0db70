"""SFT through TRL on the tiny model: the loss falls and a short run solves an easy variant above chance."""

import json

from opsdlab.evaluate import SamplingConfig, evaluate
from opsdlab.models import build_tiny_model, build_tiny_tokenizer, load_policy
from opsdlab.sft import SFTStageConfig, run_sft
from opsdlab.tasks import build_task
from opsdlab.verifier import VerifierConfig

EASY = {"min_terms": 2, "max_terms": 2, "max_term": 5, "slip_rate": 0.0, "recheck_rate": 0.0,
        "filler_rate": 0.0, "restart_rate": 0.0, "privileged_fraction": 0.0}


def test_sft_lowers_loss_and_beats_chance(tmp_path):
    task = build_task("synthetic", EASY)
    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    model = build_tiny_model(tokenizer, seed=0)
    config = SFTStageConfig(rows=512, max_steps=120, batch_size=16, learning_rate=3e-3, logging_steps=10,
                            save_steps=1000)
    out = run_sft(model, tokenizer, task.sft_rows(tokenizer, config.rows), config, tmp_path / "sft")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    trained, tokenizer = load_policy(out)
    _, summary = evaluate(trained, tokenizer, task.examples("train", 25), VerifierConfig(compare="exact"),
                          SamplingConfig(k=1, temperature=0.0, max_new_tokens=24))
    # Sums of two numbers in 1..5: the best constant guess (6) is right on at most 5 of 25 problems.
    assert summary["avg_at_k"] > 0.4
