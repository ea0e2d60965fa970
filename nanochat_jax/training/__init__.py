"""Training: the optimizer, one step and its state, the one loop, checkpoints, the stages' shared set-up, chat-stage batches, REINFORCE."""
