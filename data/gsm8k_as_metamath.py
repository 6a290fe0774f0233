"""GSM8K's published train split in MetaMathQA's row layout, so that lorapro/train.py --dataset metamath trains on
the real problems (issue 16 §3: the real-data GSM8K check on a small model).

    python data/download_benchmarks.py --sets gsm8k            # or --from_dir ../shared/data/real
    python data/gsm8k_as_metamath.py data/benchmarks/gsm8k/train.jsonl data/gsm8k-real/metamath.jsonl

Each {"question", "answer"} line becomes {"query": question, "response": answer, "type": "GSM_AnsAug"}: MetaMathQA's
GSM_AnsAug rows are GSM8K's training questions with answers written out, and "GSM" in the type is what the LoRA-Pro
pipeline keeps. The answer is GSM8K's own, ending "#### <number>", the line both our GSM8K extraction and the
released LoRA-Pro script's read. The output is written whole or not at all; a line that is not a GSM8K row is an
error naming the file and line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def convert(source: Path) -> list:
    rows = []
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, answer = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{source}:{number}: not a GSM8K row ({{\"question\", \"answer\"}} JSON)") from None
            if "####" not in answer:
                raise ValueError(f"{source}:{number}: the answer has no '#### <number>' line")
            rows.append({"query": question, "response": answer, "type": "GSM_AnsAug"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="GSM8K train.jsonl")
    parser.add_argument("dest", help="the MetaMathQA-layout JSONL to write")
    args = parser.parse_args(argv)
    try:
        rows = convert(Path(args.source))
        if not rows:
            raise ValueError(f"{args.source}: no GSM8K problems in it (an empty file?); nothing was written")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, dest)
    print(f"{dest}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
