"""Text in: the BPE tokenizer and chat format, pretraining shards and their batches, chat-stage batches, the offline stand-in text."""
