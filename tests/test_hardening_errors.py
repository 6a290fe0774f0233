"""Issue 13, class 6 (the GLUE / instruct / core cases): every error names its source, and what can be checked
before training is checked before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _glue_fixtures import write_glue_tsv  # noqa: E402
from _hardening_fixtures import write_tiny_roberta  # noqa: E402

from loralib.files import read_json  # noqa: E402
from loralib.tasks.glue import load_glue  # noqa: E402
from loralib.tasks.instruct import load_records  # noqa: E402
from loralib.tasks.instruct.data import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LATIN1 = "caf\xe9 au lait".encode("latin-1")


def test_python_dash_m_loralib_is_the_loralib_command():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run([sys.executable, "-m", "loralib", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "usage: loralib COMMAND" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "loralib", "nonsense"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr


def test_non_utf8_bytes_are_named_with_file_and_line(tmp_path):
    root = write_glue_tsv(tmp_path / "glue", tasks=("sst2",))
    tsv = root / "SST-2" / "train.tsv"
    lines = tsv.read_bytes().split(b"\n")
    lines[3] = LATIN1 + b"\t1"
    tsv.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=rf"{tsv}:4: not UTF-8 text \(byte b'\\xe9' at column 4\)"):
        load_glue("sst2", root, "train")

    jsonl = tmp_path / "metamath.jsonl"
    jsonl.write_bytes(b'{"query": "1+1?", "response": "2. The answer is: 2"}\n{"query": "' + LATIN1 + b'"}\n')
    with pytest.raises(DataError, match=rf"{jsonl}:2: not UTF-8 text"):
        load_records("metamath", jsonl)

    config = tmp_path / "adapter_config.json"
    config.write_bytes(b'{"r": 8, "note": "' + LATIN1 + b'"}')
    with pytest.raises(ValueError, match=rf"{config}:1: not UTF-8 text"):
        read_json(config, "missing")


def test_a_dev_set_with_only_its_header_is_refused_at_load(tmp_path):
    root = write_glue_tsv(tmp_path / "glue", tasks=("sst2",))
    dev = root / "SST-2" / "dev.tsv"
    dev.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=rf"{dev}: no dev examples in it \(only a header"):
        load_glue("sst2", root, "dev")


# -- run_glue.py: refused in prepare(), before anything is written -------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    return {"model": write_tiny_roberta(root / "roberta", max_positions=34),
            "glue": write_glue_tsv(root / "glue", tasks=("sst2",))}


def _glue(tiny, out, *extra, data=None):
    from test_run_glue import NLU

    argv = ["--model_name_or_path", str(tiny["model"]), "--task_name", "sst2", "--data_dir", str(data or tiny["glue"]),
            "--output_dir", str(out), "--do_train", "--do_eval", "--apply_lora", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", *extra]
    return NLU.main(argv)


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("examples/NLU/run_glue.py: error:")]
    assert len(err) == 1, err
    return err[0]


def test_output_dir_that_is_a_file_or_lies_on_one(tiny, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    capsys.readouterr()
    assert _glue(tiny, a_file) == 2
    assert f"--output_dir '{a_file}' is a file" in _one_line(capsys)
    assert _glue(tiny, a_file / "run") == 2
    assert f"'{a_file}' on its way is a file" in _one_line(capsys)


def test_a_read_only_output_folder_is_refused_before_the_model_is_built(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make access() answer as for an ordinary user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out else real(p, mode, *a, **k))
    import loralib.tasks.glue.run as driver
    monkeypatch.setattr(driver, "load_pretrained", lambda *a, **k: pytest.fail("the model was built"))
    capsys.readouterr()
    assert _glue(tiny, out) == 2
    assert "is not writable (read-only)" in _one_line(capsys)
    out.chmod(0o755)


def test_max_seq_length_beyond_the_models_positions(tiny, tmp_path, capsys):
    out = tmp_path / "long"
    capsys.readouterr()
    assert _glue(tiny, out, "--max_seq_length", "64", "--pad_to_max_length") == 2
    assert "has examples of 64 tokens but the model has 32 positions; pass --max_seq_length 32" in _one_line(capsys)
    assert not out.exists()


def test_a_deepspeed_typo_leaves_nothing_behind(tiny, tmp_path, capsys):
    out = tmp_path / "ds"
    capsys.readouterr()
    assert _glue(tiny, out, "--deepspeed", str(tmp_path / "ds_confg.json")) == 2
    assert "ds_confg.json" in _one_line(capsys)
    assert not out.exists()  # so the corrected rerun is not refused for a non-empty folder


def test_a_header_only_dev_set_fails_before_training(tiny, tmp_path, capsys):
    data = write_glue_tsv(tmp_path / "glue", tasks=("sst2",))
    (data / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n")
    out = tmp_path / "hdr"
    capsys.readouterr()
    assert _glue(tiny, out, data=data) == 2
    assert "dev.tsv: no dev examples" in _one_line(capsys)
    assert not out.exists()


def test_instruct_examples_beyond_gpt2_positions_are_refused_before_training(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from _glue_fixtures import make_tokenizer
    from test_lorapro_train import write_metamath

    from lorapro import train as lorapro_train

    tokenizer = make_tokenizer("gpt2")
    model_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16,
                                                         n_layer=1, n_head=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(model_dir), "--dataset", "metamath", "--data_path",
            str(write_metamath(tmp_path / "metamath.jsonl")), "--output_dir", str(out), "--n_train", "4", "--n_eval",
            "0", "--max_length", "256", "--global_batch_size", "4", "--disable_tqdm", "--no-bf16", "--lora", "lora",
            "--max_steps", "1"]
    capsys.readouterr()
    assert lorapro_train.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "but" in err[0] and "has 16 positions; pass --max_length 16 or less" in err[0], err
    assert not out.exists()


def test_a_missing_models_folder_says_how_to_fetch_it(tmp_path, monkeypatch):
    """`--model_name_or_path models/roberta-base` (the READMEs' layout) when that folder is missing: one error
    naming the flag and the download command, not a hub lookup of "models/roberta-base"."""
    from loralib.train.run import resolve_model_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--model_name_or_path 'models/roberta-base': no such model "
                                                 r"folder; fetch it with `python -m loralib.models.hub roberta-base`"):
        resolve_model_path("models/roberta-base")
    (tmp_path / "models" / "roberta-base").mkdir(parents=True)
    assert resolve_model_path("models/roberta-base").resolve() == (tmp_path / "models" / "roberta-base").resolve()


@pytest.mark.parametrize("variable, value", [("LORALIB_PROGRESS", "bogus"), ("LORALIB_PROGRESS_EVERY", "abc")])
def test_a_bad_progress_variable_is_refused_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch,
                                                                       variable, value):
    """It was read by the loop, after run_config.json was written, which then blocked the corrected rerun."""
    monkeypatch.setenv(variable, value)
    capsys.readouterr()
    assert _glue(tiny, tmp_path / "run") == 2
    assert f"{variable}={value!r}" in _one_line(capsys)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
