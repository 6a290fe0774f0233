"""Shared fixtures: microsoft's loralib 0.1.2 as a reference, loaded from its wheel under another name."""
from __future__ import annotations

import importlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHEEL = REPO / ".cache" / "wheels" / "loralib-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="session")
def ms_loralib(tmp_path_factory):
    """microsoft's loralib 0.1.2 imported as `ms_loralib` (it installs as `loralib`, like ours)."""
    wheel = Path(os.environ.get("LORALIB_REFERENCE_WHEEL", DEFAULT_WHEEL))
    if not wheel.is_file():
        pytest.fail(f"reference wheel {wheel} missing: run `make test` (it downloads loralib==0.1.2), or "
                    f"`pip download --no-deps loralib==0.1.2 -d {wheel.parent}`")
    root = tmp_path_factory.mktemp("ms_loralib")
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("loralib/") and name.endswith(".py"):
                target = root / "ms_loralib" / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("ms_loralib")
    finally:
        sys.path.remove(str(root))


# The tests use tiny models: one thread avoids thread-pool overhead that dominates on a loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
