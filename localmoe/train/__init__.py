"""Training LocalMoE's built-in model: corpus, tokenizer, model."""
