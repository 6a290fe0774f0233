"""Download GLUE tasks with the `datasets` library and save each one to disk, where load_glue reads it.

    python data/download_glue.py --task_names mnli,qqp --datadir data/     # -> data/glue/mnli, data/glue/qqp
    python data/download_glue.py --task_names all

Each task is the Hugging Face "glue" config of that name, saved with DatasetDict.save_to_disk under
<datadir>/glue/<task> (the layout the LoRA+ scripts use). A task already there is skipped unless --overwrite.
When the hub cannot be reached the script says so in one line and exits with status 1; the official GLUE TSV
files, placed under <datadir>/<CoLA|SST-2|MRPC|...>/, are read without this script.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

GLUE_CONFIGS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-mm": "mnli", "mnli_mismatched": "mnli", "mnli_matched": "mnli"}


class HubUnreachable(RuntimeError):
    pass


def parse_task_names(text: str) -> list[str]:
    names = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            names += GLUE_CONFIGS
            continue
        name = _ALIASES.get(name, name)
        if name not in GLUE_CONFIGS:
            raise ValueError(f"unknown GLUE task {raw.strip()!r}: expected some of {', '.join(GLUE_CONFIGS)} or 'all'")
        names.append(name)
    if not names:
        raise ValueError("--task_names is empty")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def _is_connection_error(error: BaseException) -> bool:
    """datasets raises the builtin ConnectionError when offline; requests, httpx and huggingface_hub have their
    own classes, recognised by name so that none of them has to be importable."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"ConnectError", "ConnectTimeout", "ReadTimeout", "LocalEntryNotFoundError",
                    "OfflineModeIsEnabled"}:
            return True
        error = error.__cause__ or error.__context__
    return False


def _quiet_hub_retries():
    """huggingface_hub logs every retry of an unreachable host; the one line this script prints says it all."""
    import logging
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def download(task_names: list[str], datadir: str | os.PathLike, overwrite: bool = False,
             load_dataset=None) -> list[Path]:
    """Fetch and save each task; returns the folders written. `load_dataset` defaults to datasets' own."""
    if load_dataset is None:
        from datasets import load_dataset
        _quiet_hub_retries()
    written = []
    for task in task_names:
        target = Path(datadir) / "glue" / task
        if (target / "dataset_dict.json").is_file() and not overwrite:
            print(f"{target}: already there (--overwrite to fetch again)")
            continue
        try:
            dataset_dict = load_dataset("glue", task)
        except Exception as e:
            if _is_connection_error(e):
                raise HubUnreachable(f"cannot reach the Hugging Face hub to download GLUE task {task!r} "
                                     f"({type(e).__name__}); connect to the internet, or put the official GLUE "
                                     f"TSV files under {Path(datadir)}/") from e
            raise
        # save into a sibling folder and move it into place, so an interrupted save leaves nothing half-written
        tmp = target.parent / f".{task}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            dataset_dict.save_to_disk(str(tmp))
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sizes = ", ".join(f"{split} {len(ds)}" for split, ds in dataset_dict.items())
        print(f"{target}: {sizes}")
        written.append(target)
    return written


def main(argv=None, load_dataset=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task_names", default="all", help="comma-separated, e.g. mnli,qqp; or 'all'")
    parser.add_argument("--datadir", "--data_dir", dest="datadir", default="data")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        task_names = parse_task_names(args.task_names)
    except ValueError as e:
        parser.error(str(e))
    try:
        download(task_names, args.datadir, args.overwrite, load_dataset)
    except HubUnreachable as e:
        print(f"download_glue: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"download_glue: the datasets package is needed ({e}); pip install datasets", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
