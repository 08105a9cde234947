"""Stage 1b: pretraining (`nextbit train`)."""
