"""Chat tasks: datasets of conversations for midtraining, SFT, RL and evaluation (see base.py)."""
