"""Text in: the BPE tokenizer and chat format, pretraining shards and their batches, the offline stand-in text."""
