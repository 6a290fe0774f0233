"""NLG tasks of the LoRA paper (E2E, WebNLG, DART): data conversion and encoding, GPT-2 BPE, the training run
(train: NLGTrainSpec, prepare, run; completion: examples and loss), beam search (beam: BeamSpec), decoding of
beam-search output (decode: DecodeSpec), metrics, and the evaluate step. The command lines with the original
flags are examples/NLG/gpt2_ft.py, gpt2_beam.py, gpt2_decode.py and eval_nlg.py.

    from loralib.tasks.nlg import GPT2BPE, read_raw, read_encoded, decode, evaluate_files, e2e_metrics

The metric names (e2e_metrics, webnlg_metrics, dart_metrics, read_e2e_references) come from .metrics and
are imported on first use, so data and decoding work without the metric dependencies installed.
"""
from .bpe import EOS_ID, GPT2BPE, VocabularyError, check_ids, load_bpe
from .data import (SEEN_CATEGORIES, TASKS, DataFormatError, add_group_ids, encode_file, encode_record,
                   read_dart_json, read_e2e_csv, read_e2e_txt, read_encoded, read_formatted, read_raw,
                   read_webnlg_json, read_webnlg_xml, write_jsonl)
from .decode import Group, cut_at_stop, decode_beam, group_references, post_process, read_predictions, write_outputs
from .evaluate import evaluate_files, evaluate_predictions, score, write_eval_results

_METRIC_NAMES = ("e2e_metrics", "webnlg_metrics", "dart_metrics", "read_e2e_references")


def __getattr__(name):
    if name in _METRIC_NAMES:
        from . import metrics
        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EOS_ID", "GPT2BPE", "VocabularyError", "check_ids", "load_bpe", "SEEN_CATEGORIES", "TASKS",
           "DataFormatError", "add_group_ids", "encode_file", "encode_record", "read_dart_json", "read_e2e_csv",
           "read_e2e_txt", "read_encoded", "read_formatted", "read_raw", "read_webnlg_json", "read_webnlg_xml",
           "write_jsonl", "Group", "cut_at_stop", "decode_beam", "group_references", "post_process",
           "read_predictions", "write_outputs", "evaluate_files", "evaluate_predictions", "score",
           "write_eval_results", *_METRIC_NAMES]
