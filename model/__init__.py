"""Our GPT: network, tokenizer, sampling and checkpoints."""
