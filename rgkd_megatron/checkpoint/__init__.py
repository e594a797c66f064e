"""Atomic, layout-independent checkpoints on megatron-core dist_checkpointing."""
