"""selora_kernels: SeLoRA (self-expanding LoRA) adapters with fused kernels, for diffusion fine-tuning.

Public API only. The layers below import downwards only: config, fisher_stats (pure) <- kernels <- ops
<- nn <- optim <- expansion, with integrations <- nn, then the data and methods packages, the model
families (families: denoiser, conditioning and objective per pipeline), training, evaluation and experiments
packages on top.
"""
from importlib.util import find_spec

from .config import SeLoRAConfig
from .expansion.controller import ExpansionController
from .expansion.growth import expand_modules
from .expansion.optimizer_hooks import attach_expansion
from .fisher_stats import FisherScores
from .integrations.adapter_io import (export_peft_lora, load_adapter, merge_selora, peft_metadata,
                                      peft_state_dict, save_adapter)
from .nn.selora_linear import SeLoRALinear, selora_modules
from .optim.selora_adamw import SeLoRAAdamW

if find_spec("peft") is not None:
    from .integrations.peft_method import SeLoRALayer, inject_selora  # peft is optional: kernels, layers work without

__version__ = "0.1.0"

__all__ = ["SeLoRAConfig", "SeLoRALinear", "SeLoRAAdamW", "FisherScores", "expand_modules",
           "ExpansionController", "attach_expansion", "inject_selora", "SeLoRALayer", "selora_modules",
           "save_adapter", "load_adapter",
           "export_peft_lora", "merge_selora", "peft_state_dict", "peft_metadata", "__version__"]
