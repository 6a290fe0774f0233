"""Run every benchmark in turn with the settings recorded in benchmarks/README.md (`make bench`).

Each benchmark is its own script (see its docstring); this runner only sequences them and stops at the
first failure. Pass names to run a subset: python benchmarks/run_all.py layers lorapro

The GPU rows are not here: benchmarks/gpu_suite.py runs all of them in one process on one GPU (its CPU mode,
--device cpu --tiny, is a smoke run only: tests/test_gpu_suite.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = {
    "layers": ["bench_layers.py", "--repeats", "10"],
    "gpt2_train": ["bench_gpt2_train.py"],
    "llama_train": ["bench_llama_train.py"],
    "generation": ["bench_generation.py", "--batch", "4", "--new-tokens", "32", "--repeats", "3"],
    "allocator": ["bench_allocator.py"],
    "lorapro": ["bench_lorapro.py"],
    "lorapro_memory": ["bench_lorapro_memory.py"],
    "dora": ["bench_dora.py", "--repeats", "7"],
    "compile": ["bench_compile.py"],
    "learning_check": ["learning_check.py"],
}


def main(names) -> int:
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        script, *args = BENCHMARKS[name]
        if not (HERE / script).is_file():
            print(f"== {name}: {script} is not in benchmarks/ yet, skipped")
            continue
        print(f"== {name}: python benchmarks/{script} {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), *args])
        if done.returncode != 0:
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
