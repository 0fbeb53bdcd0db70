"""Padded batches scored without a tokens x tokens attention mask.

A training forward over a padded batch (left-padded prompts, right-padded responses) gives
transformers a 2-D padding mask, from which its sdpa attention builds a rows x tokens x tokens mask
(and sdpa a converted copy of it, one layer at a time): 0.6 GiB per sequence at 16k tokens, 2.5 GiB
at 32k, the one part of a step's memory that grows faster than its tokens (docs/memory.md).

When each row's real tokens are one contiguous run, plain causal attention is exact once the run
starts the row: moving it there (the row's leading padding goes to its end) leaves every real token
attending to the same real tokens, and the padding after them is never attended. `left_aligned(model)`
does that around the model's decoder stack: each row is rolled left by its leading padding on the way
in, the stack runs with no mask (sdpa's causal kernel, no tokens^2 tensor), and its final hidden states
are rolled back on the way out, so that everything after the stack (the LM head, `logits_to_keep`,
TRL's fused log-prob head, the loss) reads the original layout. A row's first real token then sits at
position 0, as it did when the row was sampled (`generate` counts positions from the first real token;
vLLM never pads). Padding positions carry other (unused) values than before.

It stays out of the way wherever it would not be exact or would not help: a forward with a KV cache
(generation), another attention implementation (flash-attention-2 unpads by itself; eager builds a
mask anyway), a mask with a hole in a row, given position ids or other per-token inputs it does not
move, or a batch with no padding (transformers then builds no mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from opsdlab.modeling.parts import decoder_stack

# Inputs of the decoder stack with one entry per token, moved with the row; any other per-token input
# (given position ids, multimodal token types) leaves the forward as it is.
ROLLED_INPUTS = ("input_ids", "inputs_embeds")
MASK_FREE_ATTENTION = ("sdpa",)


class RowShifts(NamedTuple):
    """Each row's leading padding (the roll that starts its real tokens at position 0), and whether any
    row has some (right padding alone needs no roll, only no mask)."""

    shifts: torch.Tensor
    moved: bool


def row_shifts(attention_mask: torch.Tensor) -> RowShifts | None:
    """The rows' leading padding when causal attention can replace the padding mask: every row's ones
    one contiguous run (a row of no ones counts as one) and some row padded; else None.

    One read-back from the device; a memory trace with fake tensors, which have no values, supplies the
    answer instead."""
    mask = attention_mask.bool()
    width = mask.shape[1]
    count = mask.sum(dim=1)
    shifts = mask.int().argmax(dim=1)  # each row's first real token (0 for a row of none)
    last = width - 1 - mask.flip(1).int().argmax(dim=1)
    contiguous = (count == 0) | (count == last - shifts + 1)
    whole, padded, moved = torch.stack([contiguous.all(), (count < width).any(), (shifts > 0).any()]).tolist()
    if not (whole and padded):
        return None
    return RowShifts(shifts, bool(moved))


def roll_rows(values: torch.Tensor, shifts: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Row r of `values` (rows x tokens x ...) rolled left by shifts[r] (right, with `inverse`): the
    token at column t + shifts[r] moves to column t, those before it wrap to the end."""
    rows, width = values.shape[:2]
    columns = torch.arange(width, device=values.device)
    offset = shifts.to(values.device).view(rows, 1)
    index = (columns + (-offset if inverse else offset)) % width
    index = index.view(rows, width, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


@contextlib.contextmanager
def left_aligned(model) -> Iterator[None]:
    """Within the block, `model`'s forwards over padded batches run without a tokens^2 mask (see the
    module docstring); the final hidden states and everything computed from them are those of the
    masked forward up to floating-point rounding. A model whose decoder stack is not found, or whose
    attention is not sdpa, runs as it is."""
    stack = decoder_stack(model)
    attention = getattr(getattr(stack, "config", None), "_attn_implementation", None)
    if stack is None or attention not in MASK_FREE_ATTENTION:
        yield
        return
    pending: list[RowShifts | None] = []  # one entry per forward in flight: pushed on the way in, popped on the way out

    def inward(module, args, kwargs):
        shifts = _applicable(args, kwargs)
        pending.append(shifts)
        if shifts is None:
            return None
        changed = {**kwargs, "attention_mask": None, "use_cache": False}
        if shifts.moved:
            for name in ROLLED_INPUTS:
                if torch.is_tensor(kwargs.get(name)):
                    changed[name] = roll_rows(kwargs[name], shifts.shifts)
        return args, changed

    def outward(module, args, kwargs, output):
        shifts = pending.pop()
        if shifts is None or not shifts.moved:
            return None
        if isinstance(output, tuple):
            return (roll_rows(output[0], shifts.shifts, inverse=True), *output[1:])
        output.last_hidden_state = roll_rows(output.last_hidden_state, shifts.shifts, inverse=True)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(roll_rows(h, shifts.shifts, inverse=True) for h in output.hidden_states)
        return output

    # The way out runs before any other forward hook of the stack (one that reads its hidden states, as
    # `models.final_hidden`'s does), so that every other hook sees the original layout.
    handles = [stack.register_forward_pre_hook(inward, with_kwargs=True),
               stack.register_forward_hook(outward, with_kwargs=True, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _applicable(args: tuple, kwargs: dict) -> RowShifts | None:
    """The row shifts of one forward of the decoder stack, or None where the forward stays as it is."""
    mask = kwargs.get("attention_mask")
    if (args or not torch.is_tensor(mask) or mask.dim() != 2 or kwargs.get("past_key_values") is not None
            or kwargs.get("use_cache") is True or kwargs.get("position_ids") is not None):
        return None
    rows, width = mask.shape
    for name, value in kwargs.items():
        if name not in ROLLED_INPUTS and name != "attention_mask" and torch.is_tensor(value) and value.dim() >= 2 \
                and tuple(value.shape[:2]) == (rows, width):
            return None
    return row_shifts(mask)
