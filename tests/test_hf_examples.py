"""The Trainer examples under examples/trainer/ (the seeds' LoRA+ and LoRA-Pro snippets, rewritten for
loralib.hf, and AdaLoRA's callback) run, on their tiny random model, and do what they say."""
import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


def _run(script, tmp_path, capsys, *extra):
    """The script's main() in this process (transformers is imported once for all of them)."""
    folder = str(REPO / "examples" / "trainer")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(folder, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--output_dir", str(tmp_path), "--max_steps", "10", *extra])
    finally:
        sys.path.remove(folder)
    return capsys.readouterr().out


@pytest.mark.parametrize("script,extra", [("loraplus_trainer.py", ()), ("lorapro_trainer.py", ("--rslora",)),
                                          ("lorapro_trainer.py", ("--lorapro_mode", "efficient"))])
def test_peft_examples_train_and_save_an_adapter(tmp_path, capsys, script, extra):
    from safetensors.torch import load_file

    stdout = _run(script, tmp_path, capsys, *extra)
    loss = float(stdout.rsplit("final training loss", 1)[1].split()[0])
    assert 0 < loss < 10
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] == ("--rslora" in extra)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    lora_B = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_B and all(t.abs().sum() > 0 for t in lora_B)  # B starts at 0: it was trained


def test_adalora_example_prunes_to_the_target_budget(tmp_path, capsys):
    stdout = _run("adalora_trainer.py", tmp_path, capsys)
    pattern = ast.literal_eval(stdout.rsplit("ranks after training:", 1)[1].strip().splitlines()[0])
    assert len(pattern) == 4 and sum(sum(kept) for kept in pattern.values()) == 4 * 4  # target_rank 4 of r 8
