"""loralib.repro: the registry (released adapters, reported numbers), `loralib download` (transport mocked,
and once over a real local HTTP server), `loralib compare` on fake run folders."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import http.server
import json
import threading
import urllib.error
from pathlib import Path

import pytest
import torch

from loralib import cli
from loralib.repro import compare, download
from loralib.repro.registry import (REGISTRY_FILE, RegistryError, UnknownAdapterError, check_state_dict,
                                    expand_pattern, load_registry, parse_registry)

GLUE8 = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")


@pytest.fixture(scope="module")
def reg():
    return load_registry()


def _raw():
    return json.loads(REGISTRY_FILE.read_text())


def _one(reg, **fields):
    rows = [r for r in reg.reported if all(getattr(r, k) == v for k, v in fields.items())]
    assert len(rows) == 1, (fields, rows)
    return rows[0]


# -- registry: adapters -----------------------------------------------------------------------------

def test_every_released_adapter_is_listed_with_its_url_and_settings(reg):
    names = set(reg.adapters)
    assert names == ({f"roberta_base_lora_{t}" for t in GLUE8} | {f"deberta_v2_xxlarge_lora_{t}" for t in GLUE8}
                     | {f"gpt2_{s}_lora_{t}" for s in ("md", "lg") for t in ("e2e", "dart", "webnlg")})
    a = reg.adapter("roberta_base_lora_mnli")
    assert a.url == "https://github.com/microsoft/LoRA/releases/download/RoBERTa-base/roberta_base_lora_mnli.bin"
    assert (a.base_model, a.r, a.lora_alpha, a.num_labels, a.target_modules) == ("roberta-base", 8, 16, 3, ("query", "value"))
    d = reg.adapter("deberta_v2_xxlarge_lora_rte")
    assert d.url == "https://github.com/microsoft/LoRA/releases/download/DeBERTa/deberta_v2_xxlarge_lora_rte.bin"
    assert (d.base_model, d.r, d.lora_alpha, d.target_modules) == ("microsoft/deberta-v2-xxlarge", 16, 32,
                                                                    ("query_proj", "value_proj"))
    g = reg.adapter("gpt2_lg_lora_webnlg")
    assert g.url == "https://github.com/microsoft/LoRA/releases/download/GPT-2/gpt2_lg_lora_webnlg.pt"
    assert (g.base_model, g.r, g.lora_alpha, g.enable_lora) == ("gpt2-large", 4, 32, (True, False, True))
    assert reg.adapter("roberta_base_lora_stsb").num_labels == 1
    # no checksum is known on this machine: null everywhere, said so in the file
    assert all(x.sha256 is None for x in reg.adapters.values())
    # names are forgiving about dashes and extensions
    assert reg.adapter("roberta-base-lora-mnli.bin") is a
    with pytest.raises(UnknownAdapterError, match="did you mean roberta_base_lora_mnli"):
        reg.adapter("robreta_base_lora_mnli")


def test_expected_keys_match_the_recipes_counts(reg):
    shapes = reg.adapter("roberta_base_lora_mnli").expected_shapes()
    assert len(shapes) == 52
    assert shapes["roberta.encoder.layer.11.attention.self.value.lora_A"] == (8, 768)
    assert shapes["roberta.encoder.layer.0.attention.self.query.lora_B"] == (768, 8)
    assert shapes["classifier.out_proj.weight"] == (3, 768) and shapes["classifier.dense.weight"] == (768, 768)
    assert reg.adapter("roberta_base_lora_sst2").expected_shapes()["classifier.out_proj.bias"] == (2,)
    deberta = reg.adapter("deberta_v2_xxlarge_lora_mnli").expected_shapes()
    assert deberta["deberta.encoder.layer.47.attention.self.query_proj.lora_A"] == (16, 1536)
    # recipes.md: LoRA parameters at r=4 on c_attn q,v: 393,216 (GPT-2 M), 737,280 (GPT-2 L)
    for name, count in (("gpt2_md_lora_e2e", 393_216), ("gpt2_lg_lora_dart", 737_280)):
        assert sum(torch.Size(s).numel() for s in reg.adapter(name).expected_shapes().values()) == count
    # RoBERTa-base LoRA factors for r=8 on q,v: the "0.3M by count" of reported.md
    lora = {k: s for k, s in shapes.items() if ".lora_" in k}
    assert sum(torch.Size(s).numel() for s in lora.values()) == 294_912


def test_expand_pattern_and_check_state_dict(reg):
    assert expand_pattern("h.{0..1}.{q,v}.w") == ["h.0.q.w", "h.0.v.w", "h.1.q.w", "h.1.v.w"]
    assert expand_pattern("plain") == ["plain"]
    a = reg.adapter("gpt2_md_lora_e2e")
    state = {k: torch.zeros(s) for k, s in a.expected_shapes().items()}
    assert check_state_dict(a, state) == []
    state["transformer.h.3.attn.c_attn.lora_A"] = torch.zeros(4, 1024)
    del state["transformer.h.0.attn.c_attn.lora_B"]
    state["lm_head.weight"] = torch.zeros(2, 2)
    problems = " | ".join(check_state_dict(a, state))
    assert "1 expected keys missing" in problems and "1 keys not in the registry" in problems
    assert "transformer.h.3.attn.c_attn.lora_A has shape (4, 1024), registry says (8, 1024)" in problems


# -- registry: reported numbers ---------------------------------------------------------------------

def test_reported_numbers_with_std_and_source(reg):
    rb = _one(reg, paper="lora", model="roberta-base", method="lora", task="mnli", metric="accuracy")
    assert (rb.value, rb.std, rb.unit, rb.marks, rb.split) == (87.5, 0.3, "%", (), "dev")
    assert "LoRA paper" in rb.source
    assert _one(reg, paper="lora", model="roberta-base", method="lora", task="mnli-mm").value == 86.9
    assert _one(reg, paper="lora", model="roberta-base", method="full", task="rte").value == 78.7
    sp = _one(reg, model="microsoft/deberta-v2-xxlarge", method="lora", task="stsb", metric="spearmanr")
    assert (sp.value, sp.std) == (92.9, 0.3)
    assert _one(reg, model="microsoft/deberta-v2-xxlarge", method="full", task="mnli-mm").value == 91.9
    assert _one(reg, model="roberta-base", method="lora", task="average").value == 87.24
    cola = _one(reg, model="roberta-base", method="lora", task="cola", paper="lora")
    assert (cola.metric, cola.value, cola.std) == ("matthews_correlation", 63.4, 1.2)
    large = _one(reg, model="roberta-large", method="lora", task="rte")
    assert (large.value, large.std) == (87.4, 2.5) and "Table 2" in large.source
    assert _one(reg, model="roberta-large", method="full", task="average").value == 88.9
    web = _one(reg, model="gpt2-large", method="adapter", task="webnlg", metric="bleu_unseen")
    assert (web.value, web.std, web.split) == (49.8, 0.0, "test")
    assert _one(reg, model="gpt2-medium", method="lora", task="e2e").value == 70.4
    params = _one(reg, model="gpt2-medium", method="full", metric="trainable_params")
    assert (params.value, params.unit) == (354.92, "M")
    assert _one(reg, model="microsoft/deberta-v2-xxlarge", method="full", metric="trainable_params").value == 1500


def test_reported_numbers_of_the_other_papers_and_their_marks(reg):
    ada = _one(reg, paper="adalora", method="adalora", setting="budget 0.32M", task="cola")
    assert (ada.value, ada.model, ada.marks) == (70.04, "microsoft/deberta-v3-base", ())
    assert _one(reg, paper="adalora", method="lora", r=2, task="qqp", metric="f1").value == 88.91
    assert _one(reg, paper="adalora", method="full", task="average").value == 88.09
    plus = _one(reg, paper="loraplus", method="loraplus", task="qnli")
    assert (plus.value, plus.marks) == (92.1, ("unverified",))
    assert _one(reg, paper="loraplus", method="lora", task="mnli").value == 84.5
    vit = _one(reg, paper="loraplus", method="loraplus", task="food101-5k")
    assert (vit.value, vit.unit, vit.marks) == (0.912, "fraction", ("unverified",))
    dora = _one(reg, paper="lorapro", method="dora", task="gsm8k")
    assert (dora.value, dora.std, dora.marks) == (53.07, 0.75, ("second-hand",))
    mt = _one(reg, paper="lorapro", method="full", task="mt-bench")
    assert (mt.value, mt.std, mt.unit) == (5.30, 0.11, "score")
    span = _one(reg, paper="lorapro", method="lorapro", task="gsm8k", setting=None)
    assert (span.value, span.range, span.marks) == (None, (54.2, 56.5), ("unverified", "approximate"))
    assert span.text() == "54.20–56.50 [unverified, approximate]"
    assert _one(reg, paper="lorapro", method="lorapro", setting="authors' re-run").value == 54.13
    t5 = _one(reg, model="t5-base", method="full", task="cola")
    assert t5.value == 80.70 and "second-hand" in t5.marks
    head = _one(reg, paper="lora2", metric="trainable_params_fraction_of_full_ft")
    assert (head.value, head.marks) == (0.72, ("headline",))
    # LoRA² has no per-task rows yet: its comparisons fall back on AdaLoRA's
    assert reg.papers_for("lora2") == ("lora2", "adalora")
    assert {r.paper for r in reg.find(paper="lora2", task="rte")} == {"adalora"}
    # row counts per paper: a number dropped from the file fails here
    counts = {p: sum(r.paper == p for r in reg.reported) for p in reg.papers}
    # issue 14: lora 115 -> 114, the "computed" 0.3M row folded into Table 2's RoBERTa-base LoRA row
    assert counts == {"lora": 114, "adalora": 60, "lora2": 3, "loraplus": 11, "lorapro": 38}


def test_model_names_and_folders_map_to_registry_models(reg):
    assert reg.model_key("roberta-base") == "roberta-base"
    assert reg.model_key("FacebookAI/roberta-base") == "roberta-base"
    assert reg.model_key("/data/models/deberta-v2-xxlarge/") == "microsoft/deberta-v2-xxlarge"
    assert reg.model_key("models/microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"
    assert reg.model_key("models/all-MiniLM-L6-v2") is None and reg.model_key(None) is None


@pytest.mark.parametrize("edit, where, field_", [
    (lambda d: d["reported"][5].__setitem__("std", "0.3"), "reported[5]", "'std'"),
    (lambda d: d["reported"][7].__setitem__("marks", ["unverifed"]), "reported[7]", "'marks'"),
    (lambda d: d["reported"][9].__setitem__("model", "roberta-huge"), "reported[9]", "'model'"),
    (lambda d: d["reported"][2].__setitem__("value", None), "reported[2]", "'value'"),
    (lambda d: d["adapters"][2].pop("r"), "adapters[2] (roberta_base_lora_mrpc)", "'r'"),
    (lambda d: d["adapters"][0]["keys"].__setitem__("num_tensors", 50), "adapters[0] (roberta_base_lora_mnli) keys",
     "'num_tensors'"),
    (lambda d: d["adapters"][4].__setitem__("sha256", "abc"), "adapters[4]", "'sha256'"),
    (lambda d: d["adapters"][1].__setitem__("lora_alpha", True), "adapters[1]", "'lora_alpha'"),
])
def test_a_malformed_registry_names_the_entry_and_field(edit, where, field_):
    data = copy.deepcopy(_raw())
    edit(data)
    with pytest.raises(RegistryError) as info:
        parse_registry(data, "registry.json")
    message = str(info.value)
    assert message.startswith("registry.json: " + where) and f"field {field_}" in message


def test_registry_file_errors(tmp_path):
    bad = tmp_path / "registry.json"
    bad.write_text("{\n  \"schema\": 1,\n")
    with pytest.raises(RegistryError, match=r"registry.json: not valid JSON \(line 3"):
        load_registry(bad)
    with pytest.raises(FileNotFoundError, match="registry file not found"):
        load_registry(tmp_path / "nope.json")


# -- download (transport mocked) --------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class FakeServer:
    """Stands in for `download.fetch`: serves PAYLOAD honouring the start offset; can break off a
    transfer after `fail_after` bytes, or ignore ranges like a server without Range support."""

    def __init__(self, payload=PAYLOAD, fail_after=None, ignore_range=False):
        self.payload, self.fail_after, self.ignore_range = payload, fail_after, ignore_range
        self.starts = []

    def __call__(self, url, start, timeout=60.0):
        self.starts.append(start)
        if start and not self.ignore_range:
            if start >= len(self.payload):
                return download.Response(416, len(self.payload), iter(()))
            return download.Response(206, len(self.payload), self._chunks(self.payload[start:]))
        return download.Response(200, len(self.payload), self._chunks(self.payload))

    def _chunks(self, data):
        sent = 0
        for i in range(0, len(data), 1000):
            if self.fail_after is not None and sent >= self.fail_after:
                self.fail_after = None  # break only once
                raise ConnectionResetError("connection reset by peer")
            sent += len(data[i:i + 1000])
            yield data[i:i + 1000]


def _registry_with_sha(sha):
    data = _raw()
    data["adapters"][0]["sha256"] = sha
    return parse_registry(data, "test registry")


def test_download_writes_the_file_and_records_its_sha256(tmp_path, monkeypatch):
    server = FakeServer()
    monkeypatch.setattr(download, "fetch", server)
    logs = []
    path = download.download_adapter("roberta_base_lora_mnli", tmp_path, log=logs.append)
    assert path == tmp_path / "roberta_base_lora_mnli.bin" and path.read_bytes() == PAYLOAD
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert (tmp_path / "roberta_base_lora_mnli.bin.sha256").read_text() == f"{digest}  roberta_base_lora_mnli.bin\n"
    assert not (tmp_path / "roberta_base_lora_mnli.bin.part").exists()
    assert any(digest in line and "not in the registry" in line for line in logs)
    # the file is not a torch file: the key check says so as a warning, the download still stands
    assert any(line.startswith("warning:") and "keys not checked" in line for line in logs)
    # a second run finds it, checks it against the recorded sha256, and fetches nothing
    assert download.download_adapter("roberta_base_lora_mnli", tmp_path, log=logs.append) == path
    assert server.starts == [0]
    path.write_bytes(b"tampered")
    with pytest.raises(download.ChecksumMismatchError, match="remove the file and download it again"):
        download.download_adapter("roberta_base_lora_mnli", tmp_path, log=logs.append)


def test_an_interrupted_download_resumes_from_the_part_file(tmp_path, monkeypatch):
    server = FakeServer(fail_after=3000)
    monkeypatch.setattr(download, "fetch", server)
    with pytest.raises(download.InterruptedDownloadError, match="interrupted at byte 3000 of 10240.*run the same "
                                                                "command again to resume"):
        download.download_adapter("gpt2_md_lora_e2e", tmp_path, log=lambda s: None)
    part = tmp_path / "gpt2_md_lora_e2e.pt.part"
    assert part.read_bytes() == PAYLOAD[:3000] and not (tmp_path / "gpt2_md_lora_e2e.pt").exists()
    logs = []
    path = download.download_adapter("gpt2_md_lora_e2e", tmp_path, log=logs.append)
    assert server.starts == [0, 3000]  # the second request asked for the rest only
    assert path.read_bytes() == PAYLOAD and not part.exists()
    assert "resuming gpt2_md_lora_e2e.pt at byte 3000 of 10240" in logs


def test_a_server_that_ignores_the_range_starts_over(tmp_path, monkeypatch):
    (tmp_path / "gpt2_md_lora_e2e.pt.part").write_bytes(b"x" * 500)
    server = FakeServer(ignore_range=True)
    monkeypatch.setattr(download, "fetch", server)
    path = download.download_adapter("gpt2_md_lora_e2e", tmp_path, log=lambda s: None)
    assert server.starts == [500] and path.read_bytes() == PAYLOAD


def test_a_complete_part_file_is_finished_without_fetching_bytes(tmp_path, monkeypatch):
    (tmp_path / "gpt2_md_lora_e2e.pt.part").write_bytes(PAYLOAD)
    monkeypatch.setattr(download, "fetch", FakeServer())
    assert download.download_adapter("gpt2_md_lora_e2e", tmp_path, log=lambda s: None).read_bytes() == PAYLOAD


def test_a_checksum_mismatch_keeps_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch", FakeServer())
    wrong = "0" * 64
    with pytest.raises(download.ChecksumMismatchError, match=f"does not match the expected {wrong}"):
        download.download_adapter("roberta_base_lora_mnli", tmp_path, registry=_registry_with_sha(wrong),
                                  log=lambda s: None)
    assert list(tmp_path.iterdir()) == []
    # the right checksum: the file is kept, and no .sha256 record is needed
    right = hashlib.sha256(PAYLOAD).hexdigest()
    path = download.download_adapter("roberta_base_lora_mnli", tmp_path, registry=_registry_with_sha(right),
                                     log=lambda s: None)
    assert path.read_bytes() == PAYLOAD and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_download_offline_is_one_plain_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def offline(url, start, timeout=60.0):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(download, "fetch", offline)
    dest = tmp_path / "adapters"
    assert cli.main(["download", "roberta_base_lora_mnli", "--dest", str(dest)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: cannot download roberta_base_lora_mnli: github.com is unreachable")
    assert "by other means" in err and not dest.exists()
    assert cli.main(["download", "no_such_adapter"]) == 1
    assert "no released adapter named 'no_such_adapter'" in capsys.readouterr().err


def test_download_list(capsys):
    assert cli.main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "deberta_v2_xxlarge_lora_qqp" in out and "gpt2_lg_lora_webnlg" in out


def test_downloaded_keys_are_checked_against_the_registry(tmp_path, reg):
    a = reg.adapter("gpt2_md_lora_e2e")
    state = {"module." + k: torch.zeros(s) for k, s in a.expected_shapes().items()}
    torch.save({"model_state_dict": state}, tmp_path / "ok.pt")
    assert download.verify_keys(a, tmp_path / "ok.pt") == []
    state["module.transformer.h.0.attn.c_attn.lora_B"] = torch.zeros(2048, 8)
    torch.save({"model_state_dict": state}, tmp_path / "bad.pt")
    problems = download.verify_keys(a, tmp_path / "bad.pt")
    assert "lora_B has shape (2048, 8), registry says (2048, 4)" in problems[0]
    assert "inferred, not read from the file" in problems[-1]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """A local server with HTTP Range support; the first full GET is cut off half-way."""

    payload = PAYLOAD
    cut_first = True
    ranges = []

    def do_GET(self):
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        body = self.payload[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if not header and type(self).cut_first:
            type(self).cut_first = False
            self.wfile.write(body[:4096])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_real_fetch_resumes_over_http_with_a_range_request(tmp_path):
    _RangeHandler.cut_first, _RangeHandler.ranges = True, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # registry.json takes https URLs only; the local server speaks http, so swap the URL in afterwards
        reg = load_registry()
        local = dataclasses.replace(reg.adapter("roberta_base_lora_mnli"),
                                    url=f"http://127.0.0.1:{server.server_port}/roberta_base_lora_mnli.bin")
        registry = dataclasses.replace(reg, adapters={**reg.adapters, local.name: local})
        with pytest.raises(download.InterruptedDownloadError, match="at byte 4096 of 10240"):
            download.download_adapter("roberta_base_lora_mnli", tmp_path, registry=registry, log=lambda s: None)
        path = download.download_adapter("roberta_base_lora_mnli", tmp_path, registry=registry, log=lambda s: None)
        assert path.read_bytes() == PAYLOAD
        assert _RangeHandler.ranges == [None, "bytes=4096-"]
    finally:
        server.shutdown()
        server.server_close()


# -- compare ----------------------------------------------------------------------------------------

def _run(root: Path, name: str, config: dict | None, results: dict) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "eval_results.json").write_text(json.dumps(results))
    if config is not None:
        (folder / "run_config.json").write_text(json.dumps(config))


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "results"
    _run(root, "roberta-mnli", {"method": "lora", "model_name_or_path": "models/roberta-base", "lora": {"r": 8},
                                "loraplus_lr_ratio": None},
         {"task": "mnli", "split": "dev_matched", "num_examples": 9815, "accuracy": 0.8712,
          "mnli-mm": {"task": "mnli-mm", "split": "dev_mismatched", "num_examples": 9832, "accuracy": 0.8655}})
    _run(root, "v3-cola", {"method": "lora", "model_name_or_path": "microsoft/deberta-v3-base", "lora": {"r": 8}},
         {"task": "cola", "split": "dev", "num_examples": 1043, "matthews_correlation": 0.7031})
    _run(root, "demo/wn-lex-lora", {"method": "lora", "model_name_or_path": "models/all-MiniLM-L6-v2",
                                    "lora": {"r": 8}},
         {"task": "wn-lex", "split": "dev", "num_examples": 500, "accuracy": 0.614})
    return root


def test_compare_prints_reported_vs_measured_and_writes_a_png(results_dir, tmp_path, capsys):
    out = tmp_path / "chart.png"
    assert cli.main(["compare", str(results_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    # issue 14: the seeds and protocol columns (one run of a table that took 5 seeds, no per-epoch history)
    assert lines[0] == ("| run | model | method | task | metric | reported | measured | seeds | Δ | reported by "
                        "| protocol |")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| run ")]
    unmet = "1 of 5 seeds; last evaluation, not best epoch"
    assert rows == [
        "| demo/wn-lex-lora | all-MiniLM-L6-v2 | lora | wn-lex | accuracy | — | 61.40 | 1 |  | — | — |",
        f"| roberta-mnli | roberta-base | lora | mnli | accuracy | 87.50 ± 0.30 | 87.12 | 1/5 | -0.38 | lora | {unmet} |",
        "| roberta-mnli | roberta-base | lora | mnli | accuracy | 84.50 [unverified] | 87.12 | 1 | +2.62 | "
        "loraplus (equal lrs) | aggregation not stated (mean shown); selection not stated (final evaluation) |",
        f"| roberta-mnli | roberta-base | lora | mnli-mm | accuracy | 86.90 ± 0.30 | 86.55 | 1/5 | -0.35 | lora | {unmet} |",
        # AdaLoRA's table has LoRA at r=8 and r=2: the run's r picks the row
        "| v3-cola | microsoft/deberta-v3-base | lora | cola | matthews_correlation | 69.82 | 70.31 | 1/5 | +0.49 | "
        "adalora (r=8) | 1 of 5 seeds; selection not stated (final evaluation) |",
    ]
    assert "—: no paper in the registry reports that model / method / task / metric (1 of 5 rows; tasks wn-lex)" in text
    assert "not the papers' numbers" in text
    assert "[unverified]: not checked against the paper's own table." in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_compare_paper_filter_loraplus_method_and_default_chart(results_dir, capsys):
    _run(results_dir, "roberta-qnli-plus", {"method": "lora", "model_name_or_path": "roberta-base",
                                            "lora": {"r": 8}, "loraplus_lr_ratio": 80.0},
         {"task": "qnli", "split": "dev", "accuracy": 0.9166})
    assert compare.main([str(results_dir), "--paper", "lora"]) == 0
    text = capsys.readouterr().out
    assert "loraplus (equal lrs)" not in text
    assert "| roberta-qnli-plus | roberta-base | loraplus | qnli | accuracy | — | 91.66 | 1 |  | — | — |" in text
    assert "| v3-cola | microsoft/deberta-v3-base | lora | cola | matthews_correlation | — |" in text
    assert (results_dir / "compare.png").is_file()
    assert compare.main([str(results_dir), "--paper", "loraplus", "--out", str(results_dir / "p.png")]) == 0
    text = capsys.readouterr().out
    assert "| roberta-qnli-plus | roberta-base | loraplus | qnli | accuracy | 92.10 [unverified] | 91.66 | 1 | -0.44 |" in text
    assert compare.main([str(results_dir), "--paper", "lora2", "--out", str(results_dir / "q.png")]) == 0
    text = capsys.readouterr().out
    assert "rows of adalora stand in as the baseline" in text and "adalora (r=8)" in text


def test_compare_bad_input(tmp_path, capsys):
    assert compare.main([str(tmp_path / "missing")]) == 1
    assert "results folder not found" in capsys.readouterr().err
    assert compare.main([str(tmp_path)]) == 1
    assert "no eval_results.json under it" in capsys.readouterr().err
    _run(tmp_path, "broken", None, {"split": "dev", "accuracy": 0.5})
    assert compare.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "broken/eval_results.json" in err and 'no "task" string' in err


def test_an_evaluation_only_run_is_shown_but_not_matched(tmp_path):
    _run(tmp_path, "eval-only", None, {"task": "rte", "split": "dev", "accuracy": 0.86})
    rows = compare.compare_rows(compare.read_runs(tmp_path))
    assert [(r.task, r.reported, round(r.shown, 2)) for r in rows] == [("rte", None, 86.0)]
    assert "No run_config.json (an evaluation-only run)" in compare.markdown_table(rows, load_registry())
