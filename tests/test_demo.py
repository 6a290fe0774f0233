"""The offline demo: LoRA adapts the pretrained digits net far better than a new head alone."""
import importlib.util
from pathlib import Path

# demo/digits.py lives outside the package (`python demo/digits.py`): loaded by path
_spec = importlib.util.spec_from_file_location("demo_digits", Path(__file__).resolve().parents[1] / "demo" / "digits.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_demo_lora_beats_frozen_and_approaches_full(capsys):
    results = demo.main(["--epochs", "30", "--seed", "0"])
    frozen, low_rank, full = results.values()
    assert low_rank > frozen + 0.1
    assert low_rank > full - 0.05
    out = capsys.readouterr().out
    assert "LoRA merged for inference" in out and "reloaded" in out


def test_a_bad_rank_is_one_error():
    import pytest

    with pytest.raises(SystemExit) as stop:
        demo.main(["--rank", "-1"])
    assert stop.value.code == 2
