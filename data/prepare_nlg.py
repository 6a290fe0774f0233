"""E2E / WebNLG / DART for examples/NLG: fetch the raw release (when online), convert it to formatted JSONL and
encode it with GPT-2's BPE (the LoRA repository's create_datasets.sh, in one step).

    python data/prepare_nlg.py --task e2e --raw_dir data/raw/e2e --out_dir data/nlg/e2e --download
    python data/prepare_nlg.py --task webnlg --raw_dir data/raw/webnlg --out_dir data/nlg/webnlg --vocab vocab
    python data/prepare_nlg.py --task dart --raw_dir data/raw/dart --out_dir data/nlg/dart

writes <out_dir>/{train,valid,test}_formatted.jsonl (context, completion, id [, category]) and
<out_dir>/{train,valid,test}.jsonl (token ids), the names gpt2_ft.py / gpt2_beam.py / gpt2_decode.py take.
Raw files looked for in --raw_dir, per split, first match wins:
    e2e     train.txt | trainset.csv,   valid.txt | devset.csv,   test.txt | testset_w_refs.csv
    webnlg  train.json | train.xml | train/,   dev.json | dev.xml | dev/,   test.json | test.xml |
            testdata_with_lex.xml | test/            (XML folders: every *.xml under them)
    dart    dart-v1.1.1-full-{train,dev,test}.json | {train,dev,test}.json
--download fetches, into --raw_dir, the files the LoRA repository trained on: its E2E .txt files and WebNLG
.json files, and DART v1.1.1 from the DART repository. Offline, it says so and names the URLs. Every split is
converted and checked before anything is written; each output file appears whole or not at all.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loralib.tasks.nlg.bpe import load_bpe  # noqa: E402
from loralib.tasks.nlg.data import TASKS, encode_record, read_raw, write_jsonl  # noqa: E402

SPLITS = ("train", "valid", "test")
RAW_NAMES = {
    "e2e": {"train": ["train.txt", "trainset.csv"], "valid": ["valid.txt", "devset.csv"],
            "test": ["test.txt", "testset_w_refs.csv"]},
    "webnlg": {"train": ["train.json", "train.xml", "train"], "valid": ["dev.json", "dev.xml", "dev"],
               "test": ["test.json", "test.xml", "testdata_with_lex.xml", "test"]},
    "dart": {split: [f"dart-v1.1.1-full-{name}.json", f"{name}.json"]
             for split, name in (("train", "train"), ("valid", "dev"), ("test", "test"))},
}
_LORA_DATA = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data"
_DART_DATA = "https://raw.githubusercontent.com/Yale-LILY/dart/master/data/v1.1.1"
DOWNLOADS = {
    "e2e": {f"{s}.txt": f"{_LORA_DATA}/e2e/{s}.txt" for s in SPLITS},
    "webnlg": {f"{s}.json": f"{_LORA_DATA}/webnlg_challenge_2017/{s}.json" for s in ("train", "dev", "test")},
    "dart": {f"dart-v1.1.1-full-{s}.json": f"{_DART_DATA}/dart-v1.1.1-full-{s}.json" for s in ("train", "dev", "test")},
}


class Offline(RuntimeError):
    pass


def download(task: str, raw_dir: Path, urls: dict = None, timeout: float = 60.0) -> list:
    """Fetch the task's raw files into raw_dir (files already there are kept); returns the paths. A raw_dir this
    call made is removed again when nothing could be fetched into it."""
    made = not raw_dir.exists()
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_all(task, raw_dir, urls, timeout)
    except Offline:
        if made and not any(raw_dir.iterdir()):
            raw_dir.rmdir()
        raise


def _fetch_all(task: str, raw_dir: Path, urls, timeout: float) -> list:
    paths = []
    for name, url in (urls or DOWNLOADS[task]).items():
        target = raw_dir / name
        paths.append(target)
        if target.exists():
            continue
        fd, tmp = tempfile.mkstemp(dir=raw_dir, prefix=f".{name}.", suffix=".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise Offline(f"could not fetch {url} ({reason}): offline? Put {name} into {raw_dir} by hand "
                          f"(all files: {', '.join(DOWNLOADS[task].values())})") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return paths


def find_raw(task: str, raw_dir: Path, split: str) -> Path:
    for name in RAW_NAMES[task][split]:
        if (raw_dir / name).exists():
            return raw_dir / name
    raise FileNotFoundError(f"{raw_dir}: no {split} file for {task} (looked for {', '.join(RAW_NAMES[task][split])}); "
                            f"use --download when online, or --splits to leave the split out")


def prepare(task: str, raw_dir, out_dir, vocab=None, splits=SPLITS) -> dict:
    """Convert and encode every split, then write them; returns {split: number of lines}."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    bpe = load_bpe(vocab)
    converted = {}
    for split in splits:
        records = read_raw(task, find_raw(task, raw_dir, split))
        if not records:
            raise ValueError(f"{find_raw(task, raw_dir, split)}: no examples")
        converted[split] = (records, [encode_record(r, bpe) for r in records])
    for split, (records, encoded) in converted.items():
        write_jsonl(records, out_dir / f"{split}_formatted.jsonl")
        write_jsonl(encoded, out_dir / f"{split}.jsonl")
    return {split: len(records) for split, (records, _) in converted.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--raw_dir", required=True, help="where the raw release is (or is downloaded to)")
    p.add_argument("--out_dir", required=True, help="e.g. data/nlg/e2e")
    p.add_argument("--vocab", default=None, help="GPT-2 vocabulary: the LoRA repo's vocab/ folder, a *.tiktoken "
                   "file or a tokenizer.json folder (default .cache/gpt2-bpe/gpt2.tiktoken)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of train,valid,test")
    p.add_argument("--download", action="store_true", help="fetch missing raw files first (needs the internet)")
    args = p.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        p.error(f"--splits {args.splits!r}: expected a comma-separated subset of {','.join(SPLITS)}")
    try:
        if args.download:
            download(args.task, Path(args.raw_dir))
        counts = prepare(args.task, args.raw_dir, args.out_dir, args.vocab, splits)
    except Offline as e:
        print(f"prepare_nlg: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # malformed or unreadable raw data: one line naming the file (and line)
        print(f"prepare_nlg.py: error: {e}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"{args.task} {split}: {n} lines -> {Path(args.out_dir) / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
