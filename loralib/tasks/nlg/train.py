"""The NLG fine-tuning run of the LoRA paper (GPT-2 on E2E, DART, WebNLG): a typed spec, `prepare` (checks,
data, model; nothing written) and `run` through the one run skeleton (loralib.train.run.execute).
examples/NLG/gpt2_ft.py translates the original gpt2_ft.py flags into an NLGTrainSpec.

    spec = NLGTrainSpec(run=RunSpec(output_dir=Path("trained_models/GPT2_M/e2e"), seed=110),
                        train_data="data/e2e/train.jsonl", valid_data="data/e2e/valid.jsonl",
                        method=make_method("lora", nlg_lora(4, 32, 0.1)),
                        optimizer=OptimizerSettings(lr=2e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6,
                                                    adamw="lora-repo", correct_bias=True),
                        model_card="gpt2.md", init_checkpoint="models/gpt2-medium", max_epoch=5)
    outcome = run(spec)                                  # loralib.train's TrainResult (main process)

Data and loss: loralib.tasks.nlg.completion. Optimizer: the original optimizer.py's AdamW
(loralib.optim.gpt2ft, chosen by loralib.methods through OptimizerSettings.adamw = "lora-repo"). The
pretrained GPT-2: loralib.models.gpt2_checkpoint.

What a run writes into its work dir (training goes through loralib.train, the one loop):
    run_config.json          {"method": "lora"|"full", "model_name_or_path": "gpt2-medium", "lora": {...}, ...}
                             (a GPT-2 that is not --model_card's size, e.g. a tiny test folder, is recorded
                             by its path, with "model_size": {"n_layer", "n_embd", "n_head"})
    model.<step>.pt          as the original wrote them under torchrun, so its gpt2_beam.py reads them (ours
                             does too): at every save_interval {"model_state_dict": the LoRA factors}, keys
                             module.transformer.h.N.attn.c_attn.lora_A / lora_B; the LAST one (end of training)
                             {"model_state_dict": the whole model}, every GPT-2 weight and the factors, keys
                             module.transformer.* and module.lm_head.decoder.weight, so the original README's
                             beam command (only --init_checkpoint) decodes the trained model, not LoRA factors
                             on a randomly initialised GPT-2. A full fine-tune (method "full") writes it only.
    model.<step>.lora.pt     (LoRA runs) the LoRA factors of that last step, in the layout of the others
    checkpoint-<step>/       the loop's checkpoints (resume_from "latest" continues exactly)
    adapter/                 the final adapter in loralib's format (loralib.load_adapter)
    metrics.jsonl, train_results.json

The work dir's rules are gpt2_ft.py's: a folder that holds a previous run (run_config.json, adapter/,
checkpoint-*) needs resume_from or overwrite; other files in it (e.g. beam outputs) are allowed, and
overwrite removes only what a previous run of this kind wrote (the model.<step>.pt files included).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...files import check_output_folder
from ...methods import Method, OptimizerSettings
from ...models.gpt2_checkpoint import default_checkpoint, load_gpt2, model_record
from ...train.run import LOOP_OUTPUTS, RunSpec, Training, execute, rank, seed_everything, total_steps, world_size
from .completion import CompletionLM, check_vocab, collate, load_features, validation_loss

logger = logging.getLogger("loralib.nlg")

NLG_OUTPUTS = LOOP_OUTPUTS + ("run_config.json", "train_results.json")
_MODEL_FILE = re.compile(r"model\.\d+(\.lora)?\.pt")


@dataclass
class NLGTrainSpec:
    """One gpt2_ft.py run. run: output folder (the work dir), seed, precision, resume_from, overwrite.
    method: "lora" (nlg_lora: q and v of c_attn) or "full" (loralib.methods.make_method); optimizer: its
    settings (adamw="lora-repo" for the original's AdamW). Steps are optimizer steps: training stops at
    max_step or after max_epoch epochs, whichever comes first (one of them is required). record: what
    run_config.json keeps as "args" (the entry point's flags as given)."""

    run: RunSpec
    train_data: str
    valid_data: str
    method: Method
    optimizer: OptimizerSettings
    model_card: str = "gpt2.md"
    init_checkpoint: Optional[str] = None
    seq_len: int = 512
    joint_lm: bool = False
    label_smooth: float = 0.0
    train_batch_size: int = 8
    valid_batch_size: int = 4
    grad_acc: int = 1
    max_step: Optional[int] = None
    max_epoch: Optional[int] = None
    scheduler: str = "linear"
    warmup_step: int = 0
    log_interval: int = 100
    eval_interval: int = 2000
    save_interval: int = 500
    progress_bar: bool = True
    torch_compile: bool = False
    recipe: str = "released"
    record: Dict[str, Any] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        return self.run.output_dir


# -- the original's checkpoint files ----------------------------------------------------------------

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
        if rank() != 0:
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


# -- prepare: checks, data, model (nothing written) -------------------------------------------------

def check_work_dir(spec: NLGTrainSpec) -> None:
    """A file in the work dir's place or on its way, a read-only folder, or a previous run that this one
    would mix with (neither resume_from nor overwrite): refused before anything is read."""
    work_dir = spec.work_dir
    check_output_folder(work_dir, spec.run.output_flag)
    previous = work_dir.is_dir() and any(
        p.name.startswith("checkpoint-") or p.name in ("adapter", "run_config.json") for p in work_dir.iterdir())
    if previous and not (spec.run.resume_from or spec.run.overwrite):
        raise ValueError(f"{spec.run.output_flag} {work_dir} holds a previous run: add --resume_from_checkpoint "
                         f"latest to continue it, or --overwrite_work_dir to start again")


def previous_outputs(work_dir: Path) -> Tuple[str, ...]:
    """What overwriting clears: the loop's files, the run's records and the model.<step>[.lora].pt files."""
    found = sorted(p.name for p in work_dir.iterdir() if _MODEL_FILE.fullmatch(p.name)) if work_dir.is_dir() else []
    return NLG_OUTPUTS + tuple(found)


def run_steps(spec: NLGTrainSpec, n_examples: int) -> int:
    """Optimizer steps of the run: max_step or max_epoch epochs, whichever ends first."""
    by_epoch = total_steps(n_examples, spec.train_batch_size, spec.grad_acc, spec.max_epoch, None,
                           spec.run.seed) if spec.max_epoch else None
    return min(s for s in (spec.max_step, by_epoch) if s is not None)


class NLGRun:
    """The prepared run (loralib.train.run.RunTask): data read, model built with its LoRA factors."""

    def __init__(self, spec: NLGTrainSpec, train_set: List[dict], valid_set: List[dict], checkpoint: str,
                 model: CompletionLM):
        self.spec, self.train_set, self.valid_set, self.checkpoint, self.model = \
            spec, train_set, valid_set, checkpoint, model
        self.run_spec = dataclasses.replace(spec.run, outputs=previous_outputs(spec.work_dir))
        self.outcome = None

    def run_config(self) -> dict:
        s, lora = self.spec, self.spec.method.lora
        # the card's name only for a GPT-2 of the card's size: a tiny test model is no paper's GPT-2 M
        return {"method": s.method.name, **model_record(s.model_card, self.model.config, self.checkpoint),
                "init_checkpoint": self.checkpoint, "model_card": s.model_card,
                "lora": lora.to_dict() if lora is not None else None, "label_smooth": s.label_smooth,
                "recipe": s.recipe, "global_batch_size": s.train_batch_size * s.grad_acc * world_size(),
                "args": s.record}

    def training(self) -> Training:
        from ...train import TrainConfig

        s, full = self.spec, self.spec.method.lora is None
        opt = s.optimizer
        config = TrainConfig(
            output_dir=str(s.work_dir), max_steps=run_steps(s, len(self.train_set)),
            per_device_batch_size=s.train_batch_size, grad_accum_steps=s.grad_acc, lr=opt.lr,
            weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps or 1e-12, schedule=s.scheduler,
            warmup_steps=s.warmup_step, max_grad_norm=opt.max_grad_norm or None, precision=s.run.precision,
            eval_strategy="steps", eval_every=s.eval_interval, save_strategy="steps", save_every=s.save_interval,
            save_full_model=full, seed=s.run.seed, log_every=s.log_interval, progress_bar=s.progress_bar,
            resume_from=s.run.resume_from, torch_compile=s.torch_compile, lr_flag="--lr")
        return Training(self.model, self.train_set, collate, config, s.method, opt,
                        eval_fn=lambda m: validation_loss(m, self.valid_set, s.valid_batch_size),
                        callbacks=[OriginalCheckpoints(self.model, s.work_dir, full=full)])

    def after_training(self, outcome, train_results: dict) -> None:
        """train_results.json also names the original's files: the whole model and the LoRA factors."""
        self.outcome, work_dir = outcome, self.spec.work_dir
        train_results["valid"] = outcome.eval_metrics
        train_results["model_file"] = str(work_dir / f"model.{outcome.global_step}.pt")
        full = self.spec.method.lora is None
        train_results["lora_file"] = None if full else str(work_dir / lora_file_name(outcome.global_step))

    def evaluate(self) -> Optional[dict]:
        return None  # the validation loss is the loop's eval_fn; BLEU & co. come after decoding (gpt2_beam.py)


def prepare(spec: NLGTrainSpec) -> NLGRun:
    """Check the work dir, read the data (a malformed file fails in a second, before the model is read),
    build the GPT-2 with the method's LoRA factors (drawn from the run's seed, as the original) and mark
    what trains. Writes nothing."""
    from ...utils import mark_only_lora_as_trainable, trainable_summary

    if rank() == 0:  # other ranks would see the run_config.json rank 0 writes next
        check_work_dir(spec)
    train_set = load_features(spec.train_data, spec.seq_len, joint_lm=spec.joint_lm)
    valid_set = load_features(spec.valid_data, spec.seq_len, joint_lm=spec.joint_lm)
    checkpoint = spec.init_checkpoint or default_checkpoint(spec.model_card)
    lora = spec.method.lora
    seed_everything(spec.run.seed)  # the LoRA factors are drawn while the model is built
    lm = load_gpt2(checkpoint, spec.model_card, lora)
    lm.loralib_config = lora
    for path, features in ((spec.train_data, train_set), (spec.valid_data, valid_set)):
        check_vocab([f["input_ids"] for f in features], lm.config.vocab_size, path)
    if lora is not None:
        mark_only_lora_as_trainable(lm)
    model = CompletionLM(lm, spec.label_smooth).train()
    logger.info("%s", trainable_summary(model))
    return NLGRun(spec, train_set, valid_set, checkpoint, model)


def run(spec: NLGTrainSpec):
    """Prepare and train (loralib.train.run.execute: lock the work dir, clear a replaced run, run_config.json,
    the loop, the original's files, train_results.json). Returns the loop's TrainResult on the main process
    (None on the others)."""
    task = prepare(spec)
    execute(task.run_spec, task)
    return task.outcome
