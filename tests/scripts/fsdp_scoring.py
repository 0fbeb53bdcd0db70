"""The OPSD loss on FSDP2-sharded student and teacher (gloo, CPU), against the same loss unsharded.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/fsdp_scoring.py OUT_DIR

Shards as accelerate (each decoder layer, then the root) and TRL's `prepare_fsdp` (the teacher's
root) do, with reshard after forward. Every rank scores the same batch, so the averaged sharded
gradient must equal the unsharded one. Writes OUT_DIR/rank<r>.json: the loss of each scoring, the
largest gradient difference, and the error the "hidden" scoring raises on the sharded models.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from opsdlab.loss.chunked import chunked_divergence
from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer
from opsdlab.stages.opsd import SCORINGS, response_positions
from opsdlab.tasks import build_task


def opsd_loss(scoring: str, student, teacher, batch) -> torch.Tensor:
    student_ids, student_attn, teacher_ids, teacher_attn, completion, mask = batch
    scoring_ = SCORINGS[scoring]
    width = completion.shape[1]
    student_scores = scoring_.scores(student, student_ids, student_attn,
                                     response_positions(student_ids.shape[1] - width, width))
    with torch.no_grad():
        teacher_scores = scoring_.scores(teacher, teacher_ids, teacher_attn,
                                         response_positions(teacher_ids.shape[1] - width, width))
        teacher_head = scoring_.head(teacher)
    loss, _ = chunked_divergence(student_scores[mask], teacher_scores[mask], scoring_.head(student), teacher_head,
                                 completion[mask], "reverse_kl", chunk_size=4)
    return loss


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = build_tiny_tokenizer(build_task("synthetic", {}).tokenizer_corpus())
    student, teacher = build_tiny_model(tokenizer, seed=0), build_tiny_model(tokenizer, seed=1)
    reference_student, reference_teacher = copy.deepcopy(student), copy.deepcopy(teacher)

    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    completion = torch.randint(5, vocab, (2, 6), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    student_prompt = torch.randint(5, vocab, (2, 4), generator=generator)
    teacher_prompt = torch.randint(5, vocab, (2, 9), generator=generator)
    batch = (torch.cat([student_prompt, completion], 1), torch.cat([torch.ones_like(student_prompt), mask.long()], 1),
             torch.cat([teacher_prompt, completion], 1), torch.cat([torch.ones_like(teacher_prompt), mask.long()], 1),
             completion, mask)

    reference = opsd_loss("hidden", reference_student, reference_teacher, batch)
    reference.backward()
    reference_logits_loss = opsd_loss("logits", copy.deepcopy(reference_student), reference_teacher, batch)

    for layer in student.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(student, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    sharded = opsd_loss("logits", student, teacher, batch)
    sharded.backward()
    gradients = {name: param.grad.full_tensor() for name, param in student.named_parameters()}
    expected = dict(reference_student.named_parameters())
    gradient_difference = max((gradients[name] - expected[name].grad).abs().max().item() for name in gradients)
    try:
        opsd_loss("hidden", student, teacher, batch)
        hidden_error = None
    except RuntimeError as error:
        hidden_error = str(error)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "reference_loss": reference.item(), "reference_logits_loss": reference_logits_loss.item(),
        "sharded_logits_loss": sharded.item(), "gradient_difference": gradient_difference,
        "parameters": len(gradients), "hidden_error": hidden_error}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
