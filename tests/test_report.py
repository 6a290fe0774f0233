"""`loralib compare --report` (loralib.repro.report): one self-contained HTML page, checked as a file (tables,
notes, figures inline, configurations, nothing fetched) and in a real headless browser (Chromium from Debian's
packages: the tables are in the DOM, both images decode, and a screenshot of the page is not blank)."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from loralib.repro import compare

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, config, results, losses=None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "eval_results.json").write_text(json.dumps(results))
    if config is not None:
        (folder / "run_config.json").write_text(json.dumps(config))
    if losses is not None:
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 10 * (i + 1), "loss": v, "lr": 1e-3}) + "\n" for i, v in enumerate(losses)))
        (folder / "train_results.json").write_text(json.dumps({"global_step": 10 * len(losses),
                                                               "train_loss": sum(losses) / len(losses)}))
    return folder


@pytest.fixture
def report(tmp_path, capsys):
    root = tmp_path / "demo"
    _run(root, "wn-lex-lora", {"method": "lora", "model_name_or_path": "models/all-MiniLM-L6-v2", "task": "wn-lex",
                               "lora": {"r": 8}, "args": {"learning_rate": 1e-3, "seed": 0}},
         {"task": "wn-lex", "split": "dev", "num_examples": 600, "accuracy": 0.67}, losses=[1.7, 1.2, 0.9])
    _run(root, "wn-lex-full", {"method": "full", "model_name_or_path": "models/all-MiniLM-L6-v2", "task": "wn-lex",
                               "lora": None, "args": {"learning_rate": 5e-5, "seed": 0}},
         {"task": "wn-lex", "split": "dev", "num_examples": 600, "accuracy": 0.8233}, losses=[1.7, 1.0, 0.6])
    _run(root, "roberta-rte", {"method": "lora", "model_name_or_path": "roberta-base", "lora": {"r": 8}},
         {"task": "rte", "split": "dev", "num_examples": 277, "accuracy": 0.85})  # matched: notes list a source
    page = tmp_path / "out" / "report.html"
    assert compare.main([str(root), "--report", str(page)]) == 0
    printed = capsys.readouterr()
    assert f"report: {page}" in printed.out and printed.err == ""
    return {"page": page, "root": root, "table": printed.out}


class Page(HTMLParser):
    """The parts of the page the tests look at: tables as cell text, img sources, every external reference."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.external, self.cell, self.text = {}, [], [], None, []
        self.table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.table.append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.table[-1].append("".join(self.cell))
            self.cell = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        self.text.append(data)


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def _check_tables(page: Page, table: str) -> None:
    compare_rows = [line for line in table.splitlines() if line.startswith("| ")]
    # the HTML table is the printed one, cell for cell
    assert page.tables["compare-table"] == [[c.strip() for c in line.strip("|").split(" | ")] for line in compare_rows]
    runs = page.tables["runs-table"]
    assert runs[0] == ["run", "method", "task", "steps", "train loss"]
    assert ["wn-lex-full", "full", "wn-lex", "30", "1.1000"] in runs and len(runs) == 4


def test_report_is_one_offline_page(report):
    text = report["page"].read_text(encoding="utf-8")
    page = _parse(text)
    assert page.external == [] and "<link" not in text and "@import" not in text  # nothing fetched
    _check_tables(page, report["table"])
    assert len(page.images) == 2
    for src, name in zip(page.images, ("compare.png", "curves.png")):
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(PNG) and data == (report["root"] / name).read_bytes()
    words = " ".join(page.text)
    assert "Δ = measured − reported" in words and "Sources:" in words  # the protocol notes
    assert '"learning_rate": 5e-05' in words and '"task": "wn-lex"' in words  # each run's run_config.json
    assert "no readable run_config.json" not in text


def test_report_without_curves_or_with_a_folder(tmp_path, capsys):
    root = tmp_path / "eval-only"
    _run(root, "rte", None, {"task": "rte", "split": "dev", "accuracy": 0.86})
    assert compare.main([str(root), "--report", str(tmp_path / "r.html")]) == 0
    assert "no training curves" in capsys.readouterr().err
    text = (tmp_path / "r.html").read_text()
    assert text.count("<img ") == 1 and "Training loss and evaluation metric against step: not drawn" in text
    assert "no readable run_config.json" in text
    assert compare.main([str(root), "--report", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium: apt-get install chromium (make test installs it as root)")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    image = pytest.importorskip("PIL.Image")
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    url = report["page"].resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    _check_tables(page, report["table"])
    # the page's load script counted the images that decoded (naturalWidth > 0)
    check = re.search(r'id="render-check"[^>]*', dom.stdout).group(0)
    assert 'data-images="2"' in check and 'data-images-ok="2"' in check, check

    shot = tmp_path / "shot.png"
    run = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1600", url], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert pixels.size == (1200, 1600)
    colours = pixels.getcolors(maxcolors=1 << 20)
    inked = sum(n for n, rgb in colours if sum(rgb) < 600) / (1200 * 1600)
    assert len(colours) > 100 and inked > 0.01, (len(colours), inked)  # text, tables and the figures drawn
