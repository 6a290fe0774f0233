"""The one run skeleton every entry point fills in: a typed RunSpec, the plumbing every run shares (output
folder checks, seeding, precision, model-path resolution, step counting, the results files), and the phases

    check (flags, data, model: nothing written)  ->  start (lock the folder, clear a replaced run, write
    run_config.json)  ->  train (loralib.train.train with the method's optimizer, regularizer, allocator:
    loralib.methods)  ->  after_training (the task's own files)  ->  evaluate  ->  results files

A task family (GLUE, instruction tuning, NLG, T5 GLUE) supplies its data, collator and evaluation through a
`RunTask`; a paper's entry point translates its original flags into the RunSpec and the task. Like torchtune's
recipes (setup / train / save / cleanup), without a class to subclass: `execute(spec, task)` runs the phases.

    spec = RunSpec(output_dir=Path("out/mnli"), do_train=True, do_eval=True, seed=0, precision="fp32",
                   outputs=GLUE_OUTPUTS)
    results = execute(spec, task)      # {"train": {...}, "eval": {...}}
"""
from __future__ import annotations

import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn

from ..files import check_output_folder, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
# what loralib.train.train itself writes into an output folder (each task adds its own files)
LOOP_OUTPUTS = ("adapter", "best_adapter", "metrics.jsonl", "tensorboard")
SCRATCH_PREFIXES = ("checkpoint-", ".tmp-", ".old-")


@dataclass
class RunSpec:
    """What every run has, whatever its task: the typed half of an entry point's flags.

    outputs: the names this kind of run writes into output_dir (what --overwrite_output_dir clears);
    eval_outputs: what an evaluation-only run writes (cleared instead when not training);
    protected: a path the run reads (e.g. --lora_path) that clearing the folder must not remove."""

    output_dir: Path
    do_train: bool = True
    do_eval: bool = False
    seed: int = 42
    precision: str = "fp32"
    resume_from: Optional[str] = None
    overwrite: bool = False
    outputs: Tuple[str, ...] = LOOP_OUTPUTS + ("run_config.json", "train_results.json", "eval_results.json")
    eval_outputs: Tuple[str, ...] = ("eval_results.json",)
    protected: Optional[str] = None
    output_flag: str = "--output_dir"
    protected_flag: str = "--lora_path"

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)


# -- plumbing, once ---------------------------------------------------------------------------------

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def seed_everything(seed: int) -> None:
    """Python's, torch's and numpy's generators from one seed (what transformers' set_seed seeds)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def precision_of(fp16: bool = False, bf16: Optional[bool] = False, bf16_default: bool = False) -> str:
    """"fp16" | "bf16" | "fp32" for the --fp16 / --bf16 flags; both at once is an error. fp16 without a GPU
    falls back to fp32 with a warning; bf16 None means bf16_default (e.g. bf16 exactly when a GPU is there)."""
    if fp16 and bf16:
        raise ValueError("--fp16 and --bf16 exclude each other")
    if fp16:
        if torch.cuda.is_available():
            return "fp16"
        warnings.warn("--fp16 needs a GPU and none is available: training in fp32", stacklevel=2)
        return "fp32"
    return "bf16" if (bf16_default if bf16 is None else bf16) else "fp32"


# scripts/_common.sh writes the command that makes a run into its folder before starting it (reruns compare it):
# not a run's output, so it neither counts as a previous run nor is cleared by --overwrite_output_dir
LAUNCH_RECORD = "launch_command.txt"


def check_output_dir(spec: RunSpec) -> None:
    """Refuse, before anything is built, a folder that is a file, read-only, or holds a run this one would
    silently mix with (neither --overwrite_output_dir nor --resume_from_checkpoint given)."""
    out = spec.output_dir
    check_output_folder(out, spec.output_flag)
    if not spec.do_train or not out.is_dir() or spec.resume_from:
        return
    if not any(p.name != LAUNCH_RECORD for p in out.iterdir()):  # empty but for the script's command record
        return
    if spec.overwrite:
        if spec.protected and out.resolve() in Path(spec.protected).resolve().parents:
            raise ValueError(f"{spec.protected_flag} {spec.protected!r} lies inside {spec.output_flag} {str(out)!r}, "
                             "which --overwrite_output_dir would clear: train into another folder")
        return
    raise ValueError(f"{spec.output_flag} {str(out)!r} already holds files: add --overwrite_output_dir to replace "
                     "the previous run, or --resume_from_checkpoint latest to continue it")


def clear_previous_run(spec: RunSpec) -> None:
    """--overwrite_output_dir: remove what an earlier run of this kind wrote (only its evaluation files when
    this run only evaluates), and nothing else."""
    out = spec.output_dir
    if not out.is_dir():
        return
    doomed = [out / n for n in (spec.outputs if spec.do_train else spec.eval_outputs)]
    if spec.do_train:
        doomed += [p for p in out.iterdir() if p.name.startswith(SCRATCH_PREFIXES)]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resolve_model_path(name_or_path: str, flag: str = "--model_name_or_path") -> Path:
    """A model folder: the folder itself, models/NAME (here or at the repository root), or a hub download."""
    from ..models.hub import HubUnreachableError, download_model

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    hub_like = (not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") <= 1
                and not name_or_path.endswith("/"))
    in_models = name_or_path.startswith("models/") and name_or_path.count("/") <= 2 and len(name_or_path) > 7
    if in_models and not name_or_path.endswith("/"):  # models/NAME: the download folder of hub model NAME
        raise FileNotFoundError(f"{flag} {name_or_path!r}: no such model folder; fetch it with "
                                f"`python -m loralib.models.hub {name_or_path[len('models/'):]}` (models/README.md)")
    if not hub_like:
        raise FileNotFoundError(f"{flag} {name_or_path!r}: no such model folder")
    roots = [Path("models"), REPO_ROOT / "models"]
    for root in roots:
        if (root / name_or_path / "config.json").is_file():
            return root / name_or_path
    dest_root = REPO_ROOT / "models" if (REPO_ROOT / "models").is_dir() else Path("models")
    try:
        return download_model(name_or_path, dest_root=str(dest_root))
    except HubUnreachableError as e:
        raise HubUnreachableError(f"{flag} {name_or_path!r} is not a folder and not in "
                                  f"{' or '.join(str(r / name_or_path) for r in roots)}; {e}") from None


def load_for_training(model_path: Path, task: str, lora, precision: str) -> nn.Module:
    """Our model of `task` ("causal-lm", "seq2seq-lm", ...) for the folder, adapters inline, in train mode;
    bf16: the frozen weights in bf16, the LoRA factors in fp32 (trained under autocast).

    train() at once: from_pretrained returns eval(), where LoRA layers merge B A into W, and factors loaded later
    (a checkpoint, an adapter) would then be unmerged from a W they were never merged into."""
    from ..models.loading import from_pretrained

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = from_pretrained(model_path, task, lora=lora, dtype=dtype).train()
    if precision == "bf16":
        for name, p in model.named_parameters():
            if "lora_" in name.rsplit(".", 1)[-1]:
                p.data = p.data.float()
    model.loralib_config = lora
    return model


def mark_trainable(model: nn.Module, method) -> None:
    """What `method` (loralib.methods.Method) trains: the adapter's tensors, or for full fine-tuning every
    weight, in fp32 (bf16 only through autocast)."""
    from ..utils import mark_only_lora_as_trainable

    if method.lora is not None:
        mark_only_lora_as_trainable(model)
        return
    for p in model.parameters():
        p.requires_grad = True
        if p.dtype != torch.float32:
            p.data = p.data.float()


def total_steps(n_examples: int, per_device_batch_size: int, grad_accum: int, num_epochs: float,
                max_steps: Optional[int], seed: int) -> int:
    """Optimizer steps of the run, counted as loralib.train counts them (so an allocator can be built first)."""
    from .distributed import ShardedBatches

    if max_steps and max_steps > 0:
        return max_steps
    micro = len(ShardedBatches(n_examples, per_device_batch_size, world_size(), 0, seed=seed))
    return math.ceil(num_epochs * math.ceil(micro / grad_accum))


def accumulation_steps(global_batch_size: int, per_device_batch_size: int, given: Optional[int] = None,
                       global_given: bool = False) -> int:
    """Accumulation so that per device x accumulation x processes = global_batch_size; `given` (the
    --gradient_accumulation_steps flag) wins, and contradicting an explicitly given global batch is an error."""
    per_step = per_device_batch_size * world_size()
    if given is not None:
        if given < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {given}")
        if global_given and given * per_step != global_batch_size:
            raise ValueError(f"--gradient_accumulation_steps {given} x per device {per_device_batch_size} x "
                             f"{world_size()} processes != --global_batch_size {global_batch_size}: give one of the two")
        return given
    if global_batch_size % per_step:
        raise ValueError(f"--global_batch_size {global_batch_size} is not a multiple of --per_device_train_batch_size "
                         f"{per_device_batch_size} x {world_size()} processes")
    return global_batch_size // per_step


# -- the phases -------------------------------------------------------------------------------------

@dataclass
class Training:
    """What the train phase hands loralib.train.train: the model, its examples and collator, the loop's
    TrainConfig, the method (loralib.methods) with its optimizer settings, an eval_fn, an allocator, and the
    task's own loop callbacks (e.g. files written at each checkpoint), run after the method's."""

    model: nn.Module
    examples: Sequence[Any]
    collate: Callable
    config: Any
    method: Any
    optimizer: Any
    eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None
    allocator: Any = None
    callbacks: Sequence[Any] = ()


class RunTask(Protocol):
    """What a task family gives the skeleton. run_config(): the record written first (run_config.json);
    training(): built only when the spec trains; after_training(outcome, train_results): the task's own files
    on the main process (an exported adapter, a rank pattern), may add keys to train_results;
    evaluate(): the metrics dict written to eval_results.json (None: the task wrote its own files)."""

    def run_config(self) -> dict: ...

    def training(self) -> Training: ...

    def after_training(self, outcome, train_results: dict) -> None: ...

    def evaluate(self) -> Optional[dict]: ...


def train_results_of(outcome, groups: List[dict]) -> dict:
    """train_results.json: where the loop ended, the mean training loss and the steps it averages, the resumes
    (resumed_from_step: this call's, None when it started from scratch; resumed_at_steps: every one of the run)
    and the optimizer's parameter groups."""
    return {"global_step": outcome.global_step, "epoch": outcome.epoch, "train_loss": outcome.train_loss,
            "train_loss_steps": outcome.train_loss_steps, "resumed_from_step": outcome.resumed_from_step,
            "resumed_at_steps": outcome.resumed_at_steps,
            "best_metric": outcome.best_metric, "best_step": outcome.best_step,
            "eval_metrics": outcome.eval_metrics, "adapter_dir": outcome.adapter_dir,
            "best_adapter_dir": outcome.best_adapter_dir, "last_checkpoint": outcome.last_checkpoint,
            "param_groups": groups}


def start(spec: RunSpec, run_config: Callable[[], dict]) -> None:
    """Lock the folder (one run per folder, until the process exits), clear what a replaced run wrote, and
    record the run. A resumed run keeps its record: the loop refuses one whose settings differ from it."""
    from .progress import progress_settings
    from .run_lock import hold_output_dir

    if spec.do_train:
        progress_settings()  # a bad LORALIB_PROGRESS(_EVERY) is refused before the folder is written
    if rank() != 0:
        return
    if spec.do_train:
        hold_output_dir(spec.output_dir)
    if spec.overwrite and not spec.resume_from:
        clear_previous_run(spec)
    if spec.do_train and not (spec.resume_from and (spec.output_dir / "run_config.json").exists()):
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(spec.output_dir / "run_config.json", run_config())


def train_phase(training: Training) -> Tuple[Any, dict]:
    """loralib.train.train with the method's optimizer (one device, DDP or DeepSpeed), regularizer and
    allocator; returns (the loop's TrainResult, train_results)."""
    from ..methods import regularizer, training_hooks
    from .loop import train

    config, factory, callbacks, groups = training_hooks(training.method, training.config, training.optimizer)
    outcome = train(training.model, training.examples, training.collate, config, eval_fn=training.eval_fn,
                    optimizer_factory=factory, regularizer=regularizer(training.method),
                    allocator=training.allocator, callbacks=list(callbacks or []) + list(training.callbacks))
    return outcome, train_results_of(outcome, groups)


def execute(spec: RunSpec, task: RunTask) -> Dict[str, Any]:
    """The phases after the checks: start, train, the task's own files, evaluate, results files.
    Returns {"train": train_results, "eval": metrics} with the keys of the phases that ran."""
    main_process = rank() == 0
    results: Dict[str, Any] = {}
    start(spec, task.run_config)
    if spec.do_train:
        outcome, results["train"] = train_phase(task.training())
        if main_process:
            task.after_training(outcome, results["train"])
            write_json_atomic(spec.output_dir / "train_results.json", results["train"])
    if spec.do_eval:
        metrics = task.evaluate()
        if metrics is not None:
            results["eval"] = metrics
            if main_process:
                spec.output_dir.mkdir(parents=True, exist_ok=True)
                if not (spec.output_dir / "run_config.json").exists():  # evaluation only: what was evaluated
                    write_json_atomic(spec.output_dir / "run_config.json", task.run_config())
                write_json_atomic(spec.output_dir / "eval_results.json", metrics)
    return results
