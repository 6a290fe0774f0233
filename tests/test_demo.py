"""The offline demo: LoRA adapts the pretrained digits net far better than a new head alone."""
from loralib import demo


def test_demo_lora_beats_frozen_and_approaches_full(capsys):
    results = demo.main(["--epochs", "30", "--seed", "0"])
    frozen, low_rank, full = results.values()
    assert low_rank > frozen + 0.1
    assert low_rank > full - 0.05
    out = capsys.readouterr().out
    assert "LoRA merged for inference" in out and "reloaded" in out
