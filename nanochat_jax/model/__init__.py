"""The model: the GPT (classic and modern switches), attention, FP8 matmuls, parameter placement on a mesh, and nanochat checkpoint import."""
