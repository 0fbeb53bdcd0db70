"""RLVR and OPSD with rollouts from vLLM (TRL's `use_vllm`, colocate mode) through the real trainers.

Colocate mode builds a vLLM engine inside the training process (TRL's external launcher) and, before
each step's generation, loads the policy's current weights into it. These tests check that the OPSD
loss scores exactly the token ids vLLM generated and that vLLM holds the trained weights after a
step. They skip where vLLM is not installed.
"""

import os

import pytest
import torch
from transformers import TrainerCallback

from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig

from launch_helpers import free_port
from opsd_helpers import make_trainer, snapshot

# On CPU, vLLM's KV budget is gpu_memory_utilization x node RAM minus this process's resident memory,
# which a test process fills; a fixed 1 GiB does not depend on it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
VLLM = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1)


@pytest.fixture(autouse=True)
def _restore_launch_state():
    """TRL's colocate mode exports RANK, WORLD_SIZE and MASTER_* for vLLM's one-process group and keeps
    them; a later trainer in this test process would take them for a distributed launch."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def released():
    """`track(trainer)` for a trainer a test builds itself: its colocated engine is shut down when the test
    ends, as a stage's is (`colocated_engine_released`), so no vLLM process group outlives the test."""
    from opsdlab.evaluation.vllm_backend import colocated_engine_released

    with colocated_engine_released() as track:
        yield track


def vllm_weights(trainer) -> dict[str, torch.Tensor]:
    """The engine's parameters, read where TRL writes them (`VLLMGeneration.sync_weights`)."""
    model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# vLLM fuses q/k/v and gate/up projections; these parameters keep the transformers name.
UNFUSED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def test_stage_configs_pass_vllm_fields_to_trl_and_reject_a_bad_mode(tmp_path):
    from opsdlab.stages.opsd import opsd_args
    from opsdlab.stages.rlvr import grpo_args

    config = OPSDStageConfig(**VLLM, vllm_tensor_parallel_size=1, vllm_max_model_length=256,
                             vllm_server_base_url="http://localhost:8000")
    args = opsd_args(config, tmp_path, 0, num_processes=1)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization, args.vllm_max_model_length,
            args.vllm_server_base_url) == (True, "colocate", 0.1, 256, "http://localhost:8000")
    assert grpo_args(RLVRStageConfig(**VLLM), tmp_path, 0, num_processes=1).vllm_gpu_memory_utilization == 0.1
    with pytest.raises(ValueError, match="opsd: vllm_mode must be one of"):
        OPSDStageConfig(vllm_mode="colo")
    with pytest.raises(ValueError, match="rlvr: vllm_gpu_memory_utilization"):
        RLVRStageConfig(vllm_gpu_memory_utilization=0)


def test_opsd_scores_the_vllm_rollouts_and_vllm_gets_the_trained_weights(tmp_path, tiny_folder, task, released):
    pytest.importorskip("vllm")
    steps = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            steps[state.global_step] = snapshot(model)

    trainer = released(make_trainer(tmp_path, tiny_folder, task, callbacks=[Snapshot()], max_steps=2,
                                    learning_rate=0.1, **VLLM))
    initial = snapshot(trainer.model)
    generated, scored, synced_at = [], [], []
    generate, compute_loss, sync = (trainer.vllm_generation.generate, trainer._compute_loss,
                                    trainer.vllm_generation.sync_weights)

    def spy_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append([list(ids) for ids in out[1]])
        return out

    def spy_loss(model, inputs):
        scored.append([ids[mask.bool()].tolist() for ids, mask in zip(inputs["completion_ids"],
                                                                     inputs["completion_mask"])])
        return compute_loss(model, inputs)

    def spy_sync():
        synced_at.append(trainer.state.global_step)
        return sync()

    trainer.vllm_generation.generate, trainer._compute_loss = spy_generate, spy_loss
    trainer.vllm_generation.sync_weights = spy_sync
    trainer.train()

    # gate "all", no refill: the loss sees every vLLM rollout token for token (TRL shuffles the rows
    # of a generation batch before splitting it into micro-batches, hence the sort).
    assert [sorted(step) for step in scored] == [sorted(step) for step in generated] and len(generated) == 2
    assert synced_at == [0, 1]
    engine = vllm_weights(trainer)
    names = [n for n in initial if n.endswith(UNFUSED)]
    assert names
    for name in names:
        after_first = steps[1][name].float()
        assert (after_first - initial[name]).abs().max() > 1e-3, name  # the step moved it
        # The last sync (before step 2) loaded the weights of step 1 into vLLM, cast to the engine's
        # dtype (TRL builds the engine at vLLM's "auto" dtype: bfloat16 for this float32 checkpoint).
        dtype = engine[name].dtype
        assert torch.equal(engine[name], after_first.to(dtype)), name
        assert not torch.equal(engine[name], initial[name].to(dtype)), name


def test_rlvr_trains_with_vllm_rollouts(tmp_path, tiny_folder, task, released):
    pytest.importorskip("vllm")
    from opsdlab.modeling.models import load_policy
    from opsdlab.loss.rewards import VerifierReward
    from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, rl_dataset
    from opsdlab.tasks.verifier import VerifierConfig

    model, tokenizer = load_policy(tiny_folder)
    before = snapshot(model)
    config = RLVRStageConfig(max_steps=2, prompts_per_step=2, group_size=2, max_completion_length=8,
                             learning_rate=1e-2, save_steps=100, logging_steps=1, **VLLM)

    def coin(completions, **_):
        return [float(torch.rand(()).item() < 0.5) for _ in completions]

    trainer = released(RLVRTrainer(model=model, args=grpo_args(config, tmp_path, 0),
                                   reward_funcs=[VerifierReward(VerifierConfig(compare="exact"),
                                                                {tokenizer.eos_token_id}), coin],
                                   train_dataset=rl_dataset(task.examples("train", 8), tokenizer, True),
                                   processing_class=tokenizer))
    trainer.train()
    assert max((trainer.model.state_dict()[n] - p).abs().max().item() for n, p in before.items()) > 0
    assert trainer.state.log_history[0]["sampling/sampling_logp_difference/max"] < 0.05


@pytest.fixture
def engines(monkeypatch):
    """Weak references to what holds each colocated engine's memory (its model, its KV cache tensors),
    one list per engine TRL builds while the test runs."""
    pytest.importorskip("vllm")
    import weakref

    import trl.generation.vllm_generation as trl_vllm

    built, build = [], trl_vllm.LLM

    def remembered(*args, **kwargs):
        runner = (llm := build(*args, **kwargs)).llm_engine.model_executor.driver_worker.model_runner
        built.append([weakref.ref(runner.model), *(weakref.ref(cache) for cache in runner.kv_caches)])
        return llm

    monkeypatch.setattr(trl_vllm, "LLM", remembered)
    return built


def _alive(engines) -> list[int]:
    import gc

    gc.collect()
    assert all(len(engine) > 1 for engine in engines)  # a model and at least one KV cache tensor
    return [sum(ref() is not None for ref in engine) for engine in engines]


def _opsd_stage(model_dir, task, stage_dir):
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.opsd import run_opsd
    from opsdlab.tasks.verifier import VerifierConfig

    model, tokenizer = load_policy(model_dir)
    return run_opsd(model, tokenizer, task.examples("train", 8), VerifierConfig(compare="exact"),
                    OPSDStageConfig(max_steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_completion_length=8,
                                    save_steps=100, **VLLM), stage_dir, thinking=True)


def test_each_stage_frees_its_engine_so_stages_follow_each_other_in_one_process(tmp_path, tiny_folder, task,
                                                                                 engines):
    """RLVR then an OPSD arm in one process, both with colocated vLLM, as a one-process pipeline runs
    them: after each stage its engine is gone, and so are the launch variables TRL exported for it.
    (Without that, the next stage took those variables for a launch, opened a process group, and
    its engine then stayed alive: on CPU the third engine of a pipeline found no memory left.)"""
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.rlvr import run_rlvr
    from opsdlab.tasks.verifier import VerifierConfig

    launch = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in launch}
    model, tokenizer = load_policy(tiny_folder)
    rlvr = run_rlvr(model, tokenizer, task.examples("train", 8), VerifierConfig(compare="exact"),
                    RLVRStageConfig(max_steps=1, prompts_per_step=2, group_size=2, max_completion_length=8,
                                    save_steps=100, **VLLM), tmp_path / "rlvr", thinking=True)
    assert _alive(engines) == [0]
    assert {name: os.environ.get(name) for name in launch} == before
    _opsd_stage(rlvr, task, tmp_path / "opsd")
    assert _alive(engines) == [0, 0]
    assert not torch.distributed.is_initialized()
    assert {name: os.environ.get(name) for name in launch} == before
    assert (tmp_path / "opsd" / "model" / "model.safetensors").exists()


def test_under_a_launch_a_stage_frees_its_engine_and_keeps_the_process_group(tmp_path, tiny_folder, task, engines):
    """A process group open before the stage, as `accelerate launch` opens one: the stage's engine is
    freed and the launch's group outlives it (vLLM's own shutdown would destroy it)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    group = torch.distributed.group.WORLD
    try:
        _opsd_stage(tiny_folder, task, tmp_path / "opsd")
        assert _alive(engines) == [0]
        assert torch.distributed.is_initialized() and torch.distributed.group.WORLD is group
        torch.distributed.barrier()  # still usable
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
