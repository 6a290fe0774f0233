"""LoRA-Pro's "Example", for this library: no patched DeepSpeed and no `optim="sgd"`; `LoRAProTrainer` runs
LoRAProAdamW (mode "full", the paper's, or "efficient") on the PEFT model's LoRA pairs, with the Trainer's
schedule, accumulation, clipping, precision and checkpoints.

    python examples/trainer/lorapro_trainer.py --output_dir runs/lorapro              # tiny random model
    python examples/trainer/lorapro_trainer.py --model_name_or_path HuggingFaceTB/SmolLM2-135M \
        --text_file train.txt --output_dir runs/lorapro --rslora --learning_rate 2e-5

Equivalent with a plain Trainer: Trainer(..., optimizers=(loralib.hf.lorapro_optimizer(model, training_args), None)).
"""
from common import model_and_data, parser
from peft import LoraConfig, get_peft_model

from loralib.hf import LoRAProTrainer, LoRAProTrainingArguments


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--lorapro_mode", choices=["full", "efficient"], default="full")
    p.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r) (the paper's rslora-pro)")
    args = p.parse_args(argv)
    model, train_dataset = model_and_data(args)
    # Define your LoRA
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, use_rslora=args.rslora,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    # Define TrainingArguments: optim stays at its default, LoRA-Pro is the optimizer.
    train_args = LoRAProTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, warmup_steps=2, max_grad_norm=1.0,
        report_to="none", logging_steps=5, save_strategy="no", lorapro_mode=args.lorapro_mode)
    # LoRA-Pro Trainer
    trainer = LoRAProTrainer(model=model, args=train_args, train_dataset=train_dataset)
    # Train
    result = trainer.train()
    model.save_pretrained(args.output_dir)
    print(f"final training loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
