"""microsoft's loralib 0.1.2, imported from its wheel as `ms_loralib` (it installs as `loralib`, like ours)."""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_ms_loralib():
    if "ms_loralib" in sys.modules:
        return sys.modules["ms_loralib"]
    wheel = Path(os.environ.get("LORALIB_REFERENCE_WHEEL",
                                REPO / ".cache" / "wheels" / "loralib-0.1.2-py3-none-any.whl"))
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel}: run `make bench` (it downloads microsoft's loralib 0.1.2 wheel)")
    root = Path(tempfile.mkdtemp(prefix="ms_loralib_"))
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("loralib/") and name.endswith(".py"):
                target = root / "ms_loralib" / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    sys.path.insert(0, str(root))
    return importlib.import_module("ms_loralib")
