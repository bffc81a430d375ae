"""accelerate launch configurations (DDP, FSDP2), installed with the recipes."""
