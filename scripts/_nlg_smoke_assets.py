"""Offline stand-ins for `scripts/lora_gpt2_nlg.sh --smoke`: tiny random GPT-2s and a few lines of each NLG task.

    python scripts/_nlg_smoke_assets.py --root .cache/smoke/nlg

What it writes under ROOT (each piece once: a finished folder is reused):
    ROOT/models/gpt2-medium/, ROOT/models/gpt2-large/   tiny random GPT-2s (GPT-2's vocabulary of 50257 ids, so
                              real BPE ids and <|endoftext|> fit; width 16, 2 and 3 layers), saved with
                              transformers' save_pretrained (config.json + model.safetensors)
    ROOT/data/<task>/         {train,valid,test}_formatted.jsonl and {train,valid,test}.jsonl (encoded with the
                              GPT-2 BPE) for e2e, webnlg and dart, in the layout data/prepare_nlg.py writes

A smoke run swaps only MODEL_DIR and DATA_DIR: every flag of the real run stays. The BPE is the offline
GPT-2 vocabulary (--vocab, default .cache/gpt2-bpe/gpt2.tiktoken; see loralib.tasks.nlg.bpe).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DONE = ".smoke-complete"  # written last: a folder without it is a build that was cut off
MODELS = {"gpt2-medium": 2, "gpt2-large": 3}  # hub name -> layers (the large stand-in is one deeper)

_E2E = [
    ("name : The Vaults | Type : pub | price : more than £ 30 | customer rating : 5 out of 5 | near : Café Adriatic",
     ["The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30.",
      "Close to Café Adriatic, The Vaults pub is highly rated and expensive."]),
    ("name : The Cambridge Blue | Type : pub | food : English | price : cheap | near : Café Brazil",
     ["The Cambridge Blue is a cheap English pub near Café Brazil."]),
    ("name : The Eagle | Type : coffee shop | food : Japanese | price : less than £ 20 | area : riverside",
     ["The Eagle is a cheap Japanese coffee shop by the riverside.",
      "By the riverside, The Eagle coffee shop serves Japanese food for under £20."]),
    ("name : The Mill | Type : restaurant | food : Italian | family friendly : yes | area : city centre",
     ["The Mill is a family friendly Italian restaurant in the city centre."]),
]
_WEBNLG = [
    ("Aarhus_Airport : cityServed : Aarhus , Denmark", "Airport",
     ["Aarhus Airport serves the city of Aarhus, Denmark."]),
    ("Alan_Bean : occupation : Test_pilot | Alan_Bean : nationality : United_States", "Astronaut",
     ["Alan Bean is a United States test pilot.", "American Alan Bean was a test pilot."]),
    ("Bananaman : creator : Steve_Bright", "ComicsCharacter", ["Bananaman was created by Steve Bright."]),
    ("Elliot_See : birthPlace : Dallas", "Politician", ["Elliot See was born in Dallas."]),
]
_DART = [
    ("Mars Hill College : joined : 1973", ["Mars Hill College joined in 1973."]),
    ("Alimentum : food : Italian | Alimentum : area : riverside",
     ["Alimentum serves Italian food by the riverside.", "Alimentum is an Italian place on the riverside."]),
    ("Bakewell pudding : course : dessert", ["Bakewell pudding is a dessert."]),
]


def formatted_records(task: str):
    """The formatted lines of a task: one per reference, "id" numbering the contexts."""
    rows = []
    if task == "e2e":
        for i, (context, refs) in enumerate(_E2E):
            rows += [{"context": context, "completion": r, "id": i} for r in refs]
    elif task == "webnlg":
        for i, (context, category, refs) in enumerate(_WEBNLG):
            rows += [{"context": context, "completion": r, "id": i, "category": category} for r in refs]
    else:
        for i, (context, refs) in enumerate(_DART):
            rows += [{"context": context, "completion": r, "id": i} for r in refs]
    return rows


def build_model(dest: Path, n_layer: int) -> None:
    import torch
    import transformers

    torch.manual_seed(n_layer)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=16, n_layer=n_layer, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(dest)


def build_data(dest: Path, vocab) -> None:
    from loralib.tasks.nlg.bpe import load_bpe
    from loralib.tasks.nlg.data import encode_record, write_jsonl

    bpe = load_bpe(vocab)
    for task in ("e2e", "webnlg", "dart"):
        rows = formatted_records(task)
        for split in ("train", "valid", "test"):
            write_jsonl(rows, dest / task / f"{split}_formatted.jsonl")
            write_jsonl([encode_record(r, bpe) for r in rows], dest / task / f"{split}.jsonl")


def _once(dest: Path, build) -> None:
    """Build into a temporary sibling, mark it done, then move it into place."""
    if (dest / DONE).is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        (tmp / DONE).write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--vocab", default=None, help="GPT-2 BPE (default: loralib.tasks.nlg.bpe's offline file)")
    args = p.parse_args(argv)
    root = Path(args.root)
    for name, n_layer in MODELS.items():
        _once(root / "models" / name, lambda d, n=n_layer: build_model(d, n))
    _once(root / "data", lambda d: build_data(d, args.vocab))
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
