"""Offline stand-ins for the `--smoke` mode of the scripts in scripts/: tiny random models and tiny GLUE files.

    python scripts/_smoke_assets.py --root .cache/smoke                       # every model, and the GLUE folder
    python scripts/_smoke_assets.py --root .cache/smoke --models roberta-base  # only what one script needs

What it writes under ROOT (each piece once: a folder already there is reused):
    ROOT/models/<hub name>/   a tiny random model of the family of <hub name>, saved with transformers'
                              save_pretrained (config.json + model.safetensors), and an offline tokenizer of
                              the real tokenizer class; roberta-base, roberta-large, microsoft/deberta-v2-xxlarge,
                              microsoft/deberta-v3-base, gpt2, huggyllama/llama-7b
    ROOT/glue/                the nine GLUE tasks in the official TSV layout (ROOT/glue/MNLI/train.tsv, ...),
                              six rows a split

The model folders are named after the hub names so that a script in smoke mode only swaps MODEL_DIR and
DATA_DIR: every flag, the launcher and the results files are those of the real run. Each tiny model keeps
the architectural switches of the model it stands for (DeBERTa-v2-xxlarge: the convolution branch and
log-bucketed relative positions; DeBERTaV3: no absolute positions; Llama: no pad token, so the LoRA+ path
that adds one is exercised). The GLUE files and tokenizers come from tests/_glue_fixtures.py, which holds
the official column layouts in one place.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _glue_fixtures import make_tokenizer, write_glue_tsv  # noqa: E402

# Shared by every tiny model: 2 layers of width 16; positions enough for the longest tiny GLUE pair.
WIDTH, LAYERS, HEADS, FFN, POSITIONS = 16, 2, 2, 32, 160
_DEBERTA_V3 = dict(relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
                   pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7)

# hub name -> (transformers config class, tokenizer kind, config fields). The fields echo the real model's
# switches; sizes are tiny. "large" and "xxlarge" get one layer more than "base" so they are not the same file.
MODELS: Dict[str, Tuple[str, str, dict]] = {
    "roberta-base": ("RobertaConfig", "roberta", dict(layer_norm_eps=1e-5, type_vocab_size=1)),
    "roberta-large": ("RobertaConfig", "roberta", dict(layer_norm_eps=1e-5, type_vocab_size=1,
                                                       num_hidden_layers=LAYERS + 1)),
    "microsoft/deberta-v2-xxlarge": ("DebertaV2Config", "deberta", dict(
        _DEBERTA_V3, conv_kernel_size=3, conv_act="gelu", num_hidden_layers=LAYERS + 1)),
    "microsoft/deberta-v3-base": ("DebertaV2Config", "deberta", dict(_DEBERTA_V3)),
    "gpt2": ("GPT2Config", "gpt2", dict(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS)),
    "huggyllama/llama-7b": ("LlamaConfig", "llama", dict(rms_norm_eps=1e-6, num_key_value_heads=HEADS,
                                                         intermediate_size=24)),
}
_MODEL_CLASSES = {"RobertaConfig": "RobertaModel", "DebertaV2Config": "DebertaV2Model", "GPT2Config": "GPT2Model",
                  "LlamaConfig": "LlamaModel"}
DONE = ".smoke-complete"  # written last: a folder without it is a build that was cut off


def _config(name: str, tokenizer):
    import transformers

    config_class, _, fields = MODELS[name]
    sizes = {} if config_class == "GPT2Config" else dict(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        max_position_embeddings=POSITIONS)
    # The vocabulary is the tokenizer's (Llama's has no pad token yet: the LoRA+ driver adds one and grows it).
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    return getattr(transformers, config_class)(vocab_size=len(tokenizer), **{**sizes, **fields}, **special)


def build_model(name: str, dest: Path, seed: int = 0) -> Path:
    """Write the tiny stand-in for hub model `name` into dest (a fresh folder); returns dest."""
    import torch
    import transformers

    if name not in MODELS:
        raise KeyError(f"no smoke model for {name!r}: expected one of {', '.join(MODELS)}")
    tokenizer = make_tokenizer(MODELS[name][1])
    config = _config(name, tokenizer)
    torch.manual_seed(seed)
    model_class = getattr(transformers, _MODEL_CLASSES[type(config).__name__])
    kwargs = {"add_pooling_layer": False} if model_class is transformers.RobertaModel else {}
    model = model_class(config, **kwargs)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _build_once(target: Path, build) -> Path:
    """Run build(tmp) into a sibling temp folder and move it into place: a reader never sees half a folder,
    and two builds racing for the same target both end with a complete one."""
    if (target / DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / DONE).write_text("ok\n")
        if target.exists() and not (target / DONE).is_file():
            shutil.rmtree(target)  # an earlier build that was cut off
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / DONE).is_file():  # not a race lost to a complete build
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def build(root: os.PathLike, models: Iterable[str] = tuple(MODELS)) -> Dict[str, Path]:
    """Make sure ROOT/glue and ROOT/models/<name> exist for the given hub names; returns {"glue": ...,
    name: folder}."""
    root = Path(root)
    models = list(models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise KeyError(f"no smoke model for {', '.join(map(repr, unknown))}: expected some of {', '.join(MODELS)}")
    out = {"glue": _build_once(root / "glue", write_glue_tsv)}
    for name in models:
        out[name] = _build_once(root / "models" / name, lambda tmp, n=name: build_model(n, tmp))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder to build in (reused when already built)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of hub names (default: all)")
    args = parser.parse_args(argv)
    try:
        paths = build(args.root, [m.strip() for m in args.models.split(",") if m.strip()])
    except KeyError as e:
        print(f"_smoke_assets.py: error: {e.args[0]}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
