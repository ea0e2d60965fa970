"""Inference: the device programs, the one scheduler that owns the decode state, the Engine client, chat rendering for front ends."""
