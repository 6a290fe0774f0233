"""`loralib compare RESULTS_DIR --report report.html`: one self-contained HTML page to open after a run.

    the compare table (reported vs measured) and its protocol notes    loralib.repro.compare
    the two figures, embedded as base64 PNG                            compare.png, curves.png (loralib plot)
    each run's training summary and effective configuration            train_results.json, run_config.json

Nothing is fetched when the page is opened (no stylesheet, font or script from elsewhere), so it reads offline
and can be mailed as one file. A few lines of inline script record, once the page has loaded, how many of its
images decoded (`<p id="render-check" data-images-ok="2" data-images="2">`): a check a headless browser can read.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .compare import TABLE_HEADER, Row, Run, protocol_notes, table_cells
from .registry import Registry

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #e8eef6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.notes li { margin: 0.3em 0; }
"""
# records, after the load event, how many images decoded (naturalWidth > 0): read by headless-browser checks
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) { ok++; } }
  var p = document.getElementById("render-check");
  p.dataset.images = images.length; p.dataset.imagesOk = ok;
  p.textContent = ok + " of " + images.length + " figures rendered";
});
"""
NUMERIC = {"reported", "measured", "Δ"}


def _table(header: Sequence[str], cells: Sequence[Sequence[str]], numeric=frozenset(), table_id: str = "") -> str:
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{html.escape(c)}</td>' if h in numeric else f"<td>{html.escape(c)}</td>"
        for h, c in zip(header, row)) + "</tr>\n" for row in cells)
    return f"<table{ident}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _notes(lines: Sequence[str]) -> str:
    """The compare table's notes: sentences as list items, a "Sources:" block with its "- " lines nested."""
    items, sources = [], []
    for line in lines:
        (sources if line.startswith("- ") else items).append(line[2:] if line.startswith("- ") else line)
    out = "".join(f"<li>{html.escape(line)}</li>" for line in items if line != "Sources:")
    if sources:
        out += "<li>Sources:<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sources) + "</ul></li>"
    return f'<ul class="notes">{out}</ul>'


def _figure(path: Optional[Path], alt: str) -> str:
    """The PNG inline as a data: URI, or a sentence saying it is missing."""
    if path is None or not path.is_file():
        return f"<p><em>{html.escape(alt)}: not drawn{' (' + html.escape(str(path)) + ')' if path else ''}.</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(alt)} ({html.escape(path.name)})</figcaption></figure>")


def _json_or_none(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _summary(runs: Sequence[Run]) -> Tuple[List[str], List[List[str]]]:
    """Per run: method, task, steps and mean training loss (train_results.json, when there)."""
    header = ["run", "method", "task", "steps", "train loss"]
    cells = []
    for run in runs:
        done = _json_or_none(run.folder / "train_results.json") or {}
        config = _json_or_none(run.folder / "run_config.json") or {}
        loss = done.get("train_loss")
        cells.append([run.name, run.method or "?", str(config.get("task") or ", ".join(sorted({m[0] for m in run.measured}))),
                      str(done.get("global_step", "")),
                      f"{loss:.4f}" if isinstance(loss, (int, float)) else ""])
    return header, cells


def _configs(runs: Sequence[Run]) -> str:
    parts = []
    for run in runs:
        path = run.folder / "run_config.json"
        config = _json_or_none(path)
        body = (html.escape(json.dumps(config, indent=2, sort_keys=True, default=str)) if config is not None
                else f"no readable run_config.json in {html.escape(str(run.folder))} (an evaluation-only run?)")
        parts.append(f"<details><summary>{html.escape(run.name)}</summary><pre>{body}</pre></details>")
    return "\n".join(parts)


def write_report(out: os.PathLike | str, rows: Sequence[Row], runs: Sequence[Run], registry: Registry,
                 chart: os.PathLike | str, curves: Optional[os.PathLike | str], paper: Optional[str] = None,
                 title: str = "Reported vs measured", warnings: Sequence[str] = ()) -> Path:
    """Write the page (atomically) and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header, summary = _summary(runs)
    folder = Path(os.path.commonpath([str(run.folder.resolve()) for run in runs])) if runs else Path(".")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    warned = ("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>"
              if warnings else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Results of {html.escape(str(folder))}</h1>
<p>{len(runs)} runs; written {when} by
<code>loralib compare{" --paper " + html.escape(paper) if paper else ""} --report</code>.</p>
<p id="render-check" data-images="?" data-images-ok="?">figures not checked (scripts off)</p>
<h2>Reported vs measured</h2>
{_table(TABLE_HEADER, table_cells(rows), NUMERIC, "compare-table")}
<h3>Protocol notes</h3>
{_notes(protocol_notes(rows, registry, paper))}
<h2>Figures</h2>
{_figure(Path(chart), "Reported vs measured, one bar per number")}
{_figure(Path(curves) if curves else None, "Training loss and evaluation metric against step")}
<h2>Runs</h2>
{_table(header, summary, {"steps", "train loss"}, "runs-table")}
<h3>Effective configuration (run_config.json)</h3>
{_configs(runs)}
{warned}
<script>{CHECK_SCRIPT}</script>
</body></html>
"""
    tmp = out.with_name(".tmp-" + out.name)
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
