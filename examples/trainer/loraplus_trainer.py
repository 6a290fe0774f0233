"""LoRA+'s "With Huggingface Trainer", for this library: replace `Trainer` by `LoraPlusTrainer` and pass the
LoRA+ arguments in `LoraPlusTrainingArguments`.

    python examples/trainer/loraplus_trainer.py --output_dir runs/loraplus            # tiny random model
    python examples/trainer/loraplus_trainer.py --model_name_or_path HuggingFaceTB/SmolLM2-135M \
        --text_file train.txt --output_dir runs/loraplus --loraplus_lr_ratio 16
"""
from common import model_and_data, parser
from peft import LoraConfig, get_peft_model

from loralib.hf import LoraPlusTrainer, LoraPlusTrainingArguments


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--loraplus_lr_ratio", type=float, default=16.0)
    args = p.parse_args(argv)
    model, train_dataset = model_and_data(args)
    # LoRA model
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    training_args = LoraPlusTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=4, report_to="none", logging_steps=5, save_strategy="no",
        loraplus_lr_ratio=args.loraplus_lr_ratio, loraplus_lr_embedding=1e-6)
    trainer = LoraPlusTrainer(model=model, args=training_args, train_dataset=train_dataset)
    result = trainer.train()
    model.save_pretrained(args.output_dir)  # a PEFT adapter folder
    print(f"final training loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
