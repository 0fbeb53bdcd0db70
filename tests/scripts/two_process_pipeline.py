"""Run `opsdlab pipeline` (stages, evaluations, then the report) on every process of a launch.

Launched by tests/test_pipeline_multiprocess.py:
    accelerate launch --cpu --num_processes 2 two_process_pipeline.py CONFIG OUT_DIR
Each process runs the command line's `pipeline --config CONFIG` and writes OUT_DIR/rank{r}.json: the
command's exit code and, for every model folder the Trainer saved (final models and checkpoints),
a digest of the weights as this process held them when saving, so that the test can compare ranks.
"""

import faulthandler
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer

from opsdlab.cli import main as cli_main

RANK = int(os.environ.get("RANK", 0))


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(config: str, out: str) -> None:
    # A process stuck in a collective would wait forever: dump where it is and exit instead.
    faulthandler.dump_traceback_later(float(os.environ.get("OPSDLAB_WORKER_DEADLINE", 240)), exit=True)
    out_dir = Path(out)
    saved: dict[str, str] = {}
    save_model = Trainer.save_model

    def recording(self, output_dir=None, _internal_call=False):
        saved[str(output_dir)] = weights_digest(self.accelerator.unwrap_model(self.model))
        return save_model(self, output_dir, _internal_call=_internal_call)

    Trainer.save_model = recording
    code = cli_main(["pipeline", "--config", config])
    (out_dir / f"rank{RANK}.json").write_text(json.dumps({"exit_code": code, "saved": saved}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main(*sys.argv[1:3])
