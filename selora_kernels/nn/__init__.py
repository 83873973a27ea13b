"""SeLoRALinear, and the registry of its capacity buffers (slots.py) that optimizers read."""
