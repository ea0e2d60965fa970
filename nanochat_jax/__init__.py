"""nanochat-jax: a pure JAX/Flax reimplementation of nanochat (tokenizer → pretraining → chat → serving)."""
