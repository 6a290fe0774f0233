"""Offline stand-ins for scripts/lorapro_*.sh --smoke (and the tests): a tiny random Llama with a character-level
Llama tokenizer and tiny files in every format the real runs read.

    python lorapro/smoke.py .cache/smoke        # or: from lorapro.smoke import build_smoke_assets
"""
from __future__ import annotations

import os
import string
import sys
from pathlib import Path
from typing import Dict

SMOKE_QA = [("What is 2 plus 3?", "2 + 3 = 5. The answer is: 5"), ("What is 4 times 2?", "4 * 2 = 8. The answer is: 8"),
            ("What is 9 minus 7?", "9 - 7 = 2. The answer is: 2"), ("What is 6 plus 1?", "6 + 1 = 7. The answer is: 7")]


def _write_tiny_llama(folder: Path) -> None:
    import torch
    import transformers

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["<unk>", "<s>", "</s>"] + chars + ["\u2581" + c for c in chars] + ["\u2581", "<0x0A>"]
    tokenizer = transformers.LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    transformers.LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)


def build_smoke_assets(root) -> Dict[str, str]:
    """Built once under ROOT: the tiny Llama (ROOT/models/meta-llama/Llama-2-7b-hf) and the data files
    (ROOT/instruct: metamath / codefeedback / wizardlm JSONL, gsm8k_test.jsonl, humaneval.jsonl,
    mt_bench_question.jsonl). Returns {name: path}."""
    from loralib.files import write_jsonl_atomic

    root = Path(root)
    paths = {"model": root / "models" / "meta-llama" / "Llama-2-7b-hf", "data": root / "instruct"}
    if not (paths["model"] / "config.json").is_file():
        _write_tiny_llama(paths["model"])
    data = paths["data"]
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "metamath.jsonl": [{"query": q, "response": a, "type": "GSM_AnsAug"} for q, a in SMOKE_QA * 3],
        "codefeedback.jsonl": [{"query": f"Write f returning {i}.", "answer": f"```python\ndef f():\n    return {i}\n```"}
                               for i in range(12)],
        "wizardlm.jsonl": [{"instruction": q, "output": a} for q, a in SMOKE_QA * 3],
        "gsm8k_test.jsonl": [{"question": q, "answer": f"{a}\n#### {a[-1]}"} for q, a in SMOKE_QA],
        "humaneval.jsonl": [{"task_id": f"Smoke/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Add.\"\"\"\n",
                             "entry_point": f"add{i}", "canonical_solution": "    return a + b\n",
                             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"} for i in range(2)],
        "mt_bench_question.jsonl": [{"question_id": 81 + i, "category": "writing", "turns": [q, "Say it again."]}
                                    for i, (q, _) in enumerate(SMOKE_QA[:2])],
    }
    for name, rows in files.items():
        write_jsonl_atomic(data / name, rows)
        paths[name] = data / name
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":
    build_smoke_assets(sys.argv[1])
