"""Training: the optimizer, the step and its state, the loop, checkpoints, the stages, chat and RL batches."""
