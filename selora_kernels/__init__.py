"""selora_kernels: SeLoRA (self-expanding LoRA) adapters with fused kernels, for diffusion fine-tuning.

Public API only. The layers below import downwards only: config, fisher_stats (pure) <- kernels <- ops
<- nn <- optim <- expansion, with integrations <- nn, then the methods, data, training, evaluation and
experiments packages on top.
"""
from .config import SeLoRAConfig
from .expansion.controller import ExpansionController
from .expansion.growth import expand_modules
from .fisher_stats import FisherScores
from .integrations.adapter_io import (export_peft_lora, load_adapter, merge_selora, peft_metadata,
                                      peft_state_dict, save_adapter)
from .integrations.targets import inject_selora
from .nn.selora_linear import SeLoRALinear, selora_modules
from .optim.selora_adamw import SeLoRAAdamW

__version__ = "0.1.0"

__all__ = ["SeLoRAConfig", "SeLoRALinear", "SeLoRAAdamW", "FisherScores", "expand_modules",
           "ExpansionController", "inject_selora", "selora_modules", "save_adapter", "load_adapter",
           "export_peft_lora", "merge_selora", "peft_state_dict", "peft_metadata", "__version__"]
