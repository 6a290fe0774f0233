"""Issue 13, classes 3, 4 and 8: one run per output folder, resume that cannot lie (every result-changing
setting compared, a torn metrics line dropped, a full disk named in one line), result files with the umask."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardening_fixtures import FAST, accuracy, adapter_tensors, collate, tiny_data, tiny_model  # noqa: E402

from test_train_resume import Crash, CrashAt  # noqa: E402

from loralib.files import DiskFullError, write_json_atomic  # noqa: E402
from loralib.optim import create_loraplus_optimizer  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402
from loralib.train import checkpoint as ckpt  # noqa: E402
from loralib.train.run_lock import OutputDirInUse, acquire, output_dir_lock, release  # noqa: E402

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from loralib.train.run_lock import hold_output_dir
hold_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _config(out, **kw):
    return TrainConfig(output_dir=str(out), **{**FAST, "max_steps": 6, "save_strategy": "steps", "save_every": 2,
                                               **kw})


# -- class 3: one run per output folder ------------------------------------------------------------------

def test_a_second_process_is_refused_and_a_dead_ones_lock_is_gone(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(Path(__file__).parents[1])), str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirInUse, match="in use by another run"):
            train(tiny_model(), tiny_data(), collate, _config(out))
        assert list(out.iterdir()) == []  # refused before anything was written
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    result = train(tiny_model(), tiny_data(), collate, _config(out))
    assert result.global_step == 6


def test_the_lock_is_reentrant_in_one_process_and_leaves_no_file(tmp_path):
    out = tmp_path / "run"
    with output_dir_lock(out):
        train(tiny_model(), tiny_data(), collate, _config(out, save_strategy="no"))  # the loop takes it again
        assert acquire(out)
        release(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.jsonl"]


# -- class 4: resume that cannot lie ---------------------------------------------------------------------

def _crashed_run(out, **kw):
    with pytest.raises(Crash):
        train(tiny_model(), tiny_data(), collate, _config(out, **kw), callbacks=[CrashAt(5)])


@pytest.mark.parametrize("change, named", [
    (dict(lr=2e-2), "lr (checkpoint 0.0001, now 0.02)"),
    (dict(weight_decay=0.1), "weight_decay (checkpoint 0.0, now 0.1)"),
    (dict(schedule="cosine"), "schedule (checkpoint 'linear', now 'cosine')"),
    (dict(max_grad_norm=0.5), "max_grad_norm (checkpoint 1.0, now 0.5)"),
])
def test_resume_with_a_changed_setting_is_refused_naming_it(tmp_path, change, named):
    out = tmp_path / "run"
    _crashed_run(out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="differs from the checkpoint's") as err:
        train(tiny_model(), tiny_data(), collate, _config(out, resume_from="latest", **change))
    assert named in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == before
    # unchanged settings (logging and checkpoint cadence may change) resume
    assert train(tiny_model(), tiny_data(), collate, _config(out, resume_from="latest", log_every=3)).global_step == 6


def test_resume_with_another_optimizer_or_lora_scaling_is_refused(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out)
    loraplus = lambda m: create_loraplus_optimizer(m, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16)  # noqa: E731
    with pytest.raises(ValueError, match=r"optimizer .*(groups|initial_lr)"):
        train(tiny_model(), tiny_data(), collate, _config(out, resume_from="latest"), optimizer_factory=loraplus)
    model = tiny_model()
    model.l1.lora_alpha, model.l1.scaling = 16, 4.0  # as if built with another --lora_alpha
    with pytest.raises(ValueError, match=r"l1\.lora_alpha \(checkpoint 8, now 16\); l1\.scaling"):
        train(model, tiny_data(), collate, _config(out, resume_from="latest"))


def test_a_torn_last_metrics_line_is_dropped_and_logged(tmp_path, caplog):
    out = tmp_path / "run"
    _crashed_run(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.9')  # a crash mid-append
    with caplog.at_level("WARNING"):
        train(tiny_model(), tiny_data(), collate, _config(out, resume_from="latest"))
    assert "torn last line" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_torn_line_inside_metrics_is_named(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{torn"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        train(tiny_model(), tiny_data(), collate, _config(out, resume_from="latest"))


def test_a_full_disk_is_one_error_naming_the_path_and_resume_is_exact(tmp_path, monkeypatch):
    reference = tiny_model()
    train(reference, tiny_data(), collate, _config(tmp_path / "ref"))
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # the disk fills while checkpoint-4 is being written
        if "checkpoint-4" in str(path) and str(path).endswith(ckpt.TRAINING_STATE):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError, match=r"training_state\.pt: no space left on device") as err:
        train(tiny_model(), tiny_data(), collate, _config(out))
    assert isinstance(err.value, ValueError) and len(str(err.value).splitlines()) == 1
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    resumed = tiny_model()
    train(resumed, tiny_data(), collate, _config(out, resume_from="latest"))
    for name, tensor in adapter_tensors(reference).items():
        assert torch.equal(adapter_tensors(resumed)[name], tensor), name


def test_a_full_disk_in_a_result_file_names_it(tmp_path, monkeypatch):
    target = tmp_path / "eval_results.json"
    write_json_atomic(target, {"accuracy": 0.5})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dumps", lambda *a, **k: "x" * 10)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(DiskFullError, match=rf"{target}: no space left on device"):
        write_json_atomic(target, {"accuracy": 0.9})
    assert json.loads(target.read_text()) == {"accuracy": 0.5}  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]


class _Full:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


# -- class 8: result files and adapters with the umask ---------------------------------------------------

def test_results_and_adapters_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train(tiny_model(), tiny_data(), collate, _config(out, eval_strategy="steps", eval_every=3,
                                                          metric_for_best="accuracy"), eval_fn=accuracy)
        write_json_atomic(out / "eval_results.json", {"accuracy": 1.0})
        files = [out / "eval_results.json", out / "adapter" / "adapter_config.json",
                 out / "adapter" / "adapter.safetensors", out / "best_adapter" / "adapter_config.json",
                 out / "checkpoint-6" / "checkpoint.json"]
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(old)


def test_an_explicitly_allowed_change_is_applied_and_recorded(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out, lr=1e-2, weight_decay=0.1)
    seen = []

    class Rates:
        def on_before_optimizer_step(self, state, model, optimizer):
            seen.append((state.global_step, [g["lr"] for g in optimizer.param_groups],
                         [g["weight_decay"] for g in optimizer.param_groups]))

    config = _config(out, lr=5e-3, weight_decay=0.2, resume_from="latest", resume_overrides=("lr", "weight_decay"))
    train(tiny_model(), tiny_data(), collate, config, callbacks=[Rates()])
    # linear decay over 6 steps, no warmup: step 5 (0-based 4 done) runs at lr * 2/6 of the NEW rate
    step, lrs, decays = seen[0]
    assert step == 4 and lrs == pytest.approx([5e-3 * 2 / 6] * len(lrs)) and 0.2 in decays and 0.1 not in decays
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "resume_overrides": {"lr": [1e-2, 5e-3], "weight_decay": [0.1, 0.2]}} in records
    assert json.loads((out / "checkpoint-6" / "checkpoint.json").read_text())["config"]["lr"] == 5e-3
    with pytest.raises(ValueError, match="resume_overrides"):
        TrainConfig(output_dir=str(out), max_steps=2, resume_overrides=("seed",))
