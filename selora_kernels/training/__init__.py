"""Fine-tuning on top of the library: the training loop (trainer) and its checkpoints (checkpoints).
Datasets and the tiny pipeline are in selora_kernels.data, the adapter methods in selora_kernels.methods."""
