"""Training machinery (loop, metrics, Ctrl-C, distributed, FSDP2, bits per byte) and pretraining (`nextbit train`)."""
