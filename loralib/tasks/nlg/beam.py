"""gpt2_beam.py's run: beam search of a LoRA-adapted GPT-2 over an encoded NLG test set, from a BeamSpec
(examples/NLG/gpt2_beam.py translates the original flags into one; its fields keep the flags' names).

    torchrun --nproc_per_node=1 examples/NLG/gpt2_beam.py --data data/e2e/test.jsonl --batch_size 1 \
        --seq_len 512 --eval_len 64 --model_card gpt2.md --init_checkpoint trained_models/GPT2_M/e2e/model.26289.pt \
        --platform local --lora_dim 4 --lora_alpha 32 --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 \
        --repetition_penalty 1.0 --eos_token_id 628 --work_dir trained_models/GPT2_M/e2e \
        --output_file predict.26289.b10p08r4.jsonl

Input: encoded JSONL (loralib.tasks.nlg.data.read_encoded); each line's prompt is its context followed by
<|endoftext|> (once), cut from the left to seq_len - eval_len tokens, as the original. Output:
WORK_DIR/OUTPUT_FILE, one line per input line, in order: {"id": <line index>, "predict": [generated ids]}
(the continuation only, up to and including the eos token that ended it; no padding). And, written with the
predictions, WORK_DIR/decoding.json: {"beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty",
"eval_len", "decoding", "num_examples", "data"}, the search settings that `loralib compare` reads (a training
folder's run_config.json is the training's); one from another decoding in the same folder is removed, with a
warning, before decoding starts (a decode stopped halfway leaves no record rather than a wrong one).

Model: the pretrained GPT-2 from --base_checkpoint (default models/<gpt2 | gpt2-medium | gpt2-large> by
--model_card) with the adapter of --init_checkpoint, opened by loralib.adapter_files.open_adapter: a file
gpt2_ft.py wrote (model.<step>.pt), one of microsoft's released gpt2_{md,lg}_lora_{e2e,dart,webnlg}.pt, a
gpt2_ft.py work dir or one of its checkpoint-<step>/, one of loralib's adapter folders, or a PEFT LoRA /
AdaLoRA folder (its per-module ranks and alphas; a different --lora_alpha is refused). An adapter of another
model family is one error naming --init_checkpoint. The original loaded only --init_checkpoint, so a
LoRA-only file ran on a randomly initialised GPT-2, silently.
A file that holds the whole model (gpt2_ft.py's last model.<step>.pt, as the original's) is decoded as it
is, without --base_checkpoint; given one, the file's weights replace its own. A file without LoRA factors
is read as a whole GPT-2 (the original's use with --lora_dim 0). LoRA is merged
into the weights for inference.

Decoding, batched with left padding on a KV cache: --beam beams, score sum(log p) / (new tokens) **
--length_penalty, --no_repeat_ngram_size, --repetition_penalty, stop at any --eos_token_id (50256 always,
as the original's append default), at most --eval_len new tokens. --decoding lora_repo (default) is the
original's own beam search, with which the paper's numbers were decoded (loralib.tasks.nlg.lora_repo_beam:
n-gram ban over the generated tokens only, eval_len steps, the best finished beam); --decoding transformers
is loralib.models.generation.generate, token-identical to transformers' beam search. The table of their
differences is in lora_repo_beam's docstring.

Each distinct prompt is decoded once (an E2E test file repeats a context once per reference) and its
continuation written for every line that has it. Several processes (torchrun): rank r decodes every
WORLD_SIZE-th distinct prompt, rank 0 gathers them and writes the file in the lines' order.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ...adapter_files import AdapterError, AdapterSource, open_adapter
from ...adapters import load_adapter_source
from ...files import check_output_folder, write_json_atomic, write_jsonl_atomic
from ...models.gpt2_checkpoint import (MODEL_CARDS, default_checkpoint, load_gpt2, model_record, read_state_dict,
                                       size_name)
from .completion import EOS, check_vocab, nlg_lora, with_eos

logger = logging.getLogger("loralib.nlg")
DECODING_FILE = "decoding.json"  # the search settings of the folder's predictions (decoding_record)


@dataclass
class BeamSpec:
    """One gpt2_beam.py run (examples/NLG/gpt2_beam.py fills it from the original flags; the fields keep
    their names). init_checkpoint: the adapter (any path open_adapter reads, or a whole-model file);
    base_checkpoint: the pretrained GPT-2 (default models/<name> by model_card); lora_dim 0: the checkpoint's
    rank; lora_alpha None: the adapter's, else 32 (released files record none); eos_token_id: the stop
    tokens; decoding: "lora_repo" | "transformers"; record: what run_config.json keeps as "args"."""

    data: str
    init_checkpoint: str
    base_checkpoint: Optional[str] = None
    model_card: str = "gpt2.sm"
    lora_dim: int = 0
    lora_alpha: Optional[int] = None
    batch_size: int = 10
    seq_len: int = 512
    eval_len: int = 256
    beam: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    eos_token_id: List[int] = field(default_factory=lambda: [EOS])
    decoding: str = "lora_repo"
    work_dir: str = "gpt2_model"
    output_file: str = "beam_prediction.jsonl"
    record: Dict[str, Any] = field(default_factory=dict)


# -- the model --------------------------------------------------------------------------------------

def load_model(args: BeamSpec) -> nn.Module:
    """The base GPT-2 with the adapter of --init_checkpoint loaded (eval mode: LoRA merged). The adapter is
    read by loralib.adapter_files.open_adapter, so every format it knows decodes; a file that holds a whole
    GPT-2 without LoRA factors is the original's --lora_dim 0 use."""
    given = Path(args.init_checkpoint).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"--init_checkpoint {given}: no such file or folder")
    if given.is_file() and given.suffix != ".json" and \
            not any("lora_" in k for k in read_state_dict(given, "--init_checkpoint")):
        # a whole GPT-2 without LoRA, as the original's --lora_dim 0 runs
        if args.lora_dim:
            raise ValueError(f"--init_checkpoint {given} holds no LoRA factors, but --lora_dim is {args.lora_dim}")
        return load_gpt2(str(given), args.model_card, None).eval()
    adapter = _flagged(given, open_adapter, given)
    adapter.check_family("gpt2", flag="--init_checkpoint")
    if adapter.format == "microsoft-nlg":
        return _released_model(args, adapter, given)
    if adapter.lora is None:
        raise ValueError(f"--init_checkpoint {given}: the adapter records no LoRA config")
    if args.lora_dim and args.lora_dim != adapter.lora.r:
        raise ValueError(f"--lora_dim {args.lora_dim}, but the adapter {given} has r={adapter.lora.r}")
    if args.lora_alpha is not None:
        if adapter.format == "peft" and args.lora_alpha != adapter.lora.lora_alpha:  # its alphas are per module
            raise ValueError(f"--lora_alpha {args.lora_alpha}, but the PEFT adapter {given} records lora_alpha "
                             f"{adapter.lora.lora_alpha:g}: leave --lora_alpha out")
        adapter.lora = adapter.lora.replace(lora_alpha=args.lora_alpha)
    try:
        model = load_gpt2(_base(args), args.model_card, adapter.lora_to_build, flag="--base_checkpoint")
    except ValueError as err:
        if "match no projection" not in str(err):
            raise
        raise ValueError(f"--init_checkpoint {given}: its LoRA targets {adapter.lora.target_modules!r} match no "
                         "projection of a GPT-2 (an adapter of another model?)") from None
    return _flagged(given, load_adapter_source, model, adapter).eval()


def _base(args: BeamSpec) -> str:
    return args.base_checkpoint or default_checkpoint(args.model_card)


def _flagged(given: Path, read, *args):
    """read(*args), an adapter that does not fit named as --init_checkpoint's (an AdapterError's message
    starts with its file)."""
    try:
        return read(*args)
    except AdapterError as err:
        raise AdapterError(f"--init_checkpoint {err}") from None
    except ValueError as err:  # e.g. its target_modules name no module of a GPT-2
        raise ValueError(f"--init_checkpoint {given}: {err}") from None


def _released_model(args: BeamSpec, adapter: AdapterSource, given: Path) -> nn.Module:
    """microsoft's released GPT-2 adapter, or a model.<step>.pt of gpt2_ft.py: its size checked against the
    card (and the base), alpha 32 unless --lora_alpha (the files record none)."""
    from ...models.released import infer_gpt2_nlg_adapter_shape

    state = adapter.tensors
    shape = infer_gpt2_nlg_adapter_shape(state)
    card_embd, card_layer = MODEL_CARDS[args.model_card][1:3]
    if args.base_checkpoint is None and (shape.n_embd, shape.n_layer) != (card_embd, card_layer):
        found = size_name(shape.n_embd, shape.n_layer)
        raise ValueError(f"--init_checkpoint {given}: LoRA factors for a GPT-2 with n_embd={shape.n_embd}, "
                         f"n_layer={shape.n_layer}{f' ({found})' if found else ''}, but --model_card is "
                         f"{args.model_card}: pass the checkpoint's --model_card")
    if args.lora_dim and args.lora_dim != shape.r:
        raise ValueError(f"--lora_dim {args.lora_dim}, but --init_checkpoint {given} has LoRA rank {shape.r}")
    adapter.lora = nlg_lora(shape.r, 32 if args.lora_alpha is None else args.lora_alpha, 0.0)
    if args.base_checkpoint is None and ("wte.weight" in state or "transformer.wte.weight" in state):
        return load_gpt2(str(given), args.model_card, adapter.lora).eval()  # the whole model, LoRA included
    model = load_gpt2(_base(args), args.model_card, adapter.lora, flag="--base_checkpoint")
    if (shape.n_embd, shape.n_layer) != (model.config.n_embd, model.config.n_layer):
        raise ValueError(f"--init_checkpoint {given}: LoRA factors for a GPT-2 with n_embd={shape.n_embd}, "
                         f"n_layer={shape.n_layer}, but --base_checkpoint {_base(args)} has "
                         f"n_embd={model.config.n_embd}, n_layer={model.config.n_layer}")
    for key in ("lm_head.weight", "lm_head.decoder.weight"):  # tied to wte in a whole checkpoint
        state.pop(key, None)
    return load_adapter_source(model, adapter).eval()


# -- decoding ---------------------------------------------------------------------------------------

def prompts(path: str, seq_len: int, eval_len: int) -> List[List[int]]:
    """Each line's context + <|endoftext|>, its last seq_len - eval_len tokens."""
    from .data import read_encoded

    records = read_encoded(path)
    if not records:
        raise ValueError(f"{path}: no examples")
    room = seq_len - eval_len
    return [with_eos(r["context"])[-room:] for r in records]


def continuation(row: Sequence[int], eos_ids: Sequence[int]) -> List[int]:
    """The generated ids up to and including the first eos."""
    out = []
    for t in row:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


@torch.no_grad()
def beam_continuations(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, decoding: str, num_beams: int,
                       max_new_tokens: int, length_penalty: float, no_repeat_ngram_size: int,
                       repetition_penalty: float, eos_ids: Sequence[int], pad_id: int) -> List[List[int]]:
    """The best continuation of each left-padded row of ids (B, T), up to and including its eos token, by
    `decoding`: "lora_repo" (the LoRA repo's beam search) or "transformers" (generate())."""
    from ...models.generation import generate
    from .lora_repo_beam import lora_repo_beam_search

    if decoding == "lora_repo":
        return lora_repo_beam_search(model, ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                     length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                     repetition=repetition_penalty, eos_token_id=eos_ids)
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                   length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                   repetition_penalty=repetition_penalty, eos_token_id=list(eos_ids), pad_token_id=pad_id)
    return [continuation(row, eos_ids) for row in out[:, ids.shape[1]:].tolist()]


@torch.no_grad()
def beam_search(model: nn.Module, queries: Sequence[Sequence[int]], args: BeamSpec,
                device: torch.device) -> List[List[int]]:
    """--decoding's search over the queries in batches of --batch_size; returns the continuations in the
    queries' order. Each distinct query is decoded once (an E2E test set repeats every context once per
    reference, and the search is deterministic), and queries of similar length share a batch (little padding)."""
    from ...models.generation import left_pad

    eos_ids = list(dict.fromkeys(args.eos_token_id))
    distinct = sorted({tuple(q) for q in queries}, key=len)
    results: Dict[tuple, List[int]] = {}
    for start in range(0, len(distinct), args.batch_size):
        chunk = distinct[start:start + args.batch_size]
        ids, mask = left_pad(chunk, EOS)
        found = beam_continuations(model, ids.to(device), mask.to(device), args.decoding, args.beam, args.eval_len,
                                   args.length_penalty, args.no_repeat_ngram_size, args.repetition_penalty,
                                   eos_ids, EOS)
        for q, continued in zip(chunk, found):
            results[q] = continued
        logger.info("beam search: %d / %d distinct prompts", start + len(chunk), len(distinct))
    return [results[tuple(q)] for q in queries]


def run_config(args: BeamSpec, model: nn.Module) -> dict:
    """What `loralib compare` needs to know of a decoding-only run (gpt2_ft.py writes its own)."""
    layers = {path: m for path, m in model.named_modules() if getattr(m, "r", 0) > 0}
    first = next(iter(layers.values()), None)
    enable = getattr(first, "enable_lora", None)  # None: a PEFT adapter's LoRA on the whole projection
    lora = {"r": first.r, "lora_alpha": first.lora_alpha,
            "target_modules": sorted({path.rsplit(".", 1)[-1] for path in layers}),
            "enable_lora": list(enable) if enable is not None else None} if layers else None
    source = getattr(model, "gpt2_source", None) or _base(args)
    return {"method": "lora" if lora else "full", **model_record(args.model_card, model.config, source),
            "model_card": args.model_card, "init_checkpoint": args.init_checkpoint,
            "base_checkpoint": args.base_checkpoint, "lora": lora, "args": args.record}


def decoding_record(args: BeamSpec, num_examples: int) -> dict:
    """decoding.json: how the predictions were decoded, which `loralib compare` reads (a training folder's
    run_config.json says how the model was trained, not how it was decoded). The key names are that
    interface. num_examples: the test lines decoded (one prediction each)."""
    return {"beam": int(args.beam), "length_penalty": float(args.length_penalty),
            "no_repeat_ngram_size": int(args.no_repeat_ngram_size),
            "repetition_penalty": float(args.repetition_penalty), "eval_len": int(args.eval_len),
            "decoding": str(args.decoding), "num_examples": int(num_examples), "data": str(args.data)}


def retire_other_decoding(work_dir: Path, record: dict) -> None:
    """Before decoding: a decoding.json of another decoding is removed, with a warning naming what changed, so
    that a decode stopped halfway never leaves the new settings beside the old predictions and scores."""
    path = work_dir / DECODING_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        previous = None
    if previous != record:
        changed = ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in record.items()
                            if previous.get(k) != v) if isinstance(previous, dict) else "unreadable before"
        logger.warning("%s records another decoding (%s): removed; this decoding's is written with its "
                       "predictions", path, changed)
        path.unlink()


def write_decoding_record(work_dir: Path, record: dict) -> Path:
    """WORK_DIR/decoding.json, atomically: written once the predictions it describes are."""
    work_dir.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(work_dir / DECODING_FILE, record)


def write_predictions(path: Path, predictions: Sequence[Sequence[int]]) -> None:
    """The contract's beam output: {"id": line index, "predict": [generated ids]} a line."""
    write_jsonl_atomic(path, ({"id": i, "predict": list(p)} for i, p in enumerate(predictions)))


def run_beam(args: BeamSpec) -> Optional[Path]:
    """Read, check, decode and write; returns the predictions file (None on ranks > 0)."""
    import torch.distributed as dist

    from ...train.distributed import setup

    check_output_folder(args.work_dir, "--work_dir")
    queries = prompts(args.data, args.seq_len, args.eval_len)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = load_model(args).to(device)
    check_vocab(queries, model.config.vocab_size, args.data)
    ctx = setup(device.type)
    record = decoding_record(args, len(queries))
    if ctx.is_main:  # every check passed
        retire_other_decoding(Path(args.work_dir), record)

    # Rank r decodes every world_size-th distinct prompt (by length, so the ranks get similar work).
    distinct = sorted({tuple(q) for q in queries}, key=len)
    mine = distinct[ctx.rank::ctx.world_size]
    found = dict(zip(mine, beam_search(model, mine, args, device)))
    if ctx.distributed:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, found)
        found = {q: p for part in parts for q, p in part.items()}
    if not ctx.is_main:
        return None
    out = Path(args.work_dir) / args.output_file
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, [found[tuple(q)] for q in queries])
    write_decoding_record(Path(args.work_dir), record)  # how these predictions were decoded
    if not (out.parent / "run_config.json").exists():  # decoding a released adapter: say what was decoded
        write_json_atomic(out.parent / "run_config.json", run_config(args, model))
    logger.info("wrote %d predictions to %s", len(queries), out)
    return out
