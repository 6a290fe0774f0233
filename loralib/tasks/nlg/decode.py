"""gpt2_decode: beam-search ids -> text, grouped with their references, in the files each metric reads.

Inputs
    predictions  JSONL from gpt2_beam.py, one line per line of the encoded --data file:
                 {"id": <line index>, "predict": [ids of the generated continuation only]}
    input file   the formatted JSONL the encoded file was made from (same lines, same order)
Grouping (as the LoRA repo's gpt2_decode.py): lines with the same context are one input whose
references are their completions, in order of first appearance; with --ref_unique_file (one integer a
line, one line per input line) that integer is the key instead. A group's hypothesis is the decoded
prediction of one of its lines: when several of its lines have one (and they differ), the one that comes
LAST in the sample file, as the original's dict assignment keeps it; a beam file that holds one line per
group is enough. Text is cut at the first "<|endoftext|>" and then at the first blank line ("\\n\\n"), both
for predictions and references.
Outputs
    e2e            --output_ref_file: each group's references one a line, a blank line after each group
                   (the E2E measure_scores.py layout); --output_pred_file: one hypothesis a line
    webnlg, dart   --output_ref_file is a folder of reference0 .. reference{ref_num-1}: line i of file k
                   is group i's k-th reference, or its first one when it has fewer (GenerationEval's -nr)
--lower lower-cases, --tokenize splits every non-word character off (both on references and hypotheses).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ...files import write_text_atomic
from .bpe import EOS_TOKEN, GPT2BPE, check_ids, load_bpe
from .data import SEEN_CATEGORIES, DataFormatError, read_formatted, read_jsonl_objects
from .lines import EXTRA_LINE_BREAKS, read_utf8, universal_lines

FILTERS = ("all", "seen", "unseen")


@dataclass
class Group:
    """One input: its references and, once decoded, its hypothesis."""
    key: object
    references: List[str] = field(default_factory=list)
    category: Optional[str] = None     # WebNLG: the DBpedia category, or "seen"/"unseen" from a "cate" flag
    hypothesis: Optional[str] = None
    first_line: int = 0                # 0-based line of the input file where the group starts


def cut_at_stop(text: str) -> str:
    """The text before the first <|endoftext|>, then before the first blank line, stripped."""
    return text.split(EOS_TOKEN)[0].split("\n\n")[0].strip()


def standard_tokenize(text: str) -> str:
    """Every non-word character becomes its own token; whitespace collapses to single spaces."""
    return " ".join(" ".join(re.split(r"(\W)", text)).split())


def post_process(text: str, tokenize: bool = False, lower: bool = False) -> str:
    if lower:
        text = text.lower()
    return standard_tokenize(text) if tokenize else text


def is_seen(record: dict, where: str) -> bool:
    """WebNLG seen/unseen from "category" (ours) or the boolean "cate" (the LoRA repo's formatted files)."""
    if isinstance(record.get("category"), str):
        return record["category"] in SEEN_CATEGORIES
    if isinstance(record.get("cate"), bool):
        return record["cate"]
    raise DataFormatError(f"{where}: --filter seen/unseen needs a \"category\" (or \"cate\") on every line")


def read_ref_unique(path, num_lines: int) -> List[int]:
    keys = []
    for lineno, line in enumerate(universal_lines(read_utf8(path, "--ref_unique_file")), 1):
        try:
            keys.append(int(line.strip()))
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: expected an integer, got {line.strip()!r}") from None
    if len(keys) != num_lines:
        raise DataFormatError(f"{path}: {len(keys)} lines, the input file has {num_lines}")
    return keys


def group_references(records: Sequence[dict], filter: str = "all", ref_unique: Optional[Sequence[int]] = None,
                     source: str = "input") -> Dict[object, Group]:
    """Input records -> {key: Group} in order of first appearance, keeping only `filter`'s categories."""
    if filter not in FILTERS:
        raise ValueError(f"--filter {filter!r}: expected one of {', '.join(FILTERS)}")
    groups: Dict[object, Group] = {}
    for i, r in enumerate(records):
        if filter != "all" and is_seen(r, f"{source}:{i + 1}") != (filter == "seen"):
            continue
        key = r["context"] if ref_unique is None else ref_unique[i]
        if key not in groups:
            category = r.get("category")
            if category is None and isinstance(r.get("cate"), bool):
                category = "seen" if r["cate"] else "unseen"
            groups[key] = Group(key, category=category, first_line=i)
        groups[key].references.append(cut_at_stop(r["completion"]))
    return groups


Predictions = Union[Mapping[int, List[int]], Sequence[Tuple[int, List[int]]]]


def read_predictions(path, vocab_size: int, num_lines: int) -> List[Tuple[int, List[int]]]:
    """Beam output -> [(input line index, ids)] in the file's order (the order decides which prediction a
    group keeps: the last)."""
    predictions = []
    for where, obj in read_jsonl_objects(path, "--sample_file"):
        idx, ids = obj.get("id"), obj.get("predict")
        if isinstance(idx, bool) or not isinstance(idx, int) or not isinstance(ids, list):
            raise DataFormatError(f"{where}: expected {{\"id\": int, \"predict\": [ids]}}")
        if not 0 <= idx < num_lines:
            raise DataFormatError(f"{where}: id {idx} is not a line of the input file (0..{num_lines - 1}); "
                                  f"--sample_file and --input_file do not belong together")
        check_ids(ids, vocab_size, where)
        predictions.append((idx, ids))
    return predictions


def attach_hypotheses(groups: Dict[object, Group], records: Sequence[dict], predictions: Predictions,
                      bpe: GPT2BPE, ref_unique: Optional[Sequence[int]] = None, source: str = "sample") -> List[Group]:
    """Decode each prediction into its line's group, in the predictions' order (a mapping: its items), so
    the last one of a group wins as in the original; every kept group needs one."""
    pairs = predictions.items() if isinstance(predictions, Mapping) else predictions
    for idx, ids in pairs:
        key = records[idx]["context"] if ref_unique is None else ref_unique[idx]
        if key in groups:
            groups[key].hypothesis = cut_at_stop(bpe.decode(ids))
    missing = [g for g in groups.values() if g.hypothesis is None]
    if missing:
        raise DataFormatError(f"{source}: no prediction for {len(missing)} of {len(groups)} inputs, the first "
                              f"at input line {missing[0].first_line + 1} ({str(missing[0].key)[:60]!r})")
    return list(groups.values())


def decode_beam(records: Sequence[dict], predictions: Predictions, bpe: GPT2BPE, filter: str = "all",
           ref_unique: Optional[Sequence[int]] = None, source: str = "sample") -> List[Group]:
    """Grouped references with their decoded hypotheses, in order of first appearance."""
    groups = group_references(records, filter, ref_unique, source="input")
    return attach_hypotheses(groups, records, predictions, bpe, ref_unique, source)


def padded_references(references: Sequence[str], ref_num: int) -> List[str]:
    """Exactly `ref_num` references: the first `ref_num`, then the first one repeated (GenerationEval's -nr)."""
    return [references[k] if k < len(references) else references[0] for k in range(ref_num)]


# -- writing ------------------------------------------------------------------------------------------



def e2e_reference_text(groups: Sequence[Group], tokenize: bool = False, lower: bool = False) -> str:
    return "".join("".join(post_process(r, tokenize, lower) + "\n" for r in g.references) + "\n" for g in groups)


def hypothesis_text(groups: Sequence[Group], tokenize: bool = False, lower: bool = False) -> str:
    return "".join(post_process(g.hypothesis, tokenize, lower) + "\n" for g in groups)


def multi_reference_texts(groups: Sequence[Group], ref_num: int, tokenize: bool = False,
                          lower: bool = False) -> List[str]:
    """Contents of reference0 .. reference{ref_num-1}."""
    if ref_num < 1:
        raise ValueError(f"--ref_num {ref_num}: must be at least 1")
    columns = [padded_references(g.references, ref_num) for g in groups]
    return ["".join(post_process(refs[k], tokenize, lower) + "\n" for refs in columns) for k in range(ref_num)]


def warn_split_lines(groups: Sequence[Group], ref_type: str, tokenize: bool = False, lower: bool = False) -> None:
    """Warn when a text holds a character the task's scorer ends lines at (E2E's measure_scores.py: any
    str.splitlines() break; eval.py: \n): written as is, as the original did, it becomes two lines there,
    and the scorer refuses the files for their line counts. Names the input line of the first such text."""
    breaks = {"\n"} if ref_type != "e2e" else {"\n", "\r", *EXTRA_LINE_BREAKS}
    for g in groups:
        for kind, text in [("prediction", g.hypothesis or "")] + [("reference", r) for r in g.references]:
            found = [c for c in post_process(text, tokenize, lower) if c in breaks]
            if found:
                warnings.warn(f"input line {g.first_line + 1}: its {kind} holds U+{ord(found[0]):04X}, a line break "
                              f"to the {ref_type} scorer, which will read it as two lines", stacklevel=3)
                return


def write_outputs(groups: Sequence[Group], ref_type: str, output_ref_file, output_pred_file, ref_num: int = 4,
                  tokenize: bool = False, lower: bool = False, output_category_file=None) -> None:
    """Write the reference file (e2e) or folder (webnlg, dart) and the hypothesis file; each file appears
    whole or not at all."""
    if ref_type == "e2e":
        files = {Path(output_ref_file): e2e_reference_text(groups, tokenize, lower)}
    elif ref_type in ("webnlg", "dart"):
        texts = multi_reference_texts(groups, ref_num, tokenize, lower)
        files = {Path(output_ref_file) / f"reference{k}": t for k, t in enumerate(texts)}
    else:
        raise ValueError(f"--ref_type {ref_type!r}: expected e2e, webnlg or dart")
    files[Path(output_pred_file)] = hypothesis_text(groups, tokenize, lower)
    warn_split_lines(groups, ref_type, tokenize, lower)
    if output_category_file is not None:
        if any(g.category is None for g in groups):
            raise DataFormatError("--output_category_file: the input file has no \"category\" on some lines")
        files[Path(output_category_file)] = "".join(g.category + "\n" for g in groups)
    for path, text in files.items():
        write_text_atomic(path, text)


# -- the whole step (examples/NLG/gpt2_decode.py parses the LoRA repo's flags into a DecodeSpec) -----

@dataclass
class DecodeSpec:
    """One gpt2_decode.py run; the fields keep the flags' names. vocab None: the default GPT-2 BPE
    (load_bpe); ref_unique_file: one group key a line; filter: "all" | "seen" | "unseen"."""

    sample_file: str
    input_file: str
    output_ref_file: str
    output_pred_file: str
    vocab: Optional[str] = None
    ref_unique_file: Optional[str] = None
    ref_type: str = "e2e"
    ref_num: int = 4
    tokenize: bool = False
    lower: bool = False
    filter: str = "all"
    output_category_file: Optional[str] = None


def check_output_paths(ref_type: str, output_ref_file, output_pred_file, output_category_file=None) -> None:
    """Refuse output paths that cannot be written as asked, before anything is read or written."""
    ref_is_folder = ref_type in ("webnlg", "dart")
    ref = Path(output_ref_file)
    if ref_is_folder and ref.exists() and not ref.is_dir():
        raise ValueError(f"--output_ref_file {ref}: a file; --ref_type {ref_type} writes a folder of reference0, ...")
    files = [("--output_pred_file", output_pred_file), ("--output_category_file", output_category_file)]
    for flag, path in files + ([] if ref_is_folder else [("--output_ref_file", output_ref_file)]):
        if path is not None and Path(path).is_dir():
            raise ValueError(f"{flag} {path}: a folder, expected a file name")


def decode_files(spec: DecodeSpec) -> Tuple[int, List[Group]]:
    """Read, check and decode everything, then write the files; returns (input lines, the groups written).
    Bad input raises (naming the file and line) before any output file is written."""
    check_output_paths(spec.ref_type, spec.output_ref_file, spec.output_pred_file, spec.output_category_file)
    bpe = load_bpe(spec.vocab)
    records = read_formatted(spec.input_file, "--input_file")
    ref_unique = read_ref_unique(spec.ref_unique_file, len(records)) if spec.ref_unique_file else None
    predictions = read_predictions(spec.sample_file, bpe.vocab_size, len(records))
    groups = decode_beam(records, predictions, bpe, spec.filter, ref_unique, source=spec.sample_file)
    write_outputs(groups, spec.ref_type, spec.output_ref_file, spec.output_pred_file, spec.ref_num,
                  spec.tokenize, spec.lower, spec.output_category_file)
    return len(records), groups
