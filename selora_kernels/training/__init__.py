"""Fine-tuning on top of the library: datasets, the tiny offline pipeline, adapter methods, the training
loop, rank heatmaps and the program entry point (run_finetune)."""
