"""loralib: LoRA and its family (AdaLoRA, LoRA², LoRA+, LoRA-Pro) for any PyTorch model.

Every public name of microsoft's loralib 0.1.2 keeps its meaning: `import loralib as lora` then
`lora.Linear`, `lora.MergedLinear`, `lora.mark_only_lora_as_trainable`, `lora.lora_state_dict`, ...
"""
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear, lora_scaling
from .utils import (count_parameters, lora_layers, lora_state_dict, mark_only_lora_as_trainable, merge_lora,
                    merged_state_dict, trainable_summary, unmerge_lora)
from .config import LoRAConfig, make_linear, register_method, target_matches

__version__ = "0.2.0"
from .inject import inject
from .dora import DoRAConv1d, DoRAConv2d, DoRAConv3d, DoRAEmbedding, DoRALinear, DoRAMergedLinear
from .init_methods import as_plain_lora, loraga_init
from .adapters import (AdapterError, AdapterSource, export_peft, import_peft, load_adapter, load_adapter_source,
                       open_adapter, save_adapter)
# Importing the method modules registers their layer types ("adalora", "lora2") with LoRAConfig.
from .adalora import (RankAllocator, SVDLinear, adalora_state, apply_rank_pattern, compute_orth_regu, rank_adaptive_layers,
                      rank_pattern, trim_ranks)
from .lora2 import LoRA2Linear, LoRA2RankAllocator, compute_lora2_orth_regu, lora2_layers, sensitivity_counts
from .optim import LoRAProAdamW, LoRAProSGD, apply_swapped_init, create_loraplus_optimizer
