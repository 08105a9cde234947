"""Training machinery (loop, schedule, run folders, the stage base of the fine-tuning stages and their batch layout,
metrics, Ctrl-C, distributed, FSDP2, bits per byte) and pretraining (`nextbit train`)."""
