"""The registry: every released adapter and every reported number, read from registry.json and checked.

    from loralib.repro import load_registry
    reg = load_registry()
    reg.adapter("roberta_base_lora_mnli").url
    reg.find(model="roberta-base", method="lora", task="mnli", metric="accuracy")   # -> [Reported(value=87.5, std=0.3, ...)]

Schema of registry.json (schema 1). One JSON object:

    schema     1
    about      free text
    protocols  {key: {paper, source, seeds, aggregation, selection, metric, note (optional)}}: how a table's
               numbers were made from runs. seeds: how many runs per number (null: not stated);
               aggregation: "median" or "mean" over the seeds (null: not stated); selection: "best" (each
               run's best evaluation, the best epoch) or "last" (the run's final model), null: not stated;
               metric: the exact metric in words. `loralib compare` applies it (loralib.repro.compare).
               decoding (optional): {source, <task>: {beam, length_penalty, no_repeat_ngram_size, ...}}: the
               table's generation settings per task (the LoRA paper's Table 11); compare names a run whose
               decoding.json differs.
    papers     {paper_key: {title, authors, venue, url, notes: [str], baseline_from: [paper_key] (optional)}}
               paper keys: lora, adalora, lora2, loraplus, lorapro. baseline_from names papers whose rows
               stand in for this one's (LoRA² per-task numbers are not read yet: its comparisons use AdaLoRA's).
    models     {hub_name: {hub, family}}  the name a paper's command line used (roberta-base,
               microsoft/deberta-v2-xxlarge, ...) -> its current hub id and model family.
    adapters   [ {
        name          file stem, the NAME of `loralib download NAME` (roberta_base_lora_mnli)
        paper         paper key
        url           where the file is released
        base_model    a key of models: the pretrained model the adapter goes on
        task          GLUE task name as loralib.tasks.glue spells it (mnli, sst2, stsb, ...) or e2e/dart/webnlg
        num_labels    classifier outputs (1 for STS-B), null for generation adapters
        r, lora_alpha LoRA rank and alpha of the released run (the files do not record alpha)
        target_modules [str]; enable_lora [bool] for fused projections (GPT-2's c_attn: q, k, v)
        sha256        hex digest, or null where not known here
        keys          {num_tensors, dtype, verified: bool (false: inferred, not read from the file), note,
                       wrappers: [str] (dict keys the tensors may sit under), strip_prefix: str (e.g. "module."),
                       tensors: [{pattern, shape}]}; a pattern expands {a,b} alternatives and {0..11} ranges.
    } ]
    reported   [ {
        paper, source  paper key; where the number was read (paper / table / README, in words)
        model          a key of models, or null where the source names none
        method         full, lora, adapter, prefix, adalora, lora2, loraplus, lorapro, dora, pissa, rslora, lora-ga
        setting        null or a short string that tells rows of one (model, method) apart ("r=8", "budget 1.27M")
        r              (optional) the LoRA rank of the row, used to pick between rows when a run's rank is known
        total_rank     (optional) AdaLoRA's budget as a final total rank over the adapted matrices ("budget 0.32M":
                       144); a run is held against the row only when its recorded final total rank is this
        task           as in adapters; "average" for a table's average column; null for model-level numbers
                       (trainable parameters, headline claims)
        split          dev, test, eval or null
        metric         the key a results file uses (accuracy, f1, matthews_correlation, pearson, spearmanr,
                       average_correlation (their mean, loralib.tasks.glue.metrics.compare_metrics),
                       bleu, bleu_unseen/seen/all, pass@1, first_turn_score, average, trainable_params, ...)
        value, std     the number and its ± (null if none given); value null only when range is given
        range          (optional) [low, high] for numbers reported as a span
        unit           "%" (per cent: a measured fraction is shown x100), "M" (millions of parameters),
                       "score" (MT-Bench 0-10), "fraction" (reported as 0..1), "x" (a multiple)
        marks          [] or some of: unverified, second-hand, computed, metric-assumed, headline, approximate
        note           (optional) free text
        protocol       (optional) a key of protocols; absent or null: the table's protocol is not known
        alternatives   (optional) [{value, std, source}]: the same cell as another source prints it (the
                       microsoft/LoRA README where it differs from the paper)
    } ]

Loading checks every field; a bad one is a RegistryError naming the file, the entry and the field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

REGISTRY_FILE = Path(__file__).with_name("registry.json")

UNITS = ("%", "M", "score", "fraction", "x")
MARKS = ("unverified", "second-hand", "computed", "metric-assumed", "headline", "approximate")
AGGREGATIONS = ("median", "mean")
SELECTIONS = ("best", "last")
METHODS = ("full", "lora", "adapter", "prefix", "adalora", "lora2", "loraplus", "lorapro", "dora", "pissa",
           "rslora", "lora-ga")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(ValueError):
    """registry.json is malformed: the message names the file, the entry and the field."""


class UnknownAdapterError(KeyError):
    """No adapter of that name in the registry."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


# -- records ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """A key pattern and the shape every key it expands to has."""

    pattern: str
    shape: Tuple[int, ...]

    def keys(self) -> List[str]:
        return expand_pattern(self.pattern)


@dataclass(frozen=True)
class Adapter:
    name: str
    paper: str
    url: str
    base_model: str
    task: str
    num_labels: Optional[int]
    r: int
    lora_alpha: float
    target_modules: Tuple[str, ...]
    enable_lora: Optional[Tuple[bool, ...]]
    sha256: Optional[str]
    tensors: Tuple[TensorSpec, ...]
    num_tensors: int
    dtype: str
    keys_verified: bool
    keys_note: str
    wrappers: Tuple[str, ...]
    strip_prefix: Optional[str]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every expected key -> its shape (num_tensors entries)."""
        return {key: spec.shape for spec in self.tensors for key in spec.keys()}


@dataclass(frozen=True)
class Protocol:
    """How a table's numbers were made: `seeds` runs per number (None: not stated), aggregated by
    `aggregation` ("median" / "mean", None: not stated), each run's value taken at `selection` ("best":
    its best evaluation, the paper's best epoch; "last": the final model; None: not stated)."""

    key: str
    paper: str
    source: str
    seeds: Optional[int]
    aggregation: Optional[str]
    selection: Optional[str]
    metric: str
    note: Optional[str] = None
    decoding_source: Optional[str] = None
    # ((task, ((setting, value), ...)), ...): the table's decoding per task (a tuple: the record stays hashable)
    decoding_by_task: Tuple[Tuple[str, Tuple[Tuple[str, float], ...]], ...] = ()

    def decoding(self, task: str) -> Dict[str, float]:
        """The table's decoding settings for `task` ({} where the registry holds none)."""
        return dict(dict(self.decoding_by_task).get(task, ()))

    def text(self) -> str:
        """'median of 5 seeds, best epoch' (what is not stated says so)."""
        how = f"{self.aggregation} of {self.seeds} seeds" if self.aggregation and self.seeds else (
            f"{self.aggregation or 'aggregation not stated'}, {self.seeds or 'number of'} seeds"
            + ("" if self.seeds else " not stated"))
        pick = {"best": "best epoch", "last": "final model", None: "selection not stated"}[self.selection]
        return f"{how}, {pick}"


@dataclass(frozen=True)
class Alternative:
    """The same cell as another source prints it."""

    value: float
    std: Optional[float]
    source: str


@dataclass(frozen=True)
class Reported:
    paper: str
    source: str
    model: Optional[str]
    method: str
    setting: Optional[str]
    task: Optional[str]
    split: Optional[str]
    metric: str
    value: Optional[float]
    std: Optional[float]
    unit: str
    marks: Tuple[str, ...]
    range: Optional[Tuple[float, float]] = None
    r: Optional[int] = None
    note: Optional[str] = None
    protocol: Optional[Protocol] = None
    total_rank: Optional[int] = None
    alternatives: Tuple[Alternative, ...] = ()

    @property
    def center(self) -> float:
        """The value, or the middle of the range where only a range was reported."""
        return self.value if self.value is not None else (self.range[0] + self.range[1]) / 2

    def text(self, digits: int = 2) -> str:
        """'87.50 ± 0.30', '54.20–56.50', with the marks in brackets: '84.50 [unverified]'."""
        if self.value is None:
            s = f"{self.range[0]:.{digits}f}–{self.range[1]:.{digits}f}"
        else:
            s = f"{self.value:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")
        return s + (f" [{', '.join(self.marks)}]" if self.marks else "")


@dataclass(frozen=True)
class Registry:
    source: str
    papers: Mapping[str, dict]
    models: Mapping[str, dict]
    adapters: Mapping[str, Adapter]
    reported: Tuple[Reported, ...]
    protocols: Mapping[str, Protocol] = field(default_factory=dict)

    def adapter(self, name: str) -> Adapter:
        """By file stem; "roberta-base-lora-mnli" and "roberta_base_lora_mnli.bin" are accepted too."""
        key = Path(name.strip()).name
        for ext in (".bin", ".pt", ".part"):
            key = key[: -len(ext)] if key.endswith(ext) else key
        key = key.replace("-", "_").lower()
        if key in self.adapters:
            return self.adapters[key]
        import difflib
        close = difflib.get_close_matches(key, list(self.adapters), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownAdapterError(f"no released adapter named {name!r} in {self.source}{hint} "
                                  "(`loralib download --list` shows them all)")

    def papers_for(self, paper: str) -> Tuple[str, ...]:
        """The paper and those whose rows stand in for it (baseline_from)."""
        if paper not in self.papers:
            raise KeyError(f"unknown paper {paper!r}: expected one of {', '.join(self.papers)}")
        return (paper, *self.papers[paper].get("baseline_from", ()))

    def find(self, model: Optional[str] = None, method: Optional[str] = None, task: Optional[str] = None,
             metric: Optional[str] = None, paper: Optional[str] = None) -> List[Reported]:
        """The reported rows that agree on every field given (None: any). paper includes its baseline_from."""
        papers = self.papers_for(paper) if paper is not None else None
        return [row for row in self.reported
                if (model is None or row.model == model) and (method is None or row.method == method)
                and (task is None or row.task == task) and (metric is None or row.metric == metric)
                and (papers is None or row.paper in papers)]

    def model_key(self, name_or_path: Optional[str]) -> Optional[str]:
        """The registry model a run's --model_name_or_path refers to: the hub name itself, its current hub
        id, or a folder whose name is the model's (models/roberta-base, /data/deberta-v2-xxlarge); else None."""
        if not name_or_path:
            return None
        text = str(name_or_path).strip().rstrip("/").lower()
        base = text.rsplit("/", 1)[-1]
        for key, info in self.models.items():
            names = {key.lower(), str(info.get("hub", key)).lower()}
            if text in names or any(text.endswith("/" + n) for n in names):
                return key
        for key, info in self.models.items():
            if base in {n.rsplit("/", 1)[-1] for n in (key.lower(), str(info.get("hub", key)).lower())}:
                return key
        return None


# -- key patterns -----------------------------------------------------------------------------------

_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_pattern(pattern: str) -> List[str]:
    """'h.{0..1}.{q,v}' -> ['h.0.q', 'h.0.v', 'h.1.q', 'h.1.v'] (ranges inclusive, like bash)."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = [str(i) for i in range(int(span[1]), int(span[2]) + 1)] if span else body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [key for option in options for key in expand_pattern(head + option + tail)]


def check_state_dict(adapter: Adapter, state: Mapping[str, Any]) -> List[str]:
    """What in `state` (key -> tensor, wrappers and prefixes already removed) differs from the registry's
    expectation for `adapter`; [] when every key and shape is as expected."""
    want = adapter.expected_shapes()
    problems = []
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing:
        problems.append(f"{len(missing)} expected keys missing, e.g. {missing[:2]}")
    if extra:
        problems.append(f"{len(extra)} keys not in the registry, e.g. {extra[:2]}")
    for key, shape in want.items():
        if key in state and tuple(state[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, registry says {shape}")
    return problems


# -- loading and validation -------------------------------------------------------------------------

def load_registry(path: Union[str, Path, None] = None) -> Registry:
    """Read and check registry.json (the packaged one by default; that one is read once and cached)."""
    if path is None:
        return _load_default()
    return _load(Path(path))


@lru_cache(maxsize=1)
def _load_default() -> Registry:
    return _load(REGISTRY_FILE)


def _load(path: Path) -> Registry:
    if not path.is_file():
        raise FileNotFoundError(f"registry file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return parse_registry(data, str(path))


def parse_registry(data: Any, source: str = "registry") -> Registry:
    """Build a Registry from the decoded JSON, checking every field (RegistryError on the first bad one)."""
    top = _Entry(data, source, "top level")
    if top.get("schema", int) != 1:
        top.fail("schema", f"must be 1, got {data.get('schema')!r}")
    papers = top.get("papers", dict)
    models = top.get("models", dict)
    for key, info in papers.items():
        entry = _Entry(info, source, f"papers[{key!r}]")
        for other in entry.get("baseline_from", list, optional=True) or []:
            if other not in papers:
                entry.fail("baseline_from", f"names unknown paper {other!r}")
    for key, info in models.items():
        _Entry(info, source, f"models[{key!r}]").get("hub", str)
    protocols = {key: _parse_protocol(key, _Entry(info, source, f"protocols[{key!r}]"), papers)
                 for key, info in (top.get("protocols", dict, optional=True) or {}).items()}

    adapters: Dict[str, Adapter] = {}
    for i, raw in enumerate(top.get("adapters", list)):
        name = raw.get("name") if isinstance(raw, dict) else None
        adapter = _parse_adapter(_Entry(raw, source, f"adapters[{i}] ({name})"), papers, models)
        if adapter.name in adapters:
            raise RegistryError(f"{source}: adapters[{i}]: field 'name': {adapter.name!r} appears twice")
        adapters[adapter.name] = adapter
    reported = []
    for i, raw in enumerate(top.get("reported", list)):
        label = " ".join(str(raw.get(k)) for k in ("paper", "model", "method", "task", "metric")) \
            if isinstance(raw, dict) else "?"
        reported.append(_parse_reported(_Entry(raw, source, f"reported[{i}] ({label})"), papers, models,
                                        protocols))
    return Registry(source, papers, models, adapters, tuple(reported), protocols)


class _Entry:
    """One JSON object of the registry, read field by field with errors that say where."""

    def __init__(self, raw: Any, source: str, where: str):
        if not isinstance(raw, dict):
            raise RegistryError(f"{source}: {where}: must be a JSON object, got {type(raw).__name__}")
        self.raw, self.source, self.where = raw, source, where

    def fail(self, name: str, problem: str):
        raise RegistryError(f"{self.source}: {self.where}: field {name!r} {problem}")

    def get(self, name: str, kind, optional: bool = False, nullable: bool = False):
        if name not in self.raw:
            if optional:
                return None
            self.fail(name, "is missing")
        value = self.raw[name]
        if value is None:
            if nullable or optional:
                return None
            self.fail(name, "must not be null")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a flag is never a number here and a number never a flag
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(name, f"must be {names}, got {value!r}")
        return value

    def number(self, name: str, optional: bool = False, nullable: bool = False, positive: bool = False):
        value = self.get(name, (int, float), optional=optional, nullable=nullable)
        if value is not None and positive and value <= 0:
            self.fail(name, f"must be > 0, got {value!r}")
        return value

    def choice(self, name: str, allowed: Sequence[str], nullable: bool = False):
        value = self.get(name, str, nullable=nullable)
        if value is not None and value not in allowed:
            self.fail(name, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def shape(self, name: str) -> Tuple[int, ...]:
        value = self.get(name, list)
        if not value or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
            self.fail(name, f"must be a list of positive integers, got {value!r}")
        return tuple(value)


def _parse_adapter(e: _Entry, papers: Mapping, models: Mapping) -> Adapter:
    name = e.get("name", str)
    if not re.fullmatch(r"[a-z0-9_]+", name):
        e.fail("name", f"must be a file stem of [a-z0-9_], got {name!r}")
    url = e.get("url", str)
    if not url.startswith("https://"):
        e.fail("url", f"must be an https URL, got {url!r}")
    if Path(url.rsplit("/", 1)[-1]).stem != name:
        e.fail("url", f"must end in the file named by 'name' ({name}.*), got {url!r}")
    sha = e.get("sha256", str, nullable=True)
    if sha is not None and not _HEX64.match(sha):
        e.fail("sha256", f"must be 64 lowercase hex digits or null, got {sha!r}")
    enable = e.get("enable_lora", list, optional=True)
    if enable is not None and not all(isinstance(b, bool) for b in enable):
        e.fail("enable_lora", f"must be a list of true/false, got {enable!r}")
    targets = e.get("target_modules", list)
    if not targets or not all(isinstance(t, str) for t in targets):
        e.fail("target_modules", f"must be a non-empty list of names, got {targets!r}")

    keys = _Entry(e.get("keys", dict), e.source, e.where + " keys")
    tensors = []
    for j, raw in enumerate(keys.get("tensors", list)):
        t = _Entry(raw, e.source, f"{e.where} keys.tensors[{j}]")
        tensors.append(TensorSpec(t.get("pattern", str), t.shape("shape")))
    num_tensors = keys.get("num_tensors", int)
    expanded = sum(len(spec.keys()) for spec in tensors)
    if expanded != num_tensors:
        keys.fail("num_tensors", f"is {num_tensors} but the tensor patterns expand to {expanded} keys")
    num_labels = e.get("num_labels", int, nullable=True)
    if num_labels is not None and num_labels < 1:
        e.fail("num_labels", f"must be >= 1 or null, got {num_labels!r}")
    r = e.get("r", int)
    if r < 1:
        e.fail("r", f"must be >= 1, got {r!r}")
    base = e.get("base_model", str)
    if base not in models:
        e.fail("base_model", f"{base!r} is not a key of 'models'")
    return Adapter(
        name=name, paper=e.choice("paper", tuple(papers)), url=url, base_model=base, task=e.get("task", str),
        num_labels=num_labels, r=r, lora_alpha=e.number("lora_alpha", positive=True),
        target_modules=tuple(targets), enable_lora=tuple(enable) if enable is not None else None, sha256=sha,
        tensors=tuple(tensors), num_tensors=num_tensors, dtype=keys.get("dtype", str),
        keys_verified=keys.get("verified", bool), keys_note=keys.get("note", str, optional=True) or "",
        wrappers=tuple(keys.get("wrappers", list, optional=True) or ()),
        strip_prefix=keys.get("strip_prefix", str, optional=True))


def _parse_protocol(key: str, e: _Entry, papers: Mapping) -> Protocol:
    seeds = e.get("seeds", int, nullable=True)
    if seeds is not None and seeds < 1:
        e.fail("seeds", f"must be >= 1 or null, got {seeds!r}")
    decoding = e.get("decoding", dict, optional=True)
    source, by_task = _parse_decoding(_Entry(decoding, e.source, e.where + " decoding")) if decoding else (None, ())
    return Protocol(key=key, paper=e.choice("paper", tuple(papers)), source=e.get("source", str), seeds=seeds,
                    aggregation=e.choice("aggregation", AGGREGATIONS, nullable=True),
                    selection=e.choice("selection", SELECTIONS, nullable=True), metric=e.get("metric", str),
                    note=e.get("note", str, optional=True), decoding_source=source, decoding_by_task=by_task)


def _parse_decoding(e: _Entry) -> Tuple[str, Tuple[Tuple[str, Tuple[Tuple[str, float], ...]], ...]]:
    """A protocol's "decoding": its source and, per task, {setting: number} (every value a number)."""
    source = e.get("source", str)
    by_task = []
    for task in (key for key in e.raw if key != "source"):
        settings = _Entry(e.get(task, dict), e.source, f"{e.where}[{task!r}]")
        by_task.append((task, tuple((name, settings.number(name)) for name in settings.raw)))
    return source, tuple(by_task)


def _parse_alternatives(e: _Entry) -> Tuple[Alternative, ...]:
    out = []
    for j, raw in enumerate(e.get("alternatives", list, optional=True) or []):
        a = _Entry(raw, e.source, f"{e.where} alternatives[{j}]")
        value, std = a.number("value"), a.number("std", nullable=True)
        out.append(Alternative(float(value), float(std) if std is not None else None, a.get("source", str)))
    return tuple(out)


def _parse_reported(e: _Entry, papers: Mapping, models: Mapping, protocols: Optional[Mapping] = None) -> Reported:
    model = e.get("model", str, nullable=True)
    if model is not None and model not in models:
        e.fail("model", f"{model!r} is not a key of 'models'")
    value = e.number("value", nullable=True)
    span = e.get("range", list, optional=True)
    if span is not None:
        if len(span) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in span) \
                or span[0] > span[1]:
            e.fail("range", f"must be [low, high] numbers, got {span!r}")
        span = (float(span[0]), float(span[1]))
    if value is None and span is None:
        e.fail("value", "is null and no 'range' is given: a row holds a number")
    std = e.number("std", nullable=True)
    if std is not None and std < 0:
        e.fail("std", f"must be >= 0, got {std!r}")
    marks = e.get("marks", list)
    for mark in marks:
        if mark not in MARKS:
            e.fail("marks", f"holds unknown mark {mark!r}: expected some of {', '.join(MARKS)}")
    r = e.get("r", int, optional=True)
    total_rank = e.get("total_rank", int, optional=True)
    if total_rank is not None and total_rank < 1:
        e.fail("total_rank", f"must be >= 1, got {total_rank!r}")
    protocol = e.get("protocol", str, optional=True)
    protocols = protocols or {}
    if protocol is not None and protocol not in protocols:
        e.fail("protocol", f"{protocol!r} is not a key of 'protocols'")
    return Reported(
        paper=e.choice("paper", tuple(papers)), source=e.get("source", str), model=model,
        method=e.choice("method", METHODS), setting=e.get("setting", str, nullable=True),
        task=e.get("task", str, nullable=True), split=e.get("split", str, nullable=True),
        metric=e.get("metric", str), value=float(value) if value is not None else None,
        std=float(std) if std is not None else None, unit=e.choice("unit", UNITS), marks=tuple(marks),
        range=span, r=r, note=e.get("note", str, optional=True),
        protocol=protocols[protocol] if protocol is not None else None, alternatives=_parse_alternatives(e),
        total_rank=total_rank)
