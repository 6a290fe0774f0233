"""Fine-tune GPT-2 with LoRA on E2E / DART / WebNLG, with the flags of microsoft/LoRA examples/NLG/src/gpt2_ft.py.

The original command line works as it is (an example: examples/NLG/README.md).
Writes WORK_DIR/model.<step>.pt as the original (the LoRA factors at each --save_interval, the whole model at the
end, so the original gpt2_beam.py command reads it unchanged), model.<last step>.lora.pt (the last factors),
adapter/, checkpoint-<step>/ and run_config.json. Everything is loralib.tasks.nlg.train; see its docstring.
"""
import sys

from loralib.tasks.nlg import train

if __name__ == "__main__":
    sys.exit(train.main())
