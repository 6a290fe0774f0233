"""The `loralib` command.

    loralib download-model NAME [--dest-root models] [--revision REV]   fetch a hub model into models/NAME
    loralib compare RESULTS_DIR [--out PNG] [--report HTML]             reported vs measured (table, chart, report)
    loralib plot RUN_DIR... [--out PNG]                                  training curves of runs (metrics.jsonl)

The demos run the paper folders' entry points, so they live beside them, outside the package: `make demo`
(python demo/glue.py) and `make demo-digits` (python demo/digits.py).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, List, Optional, Tuple

INPUT_ERRORS: Tuple[type, ...] = (ValueError, FileNotFoundError, KeyError)


def run_entry_point(run: Callable[[], Any], prog: str, errors: Tuple[type, ...] = INPUT_ERRORS) -> int:
    """The command-line behaviour of every entry point (run_glue.py, gpt2_ft.py, lorapro/train.py, ...):
    INFO logging unless the caller set some up; 0 on success; bad input (one of `errors`: a flag, file or
    key at fault) prints one `PROG: error: ...` line and returns 2. Other exceptions propagate."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run()
    except errors as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0

COMMANDS = {
    "download-model": ("loralib.models.hub", "fetch a Hugging Face hub model into models/NAME"),
    "download": ("loralib.repro.download", "fetch a released adapter (loralib download --list)"),
    "compare": ("loralib.repro.compare", "reported vs measured: markdown table, bar chart, --report HTML"),
    "plot": ("loralib.repro.plot", "training loss and eval metric against step of runs (curves.png)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: loralib COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    import importlib
    module = importlib.import_module(COMMANDS[argv[0]][0])
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
