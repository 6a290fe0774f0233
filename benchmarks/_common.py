"""What several benchmarks share: timing in interleaved rounds (CPU clock or CUDA events) and random
Hugging Face models saved to a folder.

    from _common import interleaved, medians, save_random_model
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Seconds one call of fn takes. On CUDA: the device is idle when the start event is recorded and the
    end event is waited for, so the time covers the launches as well as the kernels (a step that is bound
    by its launches is timed as such, not hidden behind a previous call's queue)."""
    if torch.device(device).type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int = 0, device="cpu",
                until: Optional[float] = None, min_rounds: int = 3) -> Dict[str, List[float]]:
    """Seconds per call of each function, called in turn each round (so that a drift in the machine's
    load or clocks hits all of them alike), after `warmup` untimed rounds. With `until` (a
    time.perf_counter() value), rounds stop once it has passed, after at least `min_rounds` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(rounds):
        if until is not None and i >= min_rounds and time.perf_counter() > until:
            break
        for name, fn in fns.items():
            samples[name].append(time_call(fn, device))
    return samples


def medians(samples: Dict[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(ts) for name, ts in samples.items()}


def save_random_model(family: str, config: dict, folder) -> Path:
    """A transformers model of `family` ("gpt2" or "llama") with torch's seed-0 random weights, saved in
    the Hugging Face layout (config.json + safetensors) to `folder`; returns the folder."""
    import transformers
    classes = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}
    if family not in classes:
        raise ValueError(f"save_random_model: family {family!r} is not one of {sorted(classes)}")
    config_cls, model_cls = classes[family]
    torch.manual_seed(0)
    model_cls(config_cls(**{k: v for k, v in config.items() if k != "architectures"})).save_pretrained(folder)
    return Path(folder)
