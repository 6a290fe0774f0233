"""What a resumed run records: the same logged losses and train_loss as the uninterrupted run (exactly: the
checkpoint keeps the loss sums and every process's log window), the resumes themselves (resumed_from_step,
resumed_at_steps in TrainResult and train_results.json), and, for a checkpoint written before the loss sums
were kept, which steps train_loss and the first log line after the resume average. Also: the progress
display's line for a step shows the values logged at that step, and the non-finite-loss error names the
entry point's own learning-rate flag."""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchrun import torchrun, write_worker  # noqa: E402
from test_train_resume import Crash, CrashAt, build, collate, data, eval_fn  # noqa: E402

from loralib.adalora import RankAllocator, compute_orth_regu  # noqa: E402
from loralib.train import TrainConfig, train  # noqa: E402
from loralib.train import checkpoint as ckpt  # noqa: E402
from loralib.train.run import train_results_of  # noqa: E402

TOTAL_STEPS = 12


def run(out_dir, resume=None, callbacks=(), optimizer="adamw", log_every=4, eval_every=5, evaluate=eval_fn):
    """test_train_resume's run (AdaLoRA with its allocator, or LoRA-Pro), logging every 4 steps and saving every
    3: checkpoint-3 / -6 / -9 fall inside a log window. Returns the TrainResult."""
    adalora = optimizer == "adamw"
    model = build(adalora)
    allocator = RankAllocator(model, lora_r=4, target_rank=2, init_warmup=2, final_warmup=3, mask_interval=2,
                              beta1=0.85, beta2=0.85) if adalora else None
    config = TrainConfig(output_dir=str(out_dir), max_steps=TOTAL_STEPS, per_device_batch_size=4, grad_accum_steps=2,
                         lr=5e-2, weight_decay=0.01, warmup_steps=3, max_grad_norm=0.5, eval_every=eval_every,
                         metric_for_best="accuracy", save_every=3, log_every=log_every, progress_bar=False,
                         resume_from=resume, device="cpu")
    factory = None
    if optimizer == "lorapro":
        from loralib.optim import LoRAProAdamW
        factory = lambda m: LoRAProAdamW(m, lr=5e-2, mode="full")  # noqa: E731
    regularizer = (lambda m: compute_orth_regu(m, 0.1)) if adalora else None
    return train(model, data(), collate, config, eval_fn=evaluate, regularizer=regularizer, allocator=allocator,
                 optimizer_factory=factory, callbacks=list(callbacks))


def logged_losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module", params=["adamw", "lorapro"])
def uninterrupted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"full-{request.param}")
    return request.param, out, run(out, optimizer=request.param)


def test_a_resumed_run_logs_and_reports_the_losses_of_the_uninterrupted_run(tmp_path, uninterrupted):
    optimizer, ref_dir, ref = uninterrupted
    with pytest.raises(Crash):
        run(tmp_path, optimizer=optimizer, callbacks=[CrashAt(8)])  # after checkpoint-6, mid log window (5..8)
    resumed = run(tmp_path, resume="latest", optimizer=optimizer)
    assert logged_losses(tmp_path) == logged_losses(ref_dir)  # exactly: step 8's line averages steps 5..8
    assert resumed.train_loss == ref.train_loss and resumed.train_loss is not None
    assert resumed.train_loss_steps == ref.train_loss_steps == [1, TOTAL_STEPS]
    assert (resumed.resumed_from_step, resumed.resumed_at_steps) == (6, [6])
    assert (ref.resumed_from_step, ref.resumed_at_steps) == (None, [])


def test_every_resume_of_a_run_is_recorded_and_the_losses_still_match(tmp_path, uninterrupted):
    optimizer, ref_dir, ref = uninterrupted
    with pytest.raises(Crash):
        run(tmp_path, optimizer=optimizer, callbacks=[CrashAt(5)])  # last checkpoint: 3
    with pytest.raises(Crash):
        run(tmp_path, resume="latest", optimizer=optimizer, callbacks=[CrashAt(11)])  # last checkpoint: 9
    resumed = run(tmp_path, resume="latest", optimizer=optimizer)
    assert logged_losses(tmp_path) == logged_losses(ref_dir)
    assert resumed.train_loss == ref.train_loss
    assert (resumed.resumed_from_step, resumed.resumed_at_steps) == (9, [3, 9])
    record = train_results_of(resumed, groups=[])  # what train_results.json holds
    assert (record["train_loss"], record["train_loss_steps"]) == (ref.train_loss, [1, TOTAL_STEPS])
    assert (record["resumed_from_step"], record["resumed_at_steps"]) == (9, [3, 9])


def test_resuming_a_finished_run_reports_its_whole_loss(tmp_path, uninterrupted):
    optimizer, ref_dir, ref = uninterrupted
    import shutil
    shutil.copytree(ref_dir, tmp_path / "copy")
    again = run(tmp_path / "copy", resume="latest", optimizer=optimizer)
    assert (again.train_loss, again.train_loss_steps) == (ref.train_loss, [1, TOTAL_STEPS])
    assert (again.resumed_from_step, again.resumed_at_steps) == (TOTAL_STEPS, [TOTAL_STEPS])


def _strip_loss_sums(checkpoint: Path) -> None:
    """checkpoint as written before the loss sums were kept: no "loss" entry in training_state.pt."""
    state = ckpt.load_training_state(checkpoint)
    del state["loss"]
    torch.save(state, checkpoint / ckpt.TRAINING_STATE)


def test_an_old_checkpoint_resumes_and_the_record_says_what_the_loss_covers(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(8)])
    _strip_loss_sums(tmp_path / "checkpoint-6")
    resumed = run(tmp_path, resume="latest")
    assert (resumed.resumed_from_step, resumed.resumed_at_steps) == (6, [6])
    assert resumed.train_loss_steps == [7, TOTAL_STEPS]  # only the steps this call ran
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in rows if "loss" in r and r["step"] > 6]
    # step 8's line averages steps 7 and 8 only (the window's steps 5 and 6 were lost) and says so; step 12's is whole
    assert [(r["step"], r.get("loss_steps")) for r in after] == [(8, 2), (12, None)]
    assert resumed.train_loss == pytest.approx((2 * after[0]["loss"] + 4 * after[1]["loss"]) / 6, rel=1e-12)
    # a later resume from a checkpoint the resumed call wrote keeps what the record covers, and adds itself
    import shutil
    shutil.rmtree(tmp_path / "checkpoint-12")
    again = run(tmp_path, resume="latest")  # from checkpoint-9
    assert (again.train_loss, again.train_loss_steps) == (resumed.train_loss, [7, TOTAL_STEPS])
    assert (again.resumed_from_step, again.resumed_at_steps) == (9, [6, 9])


def test_an_old_checkpoint_at_a_log_boundary_loses_no_log_window(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path, callbacks=[CrashAt(10)], log_every=3)  # checkpoint-9: step 9 was just logged
    _strip_loss_sums(tmp_path / "checkpoint-9")
    with pytest.raises(Crash):
        run(tmp_path, resume="latest", log_every=3, callbacks=[CrashAt(TOTAL_STEPS)])  # writes checkpoint-12
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_steps" in r for r in rows)
    again = run(tmp_path, resume="latest", log_every=3)  # from checkpoint-12, which kept the sums of 10..12
    assert again.train_loss_steps == [10, TOTAL_STEPS] and again.resumed_at_steps == [9, TOTAL_STEPS]
    step_12 = [r["loss"] for r in rows if r.get("step") == TOTAL_STEPS and "loss" in r]
    assert again.train_loss == step_12[0]


# -- two processes (DDP, DeepSpeed): every process's log window is kept -----------------------------------

TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_train_resume_record import two_process_run
    out, stage = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
    two_process_run(out + "/full", stage)
    try:
        two_process_run(out + "/cut", stage, stop_at=6)  # last checkpoint: 4, inside the log window 4..6
    except KeyboardInterrupt:
        pass
    two_process_run(out + "/cut", stage, resume_from="latest")
""")


def two_process_run(out_dir, zero_stage=None, stop_at=None, resume_from=None):
    """test_train_distributed's 2-epoch run (8 steps, save every 4) logging every 3 steps, under DDP (float64)
    or DeepSpeed ZeRO-`zero_stage` (float32); on rank 0 writes <out_dir>/result.json (train_loss, the steps it
    covers, the resumes)."""
    import os

    import test_train_distributed as t

    dtype = torch.float64 if zero_stage is None else torch.float32
    ds = None if zero_stage is None else {"zero_optimization": {"stage": zero_stage}, "train_batch_size": "auto"}
    config = TrainConfig(output_dir=str(out_dir), num_epochs=2, per_device_batch_size=2, grad_accum_steps=2, lr=2e-2,
                         warmup_steps=2, save_every=4, progress_bar=False, log_every=3, device="cpu",
                         resume_from=resume_from, deepspeed_config=ds)
    result = train(t.build(dtype), t.make_data(dtype), t.collate, config,
                   callbacks=[t.StopAt(stop_at)] if stop_at else [])
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(
            {"train_loss": result.train_loss, "train_loss_steps": getattr(result, "train_loss_steps", None),
             "resumed_at_steps": getattr(result, "resumed_at_steps", None)}))


@pytest.mark.parametrize("zero_stage", [None] + [pytest.param(s, marks=pytest.mark.slow) for s in (2, 3)],
                         ids=["ddp", "zero2", "zero3"])
def test_a_resumed_two_process_run_logs_and_reports_the_losses_of_the_uninterrupted_run(tmp_path, zero_stage):
    if zero_stage is not None:
        pytest.importorskip("deepspeed")
    script = write_worker(tmp_path / "worker.py", TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent)),
                          deepspeed=zero_stage is not None)
    torchrun(script, [tmp_path] + ([zero_stage] if zero_stage is not None else []))
    full, cut = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("full", "cut"))
    assert [s for s, _ in logged_losses(tmp_path / "full")] == [3, 6, 8]  # step 6's window straddles the resume
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "full")
    assert cut["train_loss"] == full["train_loss"] and full["train_loss_steps"] == [1, 8]
    assert cut["resumed_at_steps"] == [4] and full["resumed_at_steps"] == []


# -- the progress display -------------------------------------------------------------------------------

@pytest.mark.parametrize("log_every,total", [(1, 4), (3, 5)])
def test_the_last_progress_line_shows_the_values_logged_at_the_last_step(tmp_path, capfd, monkeypatch,
                                                                        log_every, total):
    from test_train_loop import build as build_small, collate as collate_small, data as data_small

    monkeypatch.setenv("LORALIB_PROGRESS", "lines")
    monkeypatch.setenv("LORALIB_PROGRESS_EVERY", "1")  # a line for every step
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=total, per_device_batch_size=4, lr=1e-2,
                         warmup_steps=total, log_every=log_every, save_strategy="no", device="cpu")
    capfd.readouterr()
    train(build_small(), data_small(), collate_small, config)
    shown = {int(m.group(1)): line for line in capfd.readouterr().err.splitlines()
             if (m := re.match(rf"train (\d+)/{total} ", line))}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(1, total + 1) if s % log_every == 0 or s == total]
    for r in rows:  # the line of each logged step (the last one included) shows that step's loss and lr
        assert f"loss {r['loss']:.4f} lr {r['lr']:.2e} " in shown[r["step"]], (r, shown[r["step"]])
    assert len({r["lr"] for r in rows}) == len(rows)  # warmup: every logged lr differs, so a stale one shows


# -- the non-finite-loss error names the entry point's flag ----------------------------------------------

def test_a_diverging_nlg_run_names_its_own_learning_rate_flag(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("LORALIB_PROGRESS", "off")
    from test_nlg_train import ft_args, tiny_hf, write_encoded

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "NLG"))
    import gpt2_ft

    base = tmp_path / "gpt2-tiny"
    tiny_hf().save_pretrained(base)
    train_file = write_encoded(tmp_path / "train.jsonl")
    argv = ft_args(train_file, base, tmp_path / "run", "--max_step", "4", "--eval_interval", "100",
                   "--save_interval", "100", "--lr", "1e30")
    capsys.readouterr()
    assert gpt2_ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"loss is (nan|inf) at step \d+", err[0]), err
    assert "(--lr)" in err[0] and "--learning_rate" not in err[0], err[0]


# -- train_results.json of an entry point -----------------------------------------------------------------

def test_train_results_json_of_a_resumed_nlg_run_matches_the_uninterrupted_one(tmp_path, monkeypatch):
    """gpt2_ft.py (log every 2 steps, save every 3): cut after checkpoint-3, resumed with
    --resume_from_checkpoint latest; its train_results.json and metrics.jsonl losses equal the whole run's."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("LORALIB_PROGRESS", "off")
    from test_nlg_train import ft_args, tiny_hf, write_encoded

    import gpt2_ft  # examples/NLG, on the path test_nlg_train puts it on
    from loralib.tasks.nlg import train as nlg_train

    base = tmp_path / "gpt2-tiny"
    tiny_hf().save_pretrained(base)
    train_file = write_encoded(tmp_path / "train.jsonl")
    def args(work, *extra):
        return ft_args(train_file, base, work, "--max_step", "6", "--eval_interval", "100", "--save_interval", "3",
                       "--log_interval", "2", *extra)

    gpt2_ft.train_nlg(args(tmp_path / "whole"))

    def crash_after_first_save(self, state, path):
        if state.global_step == 3:
            raise Crash("power cut")

    with monkeypatch.context() as m:
        m.setattr(nlg_train.OriginalCheckpoints, "on_save", crash_after_first_save)
        with pytest.raises(Crash):
            gpt2_ft.train_nlg(args(tmp_path / "cut"))
    gpt2_ft.train_nlg(args(tmp_path / "cut", "--resume_from_checkpoint", "latest"))
    whole, cut = (json.loads((tmp_path / name / "train_results.json").read_text()) for name in ("whole", "cut"))
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "whole")
    assert cut["train_loss"] == whole["train_loss"] and cut["train_loss_steps"] == whole["train_loss_steps"] == [1, 6]
    assert (cut["resumed_from_step"], cut["resumed_at_steps"]) == (3, [3])
    assert (whole["resumed_from_step"], whole["resumed_at_steps"]) == (None, [])


def _records(out_dir):
    """metrics.jsonl without the throughput (a wall-clock rate)."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in rows]


def test_a_crash_in_the_final_evaluation_after_the_last_save_is_evaluated_once(tmp_path):
    """checkpoint-12 is saved, then the end-of-training evaluation crashes after logging (as a kill would):
    the resumed run evaluates again, and metrics.jsonl holds that evaluation once, as the uninterrupted run's."""
    ref = run(tmp_path / "ref")
    calls = []

    def crash_after_the_third(model):
        metrics = eval_fn(model)
        calls.append(1)
        if len(calls) == 3:  # steps 5, 10, then the end-of-training one at 12
            from loralib.train.loop import _MetricsLog
            _MetricsLog(tmp_path / "run", True, False).write({"step": TOTAL_STEPS, **{f"eval_{k}": v for k, v in metrics.items()}})
            raise Crash("killed after the final evaluation was logged")
        return metrics

    with pytest.raises(Crash):
        run(tmp_path / "run", evaluate=crash_after_the_third)
    resumed = run(tmp_path / "run", resume="latest")
    assert _records(tmp_path / "run") == _records(tmp_path / "ref")
    assert resumed.eval_metrics == ref.eval_metrics and resumed.eval_metrics is not None


def test_a_resume_at_the_last_step_keeps_its_evaluation(tmp_path):
    """Evaluated and saved at step 12, stopped before the run's end: the resume does not evaluate again, and
    train_results' eval_metrics are the step-12 evaluation's (they were null)."""
    ref = run(tmp_path / "ref", eval_every=3)
    with pytest.raises(Crash):
        run(tmp_path / "run", eval_every=3, callbacks=[CrashAt(TOTAL_STEPS)])
    resumed = run(tmp_path / "run", resume="latest", eval_every=3)
    assert resumed.eval_metrics == ref.eval_metrics and resumed.eval_metrics is not None
    assert _records(tmp_path / "run") == _records(tmp_path / "ref")
