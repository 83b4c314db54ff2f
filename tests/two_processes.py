"""Runs a training script as two CPU processes under `accelerate launch` (gloo), for the tests that compare a
two-process run with a one-process run of the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: str, args: dict, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Write `script` to `workdir/run.py` and run it in two processes with `args` (JSON) as its one argument."""
    (workdir / "run.py").write_text(script)
    # accelerate runs several CPU processes (gloo) only when told to use the CPU through the environment.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_free_port()), str(workdir / "run.py"), json.dumps(args)]
    return subprocess.run(launch, env=env, capture_output=True, text=True, timeout=timeout)
