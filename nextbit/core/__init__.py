"""The shared core every stage builds on: tokenizer, model, checkpoint, generation, training loop."""
