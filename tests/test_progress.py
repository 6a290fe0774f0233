"""Progress of a training run (loralib.train.progress): the plain periodic line off a terminal (first step, every
N steps or seconds, last step; loss / lr / throughput / ETA), the choice bar / lines / nothing, and the loop
showing it for a run started with progress_bar=False (the scripts' --disable_tqdm) or resumed with a bar."""
from __future__ import annotations

import io
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_loop import build, collate, data  # noqa: E402

from loralib.train import TrainConfig, train  # noqa: E402
from loralib.train.progress import ProgressLines, Silent, format_duration, open_progress, parse_every  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_parse_every_and_durations():
    assert parse_every("30s") == (None, 30.0) and parse_every(" 50 ") == (50, None)
    for bad in ("0", "-3", "fast", "0s", ""):
        with pytest.raises(ValueError, match="LORALIB_PROGRESS_EVERY"):
            parse_every(bad)
    assert format_duration(0) == "0:00" and format_duration(125.4) == "2:05" and format_duration(3725) == "1:02:05"


def test_lines_every_seconds_with_fields_and_eta():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(total=10, initial=0, every_seconds=30.0, stream=out, clock=clock)
    for step in range(1, 11):
        clock.now += 10.0  # 10 s per step
        lines.update(1)
        if step == 2:
            lines.set_postfix(loss="0.6931", lr="1.00e-03", **{"tok/s": "812"})
    lines.close()
    printed = out.getvalue().splitlines()
    # step 1 (first), step 4 (30 s after step 1), step 7, step 10 (last); close adds nothing
    assert [int(re.match(r"train (\d+)/10", p).group(1)) for p in printed] == [1, 4, 7, 10]
    assert printed[0] == "train 1/10 (10.0%) elapsed 0:10 ETA 1:30"
    assert printed[1] == "train 4/10 (40.0%) loss 0.6931 lr 1.00e-03 tok/s 812 elapsed 0:40 ETA 1:00"
    assert printed[-1].endswith("elapsed 1:40")  # no ETA once done


def test_lines_every_steps_resumed_and_stopped_early():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(total=100, initial=40, every_steps=25, every_seconds=None, stream=out, clock=clock)
    for _ in range(30):
        clock.now += 2.0
        lines.update(1)
    lines.write("step 70: accuracy=0.5")
    lines.close()  # stopped at 70 < 100: close says where
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("train 41/100 (41.0%)")
    assert printed[0].endswith("ETA 1:58")  # only this process's steps set the rate: 2 s x 59 steps left
    assert printed[1].startswith("train 66/100") and printed[2] == "step 70: accuracy=0.5"
    assert printed[3].startswith("train 70/100") and len(printed) == 4


def test_open_progress_chooses(monkeypatch):
    monkeypatch.delenv("LORALIB_PROGRESS", raising=False)
    monkeypatch.delenv("LORALIB_PROGRESS_EVERY", raising=False)
    assert isinstance(open_progress(5, 0, main=True, bar=True, stream=io.StringIO()), ProgressLines)  # not a tty
    assert isinstance(open_progress(5, 0, main=True, bar=False, stream=Terminal()), ProgressLines)
    assert type(open_progress(5, 0, main=False, bar=True, stream=Terminal())) is Silent
    tqdm = pytest.importorskip("tqdm")
    bar = open_progress(5, 0, main=True, bar=True, stream=Terminal())
    assert isinstance(bar, tqdm.tqdm)
    bar.close()
    monkeypatch.setenv("LORALIB_PROGRESS", "off")
    assert type(open_progress(5, 0, main=True, bar=True, stream=Terminal())) is Silent
    monkeypatch.setenv("LORALIB_PROGRESS", "lines")
    assert isinstance(open_progress(5, 0, main=True, bar=True, stream=Terminal()), ProgressLines)
    monkeypatch.setenv("LORALIB_PROGRESS", "loud")
    with pytest.raises(ValueError, match="LORALIB_PROGRESS='loud'"):
        open_progress(5, 0, main=True, bar=True)
    monkeypatch.setenv("LORALIB_PROGRESS", "auto")
    monkeypatch.setenv("LORALIB_PROGRESS_EVERY", "2")
    lines = open_progress(5, 0, main=True, bar=False)
    assert (lines.every_steps, lines.every_seconds) == (2, None)


def test_training_without_bar_still_shows_progress(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("LORALIB_PROGRESS", raising=False)
    monkeypatch.setenv("LORALIB_PROGRESS_EVERY", "3")
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=6, per_device_batch_size=4, lr=1e-2,
                         progress_bar=False, log_every=2, save_strategy="no", device="cpu")
    train(build(), data(), collate, config)
    err = capfd.readouterr().err.splitlines()
    shown = [line for line in err if line.startswith("train ")]
    assert [line.split()[1] for line in shown] == ["1/6", "4/6", "6/6"]
    # from step 2 on the loop's logged fields are there: loss, lr and the throughput (samples: no token mask)
    assert re.search(r"loss \d\.\d{4} lr \S+ samples/s \d+ elapsed \d+:\d\d ETA \d+:\d\d$", shown[1]), shown[1]


def test_resumed_run_with_bar_says_where_it_resumed(tmp_path, capfd, monkeypatch):
    # the loop's first message of a resumed run goes through the progress display, which is made before it
    monkeypatch.setenv("LORALIB_PROGRESS", "lines")
    base = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_batch_size=4, lr=1e-2, progress_bar=True,
                log_every=1, save_every=2, device="cpu")
    train(build(), data(), collate, TrainConfig(**base))
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")  # as if the run had stopped after step 4's checkpoint
    capfd.readouterr()
    train(build(), data(), collate, TrainConfig(resume_from="latest", **base))
    err = capfd.readouterr().err
    assert "resumed from" in err and "at step 4" in err
    assert [line.split()[1] for line in err.splitlines() if line.startswith("train ")] == ["5/6", "6/6"]
