"""The 2-process tests' launcher: a worker script run by `python -m torch.distributed.run` on CPU (gloo over
loopback), and what every worker starts and ends with.

Start (DeepSpeed workers): a test-machine choice, skip the JIT build of DeepSpeed's shared-memory collective
(minutes of g++); gloo does the work instead.

End: a worker whose work returned 0 meets the other ranks, destroys the process group and leaves with
os._exit, without interpreter finalization. Why: DeepSpeed keeps every ZeRO-3 model, and through its hooks
the engine and the groups, in a module-level list (zero.parameter_offload.FWD_MODULE_STACK), so these and
torch's gloo threads are freed only during finalization, in no set order. There a rank once aborted in CI
("terminate called without an active exception", SIGABRT) with its output ending where a finished run's
does; 100+ runs here did not reproduce it. What the tests check (the files written, the processes'
agreement) is all done before this point. A worker that fails exits the ordinary way, with its traceback.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]

DEEPSPEED_PRELUDE = """\
import deepspeed.ops
deepspeed.ops.__compatible_ops__ = dict(deepspeed.ops.__compatible_ops__, deepspeed_shm_comm=False)
"""

_EPILOGUE = """
import os as _os, sys as _sys
import torch.distributed as _dist
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_worker(path: Path, body: str, deepspeed: bool = True) -> Path:
    """path <- [DeepSpeed prelude] + body + the quiet exit. body ends the ordinary way (an exception, or
    sys.exit with a non-zero code) when it fails."""
    path.write_text((DEEPSPEED_PRELUDE if deepspeed else "") + body.rstrip() + "\n" + _EPILOGUE)
    return path


def entry_point_body(module: str, call: str = "main(sys.argv[1:])") -> str:
    """A worker body that runs an entry point, `module.call`, and stops with its exit code when it fails."""
    return f"import sys\nimport {module} as entry\ncode = entry.{call}\nif code:\n    sys.exit(code)\n"


def torchrun(script: Path, args: Sequence[str] = (), nproc: int = 2, timeout: float = 300,
             **env) -> subprocess.CompletedProcess:
    """Runs script on nproc CPU processes; asserts they all exited 0 (else shows the output's tail)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu",
                    CUDA_VISIBLE_DEVICES="")  # CPU tests, also on a machine with GPUs
    full_env.update({k: str(v) for k, v in env.items()})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
