"""Optimizers that know capacity buffers, and the growth of their state."""
