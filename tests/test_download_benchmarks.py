"""data/download_benchmarks.py: verification by row count and sha256 against the published copies, nothing
written unless every file verifies, one line when offline."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("LORALIB_SHARED_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="module")
def dl():
    spec = importlib.util.spec_from_file_location("download_benchmarks", REPO / "data" / "download_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not REAL.is_dir(), reason=f"published benchmark files not at {REAL}")
def test_published_copies_verify_and_are_written(dl, tmp_path):
    out = tmp_path / "bench"
    assert dl.main(["--sets", "all", "--out_dir", str(out), "--from_dir", str(REAL)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{s}/{n}" for (s, n) in dl.SHA256)  # every known file, no training split
    for (s, n), digest in dl.SHA256.items():
        assert dl.hashlib.sha256((out / s / n).read_bytes()).hexdigest() == digest
    assert dl.count_rows("test.jsonl", (out / "gsm8k" / "test.jsonl").read_bytes()) == 1319
    assert dl.count_rows("testset_w_refs.csv", (out / "e2e" / "testset_w_refs.csv").read_bytes()) == 4693


def test_a_changed_file_is_refused_and_nothing_written(dl, tmp_path, monkeypatch):
    good = b'{"question": "q", "answer": "a #### 1"}\n'

    def fetch(set_name, name, url):
        return good * (7473 if name == "train.jsonl" else 1318)  # test split one row short

    out = tmp_path / "bench"
    with pytest.raises(dl.VerificationError, match="gsm8k/train.jsonl: sha256"):
        dl.download(["gsm8k"], out, fetch)
    # without known digests only the row counts are checked: the short test split is still refused
    monkeypatch.delitem(dl.SHA256, ("gsm8k", "train.jsonl"))
    monkeypatch.delitem(dl.SHA256, ("gsm8k", "test.jsonl"))
    with pytest.raises(dl.VerificationError, match="gsm8k/test.jsonl: 1318 rows, the published split has 1319"):
        dl.download(["gsm8k"], out, fetch)
    assert not out.exists()


def test_offline_says_so_in_one_line(dl, tmp_path, monkeypatch, capsys):
    def unreachable(url, timeout=60.0):
        raise dl.Offline(f"{url}: cannot be reached (no route)")

    monkeypatch.setattr(dl, "fetch_url", unreachable)
    assert dl.main(["--sets", "dart", "--out_dir", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("offline:") and "nothing was written" in err[0]
    assert not (tmp_path / "b").exists()
    assert dl.main(["--sets", "nope"]) == 2
