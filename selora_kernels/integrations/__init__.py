"""diffusers / transformers / peft integration."""
