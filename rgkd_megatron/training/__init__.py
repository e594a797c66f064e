"""Training core: engines (model + DDP + optimizer + LR schedule), steps, objectives, the loop."""
