"""Low-precision weights and the learning rate: which optimizer steps round away."""

import torch

from opsdlab.cli import main
from opsdlab.modeling.runtime import vanishing_update_fraction


def test_vanishing_update_fraction_hand_values():
    # bfloat16 keeps 8 significant bits: the spacing at 1.0 is 2**-7, at 3.0 it is 2**-6, at 2**-10 it is
    # 2**-17. A step of 1e-3 is below half the spacing at 1.0 and 3.0 (lost), above it at 2**-10 (kept);
    # zero always moves.
    weights = torch.tensor([1.0, 2.0 ** -10, 0.0, -3.0], dtype=torch.bfloat16)
    assert vanishing_update_fraction([weights], 1e-3) == 0.5
    assert vanishing_update_fraction([weights.float()], 1e-3) == 0.0
    assert vanishing_update_fraction([weights], 5e-3) == 0.25  # above 2**-8 (1.0 moves), below 2**-7 (3.0 does not)
    # weights this rank has not loaded (FSDP's RAM-efficient loading puts them on the meta device) are left out
    assert vanishing_update_fraction([weights, torch.empty(8, dtype=torch.bfloat16, device="meta")], 1e-3) == 0.5


def test_vanishing_update_fraction_is_what_an_optimizer_step_does():
    """The fraction predicted for a step of size lr is the fraction AdamW's first step (which moves every
    weight by lr, the sign of its gradient) leaves unchanged; a strided read of a large tensor is close."""
    torch.manual_seed(0)
    weights = torch.nn.Parameter((torch.randn(4000) * 0.02).to(torch.bfloat16))
    before = weights.detach().clone()
    predicted = vanishing_update_fraction([weights], 1e-5)
    weights.grad = -torch.ones_like(weights)  # every step is +lr, the direction the prediction adds
    torch.optim.AdamW([weights], lr=1e-5, weight_decay=0.0).step()
    unchanged = int((weights.detach() == before).sum())
    assert 0.5 < predicted < 1.0 and predicted == unchanged / weights.numel()
    assert abs(vanishing_update_fraction([before], 1e-5, per_tensor=400) - predicted) < 0.05


def test_a_stage_with_bf16_weights_warns_that_its_steps_round_away(tmp_path, tiny_folder, capsys):
    """OPSD at the paper's learning rate (1e-6) on bfloat16 weights: the warning names the fraction;
    the same run on float32 weights does not warn."""
    common = ["--gate", "all", "--teacher-check", "0", "--set", "max_steps=1", "--set", "prompts_per_step=2",
              "--set", "rollouts_per_prompt=2", "--set", "max_completion_length=4", "--set", "learning_rate=1e-6"]
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                 *common]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "leaves" in line]
    assert len(warning) == 1 and "opsd: a step of the learning rate (1e-06) leaves 9" in warning[0]
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path / "fp32"), *common]) == 0
    assert "leaves" not in capsys.readouterr().err



def _head_gemms(run, vocab: int, hidden: int, paused: dict) -> list[tuple]:
    """(operand dtypes, operands exact in bf16, output dtype) of every LM-head product (hidden size in,
    vocabulary out) while `run()` executes, except while `paused["on"]`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.dtype}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in products and out.shape[-1] == vocab and not paused["on"]:
                a, b = [x for x in args if torch.is_tensor(x) and x.dim() == 2][-2:]
                if a.shape[-1] == hidden:
                    exact = all(bool((x == x.to(torch.bfloat16).to(x.dtype)).all()) for x in (a, b))
                    seen.append(((a.dtype, b.dtype), exact, out.dtype))
            return out

    with Record():
        run()
    return seen


def test_the_lm_head_in_the_loss_runs_bf16_operands_into_float32_logits_under_mixed_precision(
        tmp_path, tiny_folder, task, monkeypatch):
    """float32 weights under accelerate's bf16 mixed precision (the forwards under autocast): in a training
    step, the loss's LM head multiplies bf16 values (bf16 operands; on CPU bf16 values held in float32)
    into float32 logits, for the student, the teacher and the backward's recomputation, as TRL's chunked
    kernels do. The only bf16 logits are those of the forwards' own head on their last position (unused).
    Without mixed precision every head product is float32."""
    import opsd_helpers

    real_args = opsd_helpers.opsd_args

    def bf16_args(*args, **kwargs):
        training_args = real_args(*args, **kwargs)
        training_args.bf16, training_args.mixed_precision = True, "bf16"
        return training_args

    for mixed in (True, False):
        monkeypatch.setattr(opsd_helpers, "opsd_args", bf16_args if mixed else real_args)
        trainer = opsd_helpers.make_trainer(tmp_path / str(mixed), tiny_folder, task, max_steps=1, chunk_size=4)
        config = trainer.model.config
        gemms, paused, result = [], {"on": False}, []
        step, prepare = trainer.training_step, trainer._prepare_inputs

        def generation_unrecorded(*args, **kwargs):  # rollouts: the generation's own LM head
            paused["on"] = True
            try:
                return prepare(*args, **kwargs)
            finally:
                paused["on"] = False

        def recorded_step(*args, **kwargs):
            gemms.extend(_head_gemms(lambda: result.append(step(*args, **kwargs)), config.vocab_size,
                                     config.hidden_size, paused))
            return result[-1]

        trainer._prepare_inputs, trainer.training_step = generation_unrecorded, recorded_step
        trainer.train()
        assert trainer.accelerator.mixed_precision == ("bf16" if mixed else "no")
        assert next(trainer.model.parameters()).dtype == torch.float32
        forward_heads = [g for g in gemms if g[2] != torch.float32]
        loss_heads = [g for g in gemms if g[2] == torch.float32]
        assert len(loss_heads) >= 3  # student, teacher, recomputation: at least one chunk each
        if mixed:
            assert forward_heads == [((torch.bfloat16, torch.bfloat16), True, torch.bfloat16)] * 2
            assert all(exact for _, exact, _ in loss_heads), loss_heads
        else:
            assert not forward_heads
            assert all(dtypes == (torch.float32, torch.float32) for dtypes, _, _ in loss_heads)
            assert not all(exact for _, exact, _ in loss_heads)
