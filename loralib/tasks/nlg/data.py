"""E2E, WebNLG and DART: raw releases -> "formatted" JSONL -> the LoRA paper's encoded JSONL.

Formatted JSONL, one example (one reference) a line:
    {"context": "name : The Vaults | Type : pub | ...", "completion": "The Vaults is a pub ...", "id": 0}
    WebNLG adds "category" (the entry's DBpedia category; seen/unseen is decided from it at decode time).
    "id" numbers the distinct contexts in order of first appearance: lines sharing a context are the
    references of one input, which is how gpt2_decode.py groups them.
Encoded JSONL (what gpt2_ft.py and gpt2_beam.py read), one line per formatted line:
    {"context": BPE(context), "completion": BPE(" " + completion) + [50256]}
    The training collator appends <|endoftext|> (50256) after the context ids; the completion carries
    its own 50256 as the stop token (recipes.md §GPT-2 NLG).

Contexts, as the LoRA repository's converters build them:
    E2E     "name : X | Type : Y | food : Z ..."  (the repo's train.txt lines are "context||completion")
    WebNLG  "subject : property : object | ..."   from <modifiedtripleset>, lexicalisations with comment="good"
    DART    "subject : property.lower() : object | ..."  one line per annotation
Readers accept: E2E challenge CSV (mr,ref) or the repo's *.txt; WebNLG challenge XML (a file or a folder
of them) or the repo's JSON; DART's JSON release. Malformed data is refused as "file:line: why" (for a
JSON release, "file: entry N: why").
The repo's E2E .txt files (the paper's data, from Li & Liang's prefix-tuning release) are word-tokenised
("£ 30", "it 's", "family - friendly"); the challenge CSV is not, and is converted as it is, so a model
trained from the CSV is not scored on the paper's references.
"""
from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterable, List, Optional
from xml.parsers import expat

from ...files import write_jsonl_atomic
from .bpe import EOS_ID, GPT2BPE, check_ids
from .lines import DataFormatError, read_utf8, universal_lines

TASKS = ("e2e", "webnlg", "dart")
# WebNLG 2017: the ten categories of the training set; the test set adds five unseen ones.
SEEN_CATEGORIES = frozenset({"Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
                             "SportsTeam", "University", "WrittenWork"})
# E2E meaning-representation slots -> the names the LoRA repo's data uses.
E2E_SLOTS = {"name": "name", "eatType": "Type", "food": "food", "priceRange": "price",
             "customer rating": "customer rating", "area": "area", "familyFriendly": "family friendly",
             "near": "near"}
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


# -- E2E ----------------------------------------------------------------------------------------------

def e2e_context(mr: str, where: str = "<mr>") -> str:
    """'name[The Vaults], eatType[pub]' -> 'name : The Vaults | Type : pub', slots in the MR's order (E2E's
    files list them in the order the LoRA repo's data has); a slot E2E does not know keeps its own name."""
    slots, pos = {}, 0
    for m in _MR_ITEM.finditer(mr):
        if m.start() != pos:
            break
        slot, value = m.group(1), m.group(2).strip()
        if slot in slots:
            raise DataFormatError(f"{where}: slot {slot!r} given twice in {mr!r}")
        slots[slot] = value
        pos = m.end()
    if pos != len(mr) or not slots:
        raise DataFormatError(f"{where}: meaning representation {mr!r} is not 'slot[value], slot[value], ...'")
    return " | ".join(f"{E2E_SLOTS.get(s, s)} : {v}" for s, v in slots.items())


def read_e2e_csv(path) -> List[dict]:
    """The E2E challenge's trainset.csv / devset.csv / testset_w_refs.csv (columns mr, ref). A quote that is
    not closed (csv would swallow the following lines into one field) is refused naming its line."""
    path = Path(path)
    text = read_utf8(path).removeprefix("\ufeff")  # tolerate a byte-order mark
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, header, start = [], None, 1  # start: the line the row being read begins on
    try:
        for row in reader:
            where = f"{path}:{start}"
            if reader.line_num != start:  # E2E's fields never hold a line break
                raise DataFormatError(f"{where}: a quoted field runs on to line {reader.line_num} (a quote "
                                      f"that is not closed?)")
            start = reader.line_num + 1
            if header is None:
                header = [h.strip().lower() for h in row]
                if "mr" not in header or "ref" not in header:
                    raise DataFormatError(f"{where}: header {header} lacks the columns mr and ref "
                                          f"(testset.csv has no references: use testset_w_refs.csv)")
                i_mr, i_ref = header.index("mr"), header.index("ref")
                continue
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataFormatError(f"{where}: {len(row)} columns, the header has {len(header)}")
            ref = row[i_ref].strip()
            if not ref:
                raise DataFormatError(f"{where}: empty ref")
            records.append({"context": e2e_context(row[i_mr].strip(), where), "completion": ref})
    except csv.Error as e:
        raise DataFormatError(f"{path}:{start}: not valid CSV ({e}; a quote that is not closed?)") from None
    if header is None:
        raise DataFormatError(f"{path}:1: empty file, expected the header mr,ref")
    return records


def read_e2e_txt(path) -> List[dict]:
    """The LoRA repo's data/e2e/{train,valid,test}.txt: one 'context||completion' a line."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(universal_lines(read_utf8(path)), 1):
        line = line.strip()
        if not line:
            continue
        context, sep, completion = line.partition("||")
        if not sep or not context.strip() or not completion.strip():
            raise DataFormatError(f"{path}:{lineno}: expected 'context||completion', got {line[:80]!r}")
        records.append({"context": context.strip(), "completion": completion.strip()})
    return records


# -- WebNLG and DART ----------------------------------------------------------------------------------

def triples_context(triples: Iterable[tuple]) -> str:
    """[(subject, property, object), ...] -> 'subject : property : object | ...'."""
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def _parse_xml(path: Path):
    """ElementTree root plus {element: line number} (ElementTree itself keeps no line numbers)."""
    builder, lines = ET.TreeBuilder(), {}
    parser = expat.ParserCreate()

    def start(tag, attrs):
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not well-formed XML ({expat.ErrorString(e.code)})") from None
    return builder.close(), lines


def read_webnlg_xml(path) -> List[dict]:
    """WebNLG challenge XML: <entry category=...> with <modifiedtripleset><mtriple>s | p | o</mtriple> and
    <lex comment="good">text</lex> (or <lex><text>...</text></lex> in later releases). A folder is read
    file by file in sorted path order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.xml files in this folder")
        return [r for f in files for r in read_webnlg_xml(f)]
    root, lines = _parse_xml(path)
    records = []
    for entry in root.iter("entry"):
        where = f"{path}:{lines[entry]}"
        category = entry.get("category")
        if not category:
            raise DataFormatError(f"{where}: <entry> without a category attribute")
        triples = []
        for mtriple in entry.iter("mtriple"):
            parts = [p.strip() for p in (mtriple.text or "").split(" | ")]
            if len(parts) != 3 or not all(parts):
                raise DataFormatError(f"{path}:{lines[mtriple]}: mtriple {mtriple.text!r} is not "
                                      f"'subject | property | object'")
            triples.append(parts)
        if not triples:
            raise DataFormatError(f"{where}: <entry> without <modifiedtripleset><mtriple>")
        context = triples_context(triples)
        for lex in entry.iter("lex"):
            if lex.get("comment") != "good":
                continue
            text_el = lex.find("text")
            text = (text_el.text if text_el is not None else lex.text) or ""
            if not text.strip():
                raise DataFormatError(f"{path}:{lines[lex]}: empty <lex>")
            records.append({"context": context, "completion": text.strip(), "category": category})
    return records


def _read_json_release(path: Path):
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_webnlg_json(path) -> List[dict]:
    """The LoRA repo's data/webnlg_challenge_2017/*.json: {"entries": [{"1": {"category", "modifiedtripleset":
    [{"subject", "property", "object"}], "lexicalisations": [{"comment", "lex"}]}}, ...]}. Texts are kept
    exactly as released (the repo's converter did not strip them either)."""
    path = Path(path)
    data = _read_json_release(path)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise DataFormatError(f"{path}: expected an object with an 'entries' list")
    records = []
    for n, wrapped in enumerate(data["entries"], 1):
        where = f"{path}: entry {n}"
        try:
            (entry,) = wrapped.values()
            category = entry["category"]
            triples = [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]]
            lexes = [(lex["comment"], lex["lex"]) for lex in entry["lexicalisations"]]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"{where}: not a WebNLG entry ({type(e).__name__}: {e})") from None
        if not triples:
            raise DataFormatError(f"{where}: empty modifiedtripleset")
        context = triples_context(triples)
        records += [{"context": context, "completion": text, "category": category}
                    for comment, text in lexes if comment == "good"]
    return records


def read_dart_json(path) -> List[dict]:
    """DART's dart-v1.1.1-full-{train,dev,test}.json: [{"tripleset": [[s, p, o], ...], "annotations":
    [{"source", "text"}, ...]}, ...]; the property is lower-cased, one line per annotation."""
    path = Path(path)
    data = _read_json_release(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of DART entries")
    records = []
    for n, entry in enumerate(data, 1):
        where = f"{path}: entry {n}"
        try:
            triples = [(s, p.lower(), o) for s, p, o in entry["tripleset"]]
            texts = [a["text"] for a in entry["annotations"]]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DataFormatError(f"{where}: not a DART entry, want tripleset [[s, p, o], ...] and annotations "
                                  f"[{{'text': ...}}] ({type(e).__name__}: {e})") from None
        if not triples:
            raise DataFormatError(f"{where}: empty tripleset")
        context = triples_context(triples)
        records += [{"context": context, "completion": t} for t in texts]
    return records


def read_raw(task: str, path) -> List[dict]:
    """Any supported raw file (or WebNLG XML folder) of `task` -> formatted records with group ids."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if task == "e2e":
        records = read_e2e_csv(path) if suffix == ".csv" else read_e2e_txt(path)
    elif task == "webnlg":
        records = read_webnlg_json(path) if suffix == ".json" else read_webnlg_xml(path)
    elif task == "dart":
        records = read_dart_json(path)
    else:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    return add_group_ids(records)


def add_group_ids(records: List[dict]) -> List[dict]:
    """Set "id" = index of the record's context among the distinct contexts, in order of first appearance."""
    ids: Dict[str, int] = {}
    for r in records:
        r["id"] = ids.setdefault(r["context"], len(ids))
    return records


# -- JSONL files --------------------------------------------------------------------------------------

def write_jsonl(records: Iterable[dict], path) -> Path:
    """One JSON object a line, written to a temporary file and renamed, so no half-written file is left."""
    return write_jsonl_atomic(path, records)


def read_jsonl_objects(path, flag: str = "") -> Iterable[tuple]:
    """("file:line", object) for each non-blank line of a JSON Lines file; a line that is not a JSON object is a
    DataFormatError naming file:line. `flag` names the command-line flag the file came from, for the message."""
    path = Path(path)
    for lineno, line in enumerate(universal_lines(read_utf8(path, flag)), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def read_formatted(path, flag: str = "") -> List[dict]:
    """Formatted JSONL -> records; "context" and "completion" must be strings. Lines of the LoRA repo's
    formatted WebNLG files carry "cate" (seen or not) instead of "category"; both are kept as they are."""
    records = []
    for where, obj in read_jsonl_objects(path, flag):
        for key in ("context", "completion"):
            if not isinstance(obj.get(key), str):
                raise DataFormatError(f"{where}: {key!r} must be a string, got {obj.get(key)!r:.60}")
        if "category" in obj and not isinstance(obj["category"], str):
            raise DataFormatError(f"{where}: 'category' must be a string, got {obj['category']!r:.60}")
        if "cate" in obj and not isinstance(obj["cate"], bool):
            raise DataFormatError(f"{where}: 'cate' (seen in training) must be true or false, got {obj['cate']!r:.60}")
        records.append(obj)
    return records


def read_encoded(path, vocab_size: Optional[int] = None) -> List[dict]:
    """Encoded JSONL -> [{"context": [ids], "completion": [ids]}]; with `vocab_size`, every id is checked
    to index the model's vocabulary."""
    records = []
    for where, obj in read_jsonl_objects(path):
        for key in ("context", "completion"):
            ids = obj.get(key)
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DataFormatError(f"{where}: {key!r} must be a list of token ids, got {ids!r:.60}")
            if vocab_size is not None:
                check_ids(ids, vocab_size, f"{where}: {key}")
        if not obj["completion"]:
            raise DataFormatError(f"{where}: empty completion")
        records.append({"context": obj["context"], "completion": obj["completion"]})
    return records


def encode_record(record: dict, bpe: GPT2BPE) -> dict:
    """{"context": str, "completion": str} -> {"context": BPE(context), "completion": BPE(" " + text) + [eos]}.
    The leading space makes the completion's first word tokenise as it does mid-sentence."""
    return {"context": bpe.encode(record["context"]),
            "completion": bpe.encode(" " + record["completion"]) + [bpe.eos_id]}


def encode_file(formatted_path, encoded_path, bpe: GPT2BPE) -> int:
    """Formatted JSONL -> encoded JSONL (atomic); returns the number of lines written."""
    records = [encode_record(r, bpe) for r in read_formatted(formatted_path)]
    write_jsonl(records, encoded_path)
    return len(records)


__all__ = ["TASKS", "SEEN_CATEGORIES", "E2E_SLOTS", "EOS_ID", "DataFormatError", "e2e_context", "read_e2e_csv",
           "read_e2e_txt", "triples_context", "read_webnlg_xml", "read_webnlg_json", "read_dart_json",
           "read_raw", "add_group_ids", "write_jsonl", "read_formatted", "read_encoded", "encode_record",
           "encode_file"]
