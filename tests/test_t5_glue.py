"""loralib.tasks.t5glue: LoRA-GA's text-to-text formatting on hand-made rows, the collator, label-word scoring and
generation against transformers' T5, and every method training a row end to end on a tiny T5."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _glue_fixtures import write_glue_tsv
from _t5_fixtures import hf_model, tiny_config
from loralib.tasks import t5glue
from loralib.tasks.t5glue.data import T5GlueTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lorapro"))
from run_t5_glue import METHODS  # noqa: E402  (the table's rows, as lorapro/run_t5_glue.py spells them)
from smoke_t5 import build_smoke_model  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5glue")
    model = build_smoke_model(root / "models" / "t5-base")
    return {"model": model, "glue": str(write_glue_tsv(root / "glue", ("mnli", "sst2", "cola", "qnli", "mrpc")))}


# LoRA-GA's reproduce/data.py, written out by hand for one row of each task
HAND_MADE = [
    ("mnli", "A man sat.", "Nobody sat.", 2,
     "classify the semantic similarity of the text: A man sat.\nNobody sat.\nresult: ", "contradiction"),
    ("sst2", "a good film", None, 1, "classify the sentiment of the text: a good film\nresult: ", "positive"),
    ("cola", "Dog the ran.", None, 0, "classify the grammaticality of the text: Dog the ran.\nresult: ", "unacceptable"),
    ("qnli", "What is it?", "It rains.", 1,
     "classify the semantic similarity of the question and the sentence: What is it?\nIt rains.\nresult: ",
     "not_entailment"),
    ("mrpc", "He ran.", "He was running.", 1,
     "classify the semantic similarity of the text: He ran.\nHe was running.\nresult: ", "equivalent"),
]


@pytest.mark.parametrize("name,a,b,label,x,y", HAND_MADE)
def test_format_matches_the_setting(name, a, b, label, x, y):
    assert t5glue.format_example(t5glue.get_task(name), a, b, label) == (x, y)


def test_bad_task_and_label_are_refused():
    with pytest.raises(ValueError, match="rte"):
        t5glue.get_task("rte")
    with pytest.raises(ValueError, match="label 3"):
        t5glue.format_example(t5glue.get_task("sst2"), "x", None, 3)


def test_splits_read_through_the_glue_readers(assets):
    from loralib.tasks.glue import load_glue

    for name in ("mnli", "sst2", "cola", "qnli", "mrpc"):
        task = t5glue.get_task(name)
        train, dev = t5glue.load_split(task, assets["glue"], "train"), t5glue.load_split(task, assets["glue"], "dev")
        raw_dev = load_glue(name, assets["glue"], "dev_matched" if name == "mnli" else "dev")
        assert len(dev) == len(raw_dev) and len(train) > 0
        for (x, y, label), example in zip(dev, raw_dev.examples):
            assert (x, y) == t5glue.format_example(task, example.text_a, example.text_b, example.label)
            assert y == task.label_words[label]


def test_collator_pads_like_seq2seq_encode(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    rows = [("classify the sentiment of the text: ok\nresult: ", "positive", 1),
            ("classify the grammaticality of the text: a much longer sentence\nresult: ", "unacceptable", 0)]
    examples = t5glue.encode(rows, tokenizer, max_length=20)
    assert len(examples[1].input_ids) == 20 and examples[1].input_ids[-1] == tokenizer.eos_token_id  # truncated, </s> kept
    batch = t5glue.T5GlueCollator(tokenizer.pad_token_id)(examples)
    expected = tokenizer([y for _, y, _ in rows], padding=True, truncation=True, max_length=20, return_tensors="pt")
    assert torch.equal(batch["labels"], expected["input_ids"])            # pads stay pad ids (released)
    assert torch.equal(batch["decoder_attention_mask"], expected["attention_mask"])
    masked = t5glue.T5GlueCollator(tokenizer.pad_token_id, mask_label_padding=True)(examples)
    assert torch.equal(masked["labels"], expected["input_ids"].masked_fill(expected["attention_mask"] == 0, -100))


def test_scoring_and_generation_agree_with_transformers(assets, tmp_path):
    from transformers import AutoTokenizer

    from _t5_fixtures import save
    from loralib.models import from_pretrained

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    ref = hf_model(tiny_config(vocab_size=len(tokenizer)))
    ours = from_pretrained(save(ref, tmp_path / "m"), "seq2seq-lm")
    task = t5glue.get_task("mnli")
    examples = t5glue.encode(t5glue.load_split(task, assets["glue"], "dev"), tokenizer)
    firsts = t5glue.first_tokens(task, tokenizer)
    batch = t5glue.T5GlueCollator(0)(examples)
    with torch.no_grad():
        start = torch.zeros(len(examples), 1, dtype=torch.long)
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=start).logits
    assert t5glue.predict(ours, task, tokenizer, examples, "score", batch_size=4) == logits[:, 0, firsts].argmax(-1).tolist()
    generated = ref.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                             num_beams=1, max_new_tokens=max(len(i) for i in t5glue.label_word_ids(task, tokenizer)))
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    want = [task.label_words.index(t.strip()) if t.strip() in task.label_words else -1 for t in texts]
    assert t5glue.predict(ours, task, tokenizer, examples, "generate", batch_size=4) == want


def test_label_words_sharing_a_first_token_cannot_be_scored(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    with pytest.raises(ValueError, match="same token"):
        t5glue.first_tokens(T5GlueTask("x", "", ("abc", "abd")), tokenizer)


def test_metrics_are_accuracy_plus_mcc_for_cola():
    assert t5glue.metrics(t5glue.get_task("sst2"), [1, 0, 1, -1], [1, 1, 1, 0]) == {"accuracy": 0.5}
    cola = t5glue.metrics(t5glue.get_task("cola"), [1, 0, 1, 0], [1, 0, 0, 0])
    assert cola["accuracy"] == 0.75 and abs(cola["matthews_correlation"] - 1 / 3 ** 0.5) < 1e-12


@pytest.mark.parametrize("method,mode", [(m, None) for m in METHODS] + [("lora-pro", "efficient")])
def test_every_method_trains_a_row_on_t5(assets, tmp_path, method, mode):
    spec = t5glue.T5GlueRun(model_name_or_path=assets["model"], task="mrpc", data_dir=assets["glue"],
                            output_dir=str(tmp_path / method), lora=method, lorapro_mode=mode, max_steps=2,
                            per_device_train_batch_size=2, global_batch_size=4, disable_tqdm=True,
                            adalora_allocate=method == "adalora")
    p = t5glue.prepare(spec)
    before = {n: q.detach().clone() for n, q in p.model.named_parameters() if q.requires_grad}
    out = t5glue.execute(p)
    after = dict(p.model.named_parameters())
    assert out["train"]["global_step"] == 2
    assert any(not torch.equal(before[n], after[n]) for n in before)
    record = json.loads((tmp_path / method / "eval_results.json").read_text())
    assert record["task"] == "mrpc" and record["num_examples"] > 0 and 0 <= record["accuracy"] <= 1
    config = json.loads((tmp_path / method / "run_config.json").read_text())
    assert config["method"] == {"lora-pro": "lorapro"}.get(method, method)
    assert config["lorapro_mode"] == ("full" if method.endswith("-pro") and mode is None else mode)
    if method == "full":
        assert config["lora"] is None and not (tmp_path / method / "peft_adapter").exists()
    else:  # all linear layers of a relu T5, the setting's "all"
        assert config["lora"]["target_modules"] == ["q", "k", "v", "o", "wi", "wo"]
        assert (tmp_path / method / "peft_adapter" / "adapter_config.json").is_file()
    if method == "loraplus":
        assert sorted({g["lr"] for g in out["train"]["param_groups"] if g["numel"]}) == [1e-4, 16e-4]
    if method in ("adalora", "lora2"):
        assert (tmp_path / method / "rank_pattern.json").is_file()
    if method == "dora":  # a trained magnitude per output row on every adapted layer
        assert config["lora"]["use_dora"] and any("lora_magnitude_vector" in n for n in before)
    if method in ("pissa", "lora-ga"):  # the init's factors kept, the frozen weight its residual
        assert config["lora"]["init_lora_weights"] == {"pissa": "pissa", "lora-ga": "lora_ga"}[method]
        a0 = dict(p.model.named_buffers())["encoder.block.0.layer.0.SelfAttention.q.lora_A0"]
        assert a0.abs().sum() > 0
