"""SeLoRALinear and the batched growth of its capacity buffers."""
