"""Inference: the one generation engine (KV cache, slots, continuous batching) and `nextbit sample`."""
