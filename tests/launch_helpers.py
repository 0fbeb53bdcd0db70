"""Launching a multi-process run from a test: a free port, and a deadline so a hang fails instead of
stalling CI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_with_deadline(command: list[str], env: dict, log: Path, deadline: float) -> tuple[int, str]:
    """Run `command` in its own process group with output to `log`; past `deadline` + 60 s kill the
    group. Returns the exit status and the output.

    The workers exit by themselves after `deadline` seconds and dump their stacks (where they hung);
    output goes to a file, so a dead worker cannot leave a pipe open.
    """
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=deadline + 60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, log.read_text()
