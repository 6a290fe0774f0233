"""Decode gpt2_beam.py's output into reference and hypothesis files (the LoRA repo's src/gpt2_decode.py flags).

    python examples/NLG/gpt2_decode.py --vocab vocab --sample_file out/e2e/predict.jsonl \
        --input_file data/nlg/e2e/test_formatted.jsonl --output_ref_file e2e_ref.txt --output_pred_file e2e_pred.txt
Bad input: one "gpt2_decode.py: error: file:line: ..." line, exit status 2, no output file written.
The logic lives in loralib.tasks.nlg.decode.
"""
import sys

from loralib.tasks.nlg.decode import main

if __name__ == "__main__":
    sys.exit(main())
