"""AdaLoRA (or LoRA²) rank allocation inside a Trainer: loralib's layers put into a transformers model with
`inject`, its RankAllocator driven by `RankAllocatorCallback` after every optimizer step, the orthogonality
penalty added by `RegularizedTrainer`. (For a PEFT AdaLoRA model pass the model itself to the callback.)

    python examples/trainer/adalora_trainer.py --output_dir runs/adalora              # tiny random model
"""
from common import model_and_data, parser
from transformers import TrainingArguments

import loralib
from loralib.adalora import RankAllocator
from loralib.hf import RankAllocatorCallback, RegularizedTrainer


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--target_rank", type=int, default=4)
    args = p.parse_args(argv)
    model, train_dataset = model_and_data(args)
    loralib.inject(model, ["q_proj", "v_proj"], r=args.lora_r, lora_alpha=args.lora_alpha, method="adalora")
    allocator = RankAllocator(model, lora_r=args.lora_r, target_rank=args.target_rank,
                              init_warmup=args.max_steps // 10, final_warmup=args.max_steps // 5, mask_interval=1,
                              beta1=0.85, beta2=0.85)  # total_step: the Trainer's max_steps
    training_args = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps,
                                      learning_rate=args.learning_rate, per_device_train_batch_size=4,
                                      report_to="none", logging_steps=5, save_strategy="no")
    trainer = RegularizedTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                 regularizer=lambda m: loralib.compute_orth_regu(m, regu_weight=0.1),
                                 callbacks=[RankAllocatorCallback(allocator)])
    trainer.train()
    print(f"ranks after training: {allocator.get_rank_pattern()}")


if __name__ == "__main__":
    main()
