"""What a training run shows while it runs: a bar on a terminal, a plain periodic line elsewhere.

    progress = open_progress(total=150, initial=0, main=True, bar=True)
    for step in ...:
        progress.update(1)                                    # one optimizer step done
        progress.set_postfix(loss="0.6931", lr="1.00e-03", **{"tok/s": "812"})   # at each logging step
    progress.write("step 150: accuracy=0.83")                 # a message that does not break the bar
    progress.close()

Which one (the loop's TrainConfig.progress_bar, i.e. the scripts' `--disable_tqdm`, and LORALIB_PROGRESS):

    rank 0, progress_bar=True, stderr a terminal, tqdm installed   tqdm's bar (steps, loss, lr, tok/s, ETA)
    rank 0, otherwise                                              plain lines on stderr (same fields)
    other ranks, or LORALIB_PROGRESS=off                           nothing

`--disable_tqdm` (progress_bar=False) therefore turns the bar off, never the progress: a run whose output is
a pipe, a log file or CI still says where it stands. LORALIB_PROGRESS=lines forces the plain lines, =bar the bar
(even off a terminal). A plain line is written after the first step, then whenever LORALIB_PROGRESS_EVERY has
passed since the last one ("30s", the default, or "50" for every 50 steps), and after the last step:

    train 37/150 (24.7%) loss 1.2345 lr 9.21e-04 tok/s 812 elapsed 0:41 ETA 2:06
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Dict, Optional, Tuple

logger = logging.getLogger(__name__)

MODES = ("auto", "bar", "lines", "off")
DEFAULT_EVERY = "30s"


def parse_every(text: str) -> Tuple[Optional[int], Optional[float]]:
    """"30s" -> (None, 30.0) seconds; "50" -> (50, None) steps. Anything else is an error naming the variable."""
    value = text.strip().lower()
    try:
        if value.endswith("s"):
            seconds = float(value[:-1])
            if seconds > 0:
                return None, seconds
        elif int(value) > 0:
            return int(value), None
    except ValueError:
        pass
    raise ValueError(f"LORALIB_PROGRESS_EVERY={text!r}: expected seconds like '30s' or a step count like '50'")


def format_duration(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Silent:
    """No progress at all (ranks other than 0); write() still prints, as the loop's messages must."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **fields) -> None:
        pass

    def write(self, message: str) -> None:
        print(message, flush=True)

    def close(self) -> None:
        pass


class ProgressLines(Silent):
    """The plain periodic line: step / total, the latest logged fields (loss, lr, throughput), elapsed, ETA.

    ETA = (total - step) x (seconds per step of this process so far); a resumed run counts only its own steps."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", every_steps: Optional[int] = None,
                 every_seconds: Optional[float] = 30.0, stream: Optional[IO[str]] = None, clock=time.monotonic):
        self.total, self.initial, self.step, self.desc = total, initial, initial, desc
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.stream, self.clock = stream, clock
        self.fields: Dict[str, str] = {}
        self.started = self.last_time = clock()
        self.last_step: Optional[int] = None

    def set_postfix(self, **fields) -> None:
        self.fields.update({k: str(v) for k, v in fields.items()})

    def update(self, n: int = 1) -> None:
        self.step += n
        now = self.clock()
        due = (self.last_step is None or self.step >= self.total
               or (self.every_steps is not None and self.step - self.last_step >= self.every_steps)
               or (self.every_seconds is not None and now - self.last_time >= self.every_seconds))
        if due:
            self._emit(now)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        done = self.step - self.initial
        parts = [f"{self.desc} {self.step}/{self.total} ({100.0 * self.step / max(1, self.total):.1f}%)"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {format_duration(elapsed)}")
        if done > 0 and self.step < self.total:
            parts.append(f"ETA {format_duration(elapsed / done * (self.total - self.step))}")
        return " ".join(parts)

    def write(self, message: str) -> None:
        print(message, file=self.stream or sys.stderr, flush=True)

    def _emit(self, now: float) -> None:
        print(self.line(now), file=self.stream or sys.stderr, flush=True)
        self.last_step, self.last_time = self.step, now

    def close(self) -> None:
        # a run stopped early (an exception, a callback) still says where it ended
        if self.last_step != self.step and self.step > self.initial:
            self._emit(self.clock())
        self.last_step = self.step


def progress_settings():
    """(mode, (every_steps, every_seconds)) from LORALIB_PROGRESS / LORALIB_PROGRESS_EVERY, or one ValueError
    naming the variable (a run checks them before it writes anything: loralib.train.run.start)."""
    mode = os.environ.get("LORALIB_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"LORALIB_PROGRESS={mode!r}: expected one of {', '.join(MODES)}")
    return mode, parse_every(os.environ.get("LORALIB_PROGRESS_EVERY", DEFAULT_EVERY))


def open_progress(total: int, initial: int, main: bool, bar: bool, desc: str = "train",
                  stream: Optional[IO[str]] = None):
    """The progress display of one run (see the module docstring); all expose update / set_postfix / write / close."""
    mode, (every_steps, every_seconds) = progress_settings()
    if not main or mode == "off":
        return Silent()
    out = stream or sys.stderr
    wants_bar = mode == "bar" or (mode == "auto" and bar and out.isatty())
    if wants_bar:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=out)
        except ImportError:
            logger.warning("tqdm is not installed (pip install tqdm): plain progress lines instead of a bar")
    return ProgressLines(total, initial, desc, every_steps, every_seconds, stream)
