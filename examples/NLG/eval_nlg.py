"""Score NLG outputs with the official metrics and write <output_dir>/eval_results.json for `loralib compare`.

    python examples/NLG/eval_nlg.py --task e2e --ref_file e2e_ref.txt --pred_file e2e_pred.txt --output_dir out/e2e
    python examples/NLG/eval_nlg.py --task webnlg --input_file data/nlg/webnlg/test_formatted.jsonl \
        --sample_file out/webnlg/predict.jsonl --output_dir out/webnlg     # decodes too; adds seen/unseen/all
WebNLG/DART TER is eval.py's (pyter3's) by default, key "ter"; --ter sacrebleu writes "ter_sacrebleu" instead.
Bad input: one "eval_nlg.py: error: file:line: ..." line, exit status 2, nothing written.
The logic lives in loralib.tasks.nlg.evaluate.
"""
import sys

from loralib.tasks.nlg.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
