"""gpt2_ft.py and gpt2_beam.py (examples/NLG; loralib.tasks.nlg.train / beam) against the LoRA paper's code and transformers.

- the loss: completion tokens only, with the original GPT2LMModel's label smoothing, held against a loss
  computed by hand from transformers' GPT-2 logits with the original's target / mask layout;
- the optimizer: the original optimizer.py's AdamW update, by hand, with and without bias correction;
- training end to end on a tiny GPT-2 (the loss falls; the files the original's beam script reads), and an
  interrupted run resumed to the same weights;
- beam search: gpt2_beam.py's predictions equal transformers' generate(num_beams, length_penalty,
  no_repeat_ngram_size) on the same (LoRA-merged) weights, the base model is the pretrained one, and LoRA
  factors change the output;
- bad input: a checkpoint of another size, bad flags, a malformed data line: one error, nothing written.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loralib.models import gpt2_checkpoint
from loralib.optim import GPT2FTAdamW
from loralib.tasks.nlg import beam, completion, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "NLG"))
import gpt2_beam  # noqa: E402  (the entry points: the original flags)
import gpt2_ft  # noqa: E402

EOS = 50256
VOCAB = 50257  # GPT-2's: the data carries <|endoftext|> = 50256


# -- fixtures ---------------------------------------------------------------------------------------

def tiny_hf(n_layer=2, seed=0, dropout=0.0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=n_layer, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # zero biases and unit LayerNorms would hide mistakes in loading them
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.transformer.wte.weight.mul_(25.0)  # logits of a useful size: a 16-wide N(0, 0.02) head is uniform
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2-tiny"
    tiny_hf().save_pretrained(folder)
    return folder


def write_encoded(path: Path, n=6, seed=0, context_len=(3, 7), completion_len=(3, 6)):
    """n lines of random ids: {"context": [...], "completion": [... , 50256]}."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        c = int(torch.randint(*context_len, (1,), generator=g))
        k = int(torch.randint(*completion_len, (1,), generator=g))
        lines.append({"context": torch.randint(100, 1000, (c,), generator=g).tolist(),
                      "completion": torch.randint(100, 1000, (k,), generator=g).tolist() + [EOS]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlg-data")
    return write_encoded(root / "train.jsonl")


def ft_args(data, base_dir, work_dir, *extra):
    return ["--train_data", str(data), "--valid_data", str(data), "--train_batch_size", "2", "--seq_len", "32",
            "--model_card", "gpt2.md", "--init_checkpoint", str(base_dir), "--lr", "0.02", "--correct_bias",
            "--adam_beta2", "0.999", "--warmup_step", "2", "--lora_dim", "4", "--lora_alpha", "32",
            "--lora_dropout", "0.1", "--label_smooth", "0.1", "--weight_decay", "0.01", "--log_interval", "1",
            "--work_dir", str(work_dir), "--random_seed", "110", "--disable_tqdm", *extra]


# -- data and loss ----------------------------------------------------------------------------------

def test_example_layout_is_the_originals():
    ex = completion.encode_example([5, 6], [7, 8, EOS], seq_len=16)
    assert ex["input_ids"] == [5, 6, EOS, 7, 8, EOS]
    assert ex["labels"] == [-100, -100, -100, 7, 8, EOS]
    # a context that already ends in <|endoftext|> (the original gpt2_encode.py --add_bos files) gets no second one
    assert completion.encode_example([5, 6, EOS], [7, EOS], seq_len=16)["input_ids"] == [5, 6, EOS, 7, EOS]
    cut = completion.encode_example([5, 6], [7, 8, 9, EOS], seq_len=4)
    assert cut == {"input_ids": [5, 6, EOS, 7], "labels": [-100, -100, -100, 7]}
    assert completion.encode_example([5, 6], [7, EOS], seq_len=16, joint_lm=True)["labels"] == [5, 6, EOS, 7, EOS]


def _original_loss(logits, ids, n_conditions, eps):
    """The original GPT2LMModel's loss from FT_Dataset's tensors: target = input shifted by one, mask 1 from
    position len(conditions) - 1 to the input's end, per-token (1 - eps) nll + eps * mean(-log p), then
    sum(loss * mask) / sum(mask) (the original adds 1e-4 to the denominator)."""
    total, count = 0.0, 0.0
    for b, (row, n_cond) in enumerate(zip(ids, n_conditions)):
        logp = F.log_softmax(logits[b].double(), -1)
        for t in range(n_cond - 1, len(row) - 1):
            nll = -logp[t, row[t + 1]]
            smooth = -logp[t].mean()
            total += float((1 - eps) * nll + eps * smooth)
            count += 1
    return total / count


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_is_the_original_smoothed_completion_loss(eps):
    hf = tiny_hf()
    from loralib.models import gpt2

    ours = gpt2.build(hf.config.to_dict(), "causal-lm")
    ours.load_state_dict(hf.state_dict(), strict=False)
    model = completion.CompletionLM(ours, label_smooth=eps).train()
    examples = [([11, 12, 13], [21, 22, EOS]), ([31, 32], [41, 42, 43, 44, EOS])]
    features = [completion.encode_example(c, k, seq_len=32) for c, k in examples]
    batch = completion.collate(features)
    loss = model(**batch).loss

    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits
    ids = [f["input_ids"] for f in features]
    want = _original_loss(logits, ids, [len(c) + 1 for c, _ in examples], eps)
    assert loss.item() == pytest.approx(want, rel=1e-5)

    # a changed context token changes nothing a label can see: its label stays -100
    changed = [completion.encode_example([99] + c[1:], k, seq_len=32) for c, k in examples]
    assert [f["labels"] for f in changed] == [f["labels"] for f in features]
    # eval mode is the plain cross-entropy, which is transformers' own loss on these labels
    model.eval()
    with torch.no_grad():
        hf_loss = hf(batch["input_ids"], labels=batch["labels"]).loss
    assert model(**batch).loss.item() == pytest.approx(hf_loss.item(), rel=1e-5)


# -- optimizer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("correct_bias", [True, False])
def test_adamw_is_the_original_update(correct_bias):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.01
    opt = GPT2FTAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, correct_bias=correct_bias)
    want = p.detach().clone()
    m = torch.zeros_like(want)
    v = torch.zeros_like(want)
    for t in (1, 2, 3):
        g = torch.randn_like(want)
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if correct_bias else lr
        want = want - size * m / (v.sqrt() + eps)
        want = want - lr * wd * want
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


def test_adamw_with_bias_correction_is_torchs_adam_without_eps():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours = GPT2FTAdamW([a], lr=0.01, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0, correct_bias=True)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_the_registry_builds_the_lora_repo_adamw_for_the_nlg_run():
    """gpt2_ft.py's optimizer comes from loralib.methods (OptimizerSettings.adamw="lora-repo"): GPT2FTAdamW over
    the original's groups (no decay on biases and LayerNorm weights under --no_decay_bias); not for LoRA+ or
    LoRA-Pro, whose optimizers are their own."""
    from loralib.methods import OptimizerSettings, build_optimizer, make_method
    from loralib.models import gpt2

    lm = gpt2.build(tiny_hf().config.to_dict(), "causal-lm")
    settings = OptimizerSettings(lr=0.1, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6, adamw="lora-repo",
                                 correct_bias=False, no_decay_bias=True)
    opt = build_optimizer(lm, make_method("full", None), settings)
    assert isinstance(opt, GPT2FTAdamW) and opt.defaults["correct_bias"] is False
    decayed, exempt = opt.param_groups
    names = {id(p): n for n, p in lm.named_parameters()}
    assert exempt["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.01
    assert all(names[id(p)].endswith("bias") or ".ln_" in names[id(p)] for p in exempt["params"])
    assert not any(names[id(p)].endswith("bias") for p in decayed["params"])
    lora = completion.nlg_lora(4, 32, 0.0)
    for method in (make_method("loraplus", lora), make_method("lorapro", lora)):
        with pytest.raises(ValueError, match="lora-repo"):
            build_optimizer(lm, method, settings)
    with pytest.raises(ValueError, match="adamw 'bert'"):
        build_optimizer(lm, make_method("full", None), OptimizerSettings(lr=0.1, adamw="bert"))


# -- training end to end ----------------------------------------------------------------------------

def _read_metrics(work_dir: Path):
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_the_originals_files(tmp_path, data, base_dir):
    work = tmp_path / "run"
    gpt2_ft.train_nlg(ft_args(data, base_dir, work, "--max_step", "24", "--eval_interval", "2",
                            "--save_interval", "12", "--lr", "0.1"))
    evals = [r["eval_loss"] for r in _read_metrics(work) if "eval_loss" in r]
    assert len(evals) == 12 and evals[-1] < evals[0] - 1.0, evals

    # model.<step>.pt at a --save_interval step and model.<last>.lora.pt: LoRA factors only, under
    # "model_state_dict", with the keys of the original's DDP-wrapped model; its load_weight() strips
    # "module.transformer." and loads into its GPT2Model, whose parameter names are ours without the
    # "transformer." prefix. (The last model.<step>.pt holds the whole model: the next test.)
    lora_keys = sorted(f"module.transformer.h.{i}.attn.c_attn.lora_{x}" for i in range(2) for x in "AB")
    for name in ("model.12.pt", "model.24.lora.pt"):
        saved = torch.load(work / name, weights_only=True)
        assert sorted(saved["model_state_dict"]) == lora_keys
    assert saved["model_state_dict"]["module.transformer.h.0.attn.c_attn.lora_A"].shape == (8, 16)  # [A_q; A_v]
    assert saved["model_state_dict"]["module.transformer.h.0.attn.c_attn.lora_B"].abs().sum() > 0
    assert (work / "adapter" / "adapter_config.json").is_file()

    config = json.loads((work / "run_config.json").read_text())
    # a tiny GPT-2 is not the gpt2.md card's model: recorded by its folder and size (tests/test_nlg_records.py)
    assert config["method"] == "lora" and config["model_name_or_path"] == str(base_dir)
    assert config["lora"]["r"] == 4 and config["lora"]["lora_alpha"] == 32
    assert config["lora"]["enable_lora"] == [True, False, True]

    # gpt2_beam.py reads both the original-format file and the adapter folder, to the same predictions
    common = ["--data", str(data), "--batch_size", "3", "--eval_len", "6", "--beam", "3",
              "--base_checkpoint", str(base_dir), "--model_card", "gpt2.md", "--work_dir", str(work)]
    gpt2_beam.run_beam(common + ["--init_checkpoint", str(work / "model.24.pt"), "--output_file", "a.jsonl"])
    gpt2_beam.run_beam(common + ["--init_checkpoint", str(work / "adapter"), "--output_file", "b.jsonl",
                            "--lora_alpha", "32"])
    assert (work / "a.jsonl").read_text() == (work / "b.jsonl").read_text()


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, data, base_dir, monkeypatch):
    args = ("--max_step", "6", "--eval_interval", "100", "--save_interval", "3")
    gpt2_ft.train_nlg(ft_args(data, base_dir, tmp_path / "whole", *args))

    class Crash(RuntimeError):
        pass

    def crash_after_first_save(self, state, path):
        if state.global_step == 3:
            raise Crash("power cut")

    with monkeypatch.context() as m:
        m.setattr(train.OriginalCheckpoints, "on_save", crash_after_first_save)
        with pytest.raises(Crash):
            gpt2_ft.train_nlg(ft_args(data, base_dir, tmp_path / "cut", *args))
    # a second start without --resume_from_checkpoint is refused rather than overwriting
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        gpt2_ft.train_nlg(ft_args(data, base_dir, tmp_path / "cut", *args))
    gpt2_ft.train_nlg(ft_args(data, base_dir, tmp_path / "cut", *args, "--resume_from_checkpoint", "latest"))

    whole = torch.load(tmp_path / "whole" / "model.6.pt", weights_only=True)["model_state_dict"]
    cut = torch.load(tmp_path / "cut" / "model.6.pt", weights_only=True)["model_state_dict"]
    assert whole.keys() == cut.keys()
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=0, atol=0)


def _original_load_weight(lm: torch.nn.Module, path: Path) -> None:
    """The original GPT2LMModel.load_weight(torch.load(--init_checkpoint)), read literally: unwrap
    "model_state_dict", strip "module.transformer.", keep the model's own tensor for every parameter the
    file lacks, load into the transformer with strict=False (other keys ignored), tie the head to wte."""
    state = torch.load(path, weights_only=True)
    state = state.get("model_state_dict", state)
    renamed = {(k[len("module.transformer."):] if k.startswith("module.transformer.") else k): v
               for k, v in state.items()}
    for name, p in lm.transformer.named_parameters():
        renamed.setdefault(name, p)
    lm.transformer.load_state_dict(renamed, strict=False)
    lm.lm_head.weight = lm.transformer.wte.weight


def test_the_last_checkpoint_is_the_whole_model_as_the_original_wrote_it(tmp_path, data, base_dir, monkeypatch):
    """Issue 21 (4): the original gpt2_ft.py's last model.<step>.pt is model.state_dict(), so its README's
    beam command (--init_checkpoint only, a randomly initialised GPT-2 underneath) decodes the trained model.
    Ours is the same, with the LoRA-only file beside it as model.<step>.lora.pt."""
    from loralib import load_adapter
    from loralib.models import gpt2

    work = tmp_path / "run"
    result = gpt2_ft.train_nlg(ft_args(data, base_dir, work, "--max_step", "4", "--save_interval", "2", "--lr", "0.1"))
    whole = torch.load(work / "model.4.pt", weights_only=True)["model_state_dict"]
    assert "module.transformer.wte.weight" in whole and "module.lm_head.decoder.weight" in whole
    assert "module.transformer.h.1.mlp.c_fc.weight" in whole and "module.transformer.h.1.attn.c_attn.lora_B" in whole
    assert all(k.startswith("module.") for k in whole)
    lora_only = torch.load(work / "model.4.lora.pt", weights_only=True)["model_state_dict"]
    assert lora_only.keys() < whole.keys()
    for key, value in lora_only.items():
        torch.testing.assert_close(whole[key], value, rtol=0, atol=0)
    summary = json.loads((work / "train_results.json").read_text())
    assert (summary["model_file"], summary["lora_file"]) == (str(work / "model.4.pt"), str(work / "model.4.lora.pt"))
    assert result.global_step == 4

    # the trained model: the pretrained GPT-2 with the final adapter
    trained = gpt2_checkpoint.load_gpt2(str(base_dir), "gpt2.md", completion.nlg_lora(4, 32, 0.0))
    load_adapter(trained, work / "adapter")
    ids = torch.tensor([[5, 6, 7, EOS, 9, 10]])
    with torch.no_grad():
        want = trained.eval()(ids).logits

    def original(path):  # the original gpt2_beam.py: GPT2LMModel(config) (random), then load_weight(file)
        torch.manual_seed(123)
        lm = gpt2.build(trained.hf_config, "causal-lm", None, completion.nlg_lora(4, 32, 0.0))
        _original_load_weight(lm, path)
        with torch.no_grad():
            return lm.eval()(ids).logits

    torch.testing.assert_close(original(work / "model.4.pt"), want, rtol=1e-5, atol=1e-5)
    # what the LoRA-only file gave the original's command: a random GPT-2 under the factors
    assert (original(work / "model.4.lora.pt") - want).abs().max() > 1e-2

    # ours decodes the whole-model file with --init_checkpoint only, as the original's command (no
    # --base_checkpoint, no models/ folder), to the predictions of the adapter on the pretrained model
    monkeypatch.setitem(gpt2_checkpoint.MODEL_CARDS, "gpt2.md", ("gpt2-medium", 16, 2, 2))
    monkeypatch.setattr(beam, "default_checkpoint", lambda card: pytest.fail("the base model was read"))
    common = ["--data", str(data), "--batch_size", "3", "--eval_len", "6", "--beam", "3", "--model_card", "gpt2.md",
              "--work_dir", str(work), "--lora_dim", "4", "--lora_alpha", "32"]
    gpt2_beam.run_beam(common + ["--init_checkpoint", str(work / "model.4.pt"), "--output_file", "whole.jsonl"])
    gpt2_beam.run_beam(common + ["--init_checkpoint", str(work / "adapter"), "--base_checkpoint", str(base_dir),
                            "--output_file", "adapter.jsonl"])
    assert (work / "whole.jsonl").read_text() == (work / "adapter.jsonl").read_text()


# -- beam search ------------------------------------------------------------------------------------

def _lora_file(path: Path, n_layer=2, n_embd=16, r=4, seed=1, zero_b=False):
    """A LoRA-only checkpoint in the original's layout, with random factors."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n_layer):
        state[f"module.transformer.h.{i}.attn.c_attn.lora_A"] = 0.3 * torch.randn(2 * r, n_embd, generator=g)
        b = 0.3 * torch.randn(2 * n_embd, r, generator=g)
        state[f"module.transformer.h.{i}.attn.c_attn.lora_B"] = torch.zeros_like(b) if zero_b else b
    torch.save({"model_state_dict": state}, path)
    return path


def _predictions(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_beam_search_is_transformers_generate_on_the_merged_weights(tmp_path, base_dir):
    import transformers
    from loralib.utils import merged_state_dict

    data = write_encoded(tmp_path / "test.jsonl", n=5, seed=3)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    lines.append(lines[0])  # a repeated context (E2E's several references) is decoded once, written twice
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    lora = _lora_file(tmp_path / "lora.pt")
    argv = ["--data", str(data), "--batch_size", "4", "--seq_len", "40", "--eval_len", "12", "--model_card",
            "gpt2.md", "--init_checkpoint", str(lora), "--base_checkpoint", str(base_dir), "--lora_alpha", "32",
            "--beam", "4", "--length_penalty", "0.8", "--no_repeat_ngram_size", "2", "--eos_token_id", "628",
            "--decoding", "transformers", "--work_dir", str(tmp_path), "--output_file", "predict.jsonl"]
    out = gpt2_beam.run_beam(argv)
    got = _predictions(out)
    assert [p["id"] for p in got] == list(range(len(lines)))

    ours = beam.load_model(gpt2_beam.parse(argv))
    hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    hf.load_state_dict(merged_state_dict(ours), strict=False)
    for line, pred in zip(lines, got):
        prompt = torch.tensor([line["context"] + [EOS]])
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, num_beams=4,
                          length_penalty=0.8, no_repeat_ngram_size=2, eos_token_id=[EOS, 628], pad_token_id=EOS,
                          do_sample=False, early_stopping=False)
        want = beam.continuation(ref[0, prompt.shape[1]:].tolist(), [EOS, 628])
        assert pred["predict"] == want

    # a decoding-only run says what it decoded, for `loralib compare`
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["method"] == "lora" and config["model_name_or_path"] == str(base_dir)  # tiny: not gpt2.md's
    assert config["lora"]["r"] == 4 and config["lora"]["lora_alpha"] == 32

    # the LoRA factors matter: the same file with B = 0 decodes like the base model alone
    _lora_file(tmp_path / "zero.pt", zero_b=True)
    gpt2_beam.run_beam(argv[:argv.index("--init_checkpoint") + 1] + [str(tmp_path / "zero.pt")]
                  + argv[argv.index("--init_checkpoint") + 2:-1] + ["zero.jsonl"])
    zero = _predictions(tmp_path / "zero.jsonl")
    assert zero != got
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    prompt = torch.tensor([lines[1]["context"] + [EOS]])
    ref = base.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, num_beams=4,
                        length_penalty=0.8, no_repeat_ngram_size=2, eos_token_id=[EOS, 628], pad_token_id=EOS,
                        do_sample=False)
    assert zero[1]["predict"] == beam.continuation(ref[0, prompt.shape[1]:].tolist(), [EOS, 628])


def test_a_bare_state_dict_file_loads_as_the_original_did(tmp_path, monkeypatch):
    """The original's --init_checkpoint was a bare GPT2Model state dict (gpt2-medium-pytorch_model.bin: keys
    h.N.*, wte, wpe, ln_f, the attn.bias mask buffers); its own files wrapped that in model_state_dict with DDP's
    module. prefix. Both load to transformers' logits. (A tiny stand-in for the gpt2.md card.)"""
    monkeypatch.setitem(gpt2_checkpoint.MODEL_CARDS, "gpt2.md", ("gpt2-medium", 16, 2, 2))
    hf = tiny_hf()
    bare = dict(hf.transformer.state_dict())
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(bare, tmp_path / "pytorch_model.bin")
    torch.save({"model_state_dict": {f"module.transformer.{k}": v for k, v in bare.items()}}, tmp_path / "model.pt")
    ids = torch.tensor([[5, 6, 7, EOS, 9]])
    with torch.no_grad():
        want = hf(ids).logits
    for name in ("pytorch_model.bin", "model.pt"):
        model = gpt2_checkpoint.load_gpt2(str(tmp_path / name), "gpt2.md", completion.nlg_lora(4, 32, 0.0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


# -- bad input --------------------------------------------------------------------------------------

def test_a_checkpoint_of_another_size_is_refused(tmp_path, data, base_dir, capsys):
    # a bare state-dict file (the original's gpt2-medium-pytorch_model.bin layout) must be the card's size
    hf_state = tiny_hf().transformer.state_dict()
    torch.save(hf_state, tmp_path / "pytorch_model.bin")
    work = tmp_path / "run"
    code = gpt2_ft.main(ft_args(data, base_dir, work, "--max_step", "1") +
                      ["--init_checkpoint", str(tmp_path / "pytorch_model.bin")])
    err = capsys.readouterr().err
    assert code == 2 and "pytorch_model.bin" in err and "n_embd=16" in err and "--model_card gpt2.md" in err
    assert not work.exists()

    # a known GPT-2 size under the wrong card is refused too (built on the meta device: no weights needed)
    with pytest.raises(ValueError, match=r"gpt2\.lg.*--model_card gpt2\.md"):
        gpt2_checkpoint.check_card("gpt2.md", 1280, 36, "gpt2-large", "--init_checkpoint", strict=False)

    # a LoRA file for a deeper GPT-2 than the base
    deep = _lora_file(tmp_path / "deep.pt", n_layer=3)
    code = gpt2_beam.main(["--data", str(data), "--init_checkpoint", str(deep), "--base_checkpoint", str(base_dir),
                      "--model_card", "gpt2.md", "--work_dir", str(tmp_path / "beam")])
    err = capsys.readouterr().err
    assert code == 2 and "deep.pt" in err and "n_layer=3" in err
    # without --base_checkpoint, the adapter's size must be the card's
    code = gpt2_beam.main(["--data", str(data), "--init_checkpoint", str(deep), "--model_card", "gpt2.md",
                      "--work_dir", str(tmp_path / "beam")])
    err = capsys.readouterr().err
    assert code == 2 and "deep.pt" in err and "--model_card" in err
    # a LoRA-only file is no pretrained model
    code = gpt2_ft.main(ft_args(data, base_dir, work, "--max_step", "1") + ["--init_checkpoint", str(deep)])
    assert code == 2 and "LoRA factors only" in capsys.readouterr().err
    assert not (tmp_path / "beam").exists() and not work.exists()


@pytest.mark.parametrize("flags, message", [
    (["--max_step", "0"], "--max_step must be >= 1"),
    ([], "set --max_epoch or --max_step"),
    (["--max_step", "2", "--scheduler", "inv_sqrt"], "--scheduler inv_sqrt is not supported"),
    (["--max_step", "2", "--label_smooth", "1.5"], "--label_smooth"),
])
def test_bad_training_flags(tmp_path, data, base_dir, capsys, flags, message):
    work = tmp_path / "run"
    assert gpt2_ft.main(ft_args(data, base_dir, work, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not work.exists()


def test_fp16_with_bf16_is_an_error(tmp_path, data, base_dir, capsys):
    """The drift issue 12 names: gpt2_ft.py's precision is loralib.train.run.precision_of, so --fp16 --bf16 is
    one error before anything is written (the old NLG driver's _precision silently picked bf16)."""
    work = tmp_path / "run"
    assert gpt2_ft.main(ft_args(data, base_dir, work, "--max_step", "1", "--fp16", "--bf16")) == 2
    assert "--fp16 and --bf16 exclude each other" in capsys.readouterr().err
    assert not work.exists()


def test_bad_beam_flags_and_data(tmp_path, base_dir, capsys):
    data = write_encoded(tmp_path / "test.jsonl", n=2)
    lora = _lora_file(tmp_path / "lora.pt")
    common = ["--init_checkpoint", str(lora), "--base_checkpoint", str(base_dir), "--work_dir", str(tmp_path / "o")]
    assert gpt2_beam.main(["--data", str(data), "--eval_len", "512", "--seq_len", "512", *common]) == 2
    assert "--eval_len 512 leaves no room" in capsys.readouterr().err
    assert gpt2_beam.main(["--data", str(data), "--lora_dim", "8", *common]) == 2
    assert "--lora_dim 8" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"context": [1, 2], "completion": "text"}\n')
    assert gpt2_beam.main(["--data", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bad\.jsonl:3\b", err), err
    assert not (tmp_path / "o").exists()


def test_a_second_run_into_a_held_work_dir_is_refused_before_it_writes(tmp_path, data, base_dir):
    """Issue 13 §3 for gpt2_ft.py: the work dir is locked before run_config.json is written, so a second run
    started while the first holds it writes nothing there."""
    import subprocess
    import sys

    from loralib.train.run_lock import OutputDirInUse

    work = tmp_path / "run"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
         "from loralib.train.run_lock import hold_output_dir; hold_output_dir(sys.argv[1]); "
         "print('held', flush=True); time.sleep(60)", str(work), str(Path(__file__).parents[1])],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirInUse):
            gpt2_ft.train_nlg(ft_args(data, base_dir, work, "--max_step", "2"))
        assert list(work.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_file_given_as_work_dir_is_one_error_before_anything_is_read(tmp_path, data, base_dir, capsys):
    """Issue 13 §6: a file as --work_dir (or on its way) was a traceback after the model was built."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    for work in (blocker, blocker / "run"):
        assert gpt2_ft.main(ft_args(data, base_dir, work, "--max_step", "2")) == 2
        err = capsys.readouterr().err
        assert "--work_dir" in err and "is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"
