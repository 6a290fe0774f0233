"""gpt2_beam.py's --init_checkpoint opens its adapter through loralib.adapter_files.open_adapter, so one GPT-2
LoRA decodes to the same tokens from every format it can be saved in:

- a PEFT folder (save_pretrained of transformers' GPT2LMHeadModel with peft's LoraConfig on c_attn), or its
  weights file: the tokens of PEFT's own merged model under transformers' generate();
- a gpt2_ft.py run: its loop checkpoint-<step>/, its run folder, its adapter/, its model.<step>.lora.pt (the
  original's layout, as microsoft's released files), its whole-model model.<step>.pt, and the same adapter
  exported to PEFT: the tokens of the adapter loaded directly into the base GPT-2;
- an adapter of another model family (a RoBERTa's, in each format) is one error naming --init_checkpoint,
  before anything is written.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import loralib as lora
from loralib.models import gpt2_checkpoint
from loralib.tasks.nlg import beam
from loralib.tasks.nlg.completion import nlg_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nlg_train import EOS, ft_args, gpt2_beam, gpt2_ft, tiny_hf, write_encoded  # noqa: E402

peft = pytest.importorskip("peft")
CARD = "gpt2.md"
SEARCH = dict(max_new_tokens=8, num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2-tiny"
    tiny_hf().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    return write_encoded(tmp_path_factory.mktemp("nlg") / "test.jsonl", n=4, seed=5)


def _decode(test_set, base_dir, checkpoint, work, name, *extra, decoding="transformers"):
    """gpt2_beam.py's predictions for --init_checkpoint `checkpoint` (a list of token lists)."""
    out = gpt2_beam.run_beam(["--data", str(test_set), "--batch_size", "3", "--seq_len", "40", "--eval_len",
                              str(SEARCH["max_new_tokens"]), "--beam", str(SEARCH["num_beams"]), "--length_penalty",
                              str(SEARCH["length_penalty"]), "--no_repeat_ngram_size",
                              str(SEARCH["no_repeat_ngram_size"]), "--model_card", CARD, "--base_checkpoint",
                              str(base_dir), "--init_checkpoint", str(checkpoint), "--decoding", decoding,
                              "--work_dir", str(work), "--output_file", f"{name}.jsonl", *extra])
    return [json.loads(line)["predict"] for line in out.read_text().splitlines()]


def _hf_generate(hf, test_set):
    """transformers' beam search on each prompt (context + <|endoftext|>), the continuation to its eos."""
    found = []
    for line in test_set.read_text().splitlines():
        prompt = torch.tensor([json.loads(line)["context"] + [EOS]])
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), eos_token_id=[EOS], pad_token_id=EOS,
                          do_sample=False, early_stopping=False, **SEARCH)
        found.append(beam.continuation(out[0, prompt.shape[1]:].tolist(), [EOS]))
    return found


def _peft_gpt2(base_dir, seed=0):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                    fan_in_fan_out=True, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_a_peft_gpt2_adapter_decodes_alike_from_every_format(tmp_path, base_dir, test_set):
    theirs = _peft_gpt2(base_dir)
    theirs.save_pretrained(str(tmp_path / "peft"))
    want = _hf_generate(copy.deepcopy(theirs).merge_and_unload().eval(), test_set)
    work = tmp_path / "beam"
    got = {name: _decode(test_set, base_dir, tmp_path / path, work, name)
           for name, path in (("folder", "peft"), ("weights", "peft/adapter_model.safetensors"))}
    for name, predictions in got.items():
        assert predictions == want, name
    # the adapter matters: the base model alone decodes otherwise
    import transformers
    assert _hf_generate(transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval(), test_set) != want
    # a decoding-only run says what it decoded (PEFT's LoRA is on the whole c_attn, at its rank)
    config = json.loads((work / "run_config.json").read_text())
    assert config["lora"] == {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "enable_lora": None}


def test_a_gpt2_ft_run_decodes_alike_from_every_file_it_wrote(tmp_path, base_dir, test_set):
    work = tmp_path / "run"
    gpt2_ft.train_nlg(ft_args(test_set, base_dir, work, "--max_step", "4", "--save_interval", "2", "--lr", "0.1"))
    assert (work / "checkpoint-4").is_dir() and (work / "model.4.lora.pt").is_file()
    direct = gpt2_checkpoint.load_gpt2(str(base_dir), CARD, nlg_lora(4, 32, 0.0))
    lora.load_adapter(direct, work / "adapter")
    lora.mark_only_lora_as_trainable(direct)  # what was trained: export_peft saves the trainable rest whole
    lora.export_peft(direct, tmp_path / "peft")
    prompts = beam.prompts(str(test_set), 40, SEARCH["max_new_tokens"])
    spec = gpt2_beam.parse(["--data", str(test_set), "--init_checkpoint", str(work), "--beam", "3",
                            "--length_penalty", "0.8", "--no_repeat_ngram_size", "2", "--eval_len", "8",
                            "--seq_len", "40"])
    want = beam.beam_search(direct.eval(), prompts, spec, torch.device("cpu"))

    out = tmp_path / "beam"
    for name, path in (("checkpoint", work / "checkpoint-4"), ("run", work), ("adapter", work / "adapter"),
                       ("lora_file", work / "model.4.lora.pt"), ("whole", work / "model.4.pt"),
                       ("peft", tmp_path / "peft")):
        assert _decode(test_set, base_dir, path, out, name, decoding="lora_repo") == want, name
    # an earlier checkpoint is another adapter
    assert _decode(test_set, base_dir, work / "checkpoint-2", out, "early", decoding="lora_repo") != want


def _roberta_adapters(root: Path):
    """A tiny RoBERTa LoRA in our folder (with its run's run_config.json), microsoft's NLU file layout and
    PEFT's folder."""
    from _tiny_hf import randomise_lora, tiny_roberta

    model = lora.inject(tiny_roberta(), ["query", "value"], r=2, lora_alpha=4)
    randomise_lora(model)
    lora.save_adapter(model, root / "ours" / "adapter")
    (root / "ours" / "run_config.json").write_text(json.dumps({"model_type": "roberta"}))
    torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, root / "roberta_base_lora_sst2.bin")
    theirs = peft.get_peft_model(tiny_roberta(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    theirs.save_pretrained(str(root / "peft"))
    lora.save_adapter(model, root / "no_run")  # no run_config.json: its family unknown, its targets not GPT-2's
    return {"ours": root / "ours", "no_run": root / "no_run", "nlu_file": root / "roberta_base_lora_sst2.bin",
            "peft": root / "peft"}


def test_an_adapter_of_another_family_is_one_error_naming_the_flag(tmp_path, base_dir, test_set, capsys):
    work = tmp_path / "beam"
    for name, path in _roberta_adapters(tmp_path).items():
        code = gpt2_beam.main(["--data", str(test_set), "--model_card", CARD, "--base_checkpoint", str(base_dir),
                               "--init_checkpoint", str(path), "--work_dir", str(work)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, (name, err)
        assert "--init_checkpoint" in err and str(path) in err, (name, err)
        if name in ("ours", "nlu_file"):  # the others do not say their model; they name modules GPT-2 lacks
            assert "roberta model" in err, (name, err)
        else:
            assert "query" in err, (name, err)
    assert not work.exists()


def test_a_peft_adapter_keeps_its_own_alpha(tmp_path, base_dir, test_set, capsys):
    """PEFT records lora_alpha per module (alpha_pattern): a different --lora_alpha is refused, not ignored."""
    _peft_gpt2(base_dir).save_pretrained(str(tmp_path / "peft"))
    argv = ["--data", str(test_set), "--model_card", CARD, "--base_checkpoint", str(base_dir), "--init_checkpoint",
            str(tmp_path / "peft"), "--work_dir", str(tmp_path / "beam")]
    assert gpt2_beam.main(argv + ["--lora_alpha", "32"]) == 2
    assert "--lora_alpha 32, but the PEFT adapter" in capsys.readouterr().err
    assert gpt2_beam.main(argv + ["--lora_dim", "8"]) == 2
    assert "--lora_dim 8, but the adapter" in capsys.readouterr().err
    assert not (tmp_path / "beam").exists()
    assert gpt2_beam.main(argv + ["--lora_alpha", "8", "--lora_dim", "4", "--eval_len", "4"]) == 0
