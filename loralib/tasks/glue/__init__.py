"""GLUE: the nine tasks (plus two offline WordNet tasks) read from the official TSV files or a `datasets`
save_to_disk folder, their metrics in numpy, and pair tokenisation with dynamic padding.

    from loralib.tasks.glue import load_glue, compute_metrics, encode_examples, GlueCollator
"""
from .data import GLUE_TASK_NAMES, TASKS, GlueData, GlueExample, GlueTask, get_task, load_glue
from .metrics import (accuracy, compute_metrics, f1_binary, main_metric, matthews_corrcoef, pearson,
                      spearmanr)
from .tokenize import LLAMA_PAD_TOKEN, GlueCollator, collate, encode_examples, ensure_pad_token

__all__ = ["GLUE_TASK_NAMES", "TASKS", "GlueData", "GlueExample", "GlueTask", "get_task", "load_glue",
           "accuracy", "compute_metrics", "f1_binary", "main_metric", "matthews_corrcoef", "pearson",
           "spearmanr", "LLAMA_PAD_TOKEN", "GlueCollator", "collate", "encode_examples", "ensure_pad_token"]
