"""gpt2_ft.py: fine-tune GPT-2 on an NLG task (E2E, DART, WebNLG) with LoRA, with the original flags.

    torchrun --nproc_per_node=1 examples/NLG/gpt2_ft.py --train_data data/e2e/train.jsonl \
        --valid_data data/e2e/valid.jsonl --train_batch_size 8 --grad_acc 1 --valid_batch_size 4 --seq_len 512 \
        --model_card gpt2.md --init_checkpoint models/gpt2-medium --platform local --clip 0.0 --lr 0.0002 \
        --weight_decay 0.01 --correct_bias --adam_beta2 0.999 --scheduler linear --warmup_step 500 --max_epoch 5 \
        --save_interval 1000 --lora_dim 4 --lora_alpha 32 --lora_dropout 0.1 --label_smooth 0.1 \
        --work_dir trained_models/GPT2_M/e2e --random_seed 110

Data: encoded JSONL (loralib.tasks.nlg.data.read_encoded), {"context": [ids], "completion": [ids]} a line.
One example is input = (context + [50256] + completion)[:seq_len]; the loss is taken on the completion
tokens only (--obj jlm: on every token). A context that already ends in 50256 (the original gpt2_encode.py
--add_bos files) gets no second one.

Loss, as the original's GPT2LMModel: per predicted token (1 - eps) * (-log p[y]) + eps * mean_v(-log p[v])
(eps = --label_smooth), averaged over the completion tokens of the micro-batch. Validation loss is the plain
cross-entropy (the original evaluated without smoothing).

Optimizer, as the original's optimizer.py: `GPT2FTAdamW` (Adam with the bias correction only under
--correct_bias; decoupled weight decay applied after the Adam step) over every trainable tensor (biases and
LayerNorm weights excepted under --no_decay_bias); the linear / cosine / constant schedules after
--warmup_step linear warmup steps; --clip > 0 clips the global gradient norm.

What a run writes into --work_dir (training goes through loralib.train, the one loop):
    run_config.json          {"method": "lora"|"full", "model_name_or_path": "gpt2-medium", "lora": {...}, ...}
    model.<step>.pt          as the original wrote them under torchrun, so its gpt2_beam.py reads them (ours
                             does too): at every --save_interval {"model_state_dict": the LoRA factors}, keys
                             module.transformer.h.N.attn.c_attn.lora_A / lora_B; the LAST one (end of training)
                             {"model_state_dict": the whole model}, every GPT-2 weight and the factors, keys
                             module.transformer.* and module.lm_head.decoder.weight, so the original README's
                             beam command (only --init_checkpoint) decodes the trained model, not LoRA factors
                             on a randomly initialised GPT-2. A full fine-tune (--lora_dim 0) writes it only.
    model.<step>.lora.pt     (LoRA runs) the LoRA factors of that last step, in the layout of the others
    checkpoint-<step>/       the loop's checkpoints (--resume_from_checkpoint latest continues exactly)
    adapter/                 the final adapter in loralib's format (loralib.load_adapter)
    metrics.jsonl, train_results.json

Decisions where the original was silent, wrong or impossible here:
- --init_checkpoint: a GPT-2 folder (config.json + weights), a model.safetensors / pytorch_model.bin file
  (the original's gpt2-medium-pytorch_model.bin), or unset: models/gpt2-medium (by --model_card). Its size
  must be --model_card's (a folder with a non-standard size, e.g. a tiny test model, is used as it is).
  The original silently trained a random GPT-2 when the flag was left out.
- --max_step and --max_epoch: training stops at whichever comes first; one of them is required.
- Steps are optimizer steps: with --grad_acc > 1 the schedule advances once per accumulation group (the
  original stepped it every micro-batch, so its warmup and decay ran --grad_acc times faster).
- The original also wrote the whole model at the end of every epoch (as model.<step>.pt, 1.4 GB each for
  GPT-2 M); here only the end of training gets the whole model (the other epoch ends nothing, unless they
  fall on a --save_interval step, which gets the LoRA factors).
- --fp16 uses torch autocast with loss scaling on a GPU (the original needed apex); on a CPU: a warning, fp32.
- The original's cosine schedule measured its decay from step 0, not from the warmup's end; ours from the
  warmup's end (loralib.train.schedules).
- Flags of the original that change nothing here are accepted: --platform, --local_rank, --rank, --device,
  --world_size (torchrun's environment is read), --roll_interval, --roll_lr, --roll_step, --eval_epoch,
  --i_steps, --i_lrs.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import LoRAConfig
from ...files import check_output_folder, write_json_atomic
from ...models.outputs import ModelOutput
from ...models.released import ENABLE_QV

logger = logging.getLogger("loralib.nlg")

EOS = 50256
REPO_ROOT = Path(__file__).resolve().parents[3]
# --model_card -> (hub name, n_embd, n_layer, n_head)
MODEL_CARDS = {"gpt2.sm": ("gpt2", 768, 12, 12), "gpt2.md": ("gpt2-medium", 1024, 24, 16),
               "gpt2.lg": ("gpt2-large", 1280, 36, 20)}
_KNOWN_SIZES = {(e, l): card for card, (_, e, l, _) in MODEL_CARDS.items()} | {(1600, 48): "gpt2-xl"}
_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")


# -- flags ------------------------------------------------------------------------------------------

def add_gpu_flags(parser: argparse.ArgumentParser) -> None:
    """The original gpu.py's flags; torchrun's environment decides ranks and devices here."""
    g = parser.add_argument_group("distributed (the original's flags; torchrun's environment is what counts)")
    g.add_argument("--platform", default="k8s", help="accepted; launch several processes with torchrun")
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help="accepted; LOCAL_RANK is read")
    g.add_argument("--rank", type=int, default=0, help="accepted; RANK is read")
    g.add_argument("--device", type=int, default=0, help="accepted; the local rank's GPU is used")
    g.add_argument("--world_size", type=int, default=0, help="accepted; WORLD_SIZE is read")
    g.add_argument("--random_seed", type=int, default=10, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2_ft.py", description="Fine-tune GPT-2 with LoRA on E2E / DART / WebNLG "
                                "(the flags of microsoft/LoRA examples/NLG/src/gpt2_ft.py).")
    add_gpu_flags(p)
    o = p.add_argument_group("optimizer (the original optimizer.py)")
    o.add_argument("--lr", type=float, default=0.00001)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--correct_bias", action="store_true", help="Adam's bias correction (the paper's runs set it)")
    o.add_argument("--adam_epislon", "--adam_epsilon", dest="adam_epislon", type=float, default=1e-6)
    o.add_argument("--no_decay_bias", action="store_true", help="no weight decay on biases and LayerNorm weights")
    o.add_argument("--adam_beta1", type=float, default=0.9)
    o.add_argument("--adam_beta2", type=float, default=0.98)
    o.add_argument("--scheduler", default="linear",
                   choices=("cosine", "inv_sqrt", "dev_perf", "constant", "linear", "cycle"),
                   help="linear, cosine or constant (each after --warmup_step); the others are not supported")
    o.add_argument("--max_step", type=int, default=None, help="optimizer steps (stops at this or --max_epoch)")
    o.add_argument("--max_epoch", type=int, default=None)
    o.add_argument("--warmup_step", type=int, default=0)
    o.add_argument("--i_steps", default="0", help="accepted (the unsupported cycle scheduler)")
    o.add_argument("--i_lrs", default="0.00025", help="accepted (the unsupported cycle scheduler)")

    d = p.add_argument_group("data and model")
    d.add_argument("--train_data", required=True, help="encoded JSONL: {'context': [ids], 'completion': [ids]}")
    d.add_argument("--valid_data", required=True, help="encoded JSONL for the validation loss")
    d.add_argument("--train_batch_size", type=int, default=8)
    d.add_argument("--valid_batch_size", type=int, default=4)
    d.add_argument("--grad_acc", type=int, default=1)
    d.add_argument("--clip", type=float, default=0.0, help="max gradient norm; 0: no clipping")
    d.add_argument("--seq_len", type=int, default=512, help="examples are cut to this many tokens")
    d.add_argument("--model_card", default="gpt2.md", choices=tuple(MODEL_CARDS))
    d.add_argument("--init_checkpoint", default=None, help="pretrained GPT-2: a folder, a model.safetensors or "
                   "pytorch_model.bin file (default: models/<gpt2 | gpt2-medium | gpt2-large> by --model_card)")
    d.add_argument("--fp16", action="store_true", help="fp16 autocast + loss scaling on a GPU (CPU: fp32)")
    d.add_argument("--bf16", action="store_true", help="bf16 autocast (not an original flag)")
    d.add_argument("--log_interval", type=int, default=100)
    d.add_argument("--eval_interval", type=int, default=2000)
    d.add_argument("--save_interval", type=int, default=500)
    d.add_argument("--work_dir", default=os.getenv("PT_OUTPUT_DIR", "gpt2_model"))
    d.add_argument("--lora_dim", type=int, default=0, help="LoRA rank r on q and v of c_attn; 0: full fine-tuning")
    d.add_argument("--lora_alpha", type=int, default=128)
    d.add_argument("--obj", default="clm", choices=("jlm", "clm"),
                   help="clm: loss on the completion; jlm: on every token")
    d.add_argument("--lora_dropout", type=float, default=0.0)
    d.add_argument("--label_smooth", type=float, default=0.0)
    d.add_argument("--recipe", choices=("released", "paper"), default="released",
                   help="recorded in run_config.json: which account of the paper the run follows (scripts/README.md)")
    d.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint-<step> folder of --work_dir (not an original flag)")
    d.add_argument("--overwrite_work_dir", action="store_true",
                   help="train into a --work_dir that holds a previous run (not an original flag)")
    d.add_argument("--disable_tqdm", action="store_true", help="no progress bar (not an original flag)")
    d.add_argument("--torch_compile", action="store_true", help="torch.compile the training forward (inductor; off by default: see benchmarks/README.md) (not an original flag)")

    c = p.add_argument_group("accepted for the original commands; they change nothing here")
    c.add_argument("--roll_interval", type=int, default=-1)
    c.add_argument("--roll_lr", type=float, default=0.00001)
    c.add_argument("--roll_step", type=int, default=100)
    c.add_argument("--eval_epoch", type=int, default=1)
    return p


def check_flags(args: argparse.Namespace) -> None:
    """One clear error for a flag value the run cannot honour."""
    positive = ("train_batch_size", "valid_batch_size", "grad_acc", "seq_len", "log_interval", "eval_interval",
                "save_interval")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_step", "max_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_step is None and args.max_epoch is None:
        raise ValueError("set --max_epoch or --max_step (the original ran forever without either)")
    if args.scheduler not in ("linear", "cosine", "constant"):
        raise ValueError(f"--scheduler {args.scheduler} is not supported; use linear, cosine or constant")
    if args.lora_dim < 0:
        raise ValueError(f"--lora_dim must be >= 0, got {args.lora_dim}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}")
    if not 0.0 <= args.label_smooth < 1.0:
        raise ValueError(f"--label_smooth must lie in [0, 1), got {args.label_smooth}")
    if args.lr < 0 or args.weight_decay < 0 or args.adam_epislon < 0 or args.warmup_step < 0 or args.clip < 0:
        raise ValueError("--lr, --weight_decay, --adam_epislon, --warmup_step and --clip must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 exclude each other")


# -- the pretrained GPT-2 ---------------------------------------------------------------------------

def default_checkpoint(model_card: str) -> str:
    """models/<hub name> for the card, under the working directory or the repository."""
    name = MODEL_CARDS[model_card][0]
    for root in (Path("models"), REPO_ROOT / "models"):
        if (root / name).is_dir():
            return str(root / name)
    raise FileNotFoundError(f"no --init_checkpoint given and models/{name} does not exist: download it with "
                            f"`python -m loralib.models.hub {name}` or pass the GPT-2 checkpoint")


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A torch or safetensors file as a flat dict of tensors: the "model_state_dict" wrapper and DDP's
    "module." prefixes removed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # a corrupt or foreign file
            raise ValueError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read as a torch state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'model_state_dict')")
    return {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}


def size_name(n_embd: int, n_layer: int) -> Optional[str]:
    """The --model_card (or "gpt2-xl") of a GPT-2 of this width and depth; None for other sizes."""
    return _KNOWN_SIZES.get((n_embd, n_layer))


def _check_card(model_card: str, n_embd: int, n_layer: int, source: str, flag: str, strict: bool) -> None:
    _, want_embd, want_layer, _ = MODEL_CARDS[model_card]
    if (n_embd, n_layer) == (want_embd, want_layer):
        return
    found = size_name(n_embd, n_layer)
    if strict or found is not None:
        raise ValueError(f"{flag} {source} holds a GPT-2 with n_embd={n_embd}, n_layer={n_layer}"
                         f"{f' ({found})' if found else ''}, but --model_card {model_card} is n_embd={want_embd}, "
                         f"n_layer={want_layer}: pass the --model_card of the checkpoint")
    warnings.warn(f"{flag} {source}: a GPT-2 of non-standard size (n_embd={n_embd}, n_layer={n_layer}); "
                  f"its config.json is used and --model_card {model_card} is ignored", stacklevel=3)


class _TensorCheckpoint:
    """A state dict in the shape loralib.models.loading.load_state_into reads (files / shape / tensor)."""

    def __init__(self, state: Dict[str, torch.Tensor], source: Path):
        self.state = state
        self.files = {k: source for k in state}

    def shape(self, key: str):
        return tuple(self.state[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def load_gpt2(source: str, model_card: str, lora: Optional[LoRAConfig], flag: str = "--init_checkpoint"):
    """Our GPT2LMHeadModel with the pretrained weights of `source` (folder or file) and LoRA per `lora`
    (factors freshly initialised). Every backbone weight must be in the checkpoint; its size must be the
    card's. Returns the model in eval mode, float32, on the CPU."""
    from ...models import gpt2
    from ...models.loading import from_pretrained, load_state_into

    path = Path(source).expanduser()
    if path.is_dir():
        model = from_pretrained(path, "causal-lm", lora=lora, dtype=torch.float32)
        cfg = model.config
        _check_card(model_card, cfg.n_embd, cfg.n_layer, str(path), flag, strict=False)
        info = model.loading_info
    elif path.is_file():
        state = read_state_dict(path)
        state.pop("lm_head.weight", None)  # tied to wte: the original's files hold it as lm_head.decoder.weight
        state.pop("lm_head.decoder.weight", None)
        wte = state.get("wte.weight", state.get("transformer.wte.weight"))
        if wte is None:
            lora_keys = [k for k in state if "lora_" in k]
            what = "LoRA factors only (an adapter: give it to gpt2_beam.py --init_checkpoint)" if lora_keys else \
                f"keys {sorted(state)[:4]}"
            raise ValueError(f"{flag} {path}: not a pretrained GPT-2 (no wte.weight); it holds {what}")
        layers = {int(m.group(1)) for m in map(_LAYER.match, state) if m}
        n_layer, n_embd = (max(layers) + 1 if layers else 0), wte.shape[1]
        _check_card(model_card, n_embd, n_layer, str(path), flag, strict=True)
        _, _, _, n_head = MODEL_CARDS[model_card]
        wpe = state.get("wpe.weight", state.get("transformer.wpe.weight"))
        hf_config = {"model_type": "gpt2", "vocab_size": wte.shape[0], "n_embd": n_embd, "n_layer": n_layer,
                     "n_head": n_head, "n_positions": wpe.shape[0] if wpe is not None else 1024}
        with torch.device("meta"):
            model = gpt2.build(hf_config, "causal-lm", None, lora)
        info = load_state_into(model, _TensorCheckpoint(state, path), torch.float32, "cpu")
        model.hf_config = hf_config
        model.eval()
    else:
        raise FileNotFoundError(f"{flag} {source}: no such file or folder")
    if info["missing"] or info["newly_initialized"]:
        missing = info["missing"] + info["newly_initialized"]
        raise ValueError(f"{flag} {source}: the checkpoint lacks GPT-2 weights {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    if info["unexpected"]:
        raise ValueError(f"{flag} {source}: keys the GPT-2 has no place for: {info['unexpected'][:4]} "
                         "(a fine-tuned file? pass the pretrained model)")
    return model


def nlg_lora(r: int, alpha: float, dropout: float) -> Optional[LoRAConfig]:
    """LoRA on q and v of c_attn, as the paper (None for r = 0: full fine-tuning)."""
    if r == 0:
        return None
    return LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=("c_attn",),
                      enable_lora=ENABLE_QV)


# -- data -------------------------------------------------------------------------------------------

def with_eos(context: Sequence[int]) -> List[int]:
    """The conditioning tokens: the context followed by <|endoftext|> (once)."""
    context = list(context)
    return context if context[-1:] == [EOS] else context + [EOS]


def encode_example(context: Sequence[int], completion: Sequence[int], seq_len: int, joint_lm: bool = False) -> dict:
    """input_ids = (context + eos + completion)[:seq_len]; labels = the same ids with the conditioning
    tokens set to -100 (clm), so position t's logits are scored against labels[t + 1] on completion tokens."""
    query = with_eos(context)
    ids = (query + list(completion))[:seq_len]
    labels = list(ids) if joint_lm else ([-100] * len(query) + list(completion))[:seq_len]
    return {"input_ids": ids, "labels": labels}


def load_features(path: str, seq_len: int, joint_lm: bool = False) -> List[dict]:
    from .data import read_encoded

    records = read_encoded(path)
    if not records:
        raise ValueError(f"{path}: no examples")
    features = [encode_example(r["context"], r["completion"], seq_len, joint_lm) for r in records]
    empty = sum(1 for f in features if all(t == -100 for t in f["labels"][1:]))
    if empty:
        warnings.warn(f"{path}: {empty} of {len(features)} examples have no completion token within "
                      f"--seq_len {seq_len}; they add nothing to the loss", stacklevel=2)
    return features


def check_vocab(rows: Sequence[Sequence[int]], vocab_size: int, path: str) -> None:
    """Every id must index the model's embedding; the first one that does not is named with its line."""
    for line, ids in enumerate(rows, 1):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{path}:{line}: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")


def collate(features: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids (B, T) (pad 0, as the original) and labels (B, T) (pad -100). No attention
    mask: attention is causal, so the padding after a row's last token never reaches it."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), T), dtype=torch.long)
    labels = torch.full((len(features), T), -100, dtype=torch.long)
    for b, f in enumerate(features):
        ids[b, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        labels[b, :len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": ids, "labels": labels}


# -- loss -------------------------------------------------------------------------------------------

class CompletionLM(nn.Module):
    """The training view of a GPT2LMHeadModel: the same modules under the same names (so checkpoints and
    adapters hold the LM's keys), and a loss on the labelled tokens with the original's label smoothing.

    forward(input_ids (B, T), labels (B, T)) -> ModelOutput(loss): logits are computed only at the N
    positions t whose target labels[t + 1] is not -100, so the (N, V) fp32 block is all the head costs.
    Smoothing applies in training mode; eval mode gives the plain cross-entropy (the validation loss).
    """

    def __init__(self, lm: nn.Module, label_smooth: float = 0.0):
        super().__init__()
        self.transformer, self.lm_head, self.config = lm.transformer, lm.lm_head, lm.config
        self.label_smooth = label_smooth
        self.loralib_config = getattr(lm, "loralib_config", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        total, count = self.loss_sum(input_ids, labels, attention_mask)
        return ModelOutput(logits=None, loss=total / count.clamp(min=1))

    def loss_sum(self, input_ids, labels, attention_mask=None):
        """(sum of the per-token losses, number of scored tokens)."""
        h = self.transformer(input_ids, attention_mask).hidden_states[:, :-1]  # (B, T-1, C)
        targets = labels[:, 1:]
        scored = targets != -100
        logits = self.lm_head(h[scored]).float()  # (N, V)
        # PyTorch's label_smoothing is the original's formula: (1 - eps) nll + eps * mean over the vocabulary.
        eps = self.label_smooth if self.training else 0.0
        total = F.cross_entropy(logits, targets[scored], label_smoothing=eps, reduction="sum")
        return total, scored.sum()


@torch.no_grad()
def validation_loss(model: CompletionLM, features: Sequence[dict], batch_size: int) -> Dict[str, float]:
    """Mean cross-entropy per completion token over the set, and its perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = collate(features[i:i + batch_size])
        s, n = model.loss_sum(batch["input_ids"].to(device), batch["labels"].to(device))
        total, count = total + float(s), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


# -- optimizer --------------------------------------------------------------------------------------

class GPT2FTAdamW(torch.optim.Optimizer):
    """The Adam of the original optimizer.py (BERT's AdamW), per parameter p with gradient g at step t:

        m = b1 m + (1 - b1) g;      v = b2 v + (1 - b2) g^2
        p = p - s * m / (sqrt(v) + eps),   s = lr * sqrt(1 - b2^t) / (1 - b1^t) if correct_bias else lr
        p = p - lr * weight_decay * p      (decoupled decay, after the Adam step)

    torch.optim.AdamW differs: eps is added after the bias correction of v, the decay comes first, and
    the correction cannot be turned off.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"GPT2FTAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                size = group["lr"]
                if group["correct_bias"]:
                    size *= math.sqrt(1.0 - b2 ** state["step"]) / (1.0 - b1 ** state["step"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_bias: bool) -> List[dict]:
    """The trainable tensors; with no_decay_bias, biases and LayerNorm weights get no decay (the original
    matched the names "bias" and "layer_norm.weight"; GPT-2's LayerNorms are ln_*)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_bias:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    exempt = lambda n: n.endswith("bias") or re.search(r"(^|\.)ln_(\d+|f)\.weight$", n)  # noqa: E731
    groups = [{"params": [p for n, p in params if not exempt(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in params if exempt(n)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# -- the run ----------------------------------------------------------------------------------------

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def original_state_dict(model: nn.Module, full: bool) -> Dict[str, torch.Tensor]:
    """What the original wrote as model.<step>.pt's "model_state_dict": the LoRA factors (or everything)
    under the keys of its DDP-wrapped GPT2LMModel, module.transformer.h.N.attn.c_attn.lora_A ..., which its
    load_weight() maps back (it strips "module.transformer."; keys without it would be ignored silently).
    Its tied output layer was lm_head.decoder.weight."""
    state = model.state_dict()
    keep = {("lm_head.decoder.weight" if k == "lm_head.weight" else k): v
            for k, v in state.items() if full or "lora_" in k}
    return {f"module.{k}": v.detach().cpu().clone() for k, v in keep.items()}


class OriginalCheckpoints:
    """Loop callback (rank 0): work_dir/model.<step>.pt with the LoRA factors at every loop checkpoint; at
    the end model.<step>.pt with the whole model, as the original's last file, and (LoRA runs)
    model.<step>.lora.pt with the factors beside it."""

    def __init__(self, model: nn.Module, work_dir: Path, full: bool):
        self.model, self.work_dir, self.full = model, work_dir, full

    def write(self, name: str, full: bool) -> Optional[Path]:
        if _rank() != 0:
            return None
        path = self.work_dir / name
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model_state_dict": original_state_dict(self.model, full)}, tmp)
        os.replace(tmp, path)
        return path

    def on_save(self, state, path) -> None:
        if not self.full:  # a full fine-tune's 1.4 GB copies are written at the end only
            self.write(f"model.{state.global_step}.pt", full=False)

    def on_train_end(self, state) -> None:
        if not self.full:
            self.write(lora_file_name(state.global_step), full=False)
        self.write(f"model.{state.global_step}.pt", full=True)


def lora_file_name(step: int) -> str:
    """The LoRA-only file written beside the last, whole-model model.<step>.pt."""
    return f"model.{step}.lora.pt"


def _precision(args) -> str:
    if args.bf16:
        return "bf16"
    if args.fp16:
        if torch.cuda.is_available():
            return "fp16"
        warnings.warn("--fp16 needs a GPU; training in fp32", stacklevel=2)
    return "fp32"


def _total_steps(n: int, args) -> int:
    """Optimizer steps of the run: --max_step or --max_epoch epochs, whichever ends first."""
    from ...train import ShardedBatches

    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = len(ShardedBatches(n, args.train_batch_size, world, 0, seed=args.random_seed))
    by_epoch = math.ceil(micro / args.grad_acc) * args.max_epoch if args.max_epoch else None
    return min(s for s in (args.max_step, by_epoch) if s is not None)


def _check_work_dir(work_dir: Path, args) -> None:
    check_output_folder(work_dir, "--work_dir")  # a file in its place or on its way, or read-only: refused now
    previous = work_dir.is_dir() and any(
        p.name.startswith("checkpoint-") or p.name in ("adapter", "run_config.json") for p in work_dir.iterdir())
    if previous and not (args.resume_from_checkpoint or args.overwrite_work_dir):
        raise ValueError(f"--work_dir {work_dir} holds a previous run: add --resume_from_checkpoint latest to "
                         "continue it, or --overwrite_work_dir to start again")


def run_config(args, lora: Optional[LoRAConfig], checkpoint: str) -> dict:
    return {"method": "lora" if lora is not None else "full",
            "model_name_or_path": MODEL_CARDS[args.model_card][0], "init_checkpoint": checkpoint,
            "model_card": args.model_card, "lora": lora.to_dict() if lora is not None else None,
            "label_smooth": args.label_smooth, "recipe": args.recipe,
            "global_batch_size": args.train_batch_size * args.grad_acc * int(os.environ.get("WORLD_SIZE", "1")),
            "args": vars(args)}


def train_nlg(argv: Optional[Sequence[str]] = None):
    """Parse, check, train; returns loralib.train's TrainResult. Errors propagate (see `main`)."""
    from ...train import TrainConfig, train
    from ...train.run_lock import hold_output_dir
    from ...utils import mark_only_lora_as_trainable, trainable_summary

    args = build_parser().parse_args(argv)
    check_flags(args)
    work_dir = Path(args.work_dir)
    if _rank() == 0:  # other ranks would see the run_config.json rank 0 writes next
        _check_work_dir(work_dir, args)
    # Data first: a malformed file fails in a second, before the model is read.
    train_set = load_features(args.train_data, args.seq_len, joint_lm=args.obj == "jlm")
    valid_set = load_features(args.valid_data, args.seq_len, joint_lm=args.obj == "jlm")
    checkpoint = args.init_checkpoint or default_checkpoint(args.model_card)
    lora = nlg_lora(args.lora_dim, args.lora_alpha, args.lora_dropout)

    torch.manual_seed(args.random_seed)  # the LoRA factors are drawn while the model is built, as the original
    lm = load_gpt2(checkpoint, args.model_card, lora)
    lm.loralib_config = lora
    for path, features in ((args.train_data, train_set), (args.valid_data, valid_set)):
        check_vocab([f["input_ids"] for f in features], lm.config.vocab_size, path)
    if lora is not None:
        mark_only_lora_as_trainable(lm)
    model = CompletionLM(lm, args.label_smooth).train()
    logger.info("%s", trainable_summary(model))

    total = _total_steps(len(train_set), args)
    config = TrainConfig(
        output_dir=str(work_dir), max_steps=total, per_device_batch_size=args.train_batch_size,
        grad_accum_steps=args.grad_acc, lr=args.lr, weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epislon or 1e-12, schedule=args.scheduler,
        warmup_steps=args.warmup_step, max_grad_norm=args.clip or None, precision=_precision(args),
        eval_strategy="steps", eval_every=args.eval_interval, save_strategy="steps", save_every=args.save_interval,
        save_full_model=lora is None, seed=args.random_seed, log_every=args.log_interval,
        progress_bar=not args.disable_tqdm and sys.stderr.isatty(), resume_from=args.resume_from_checkpoint,
        torch_compile=args.torch_compile)
    if _rank() == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        hold_output_dir(work_dir)  # one run per folder, locked before the first write (to process exit)
        if args.overwrite_work_dir and not args.resume_from_checkpoint:
            _clear_previous_run(work_dir)
        write_json_atomic(work_dir / "run_config.json", run_config(args, lora, checkpoint))

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return GPT2FTAdamW(parameter_groups(m, args.weight_decay, args.no_decay_bias), lr=args.lr,
                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epislon,
                           weight_decay=args.weight_decay, correct_bias=args.correct_bias)

    result = train(model, train_set, collate, config,
                   eval_fn=lambda m: validation_loss(m, valid_set, args.valid_batch_size),
                   optimizer_factory=make_optimizer,
                   callbacks=[OriginalCheckpoints(model, work_dir, full=lora is None)])
    if _rank() == 0:
        write_json_atomic(work_dir / "train_results.json", {
            "global_step": result.global_step, "epoch": result.epoch, "train_loss": result.train_loss,
            "valid": result.eval_metrics, "adapter_dir": result.adapter_dir,
            "last_checkpoint": result.last_checkpoint,
            "model_file": str(work_dir / f"model.{result.global_step}.pt"),  # the whole model
            "lora_file": str(work_dir / lora_file_name(result.global_step)) if lora is not None else None})
    return result


def _clear_previous_run(work_dir: Path) -> None:
    """--overwrite_work_dir: remove what an earlier gpt2_ft.py run wrote there, and nothing else."""
    import shutil

    for p in work_dir.iterdir():
        ours = (p.name in ("adapter", "best_adapter", "metrics.jsonl", "tensorboard", "run_config.json",
                           "train_results.json") or p.name.startswith(("checkpoint-", ".tmp-", ".old-"))
                or re.fullmatch(r"model\.\d+(\.lora)?\.pt", p.name))
        if ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: 0 on success; a bad flag, file or checkpoint prints one `error:` line, returns 2."""
    from ...cli import run_entry_point

    return run_entry_point(lambda: train_nlg(argv), "gpt2_ft.py")
