"""selora_kernels: SeLoRA (self-expanding LoRA) adapters with fused kernels, for diffusion fine-tuning.

Public API only; the layers below are kernels <- ops <- optim <- nn <- expansion <- integrations.
"""
from .config import SeLoRAConfig
from .nn.growth import expand_modules
from .nn.selora_linear import FisherScores, SeLoRALinear
from .optim.selora_adamw import SeLoRAAdamW

__version__ = "0.1.0"

__all__ = ["SeLoRAConfig", "SeLoRALinear", "SeLoRAAdamW", "FisherScores", "expand_modules", "__version__"]
