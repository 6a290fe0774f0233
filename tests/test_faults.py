"""Fault injection (issue 13): kill -9 in the middle of a run, a full disk, torn files, two runs racing for one
folder. Each case ends either in an exact resume (the adapter bit-equal to an uninterrupted run's, every
metrics step logged once) or in a clean refusal (one line, nothing of the other run touched).

The runs are tests/_hardening_fixtures.py as a script: 8 steps, a checkpoint every 2, --sleep after each step.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardening_fixtures import FAST, collate, tiny_data, tiny_model  # noqa: E402

from loralib.files import DiskFullError  # noqa: E402
from loralib.train import TrainConfig, list_checkpoints, train  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "_hardening_fixtures.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[1]))


def _config(out, **kw):
    return TrainConfig(output_dir=str(out), **{**FAST, "max_steps": 8, "lr": 1e-2, "save_strategy": "steps",
                                               "save_every": 2, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_model(), tiny_data(), collate, _config(out))
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def _start(out, *args):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(proc, line, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if got.strip() == line:
            return
        if not got and proc.poll() is not None:
            break
    raise AssertionError(f"never printed {line!r}: {proc.stderr.read()[-2000:]}")


def _resume(out):
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--resume"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]


def _assert_exact(out, reference):
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert adapter.keys() == reference.keys()
    for key in reference:
        assert torch.equal(adapter[key], reference[key]), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step logged once
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_two_runs_racing_for_one_folder_one_is_refused_in_one_line(tmp_path, reference):
    out = tmp_path / "run"
    procs = [_start(out, "--sleep", "0.05") for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    refused = next(err for rc, _, err in results if rc == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use by another run" in lines[0], refused
    _assert_exact(out, reference)  # the winner's run, untouched by the loser


def test_a_second_run_is_refused_while_the_first_holds_the_folder_then_the_first_resumes_exactly(tmp_path,
                                                                                                   reference):
    out = tmp_path / "run"
    first = _start(out, "--sleep", "2")
    _wait_for(first, "step 2")  # checkpoint-2 is written before a step's end is announced
    second = subprocess.run([sys.executable, str(SCRIPT), str(out), "--resume"], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert second.returncode == 2 and "in use by another run" in second.stderr
    first.send_signal(signal.SIGKILL)  # the holder dies: its lock goes with it
    first.wait()
    _resume(out)
    _assert_exact(out, reference)


def test_full_disk_mid_checkpoint_then_resume_is_exact(tmp_path, reference, monkeypatch):
    import loralib.adapters as adapters

    out = tmp_path / "run"
    real = adapters.save_file

    def save_file(tensors, path, *args, **kwargs):  # the disk fills while checkpoint-6's adapter is written
        if ".tmp-checkpoint-6" in str(path):
            Path(path).write_bytes(b"\x00" * 7)  # a torn file
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(adapters, "save_file", save_file)
    with pytest.raises(DiskFullError, match=r"\.tmp-checkpoint-6/adapter/adapter\.safetensors\.tmp: no space left"):
        train(tiny_model(), tiny_data(), collate, _config(out))
    monkeypatch.setattr(adapters, "save_file", real)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert (out / ".tmp-checkpoint-6").is_dir()  # the half-written folder is never taken for a checkpoint
    _resume(out)
    _assert_exact(out, reference)


def test_kill_9_mid_run_and_torn_files_then_resume_is_exact(tmp_path, reference):
    """(kill -9 at every point of a checkpoint save itself: tests/test_train_resume.py)"""
    out = tmp_path / "run"
    proc = _start(out, "--sleep", "0.3")
    _wait_for(proc, "step 7")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0')  # torn mid-append
    (out / "checkpoint-6" / "checkpoint.json").unlink()  # torn checkpoint: its marker never written
    (out / "checkpoint-6" / "training_state.pt").write_bytes(b"PK\x03")
    tmp = out / ".tmp-checkpoint-8"
    tmp.mkdir()
    (tmp / "training_state.pt").write_bytes(b"torn")
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    _resume(out)
    _assert_exact(out, reference)
