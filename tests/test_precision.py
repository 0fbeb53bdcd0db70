"""Low-precision weights and the learning rate: which optimizer steps round away."""

import torch

from opsdlab.cli import main
from opsdlab.runtime import vanishing_update_fraction


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
