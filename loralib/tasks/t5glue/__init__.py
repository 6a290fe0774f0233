"""Text-to-text GLUE on T5 as the LoRA-GA setting runs it (LoRA-Pro's T5-base table): data and formatting,
label-word scoring / generation, and the run of one (method, task, seed) row.

    from loralib.tasks.t5glue import TASKS, format_example, T5GlueCollator, evaluate, T5GlueRun, prepare, execute
"""
from .data import (MAX_LENGTH, TASKS, T5GlueCollator, T5GlueExample, T5GlueTask, encode, format_example, get_task,
                   label_word_ids, load_split)
from .evaluate import MODES, evaluate, first_tokens, metrics, predict
from .run import T5GlueRun, default_targets, execute, method_of, prepare

__all__ = ["MAX_LENGTH", "TASKS", "T5GlueCollator", "T5GlueExample", "T5GlueTask", "encode", "format_example",
           "get_task", "label_word_ids", "load_split", "MODES", "evaluate", "first_tokens", "metrics", "predict",
           "T5GlueRun", "default_targets", "execute", "method_of", "prepare"]
