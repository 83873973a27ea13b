"""diffusers / transformers / peft integration; `export_kohya` writes kohya-ss / ComfyUI LoRA files."""
from .kohya_export import export_kohya

__all__ = ["export_kohya"]
