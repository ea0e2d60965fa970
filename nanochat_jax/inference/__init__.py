"""Inference: the device programs, the scheduler that owns the decode state, its Engine client, chat rendering."""
