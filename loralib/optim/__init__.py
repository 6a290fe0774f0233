"""Optimizers of the LoRA family: LoRA+ parameter groups and the LoRA-Pro optimizers.

The DeepSpeed path (`loralib.optim.deepspeed_lorapro`) is imported on use: it needs deepspeed.
"""
from .gpt2ft import GPT2FTAdamW, lora_repo_groups  # the LoRA paper's GPT-2 AdamW
from .loraplus import apply_swapped_init, create_loraplus_optimizer, loraplus_param_groups
from .lorapro import (LoRAPair, LoRAProAdamW, LoRAProSGD, adjust_lora_gradients, equivalent_gradient,
                      lora_pairs, lorapro_gradients)

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups", "apply_swapped_init", "LoRAProAdamW",
           "LoRAProSGD", "LoRAPair", "lora_pairs", "lorapro_gradients", "equivalent_gradient",
           "adjust_lora_gradients"]
__all__ += ["GPT2FTAdamW", "lora_repo_groups"]
