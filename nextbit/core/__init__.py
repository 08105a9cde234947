"""The small core every stage builds on: config (one dial), tokenizer, model, checkpoint, optimizers, token shards, devices, atomic writes, errors."""
