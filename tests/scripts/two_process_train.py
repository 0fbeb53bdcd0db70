"""Run OPSD or RLVR for a few steps under torchrun (2 CPU processes, gloo); save each rank's weights.

Launched by tests/test_multiprocess.py:
    torchrun --nproc_per_node 2 two_process_train.py {opsd|opsd-weighted|opsd-single|opsd-checks|rlvr} MODEL_FOLDER OUT_DIR
OPSD is scripted so that step 1 keeps rollouts on rank 0 only (rank 1's gate keeps nothing) and
step 2 keeps nothing on any rank; `opsd-weighted` is the same with supervised_tokens, the margin_cut
weighting (scored on rank 0 alone in step 1) and an anchor beside an EMA teacher; `opsd-single` runs OPSD with one rollout per prompt and records
each rank's prompts; RLVR runs dynamic sampling with groups that carry no reward variance, so that
ranks refill.
"""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opsd_helpers import ScriptedReward, make_trainer  # noqa: E402
from opsdlab.modeling.models import load_policy  # noqa: E402
from opsdlab.config.stages import RLVRStageConfig  # noqa: E402
from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, rl_dataset  # noqa: E402
from opsdlab.tasks import build_task  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


def opsd_script(call: int, n: int) -> list[bool]:
    if call == 1:  # step 1: rank 0 keeps all, rank 1 keeps nothing
        return [RANK == 0] * n
    if call == 2:  # step 2: nothing kept anywhere (refill is off): the optimizer step is skipped
        return [False] * n
    return [True] * n


def half_constant(prompts, completions, completion_ids, id, **_):
    """No reward variance for even problem ids; a coin for odd ones (per rank, seeded by TRL)."""
    return [0.0 if int(i.split("-")[1]) % 2 == 0 else float(torch.rand(()).item() < 0.5) for i in id]


def main(mode: str, folder: str, out: str) -> None:
    # A rank stuck in a collective would wait forever: dump where it is and exit instead.
    faulthandler.dump_traceback_later(float(os.environ.get("OPSDLAB_WORKER_DEADLINE", 150)), exit=True)
    out_dir = Path(out)
    task = build_task("synthetic", {})
    prompts_seen = []  # problem ids of each generation batch on this rank (opsd-single)
    if mode in ("opsd", "opsd-weighted"):
        # prompts_per_step counts both processes: each process gets 2 prompts x 2 rollouts.
        weighted = dict(supervised_tokens=6, position_weighting="margin_cut", margin_window=2, anchor_beta=0.1,
                        teacher_weights="ema") if mode == "opsd-weighted" else {}
        trainer = make_trainer(out_dir / "stage", folder, task, reward=ScriptedReward(opsd_script), gate="correct",
                               max_steps=3, refill_max_rounds=1, problems=32, prompts_per_step=4, **weighted)
    elif mode == "opsd-single":
        # 4 distinct prompts x 1 rollout per optimizer step over both processes: 2 on each.
        trainer = make_trainer(out_dir / "stage", folder, task, gate="all", max_steps=2, problems=32,
                               prompts_per_step=4, rollouts_per_prompt=1)
        generate = trainer._generate_and_score_completions

        def recording(inputs):
            prompts_seen.append([row["id"] for row in inputs])
            return generate(inputs)

        trainer._generate_and_score_completions = recording
    elif mode == "opsd-checks":
        # Held-out checks split over the ranks, a stop/selection decision every rank must share.
        from opsdlab.config.stages import OPSDStageConfig
        from opsdlab.stages.opsd import run_opsd
        from opsdlab.tasks.verifier import VerifierConfig

        config = OPSDStageConfig(max_steps=3, prompts_per_step=4, rollouts_per_prompt=2, max_completion_length=8,
                                 learning_rate=1e-2, save_steps=100, logging_steps=1, gate="all", train_problems=16,
                                 check_every=1, check_problems=5, check_k=1, check_max_new_tokens=8,
                                 select="shortest_within_tolerance", select_tolerance=1.0)
        model, tokenizer = load_policy(folder)
        run_opsd(model, tokenizer, task.examples("train", 16), VerifierConfig(**task.default_verifier), config,
                 out_dir / "stage", thinking=True, check_examples=task.examples("test", 5))
        weights = {n: p.detach().cpu() for n, p in model.named_parameters()}
        torch.save(weights, out_dir / f"rank{RANK}.pt")
        selection = json.loads((out_dir / "stage" / "selection.json").read_text())
        (out_dir / f"rank{RANK}.json").write_text(json.dumps({"processes": int(os.environ.get("WORLD_SIZE", 1)),
                                                              "selected": selection["step"]}))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return
    else:
        config = RLVRStageConfig(max_steps=2, prompts_per_step=4, group_size=2, max_completion_length=8,
                                 learning_rate=1e-2, save_steps=100, logging_steps=1, dynamic_sampling=True,
                                 dynamic_sampling_max_rounds=3)
        model, tokenizer = load_policy(folder)
        trainer = RLVRTrainer(model=model, reward_funcs=[half_constant], args=grpo_args(config, out_dir / "stage", 0),
                              train_dataset=rl_dataset(task.examples("train", 32), tokenizer, True),
                              processing_class=tokenizer, dynamic_sampling=True, dynamic_sampling_max_rounds=3)
    lengths = []  # this rank's completion lengths of every training generation round
    generate_round = trainer._generate

    def counting(prompts):
        generated = generate_round(prompts)
        lengths.extend(len(ids) for ids in generated[1])
        return generated

    trainer._generate = counting
    trainer.train()
    weights = {n: p.detach().cpu() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    torch.save(weights, out_dir / f"rank{RANK}.pt")
    info = {"processes": trainer.accelerator.num_processes, "distributed_type": str(trainer.accelerator.distributed_type),
            "teacher": type(getattr(getattr(trainer, "teacher", None), "copy", None)).__name__, "skipped_steps": getattr(trainer, "skipped_steps", 0),
            "global_step": trainer.state.global_step, "per_device_batch": trainer.args.per_device_train_batch_size,
            "generation_batch": trainer.args.generation_batch_size, "prompts": prompts_seen,
            "rollout_tokens": trainer.rollout_tokens, "completion_lengths": lengths}
    (out_dir / f"rank{RANK}.json").write_text(json.dumps(info))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # both ranks have written their results
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # Leave without the interpreter's teardown: once, after both ranks had finished training and
    # written their results, rank 0 hung there (in the destructors of `main`'s objects) until the
    # deadline. What this test checks is complete by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
