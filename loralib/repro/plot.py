"""`loralib plot RUN_DIR... [--out curves.png]`: training loss and evaluation metric against step, every run in one
figure, from the runs' metrics.jsonl (what loralib.train writes: GLUE, NLG and instruction runs alike).

A RUN_DIR is a run folder (it holds metrics.jsonl) or a folder of runs (every metrics.jsonl under it). The
records of metrics.jsonl are

    {"step": 40, "epoch": 1.0, "loss": 0.69, "lr": 1e-3, "tok_per_s": 812.0, ...}   a training log line
    {"step": 40, "epoch": 1.0, "eval_accuracy": 0.81, ...}                          an in-loop evaluation

(other records, AdaLoRA's ranks for one, are left alone). A resumed run may have logged a step twice: the later
record of a step replaces the earlier one. A run evaluated only after training (no eval_* record, as in
`make demo`) shows its eval_results.json as one point at its last step. The evaluation metric is the first of
accuracy, matthews_correlation, pearson, spearmanr, f1, loss a run has (else its first eval_* key).

One colour per method (run_config.json's "method"; LoRA+ is told from LoRA by its loraplus_lr_ratio); runs
of the same task, method and learning rate are taken as seeds of one another: their mean is drawn with a band
from their minimum to their maximum. A file that cannot be read is named in a warning and left out; a torn
last line (a run killed mid-write) is skipped with a warning and the rest of the file kept.
Default --out: RUN_DIR/curves.png for one folder of runs (next to compare.png), else the runs' common folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .compare import FRACTION_METRICS, method_of, save_figure

PREFERRED = ("accuracy", "matthews_correlation", "pearson", "spearmanr", "f1", "loss")
METHOD_ORDER = ("full", "lora", "loraplus", "adalora", "lora2", "lorapro")


@dataclass
class Curves:
    """One run's curves: {step: value}, its eval metric's name, and what groups it with other runs."""

    folder: Path
    method: str
    task: Optional[str] = None
    lr: Optional[float] = None
    seed: Optional[int] = None
    loss: Dict[int, float] = field(default_factory=dict)
    metric: Optional[str] = None
    evals: Dict[int, float] = field(default_factory=dict)


def read_records(path: Path, warnings: List[str]) -> Optional[List[dict]]:
    """The JSON objects of a metrics.jsonl, or None (with a warning) when the file cannot be read.
    A last line that does not parse is a torn write: skipped with a warning."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        warnings.append(f"{path}: could not be read ({e}); left out")
        return None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as e:
            if k == len(numbered) - 1:
                warnings.append(f"{path}: line {number} is torn (a run stopped mid-write?); skipped it")
                break
            warnings.append(f"{path}: line {number} is not a JSON object ({e}); left the file out")
            return None
        records.append(record)
    return records


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def pick_metric(names: Sequence[str]) -> Optional[str]:
    """The evaluation metric drawn, from metric names without their eval_ prefix."""
    for name in PREFERRED:
        if name in names:
            return name
    return names[0] if names else None


def read_curves(folder: Path, warnings: List[str]) -> Optional[Curves]:
    """One run folder's curves (None when its metrics.jsonl cannot be read)."""
    records = read_records(folder / "metrics.jsonl", warnings)
    if records is None:
        return None
    config = _read_json(folder / "run_config.json", warnings) or {}
    args = config.get("args") if isinstance(config.get("args"), dict) else {}
    lr = args.get("learning_rate", args.get("lr"))
    seed = args.get("seed", args.get("random_seed"))
    run = Curves(folder, method_of(config) or folder.name, config.get("task") or args.get("task_name"),
                 lr if _number(lr) is not None else None, seed if isinstance(seed, int) else None)
    evals: Dict[str, Dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if _number(record.get("loss")) is not None:
            run.loss[step] = float(record["loss"])      # a later record of a step replaces an earlier one
        for key, value in record.items():
            if key.startswith("eval_") and _number(value) is not None:
                evals.setdefault(key[len("eval_"):], {})[step] = float(value)
    if not evals:  # evaluated after training only: eval_results.json at the last step
        results = _read_json(folder / "eval_results.json", warnings) or {}
        last = max(run.loss, default=None)
        done = _read_json(folder / "train_results.json", warnings) or {}
        last = done.get("global_step", last) if isinstance(done.get("global_step"), int) else last
        if last is not None:
            evals = {k: {last: float(v)} for k, v in results.items() if _number(v) is not None
                     and k not in ("num_examples", "epoch", "step", "global_step")}
    run.metric = pick_metric(list(evals))
    run.evals = evals.get(run.metric, {}) if run.metric else {}
    return run


def _read_json(path: Path, warnings: List[str]) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: could not be read ({e}); ignored")
        return None
    return data if isinstance(data, dict) else None


def find_runs(dirs: Sequence[os.PathLike | str]) -> List[Path]:
    """The run folders (holding metrics.jsonl) given or under the given folders, in order, without repeats."""
    found: List[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder")
        runs = [d] if (d / "metrics.jsonl").is_file() else sorted(p.parent for p in d.rglob("metrics.jsonl"))
        if not runs:
            raise FileNotFoundError(f"{d}: no metrics.jsonl in it or under it (loralib.train writes one into "
                                    "each run's output folder)")
        found += [r for r in runs if r not in found]
    return found


def default_out(dirs: Sequence[os.PathLike | str]) -> Path:
    paths = [Path(d).resolve() for d in dirs]
    return Path(os.path.commonpath(paths)) / "curves.png"


def _groups(runs: Sequence[Curves]) -> List[Tuple[str, str, List[Curves]]]:
    """(label, method, runs) per task / method / lr, methods in the demo's order."""
    groups: Dict[tuple, List[Curves]] = {}
    for run in runs:
        groups.setdefault((run.task, run.method, run.lr), []).append(run)
    tasks = {run.task for run in runs}
    lrs: Dict[str, set] = {}
    for run in runs:
        lrs.setdefault(run.method, set()).add(run.lr)

    def label(task, method, lr, members):
        text = method + (f" {task}" if len(tasks) > 1 and task else "") + (
            f" lr {lr:g}" if len(lrs[method]) > 1 and lr is not None else "")
        return text + (f" ({len(members)} seeds)" if len(members) > 1 else "")

    def order(item):
        (task, method, lr), _ = item
        return str(task), METHOD_ORDER.index(method) if method in METHOD_ORDER else 99, method, lr or 0.0

    return [(label(*key, members), key[1], members) for key, members in sorted(groups.items(), key=order)]


def _draw(ax, series: List[Dict[int, float]], colour, style: str, label: str) -> None:
    """One group on one axis: its run's curve, or the mean of its seeds over their common steps with a band."""
    series = [s for s in series if s]
    if not series:
        return
    marker = "o" if max(len(s) for s in series) == 1 else None
    if len(series) == 1:
        steps = sorted(series[0])
        ax.plot(steps, [series[0][s] for s in steps], color=colour, linestyle=style, marker=marker, label=label)
        return
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:  # the seeds logged different steps: each drawn thin
        for i, s in enumerate(series):
            keys = sorted(s)
            ax.plot(keys, [s[k] for k in keys], color=colour, linestyle=style, marker=marker, linewidth=0.8,
                    label=label if i == 0 else None)
        return
    values = [[s[k] for s in series] for k in steps]
    ax.plot(steps, [sum(v) / len(v) for v in values], color=colour, linestyle=style, marker=marker, label=label)
    ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2,
                    linewidth=0)


def write_curves(runs: Sequence[Curves], out: os.PathLike | str, title: str = "Training curves") -> Path:
    """The figure: training loss (left) and evaluation metric (right) against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = _groups(runs)
    methods = list(dict.fromkeys(method for _, method, _ in groups))
    palette = plt.get_cmap("tab10")
    colours = {m: palette(i % 10) for i, m in enumerate(methods)}
    tasks = list(dict.fromkeys(run.task for run in runs))
    styles = {t: ("-", "--", ":", "-.")[i % 4] for i, t in enumerate(tasks)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)  # a final-only eval sits at its step
    for label, method, members in groups:
        style = styles[members[0].task]
        _draw(left, [run.loss for run in members], colours[method], style, label)
        _draw(right, [run.evals for run in members], colours[method], style, label)
    metrics = sorted({run.metric for run in runs if run.metric})
    left.set_title("training loss")
    right.set_title("evaluation: " + (", ".join(metrics) if metrics else "none logged"))
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.set_ylabel("loss (mean over each logging interval)")
    right.set_ylabel(" / ".join(f"{m} (fraction)" if m in FRACTION_METRICS else m for m in metrics) or "—")
    if groups:
        left.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, out, dpi=100)


def plot_runs(dirs: Sequence[os.PathLike | str], out: Optional[os.PathLike | str] = None) -> Tuple[Path, List[str]]:
    """Read the runs under dirs and draw them; returns (the PNG, the warnings). Raises FileNotFoundError when no
    folder holds a run, ValueError when no run could be read."""
    warnings: List[str] = []
    folders = find_runs(dirs)
    runs = [run for run in (read_curves(f, warnings) for f in folders) if run is not None]
    if not runs:
        raise ValueError("no run could be read:\n  " + "\n  ".join(warnings))
    return write_curves(runs, Path(out) if out else default_out(dirs)), warnings


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="loralib plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders of runs")
    parser.add_argument("--out", default=None, help="PNG (default: curves.png in the runs' common folder)")
    args = parser.parse_args(argv)
    try:
        out, warnings = plot_runs(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError:
        print("error: the figure needs matplotlib (pip install matplotlib==3.11.2; it is in the nlu and dev "
              "extras)", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
