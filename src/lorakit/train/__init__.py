"""Training LoRA adapters from the command line: config, data, tasks, checkpoints."""
