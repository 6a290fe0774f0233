"""The smoke model of scripts/lorapro_t5_glue.sh --smoke: a tiny random T5 in t5-base's layout.

    python lorapro/smoke_t5.py DEST          # builds DEST once (a folder transformers and loralib both load)
"""
import os
import string
import sys
from pathlib import Path


def build_smoke_model(dest) -> str:
    """A tiny random T5 in t5-base's layout (relu, tied head, dropout 0.1) with a character-level T5 tokenizer,
    saved under dest (once) with transformers' save_pretrained. Returns the folder."""
    import torch
    import transformers

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return str(dest)
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars] + \
            [("\u2581" + c, -1.0) for c in chars] + [("\u2581", -2.0)]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_heads=2, feed_forward_proj="relu", dropout_rate=0.1, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return str(dest)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python lorapro/smoke_t5.py DEST")
    print(build_smoke_model(sys.argv[1]))
