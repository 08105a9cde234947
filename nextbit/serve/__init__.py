"""Serving: an OpenAI-compatible API with continuous batching on the one engine, and a chat page."""
