"""The model: the GPT (classic and modern), attention, FP8 matmuls, mesh placement, nanochat checkpoint import."""
