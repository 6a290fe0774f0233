"""Download the published benchmark files (GSM8K, E2E, WebNLG 2017, DART) from their public repositories,
verify them, and write them under data/benchmarks/ whole or not at all.

    python data/download_benchmarks.py --sets all                   # -> data/benchmarks/<set>/<file>
    python data/download_benchmarks.py --sets gsm8k,e2e --out_dir data/benchmarks
    python data/download_benchmarks.py --sets e2e --from_dir ../shared/data/real   # copy + verify local copies

    set        files (upstream repository : path)
    gsm8k      train.jsonl, test.jsonl          openai/grade-school-math : grade_school_math/data/
    e2e        trainset.csv, devset.csv, testset_w_refs.csv   tuetschek/e2e-dataset : /
    lora-e2e   train.txt, valid.txt, test.txt   microsoft/LoRA : examples/NLG/data/e2e/
    webnlg     train.json, dev.json, test.json  microsoft/LoRA : examples/NLG/data/webnlg_challenge_2017/
    dart       dart-v1.1.1-full-{train,dev,test}.json   microsoft/LoRA : examples/NLG/data/dart/

Verification, for each file: its row count where the dataset states one (GSM8K 7,473 / 1,319 rows; E2E dev
4,672 and test 4,693 references; WebNLG dev 872 entries; DART dev 2,768) and its sha256 where it is known
(the evaluation splits and GSM8K train, checked against the copies the tests use at the commits named in
SHA256 below). A file that fails either check is not written, and the script names it. Files whose sha256 is
not known here (the training splits) are written with the sha256 computed, printed for the record.
When the network cannot be reached the script says so in one line and exits with status 1.
`python data/prepare_nlg.py --task e2e --raw_dir data/benchmarks/lora-e2e ...` then builds the encoded files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
E2E = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/master/"
LORA_NLG = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/"

# set -> {file name: (url, expected rows or None, folder of the copy in ../shared/data/real or None)}
SOURCES: Dict[str, Dict[str, Tuple[str, Optional[int], Optional[str]]]] = {
    "gsm8k": {"train.jsonl": (GSM8K + "train.jsonl", 7473, "gsm8k"),
              "test.jsonl": (GSM8K + "test.jsonl", 1319, "gsm8k")},
    "e2e": {"trainset.csv": (E2E + "trainset.csv", None, None),
            "devset.csv": (E2E + "devset.csv", 4672, "e2e-official"),
            "testset_w_refs.csv": (E2E + "testset_w_refs.csv", 4693, "e2e-official")},
    "lora-e2e": {"train.txt": (LORA_NLG + "e2e/train.txt", None, None),
                 "valid.txt": (LORA_NLG + "e2e/valid.txt", 4672, "lora-nlg/e2e"),
                 "test.txt": (LORA_NLG + "e2e/test.txt", 4693, "lora-nlg/e2e")},
    "webnlg": {name: (LORA_NLG + "webnlg_challenge_2017/" + name, 872 if name == "dev.json" else None,
                      "lora-nlg/webnlg_challenge_2017" if name == "dev.json" else None)
               for name in ("train.json", "dev.json", "test.json")},
    "dart": {f"dart-v1.1.1-full-{split}.json": (f"{LORA_NLG}dart/dart-v1.1.1-full-{split}.json",
                                                2768 if split == "dev" else None,
                                                "lora-nlg/dart" if split == "dev" else None)
             for split in ("train", "dev", "test")},
}

# Known digests: openai/grade-school-math@3101c7d5, tuetschek/e2e-dataset@ab0d967d, microsoft/LoRA@c4593f06.
SHA256 = {
    ("gsm8k", "train.jsonl"): "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    ("gsm8k", "test.jsonl"): "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    ("e2e", "devset.csv"): "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    ("e2e", "testset_w_refs.csv"): "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
    ("lora-e2e", "valid.txt"): "ba963113c8401d3d26216c0dc0a6dae1ea6ea927de3bf830e32c41f65401c80d",
    ("lora-e2e", "test.txt"): "81b1bcd40c4f12845ec4eb61a77bf43765d112483cd9b2f91ef10bfc1b3d8f13",
    ("webnlg", "dev.json"): "50f5a2c24d760bc84ba3e852707cd3b43b0cf2da035b425f87945a2440880488",
    ("dart", "dart-v1.1.1-full-dev.json"): "5038f3543b6d59b94ac4e3f69d15a0b01d8578913f862142e7c560200dd6e434",
}


class Offline(RuntimeError):
    """The upstream host could not be reached."""


class VerificationError(ValueError):
    """A fetched file is not the published one (row count or sha256)."""


def parse_sets(text: str) -> list:
    names = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if name == "all":
            names += list(SOURCES)
        elif name:
            if name not in SOURCES:
                raise ValueError(f"--sets: unknown set {name!r}; expected some of {', '.join(SOURCES)} or 'all'")
            names.append(name)
    if not names:
        raise ValueError("--sets is empty")
    return list(dict.fromkeys(names))


def fetch_url(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise VerificationError(f"{url}: HTTP {e.code} (moved upstream?)") from None
    except (urllib.error.URLError, OSError) as e:
        raise Offline(f"{url}: cannot be reached ({getattr(e, 'reason', e)})") from None


def count_rows(name: str, payload: bytes) -> int:
    """Rows as the dataset counts them: JSON Lines lines, CSV records (header excluded), text lines, JSON
    entries (WebNLG's "entries", DART's top-level list)."""
    text = payload.decode("utf-8-sig")
    if name.endswith(".jsonl"):
        return sum(1 for line in text.splitlines() if line.strip())
    if name.endswith(".csv"):
        import csv
        import io
        return sum(1 for row in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in row)) - 1
    if name.endswith(".txt"):
        return sum(1 for line in text.splitlines() if line.strip())
    data = json.loads(text)
    return len(data["entries"]) if isinstance(data, dict) else len(data)


def verify(set_name: str, name: str, payload: bytes, rows: Optional[int]) -> str:
    """The sha256 of `payload` after checking it against the known digest and row count; raises
    VerificationError naming the file otherwise."""
    digest = hashlib.sha256(payload).hexdigest()
    want = SHA256.get((set_name, name))
    if want is not None and digest != want:
        raise VerificationError(f"{set_name}/{name}: sha256 {digest} is not the published file's {want}")
    if rows is not None:
        try:
            got = count_rows(name, payload)
        except (ValueError, KeyError, TypeError) as e:
            raise VerificationError(f"{set_name}/{name}: cannot be read ({e})") from None
        if got != rows:
            raise VerificationError(f"{set_name}/{name}: {got} rows, the published split has {rows}")
    return digest


def _write_whole(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def download(sets, out_dir: Path, fetch: Callable[[str, str, str], bytes], overwrite: bool = False,
             log=print) -> Dict[str, str]:
    """Fetch, verify, then write every file of `sets`; nothing is written unless all of them verify.
    `fetch(set_name, file_name, url)` returns the bytes, or None to skip the file. Returns {"set/file": sha256}."""
    fetched = {}
    for set_name in sets:
        for name, (url, rows, _) in SOURCES[set_name].items():
            target = out_dir / set_name / name
            if target.exists() and not overwrite:
                log(f"{target}: already there (--overwrite to fetch again)")
                continue
            payload = fetch(set_name, name, url)
            if payload is None:
                log(f"{target}: skipped (no copy to read)")
                continue
            fetched[target] = (verify(set_name, name, payload, rows), payload)
    for target, (digest, payload) in fetched.items():
        _write_whole(target, payload)
        log(f"{target}: {len(payload)} bytes, sha256 {digest}")
    return {f"{t.parent.name}/{t.name}": d for t, (d, _) in fetched.items()}


def local_fetcher(root: Path) -> Callable[[str, str, str], bytes]:
    """Read the copies in a local folder laid out as ../shared/data/real (the evaluation splits and GSM8K
    train; the other training splits are skipped)."""
    def fetch(set_name: str, name: str, url: str) -> Optional[bytes]:
        folder = SOURCES[set_name][name][2]
        if folder is None:
            return None
        path = root / folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return path.read_bytes()
    return fetch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="data/download_benchmarks.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="all", help=f"comma-separated: {', '.join(SOURCES)} or all")
    parser.add_argument("--out_dir", default="data/benchmarks")
    parser.add_argument("--from_dir", default=None, help="copy and verify local copies instead of downloading")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        sets = parse_sets(args.sets)
        fetch = local_fetcher(Path(args.from_dir)) if args.from_dir else (lambda s, n, url: fetch_url(url))
        download(sets, Path(args.out_dir), fetch, args.overwrite)
    except Offline as e:
        print(f"offline: {e}; nothing was written. Run this where GitHub is reachable.", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}; nothing was written.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
