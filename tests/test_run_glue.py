"""The three run_glue.py entry points end to end, in-process, on tiny random models and tiny GLUE folders.

Models (random weights, transformers' save_pretrained + the offline tokenizers of _glue_fixtures) and GLUE
files in the official layout are written once per module; every run trains a few steps at most.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _glue_fixtures import make_tokenizer, write_glue_tsv  # noqa: E402

transformers = pytest.importorskip("transformers")

from loralib.tasks.glue import run as glue  # noqa: E402
from loralib.train import run as skeleton  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D = 16  # hidden size of the tiny encoders
ALL_MODULES = "query,key,value,intermediate,layer.output,attention.output"


def _entry(relpath: str):
    spec = importlib.util.spec_from_file_location("run_glue_" + relpath.split("/")[0].lower(), REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NLU, LORA2, LORAPLUS = (_entry(p) for p in ("examples/NLU/run_glue.py", "lora2/run_glue.py", "loraplus/run_glue.py"))
ADAPTIVE = sys.modules["glue_entry"]  # lora2/glue_entry.py: the lora2 flags (--svd_layer adalora unless given)
ENTRIES = {"nlu": NLU, "lora2": ADAPTIVE, "loraplus": LORAPLUS}


def _parse(argv, flavour):
    """The flags as the entry point of `flavour` parses them."""
    return ENTRIES[flavour].parse_args(argv)


def _prepare(args, flavour):
    """prepare() of the GlueRun the entry point makes of its flags (writes nothing)."""
    return glue.prepare(ENTRIES[flavour].glue_run(args))


def _run_glue(argv, flavour):
    return ENTRIES[flavour].run_glue(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"glue": GLUE folder, "roberta" | "deberta" | "gpt2" | "llama": model folder}."""
    root = tmp_path_factory.mktemp("run_glue")
    out = {"glue": write_glue_tsv(root / "glue")}
    torch.manual_seed(0)
    common = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    models = {
        "roberta": transformers.RobertaModel(transformers.RobertaConfig(
            vocab_size=64, max_position_embeddings=80, **common), add_pooling_layer=False),
        "deberta": transformers.DebertaV2Model(transformers.DebertaV2Config(
            vocab_size=64, max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
            position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
            type_vocab_size=0, **common)),
        "gpt2": transformers.GPT2Model(transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=D, n_layer=2,
                                                               n_head=2)),
    }
    llama_tokenizer = make_tokenizer("llama")
    models["llama"] = transformers.LlamaModel(transformers.LlamaConfig(  # vocab = the tokenizer's: [PAD] must grow it
        vocab_size=len(llama_tokenizer), hidden_size=D, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    for name, model in models.items():
        model.save_pretrained(root / name)
        (llama_tokenizer if name == "llama" else make_tokenizer(name)).save_pretrained(root / name)
        out[name] = root / name
    return out


def _base(files, model, task, out, *extra):
    return ["--model_name_or_path", str(files[model]), "--task_name", task, "--data_dir", str(files["glue"]),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--learning_rate", "1e-3", "--disable_tqdm", *extra]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _released_roberta_file(path: Path, num_labels: int = 3, r: int = 8, hidden: int = D, seed: int = 0) -> Path:
    """A file in the layout of microsoft's roberta_base_lora_{task}.bin: LoRA on query/value + the head."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        for proj in ("query", "value"):
            key = f"roberta.encoder.layer.{i}.attention.self.{proj}"
            sd[f"{key}.lora_A"] = torch.randn(r, hidden, generator=g)
            sd[f"{key}.lora_B"] = torch.randn(hidden, r, generator=g)
    sd["classifier.dense.weight"] = torch.randn(hidden, hidden, generator=g)
    sd["classifier.dense.bias"] = torch.randn(hidden, generator=g)
    sd["classifier.out_proj.weight"] = torch.randn(num_labels, hidden, generator=g)
    sd["classifier.out_proj.bias"] = torch.randn(num_labels, generator=g)
    torch.save(sd, path)
    return path


# -- examples/NLU --------------------------------------------------------------------------------------

def test_nlu_train_and_eval_mnli_reports_matched_and_mismatched(files, tmp_path):
    out = tmp_path / "mnli"
    argv = _base(files, "roberta", "mnli", out, "--do_train", "--do_eval", "--apply_lora", "--lora_r", "4",
                 "--max_steps", "3", "--evaluation_strategy", "steps", "--eval_steps", "2", "--save_steps", "2")
    assert NLU.main(argv) == 0
    results = _json(out / "eval_results.json")
    assert (results["task"], results["split"], results["num_examples"]) == ("mnli", "dev_matched", 6)
    assert set(results) == {"task", "split", "num_examples", "accuracy", "mnli-mm"}
    assert results["mnli-mm"]["split"] == "dev_mismatched" and 0.0 <= results["mnli-mm"]["accuracy"] <= 1.0
    train = _json(out / "train_results.json")
    assert train["global_step"] == 3 and train["best_step"] in (2, 3)
    config = _json(out / "run_config.json")
    assert (config["method"], config["num_labels"], config["lora"]["r"], config["lora"]["lora_alpha"]) == ("lora", 3, 4, 8)
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "best_adapter").is_dir()
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()


@pytest.mark.parametrize("task, metrics, train", [("stsb", {"pearson", "spearmanr"}, True),
                                                  ("cola", {"matthews_correlation"}, False),
                                                  ("mrpc", {"accuracy", "f1"}, False)])
def test_nlu_metric_names(files, tmp_path, task, metrics, train):
    argv = _base(files, "roberta", task, tmp_path / task, "--do_eval", "--apply_lora", "--max_steps", "2",
                 "--save_strategy", "no", *(["--do_train"] if train else []))
    assert NLU.main(argv) == 0
    results = _json(tmp_path / task / "eval_results.json")
    assert set(results) == {"task", "split", "num_examples"} | metrics
    assert results["task"] == task and results["split"] == "dev"


def test_full_finetuning_without_apply_lora_trains_everything(files, tmp_path):
    result = _run_glue(_base(files, "roberta", "sst2", tmp_path / "full", "--do_train", "--max_steps", "1",
                                   "--save_strategy", "no"), "nlu")
    assert all(p.requires_grad for p in result.model.parameters())
    assert _json(tmp_path / "full" / "run_config.json")["method"] == "full"


def test_released_adapter_file_evaluates(files, tmp_path):
    adapter = _released_roberta_file(tmp_path / "roberta_base_lora_mnli.bin")
    # the original command names r and alpha; without them they are read from the file (alpha = 2 r)
    for i, flags in enumerate((["--apply_lora", "--lora_r", "8", "--lora_alpha", "16"], [])):
        out = tmp_path / f"eval{i}"
        result = _run_glue(_base(files, "roberta", "mnli", out, "--do_eval", "--lora_path", str(adapter), *flags),
                                 "nlu")
        assert set(_json(out / "eval_results.json")) == {"task", "split", "num_examples", "accuracy", "mnli-mm"}
        layer = result.model.roberta.encoder.layer[1].attention.self.value
        expected = torch.load(adapter)
        assert torch.equal(layer.lora_B.detach(), expected["roberta.encoder.layer.1.attention.self.value.lora_B"])
        assert torch.equal(result.model.classifier.out_proj.weight.detach(), expected["classifier.out_proj.weight"])
        assert layer.scaling == 2.0
    assert NLU.main(_base(files, "roberta", "mnli", tmp_path / "e3", "--do_eval", "--lora_path", str(adapter))) == 0


def test_training_from_an_mnli_adapter_keeps_its_lora_and_starts_a_new_head(files, tmp_path, caplog):
    adapter = _released_roberta_file(tmp_path / "mnli.bin")
    args = _parse(_base(files, "roberta", "mrpc", tmp_path / "mrpc", "--do_train", "--apply_lora",
                                   "--lora_path", str(adapter)), "nlu")
    with caplog.at_level("WARNING"):
        prepared = _prepare(args, "nlu")
    assert "trained for 3 labels" in caplog.text
    query = prepared.model.roberta.encoder.layer[0].attention.self.query
    assert torch.equal(query.lora_A.detach(), torch.load(adapter)["roberta.encoder.layer.0.attention.self.query.lora_A"])
    assert prepared.model.classifier.out_proj.weight.shape == (2, D)
    assert not (tmp_path / "mrpc").exists()  # prepare writes nothing


def test_our_adapter_folder_reproduces_the_trained_model(files, tmp_path):
    out = tmp_path / "train"
    trained = _run_glue(_base(files, "roberta", "rte", out, "--do_train", "--do_eval", "--apply_lora",
                                    "--lora_r", "2", "--max_steps", "3", "--save_strategy", "no"), "nlu")
    again = _run_glue(_base(files, "roberta", "rte", tmp_path / "eval", "--do_eval", "--lora_path",
                                  str(out / "adapter")), "nlu")
    assert again.eval_results == trained.eval_results
    for (name, p), (_, q) in zip(trained.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), name


# -- lora2 ---------------------------------------------------------------------------------------------

def _adaptive_argv(files, out, *extra):
    return _base(files, "deberta", "mrpc", out, "--do_train", "--do_eval", "--apply_lora", "--lora_type", "svd",
                 "--lora_r", "4", "--target_rank", "1", "--init_warmup", "1", "--final_warmup", "1",
                 "--mask_interval", "1", "--reg_orth_coef", "0.1", "--lora_module", ALL_MODULES, "--max_steps", "6",
                 "--save_strategy", "no", *extra)


@pytest.mark.parametrize("switch, layer_type", [(["--apply_adalora"], "SVDLinear"),
                                                (["--apply_rankselector", "--apply_lora2", "--lora2_k", "2"], "LoRA2Linear")])
def test_lora2_rank_allocation_changes_ranks_and_saves_the_pattern(files, tmp_path, switch, layer_type):
    out = tmp_path / "run"
    result = _run_glue(_adaptive_argv(files, out, *switch), "lora2")
    pattern = _json(out / "rank_pattern.json")["rank_pattern"]
    assert len(pattern) == 12 and all(len(keep) == 4 for keep in pattern.values())  # 2 layers x 6 matrices, r 4
    assert sum(map(sum, pattern.values())) == 12  # the final budget: target_rank 1 per matrix
    assert _json(out / "adapter" / "rank_pattern.json")["rank_pattern"] == pattern
    layers = [m for m in result.model.modules() if type(m).__name__ == layer_type]
    assert len(layers) == 12
    for layer in layers:  # pruned triplets have E = 0
        assert torch.all(layer.lora_E.detach()[~layer.rank_mask] == 0)
    assert set(_json(out / "eval_results.json")) == {"task", "split", "num_examples", "accuracy", "f1"}


def test_lora2_resume_after_a_crash_is_exact(files, tmp_path, caplog):
    """A run cut after its step-3 checkpoint and resumed ends with the uninterrupted run's adapter and ranks."""
    from safetensors.torch import load_file

    argv = _adaptive_argv(files, tmp_path / "run", "--apply_adalora", "--save_strategy", "steps", "--save_steps", "3")
    argv.remove("--do_eval")
    assert LORA2.main(argv) == 0
    full = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    pattern = _json(tmp_path / "run" / "rank_pattern.json")
    for name in ("checkpoint-6", "adapter", "rank_pattern.json", "train_results.json"):  # the crash
        path = tmp_path / "run" / name
        __import__("shutil").rmtree(path) if path.is_dir() else path.unlink()
    with caplog.at_level("INFO", logger="loralib.train.loop"):
        assert LORA2.main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert "checkpoint-3 at step 3" in caplog.text
    resumed = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    assert _json(tmp_path / "run" / "rank_pattern.json") == pattern


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3])
def test_lora2_cls_dropout_is_honoured_under_the_paper_recipe(files, tmp_path, p):
    # the LoRA² paper's table gives a head dropout per task; --recipe paper honours it
    args = _parse(_adaptive_argv(files, tmp_path / "x", "--apply_lora2", "--cls_dropout", str(p),
                                            "--recipe", "paper"), "lora2")
    model = _prepare(args, "lora2").model
    assert model.dropout.p == p and model.hf_config["cls_dropout"] == p
    roberta = _prepare(_parse(_base(files, "roberta", "rte", tmp_path / "y", "--do_eval",
                                    "--cls_dropout", str(p)), "nlu"), "nlu").model
    assert roberta.classifier.dropout.p == p
    adalora = _prepare(_parse(_adaptive_argv(files, tmp_path / "z", "--apply_adalora",
                                             "--cls_dropout", str(p)), "lora2"), "lora2").model
    assert adalora.dropout.p == p  # AdaLoRA's code honoured the flag under either recipe


def test_lora2_released_recipe_fixes_the_head_dropout_at_0_15(files, tmp_path):
    # the released LoRA² run_glue.py ignored --cls_dropout and hard-coded 0.15: the default recipe runs that
    args = _parse(_adaptive_argv(files, tmp_path / "x", "--apply_lora2", "--cls_dropout", "0.2"), "lora2")
    with pytest.warns(UserWarning, match="--cls_dropout 0.2 is ignored for LoRA² under --recipe released"):
        model = _prepare(args, "lora2").model
    assert args.recipe == "released" and model.dropout.p == 0.15 and model.hf_config["cls_dropout"] == 0.15


def test_an_original_lora2_command_builds_lora2_and_adalora_has_its_own_entry_point(files, tmp_path):
    """The LoRA² scripts write AdaLoRA's command (--apply_adalora --lora_type svd, no --apply_lora2); in the
    LoRA² repository its loralib made that LoRA²'s layer with k = 8. lora2/run_glue.py keeps that meaning;
    lora2/run_glue_adalora.py keeps AdaLoRA's, and --svd_layer chooses explicitly."""
    adalora_entry = _entry("lora2/run_glue_adalora.py")
    cases = [(LORA2, [], "LoRA2Linear", "lora2"), (adalora_entry, [], "SVDLinear", "adalora"),
             (LORA2, ["--svd_layer", "adalora"], "SVDLinear", "adalora"),
             (adalora_entry, ["--svd_layer", "lora2"], "LoRA2Linear", "lora2")]
    for i, (entry, extra, layer_type, method) in enumerate(cases):
        out = tmp_path / f"run{i}"
        argv = _adaptive_argv(files, out, "--apply_adalora", "--max_steps", "3", *extra)
        assert entry.main(argv) == 0, (entry, extra)
        config = _json(out / "run_config.json")
        assert config["method"] == method and config["lora"]["method"] == method, (entry, extra)
        assert config["recipe"] == "released"
        if method == "lora2":
            assert config["lora"]["lora2_k"] == 8  # the LoRA² repository's fixed inner rank
    assert _parse(_adaptive_argv(files, tmp_path), "lora2").svd_layer == "adalora"  # the driver's default
    layers = {type(m).__name__ for m in _run_glue(
        ["--svd_layer", "lora2"] + _adaptive_argv(files, tmp_path / "x", "--apply_adalora", "--max_steps", "3"),
        "lora2").model.modules()}
    assert "LoRA2Linear" in layers and "SVDLinear" not in layers


def test_lora_a_init_normal_draws_from_the_initializer_range(files, tmp_path):
    """--lora_a_init normal: lora_A ~ N(0, 0.02) (the DeBERTa fork's _init_weights); B stays zero."""
    def a_factors(*extra):
        args = _parse(_base(files, "deberta", "rte", tmp_path / "o", "--do_train", "--apply_lora",
                                       "--lora_r", "8", *extra), "nlu")
        model = _prepare(args, "nlu").model
        return ([p for n, p in model.named_parameters() if n.endswith("lora_A")],
                [p for n, p in model.named_parameters() if n.endswith("lora_B")])
    normal, b = a_factors("--lora_a_init", "normal")
    kaiming, _ = a_factors()
    values = torch.cat([p.detach().flatten() for p in normal])
    assert len(normal) == 4 and all(torch.count_nonzero(p) == 0 for p in b)
    assert abs(values.std().item() - 0.02) < 0.004 and abs(values.mean().item()) < 0.004
    # loralib's default: kaiming uniform with a = sqrt(5), bound 1 / sqrt(in_features) = 0.25 here
    assert torch.cat([p.detach().flatten() for p in kaiming]).abs().max() > 0.1
    with pytest.raises(ValueError, match="has no lora_A"):
        _prepare(_parse(_base(files, "deberta", "rte", tmp_path / "o", "--do_eval",
                              "--lora_a_init", "normal"), "nlu"), "nlu")


def test_lora2_root_output_dir(files, tmp_path):
    argv = [a for a in _adaptive_argv(files, tmp_path / "unused", "--apply_adalora") if a != str(tmp_path / "unused")]
    argv.remove("--output_dir")
    assert LORA2.main(argv + ["--root_output_dir", str(tmp_path / "root")]) == 0
    assert (tmp_path / "root" / "model" / "eval_results.json").is_file()


# -- loraplus ------------------------------------------------------------------------------------------

def test_loraplus_gpt2_builds_the_loraplus_groups(files, tmp_path):
    out = tmp_path / "gpt2"
    argv = _base(files, "gpt2", "sst2", out, "--target_modules", "c_attn, c_proj, c_fc", "--loraplus_lr_ratio", "16",
                 "--lora_rank", "2", "--lora_alpha", "2", "--max_steps", "2", "--save_strategy", "no")
    result = _run_glue(argv, "loraplus")  # --do_train and --do_eval are on by default, as in LoRA+
    groups = {g["name"]: g for g in _json(out / "train_results.json")["param_groups"]}
    assert list(groups) == ["lora_A", "embedding", "lora_B", "lora_B_nd"]
    assert [groups[n]["lr"] for n in groups] == pytest.approx([1e-3, 1e-6, 1.6e-2, 1.6e-2])
    named = dict(result.model.named_parameters())
    numel = lambda pred: sum(p.numel() for n, p in named.items() if p.requires_grad and pred(n))  # noqa: E731
    assert groups["lora_A"]["numel"] == numel(lambda n: "lora_B" not in n and named[n].ndim > 1)
    assert groups["lora_B"]["numel"] == numel(lambda n: "lora_B" in n) > 0
    assert groups["embedding"]["numel"] == 0 and groups["lora_A"]["numel"] > numel(lambda n: n == "score.weight")
    assert set(_json(out / "eval_results.json")) == {"task", "split", "num_examples", "accuracy"}
    assert result.model.transformer.h[0].attn.c_attn.has_lora and result.model.transformer.h[1].mlp.c_proj.has_lora


def test_loraplus_init_and_trainable_head(files, tmp_path):
    def prepared(model, *extra):
        return _prepare(_parse(_base(files, model, "rte", tmp_path / "p", "--no_do_train",
                                     "--target_modules", "query, value", *extra), "loraplus"), "loraplus").model

    swapped, original = prepared("roberta"), prepared("roberta", "--use_original_init")
    q_swapped, q_original = (m.roberta.encoder.layer[0].attention.self.query for m in (swapped, original))
    assert torch.count_nonzero(q_swapped.lora_A) == 0 and torch.count_nonzero(q_swapped.lora_B) > 0
    assert torch.count_nonzero(q_original.lora_B) == 0 and torch.count_nonzero(q_original.lora_A) > 0
    # the LoRA+ script's spelling of the flag
    q = prepared("roberta", "--lora_use_original_init").roberta.encoder.layer[0].attention.self.query
    assert torch.count_nonzero(q.lora_B) == 0
    # RoBERTa: out_proj trained, classifier.dense frozen (as in the LoRA+ GLUE script)
    assert swapped.classifier.out_proj.weight.requires_grad and not swapped.classifier.dense.weight.requires_grad
    assert not swapped.roberta.embeddings.word_embeddings.weight.requires_grad


def test_loraplus_llama_adds_a_pad_token(files, tmp_path):
    out = tmp_path / "llama"
    argv = _base(files, "llama", "rte", out, "--target_modules", "q_proj, v_proj", "--loraplus_lr_ratio", "4",
                 "--max_steps", "2", "--save_strategy", "no", "--lr_scheduler_type", "constant")
    result = _run_glue(argv, "loraplus")
    vocab = len(make_tokenizer("llama"))
    embedding = result.model.model.embed_tokens
    assert embedding.num_embeddings == vocab + 1 and result.model.hf_config["vocab_size"] == vocab + 1
    assert torch.allclose(embedding.weight[-1], embedding.weight[:-1].mean(0), atol=1e-6)
    assert set(_json(out / "eval_results.json")) == {"task", "split", "num_examples", "accuracy"}


# -- bad input: one clear error each, nothing written ----------------------------------------------------

def _refused(entry, argv, capsys, out: Path, phrase: str) -> None:
    assert entry.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and phrase in err, err
    assert not out.exists(), sorted(out.rglob("*"))


def test_error_unknown_task(files, tmp_path, capsys):
    _refused(NLU, _base(files, "roberta", "nope", tmp_path / "o", "--do_eval"), capsys, tmp_path / "o",
             "unknown GLUE task 'nope'")


def test_error_missing_split_files(files, tmp_path, capsys):
    empty = tmp_path / "empty_glue"
    empty.mkdir()
    argv = _base(files, "roberta", "rte", tmp_path / "o", "--do_train") + ["--data_dir", str(empty)]
    _refused(NLU, argv, capsys, tmp_path / "o", "RTE/train.tsv")


def test_error_adapter_label_count(files, tmp_path, capsys):
    adapter = _released_roberta_file(tmp_path / "mnli.bin", num_labels=3)
    _refused(NLU, _base(files, "roberta", "sst2", tmp_path / "o", "--do_eval", "--lora_path", str(adapter)),
             capsys, tmp_path / "o", "trained for 3 labels")


def test_error_adapter_of_another_model(files, tmp_path, capsys):
    adapter = _released_roberta_file(tmp_path / "mnli.bin")
    _refused(NLU, _base(files, "deberta", "mnli", tmp_path / "o", "--do_eval", "--lora_path", str(adapter)),
             capsys, tmp_path / "o", "holds adapters of a roberta model")
    wide = _released_roberta_file(tmp_path / "wide.bin", hidden=2 * D)  # another model size
    _refused(NLU, _base(files, "roberta", "mnli", tmp_path / "o", "--do_eval", "--lora_path", str(wide)),
             capsys, tmp_path / "o", "another model size")
    _refused(NLU, _base(files, "roberta", "mnli", tmp_path / "o", "--do_eval", "--lora_path", str(tmp_path / "no.bin")),
             capsys, tmp_path / "o", "does not exist")


@pytest.mark.parametrize("extra, phrase", [
    (["--apply_adalora", "--lora_type", "svd"], "--apply_adalora needs --target_rank"),
    (["--apply_adalora", "--target_rank", "1", "--lora_type", "frd"], "add --lora_type svd"),
    (["--apply_lora", "--lora_module", "query,feed_forward"], "'feed_forward' matches no projection"),
    (["--apply_adalora", "--lora_type", "svd", "--target_rank", "1", "--init_warmup", "3", "--final_warmup", "3"],
     "leaves no budgeting phase"),
])
def test_error_lora2_flag_combinations(files, tmp_path, capsys, extra, phrase):
    argv = _base(files, "deberta", "rte", tmp_path / "o", "--do_train", "--max_steps", "4", *extra)
    _refused(LORA2, argv, capsys, tmp_path / "o", phrase)


def test_error_output_dir_holds_files(files, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = _base(files, "roberta", "rte", out, "--do_train", "--apply_lora", "--max_steps", "1", "--save_strategy", "no")
    assert NLU.main(argv) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # with --overwrite_output_dir: runs, twice, and removes only what a run wrote
    for _ in range(2):
        assert NLU.main(argv + ["--overwrite_output_dir", "--save_strategy", "steps", "--save_steps", "1"]) == 0
    assert NLU.main(argv + ["--overwrite_output_dir"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob("checkpoint-*"))


def test_error_model_not_found_and_hub_offline(files, tmp_path, capsys, monkeypatch):
    import loralib.models.hub as hub

    missing = {**files, "nowhere": tmp_path / "missing"}
    _refused(NLU, _base(missing, "nowhere", "rte", tmp_path / "o", "--do_eval"), capsys, tmp_path / "o",
             "no such model folder")

    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(hub, "_snapshot_download", offline)
    monkeypatch.setattr(skeleton, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", "roberta-base", "--task_name", "rte", "--data_dir", str(files["glue"]),
            "--do_eval", "--output_dir", str(tmp_path / "o")]
    _refused(NLU, argv, capsys, tmp_path / "o", "the Hugging Face hub is unreachable")


@pytest.mark.parametrize("entry, model, extra, phrase", [
    ("nlu", "roberta", [], "nothing to do"),
    ("nlu", "roberta", ["--do_eval", "--fp16", "--bf16"], "exclude each other"),
    ("loraplus", "gpt2", ["--cls_dropout", "0.1"], "gpt2 classifier has no dropout"),
    ("loraplus", "gpt2", [], "--target_modules is required"),
    ("nlu", "gpt2", ["--do_eval", "--apply_lora"], "'query' matches no projection"),
    ("nlu", "roberta", ["--do_eval", "--lora_r", "4"], "--lora_r configure LoRA, which is off"),
])
def test_error_flags(files, tmp_path, capsys, entry, model, extra, phrase):
    argv = _base(files, model, "rte", tmp_path / "o", *extra)
    if entry == "loraplus" and "--cls_dropout" in extra:
        argv += ["--target_modules", "c_attn"]
    _refused({"nlu": NLU, "loraplus": LORAPLUS}[entry], argv, capsys, tmp_path / "o", phrase)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp16_without_gpu_warns_and_trains_in_fp32(files, tmp_path):
    out = tmp_path / "fp16"
    with pytest.warns(UserWarning, match="--fp16 needs a GPU"):
        assert NLU.main(_base(files, "roberta", "rte", out, "--do_train", "--apply_lora", "--fp16", "--max_steps", "1",
                              "--save_strategy", "no")) == 0
    assert _json(out / "run_config.json")["precision"] == "fp32"


@pytest.mark.parametrize("flavour", ["nlu", "lora2", "loraplus"])
def test_logging_flags_of_the_original_scripts_are_accepted(files, tmp_path, flavour, capsys):
    argv = _base(files, "roberta", "rte", tmp_path / "x", "--logging_strategy", "steps", "--tb_writter_loginterval", "50")
    args = _parse(argv, flavour)
    assert (args.logging_strategy, args.tb_writter_loginterval) == ("steps", 50)
    with pytest.raises(SystemExit):
        _parse(_base(files, "roberta", "rte", tmp_path / "x", "--logging_strategy", "hourly"), flavour)
    assert "--logging_strategy" in capsys.readouterr().err


def test_gradient_checkpointing_trains_the_same_adapter(files, tmp_path):
    """--gradient_checkpointing (the LoRA+ Llama recipe) recomputes each block and changes no number."""
    from loralib.models.grad_checkpoint import is_gradient_checkpointing

    def run(out, *extra):
        argv = _base(files, "llama", "rte", out, "--target_modules", "q_proj, v_proj", "--loraplus_lr_ratio", "4",
                     "--max_steps", "2", "--save_strategy", "no", "--no_do_eval", *extra)
        return _run_glue(argv, "loraplus").model

    plain, checkpointed = run(tmp_path / "plain"), run(tmp_path / "ckpt", "--gradient_checkpointing")
    assert is_gradient_checkpointing(checkpointed) and not is_gradient_checkpointing(plain)
    lora = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    for k, v in checkpointed.state_dict().items():
        if k in lora:
            torch.testing.assert_close(v, lora[k], rtol=1e-5, atol=1e-6)
