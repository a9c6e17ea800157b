"""The training loop and the distributed strategies (DDP, DeepSpeed ZeRO). Knows nothing of Ray."""
